"""A small synchronous client for the daemon's API (stdlib only, so qusctl
starts fast). A problem response becomes the QusdError of its code.
`qusd.client.AsyncClient` is the typed async one (aiohttp, pydantic models)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from qusd.errors import DaemonUnavailableError, QusdError, SocketPermissionError

if TYPE_CHECKING:
    from qusd.async_client import AsyncClient

__all__ = ["DEFAULT_SOCKET", "AsyncClient", "Client", "default_socket", "unreachable"]

DEFAULT_SOCKET = "/run/qusd/qusd.sock"
T = TypeVar("T")


def __getattr__(name: str) -> Any:
    """AsyncClient, the typed async client (qusd.async_client), brings
    aiohttp and the API's models: loaded only when asked for, so qusctl
    starts as fast as before."""
    if name == "AsyncClient":
        from qusd.async_client import AsyncClient  # noqa: PLC0415

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_socket() -> str:
    """$QUSD_SOCKET, or the system daemon's socket (an empty variable counts
    as unset, as a shell's `QUSD_SOCKET= qusctl ...` means)."""
    return os.environ.get("QUSD_SOCKET") or DEFAULT_SOCKET


def unreachable(path: str, err: OSError) -> QusdError:
    """Why the daemon at path cannot be reached, and the fix."""
    start = "start it with 'systemctl start qusd'"
    if isinstance(err, FileNotFoundError):
        return DaemonUnavailableError(
            f"qusd is not running: no socket at {path}; {start} (or pass --socket)"
        )
    if isinstance(err, ConnectionRefusedError):
        return DaemonUnavailableError(
            f"nothing listens on {path}: qusd stopped or crashed; {start}"
        )
    if isinstance(err, PermissionError):
        return SocketPermissionError(
            f"permission denied on {path}: ask an admin to add you to the qusd group "
            "(then log in again)"
        )
    if isinstance(err, NotADirectoryError):
        return DaemonUnavailableError(
            f"{path} is not a socket path: a part of it is a file; pass the daemon's socket "
            "with --socket or QUSD_SOCKET"
        )
    if "too long" in str(err):  # AF_UNIX paths hold at most 107 bytes; no errno
        return DaemonUnavailableError(
            f"the socket path {path} is {len(os.fsencode(path))} bytes, more than a Unix "
            "socket's 107: use a shorter path (a symlink to its directory works)"
        )
    if isinstance(err, TimeoutError):
        return DaemonUnavailableError(
            f"qusd at {path} did not answer in time: it is busy or hung; see "
            "'journalctl -u qusd' and restart it with 'systemctl restart qusd'"
        )
    return DaemonUnavailableError(
        f"talking to qusd at {path} failed: {err.strerror or err}; check that qusd runs "
        "('systemctl status qusd') and that this is its socket"
    )


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
        self.path = default_socket() if path is None else path
        self.timeout = timeout
        if not self.path:
            raise DaemonUnavailableError(
                "the socket path is empty: pass the daemon's socket with --socket PATH, or "
                f"leave it out for {default_socket()}"
            )

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
        except OSError as e:
            raise unreachable(self.path, e) from None
        except http.client.HTTPException as e:
            raise DaemonUnavailableError(
                f"{self.path} answered something that is not HTTP ({e!r}): is it qusd's socket?"
            ) from None

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
