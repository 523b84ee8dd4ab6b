"""The typed async client: aiohttp over the daemon's Unix socket, answers as
the API's own pydantic models (qusd.models).

One API definition, bound twice (as subiquity binds its API to both ends):
the route table in qusd.api serves the daemon, and the same table makes
this client, one method per route, named after the route's handler, with
the route's request model for the body and its response model for the
answer. A route added to the table is a method here too.

    async with AsyncClient("/run/qusd/qusd.sock") as qusd:
        status = await qusd.status()                      # models.Status
        made = await qusd.register(targets=["arm64"])     # models.RegisterResponse
        entry = await qusd.patch_registration("qemu-aarch64", enabled=False)
        await qusd.delete_registration("qemu-aarch64")    # None (204)

A problem answer raises the QusdError of its code (ConflictError, ...), as
the stdlib client qusctl uses does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel

from qusd.api import ROUTES, Route
from qusd.client import default_socket, unreachable
from qusd.errors import DaemonUnavailableError, QusdError

_PARAM = re.compile(r"{(\w+)}")

Method = Callable[..., Awaitable[Any]]


class AsyncClient:
    """The daemon's API as coroutine methods, one per route of the table."""

    def __init__(
        self,
        path: str | None = None,
        *,
        timeout: float = 60.0,
        routes: Sequence[Route] = ROUTES,
    ) -> None:
        self.path = default_socket() if path is None else path
        if not self.path:
            raise DaemonUnavailableError("the socket path is empty: pass the daemon's socket")
        self.timeout = timeout
        #: operation (the handler's name) -> its route
        self.routes = {r.handler.__name__: r for r in routes}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.path),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    def __getattr__(self, name: str) -> Method:
        routes = self.__dict__.get("routes", {})
        if name not in routes:
            raise AttributeError(f"{type(self).__name__} has no operation {name!r}")
        route = routes[name]

        async def operation(*path: str, body: BaseModel | None = None, **fields: Any) -> Any:
            return await self.call(route, *path, body=body, **fields)

        operation.__name__ = name
        operation.__doc__ = route.summary
        return operation

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self.routes]

    async def call(
        self, route: Route, *path: str, body: BaseModel | None = None, **fields: Any
    ) -> Any:
        """Make route's request: path parameters in order, the body as its
        request model (or that model's fields); the answer as its response
        model (a list of them for a collection), None for 204."""
        params = _PARAM.findall(route.path)
        if len(path) != len(params):
            raise TypeError(f"{route.handler.__name__}() takes {', '.join(params) or 'no'} "
                            f"path parameter(s), got {len(path)}")  # fmt: skip
        url = route.path
        for param, value in zip(params, path, strict=True):
            url = url.replace(f"{{{param}}}", quote(value, safe=""))
        data = None
        if route.request is not None:
            if body is None:
                body = route.request.model_validate(fields)  # the server's own checks
            data = body.model_dump(mode="json", exclude_unset=True)
        elif body is not None or fields:
            raise TypeError(f"{route.handler.__name__}() takes no body")
        try:
            async with self._session_now().request(
                route.method, f"http://localhost{url}", json=data
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as e:
            raise unreachable(self.path, e.os_error) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DaemonUnavailableError(f"talking to qusd at {self.path} failed: {e}") from None
        if status >= 400:
            try:
                problem = json.loads(raw)
            except ValueError:
                problem = raw.decode(errors="replace")
            raise QusdError.from_problem(problem, status)
        if status == 204 or route.response is None:
            return json.loads(raw) if raw else None
        if route.many:
            return [route.response.model_validate(item) for item in json.loads(raw)]
        return route.response.model_validate_json(raw)
