"""The HTTP API (version 1) on the daemon's Unix socket: a thin shell over the
service. Bodies are parsed into pydantic models before anything else runs;
every error leaves as application/problem+json, mapped here and only here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from qusd import __version__
from qusd.errors import (
    MalformedRequestError,
    QusdError,
    RateLimitedError,
    RequestTimeoutError,
    RequestValidationError,
    UnsupportedMediaTypeError,
)
from qusd.events import event
from qusd.models import (
    EnableRequest,
    Health,
    Problem,
    RegisterRequest,
    RegisterResponse,
    RegistrationOut,
    ResetRequest,
    ResetResponse,
    Status,
    TargetOut,
    printable,
)
from qusd.policy import Caller, RateLimiter, Role
from qusd.service import Overrides, Service

log = logging.getLogger("qusd.api")

MAX_BODY = 64 * 1024
PROBLEM_JSON = "application/problem+json"
MUTATING = frozenset({"POST", "PATCH", "DELETE"})
NOBODY = Caller(uid=-1, gid=-1, pid=0)  # no peer credentials: may only read


@dataclass(frozen=True)
class Limits:
    body_timeout: float = 10.0
    rate_limit: float = 5.0
    rate_burst: int = 20
    rate_limit_admins: bool = False


SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
BUCKETS: web.AppKey[RateLimiter] = web.AppKey("buckets", RateLimiter)
audit = logging.getLogger("qusd.audit")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body = Problem(
        type=f"urn:qusd:problem:{code}",
        title=title,
        status=status,
        detail=detail,
        code=code,
        **extra,
    )
    return web.Response(
        status=status,
        text=body.model_dump_json(exclude_none=True),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def caller(request: web.Request) -> Caller:
    """The peer, from the kernel (SO_PEERCRED), never from anything it says."""
    found: Caller | None = request.get("caller")
    if found is None:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        try:
            found = Caller.of_socket(sock) if sock is not None else NOBODY
        except OSError:
            found = NOBODY
        request["caller"] = found
    return found


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become responses; every mutation leaves an
    audit line, whatever its outcome."""
    response = await _answer(request, handler)
    if request.method in MUTATING:
        who = caller(request)
        audit.info(
            "audit: uid=%d pid=%d exe=%s action=%s %s names=%s result=%d",
            who.uid, who.pid, _escaped(who.exe() or "?"), request.method, request.raw_path,
            _escaped(",".join(request.get("names", [])) or "-"), response.status,
            extra=event("refused") if response.status == 403 else None,
        )  # fmt: skip
    return response


