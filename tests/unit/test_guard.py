"""The connection guard's books, in-process on a Unix socket: whatever
happens to connections (closed at once, a request in time, a request after
the deadline, refused over the cap), every count drains back to nothing.
The real-kernel suite shows the per-uid shares with real users
(tests/test_security.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from qusd import api, server
from qusd.config import Config
from tests.unit.conftest import World

GET = b"GET /v1/health HTTP/1.1\r\nHost: qusd\r\n\r\n"


async def client(path: str, fate: int) -> str:
    """One connection: 0 closes at once, 1 asks in time, 2 asks late."""
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return "refused"
    try:
        if fate == 2:
            await asyncio.sleep(0.3)  # past header_timeout
        if fate:
            writer.write(GET)
            got = await asyncio.wait_for(reader.read(65536), 5)
            return "answered" if got.startswith(b"HTTP/1.1 200") else "closed"
        return "left"
    except (OSError, TimeoutError):
        return "closed"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_the_books_drain_whatever_happened(world: World, tmp_path: Path) -> None:
    cfg = Config(max_connections=16, header_timeout=0.15, keepalive_timeout=30.0)
    svc = world.service(max_connections=16)
    path = str(tmp_path / "guard.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    runner, guard = await server.start(api.make_app(svc, cfg), sock, cfg)
    try:
        for _ in range(3):
            fates = await asyncio.gather(*(client(path, i % 3) for i in range(60)))
            assert "answered" in fates, fates
            await asyncio.sleep(0.3)
            assert (guard.open, guard.admitted, guard.by_uid) == (0, 0, {})
            assert not guard._waiting
        assert guard.refused > 0  # 60 at once, 16 at most
    finally:
        await runner.cleanup()
