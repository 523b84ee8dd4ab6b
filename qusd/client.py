"""A small synchronous client for the daemon's API (stdlib only, so qusctl
starts fast). A problem response becomes the QusdError of its code."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from qusd.errors import DaemonUnavailableError, QusdError, SocketPermissionError

DEFAULT_SOCKET = "/run/qusd/qusd.sock"
T = TypeVar("T")


def default_socket() -> str:
    return os.environ.get("QUSD_SOCKET", DEFAULT_SOCKET)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, path: str | None = None, timeout: float = 60.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer (None for 204); QusdError on any failure."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            resp = self._send(conn, method, path, body)
            raw = self._guard(resp.read)
        finally:
            conn.close()
        return _decode(resp, raw)

    def stream(self, path: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Each line of a newline-delimited JSON answer (GET /v1/events), as
        it arrives, until the daemon ends the stream; QusdError on failure."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            resp = self._send(conn, "GET", path, None)
            if resp.status >= 400:
                _decode(resp, self._guard(resp.read))
            assert conn.sock is not None
            conn.sock.settimeout(timeout)
            while True:
                raw = self._guard(resp.readline)
                if not raw:
                    return
                if raw.strip():
                    yield json.loads(raw)
        finally:
            conn.close()

    def _send(
        self, conn: _UnixConnection, method: str, path: str, body: Any
    ) -> http.client.HTTPResponse:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"

        def send() -> http.client.HTTPResponse:
            conn.request(method, path, body=data, headers=headers)
            return conn.getresponse()

        return self._guard(send)

    def _guard(self, fn: Callable[[], T]) -> T:
        """fn(), its socket and HTTP failures as the errors that name the fix."""
        try:
            return fn()
        except FileNotFoundError:
            raise DaemonUnavailableError(
                f"qusd is not running: no socket at {self.path}; start it with "
                "'systemctl start qusd' (or pass --socket)"
            ) from None
        except ConnectionRefusedError:
            raise DaemonUnavailableError(
                f"nothing listens on {self.path}: qusd stopped or crashed; "
                "start it with 'systemctl start qusd'"
            ) from None
        except PermissionError:
            raise SocketPermissionError(
                f"permission denied on {self.path}: ask an admin to add you to the "
                "qusd group (then log in again)"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnavailableError(f"talking to qusd at {self.path} failed: {e}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)


def _decode(resp: http.client.HTTPResponse, raw: bytes) -> Any:
    if resp.status == 204 or not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise QusdError(f"qusd answered {resp.status} with a body that is not JSON") from None
    if resp.status >= 400:
        raise QusdError.from_problem(doc, resp.status)
    return doc