def _escaped(text: str) -> str:
    """One audit record is one line: control characters (and backslashes)
    escaped, so no request can forge a record."""
    return "".join(
        c
        if c.isprintable() and c != "\\"
        else c.encode("unicode_escape", "backslashreplace").decode()
        for c in printable(text)
    )


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.started(request)
    try:
        if request.method in MUTATING:
            _rate_limit(request)
        return await handler(request)
    except RateLimitedError as e:
        return problem(429, e.code, "Too many requests", e.message,
                       headers={"Retry-After": str(e.retry_after)})  # fmt: skip
    except QusdError as e:
        resp = problem(e.http_status, e.code, e.code.replace("-", " ").capitalize(), e.message)
        if isinstance(e, RequestTimeoutError):
            resp.force_close()  # the client is stalled: do not wait for the rest
        return resp
    except ValidationError as e:
        fields = [
            {"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]}
            for e_ in e.errors(include_url=False, include_input=False)
        ]
        detail = "; ".join(
            f"{'.'.join(map(str, f['loc'][1:])) or 'body'}: {f['msg']}" for f in fields
        )
        return problem(422, RequestValidationError.code, "Invalid request", detail, errors=fields)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(e.status, "http")
        kept = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return problem(e.status, code, e.reason, e.text or e.reason, headers=kept)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return problem(500, "internal", "Internal error", "internal error; see the daemon's log")


def _rate_limit(request: web.Request) -> None:
    limits, who = request.app[LIMITS], caller(request)
    svc = request.app[SERVICE]
    if svc.policy.role(who) is Role.ADMIN and not limits.rate_limit_admins:
        return
    wait = request.app[BUCKETS].take(who.uid)
    if wait > 0:
        raise RateLimitedError(
            f"uid {who.uid} sent more than {limits.rate_burst} changes in a burst "
            f"(at most {limits.rate_limit:g} a second); retry in {math.ceil(wait)} s",
            retry_after=math.ceil(wait),
        )


async def body(request: web.Request, model: type[Any]) -> Any:
    """Parse and validate a JSON body; an empty body counts as {}."""
    timeout = request.app[LIMITS].body_timeout
    try:
        # aiohttp refuses more than client_max_size with 413
        raw = await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise RequestTimeoutError(f"the body did not arrive within {timeout:g} s") from None
    if not raw.strip():
        raw = b"{}"
    elif request.content_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"the body is {request.content_type or 'untyped'}; send it as application/json"
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedRequestError(f"the body is not JSON: {e}") from None
    except RecursionError:
        raise MalformedRequestError("the body is nested too deeply") from None
    svc = request.app[SERVICE]
    return model.model_validate(data, context={"catalog": svc.catalog})


def reply(model: BaseModel | list[Any], status: int = 200) -> web.Response:
    if isinstance(model, list):
        text = "[" + ",".join(m.model_dump_json() for m in model) + "]"
    else:
        text = model.model_dump_json()
    return web.Response(status=status, text=text, content_type="application/json")


# -- handlers ----------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return reply(Health())


async def status(request: web.Request) -> web.Response:
    return reply(Status.model_validate(request.app[SERVICE].status()))


async def targets(request: web.Request) -> web.Response:
    return reply([TargetOut.of(t) for t in request.app[SERVICE].targets()])


async def list_registrations(request: web.Request) -> web.Response:
    return reply([RegistrationOut.of(r) for r in request.app[SERVICE].registrations()])


async def get_registration(request: web.Request) -> web.Response:
    return reply(RegistrationOut.of(request.app[SERVICE].registration(request.match_info["name"])))


async def register(request: web.Request) -> web.Response:
    req: RegisterRequest = await body(request, RegisterRequest)
    svc, who = request.app[SERVICE], caller(request)
    overrides = Overrides(req.force, req.allow_untrusted_interpreter)
    if req.entry is not None:
        request["names"] = [req.entry.name]
        result = await svc.register_entry(
            who,
            req.entry.rule(),
            persistent=req.persistent,
            replace_existing=req.replace,
            overrides=overrides,
        )
    else:
        request["names"] = req.targets or ["(all foreign)"]
        flags = req.flags if req.flags is not None else "F"
        result = await svc.register_targets(
            who,
            req.targets,
            flags,
            persistent=req.persistent,
            replace_existing=req.replace,
            overrides=overrides,
        )
    return reply(
        RegisterResponse(
            registered=[RegistrationOut.of(r) for r in result.registered],
            unchanged=[RegistrationOut.of(r) for r in result.unchanged],
        ),
        status=201,
    )


async def patch_registration(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    request["names"] = [name]
    req: EnableRequest = await body(request, EnableRequest)
    reg = await request.app[SERVICE].set_enabled(caller(request), name, req.enabled)
    return reply(RegistrationOut.of(reg))


async def delete_registration(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    request["names"] = [name]
    await request.app[SERVICE].unregister(caller(request), name)
    return web.Response(status=204)


async def reset(request: web.Request) -> web.Response:
    req: ResetRequest = await body(request, ResetRequest)
    request["names"] = [f"scope={req.scope}"]
    removed = await request.app[SERVICE].reset(caller(request), req.scope)
    return reply(ResetResponse(removed=[printable(n) for n in removed]))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


# -- the route table, the one source of routes and of the OpenAPI document -----


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    many: bool = False
    status: int = 200
    errors: tuple[int, ...] = ()


ROUTES = (
    Route("GET", "/v1/health", health, "Liveness", response=Health),
    Route("GET", "/v1/status", status, "Daemon, kernel and table status", response=Status),
    Route("GET", "/v1/targets", targets, "The target catalog", response=TargetOut, many=True),
    Route("GET", "/v1/registrations", list_registrations, "Every entry in the kernel",
          response=RegistrationOut, many=True, errors=(503,)),
    Route("GET", "/v1/registrations/{name}", get_registration, "One entry",
          response=RegistrationOut, errors=(404, 503)),
    Route("POST", "/v1/registrations", register, "Register targets or a custom entry",
          request=RegisterRequest, response=RegisterResponse, status=201,
          errors=(400, 403, 408, 409, 413, 415, 422, 429, 503)),
    Route("PATCH", "/v1/registrations/{name}", patch_registration, "Enable or disable an entry",
          request=EnableRequest, response=RegistrationOut,
          errors=(400, 403, 404, 408, 413, 415, 422, 429, 503)),
    Route("DELETE", "/v1/registrations/{name}", delete_registration,
          "Remove an entry from the kernel and the state", status=204,
          errors=(403, 404, 429, 503)),
    Route("POST", "/v1/reset", reset, "Remove managed, qemu-* or all entries",
          request=ResetRequest, response=ResetResponse,
          errors=(400, 403, 408, 413, 415, 422, 429, 503)),
)  # fmt: skip


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1, generated from the route table and the models."""
    models: set[type[BaseModel]] = {Problem}
    for r in ROUTES:
        models.update(m for m in (r.request, r.response) if m is not None)
    _, schemas = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "responses": {},
        }
        if "{name}" in r.path:
            op["parameters"] = [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        if r.request is not None:
            op["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": _ref(r.request)}},
            }
        if r.response is not None:
            schema: dict[str, Any] = _ref(r.response)
            if r.many:
                schema = {"type": "array", "items": schema}
            op["responses"][str(r.status)] = {
                "description": r.summary,
                "content": {"application/json": {"schema": schema}},
            }
        else:
            op["responses"][str(r.status)] = {"description": r.summary}
        for code in (*r.errors, 500):
            op["responses"][str(code)] = {
                "description": "problem details",
                "content": {PROBLEM_JSON: {"schema": problem_ref}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1 document"}},
        }
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "qusd", "version": __version__,
                 "description": "QEMU user-mode binfmt_misc registrations, over a Unix socket"},
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {})},
    }  # fmt: skip
    return doc


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


OPENAPI = openapi_document()


def make_app(service: Service, limits: Limits | None = None) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[LIMITS] = limits = limits or Limits()
    app[BUCKETS] = RateLimiter(limits.rate_limit, limits.rate_burst)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    app.router.add_get("/openapi.json", openapi)
    return app


class ConnectionGuard:
    """The protocol factory for the listening socket: at most max_connections
    open at once (more are closed at once), and a client that has not sent a
    whole request head within header_timeout is disconnected, so slow or
    flooding clients cannot hold the daemon's memory or its connections.
    (A keep-alive connection's later requests are bounded by
    keepalive_timeout, like an idle one.)"""

    def __init__(self, server: web.Server, max_connections: int, header_timeout: float) -> None:
        self.server = server
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.refused = 0
        # the server learns of a connection only in connection_made, which
        # asyncio calls on the next loop iteration: handlers made since then
        # count too, so a batch of accepts cannot overshoot
        self._pending = 0
        # handlers whose first request arrived; each leaves at its deadline
        self._started: set[object] = set()

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) + self._pending >= self.max_connections:
            self.refused += 1
            return _Refuse()
        loop = asyncio.get_running_loop()
        if self._pending == 0:
            loop.call_soon(self._settled)
        self._pending += 1
        handler = self.server()
        loop.call_later(self.header_timeout, self._deadline, handler)
        return handler

    def _settled(self) -> None:
        self._pending = 0

    def started(self, request: web.BaseRequest) -> None:
        """Called for every request whose head arrived."""
        self._started.add(request.protocol)

    def _deadline(self, handler: web.RequestHandler) -> None:
        if handler in self._started:
            self._started.discard(handler)
        elif handler.transport is not None:
            log.debug("closing a connection that sent no request in %gs", self.header_timeout)
            handler.force_close()  # closes the transport too


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


GUARD: web.AppKey[ConnectionGuard] = web.AppKey("guard", ConnectionGuard)


async def start_server(
    app: web.Application,
    sock: socket.socket,
    *,
    max_connections: int,
    header_timeout: float,
    keepalive_timeout: float,
) -> tuple[web.AppRunner, asyncio.Server]:
    """Serve app on an already listening Unix socket, behind a ConnectionGuard."""
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=10,
        keepalive_timeout=keepalive_timeout,
        # after an early answer (413, 408) read what the client still sends
        # for a moment only: it must not hold a connection slot
        lingering_time=1.0,
    )
    await runner.setup()
    assert runner.server is not None
    guard = ConnectionGuard(runner.server, max_connections, header_timeout)
    app[GUARD] = guard
    server = await asyncio.get_running_loop().create_unix_server(guard, sock=sock)
    return runner, server
