"""Clients that flood the daemon, run as other users by the security tests.

Standard library only, and passed to `python -c` as source: the users who
run it cannot read the checkout. Prints one JSON object.

    hold PATH N SECONDS       open N keep-alive connections, a GET on each
                              every second; how many were still answered
                              at the end (200, or 429 past the read limit)
    hammer PATH N SECONDS     N connections sending GET /v1/status back to
                              back; the answers by status
    latency PATH COUNT        COUNT GET /v1/status, each on a new
                              connection; the seconds each took (None: refused)
    churn PATH TOTAL WAVE LATE
                              TOTAL connections, WAVE at a time: a third close
                              at once, a third ask in time, a third ask LATE
                              seconds after connecting; how each ended
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time

REQUEST = b"GET /v1/%s HTTP/1.1\r\nHost: qusd\r\n\r\n"


async def answer(reader: asyncio.StreamReader) -> int:
    """Read one response; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def hold(path: str, n: int, seconds: float) -> dict[str, int]:
    """n connections, each asking for /v1/health every second."""
    served = [False] * n

    async def one(i: int) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError:
            return
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                writer.write(REQUEST % b"health")
                served[i] = await asyncio.wait_for(answer(reader), 5) in (200, 429)
                await asyncio.sleep(1)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            served[i] = False
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    return {"served": sum(served)}


async def hammer(path: str, n: int, seconds: float) -> dict[str, int]:
    counts: dict[str, int] = {}

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError:
            counts["refused"] = counts.get("refused", 0) + 1
            return
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                writer.write(REQUEST % b"status")
                status = str(await asyncio.wait_for(answer(reader), 10))
                counts[status] = counts.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            counts["closed"] = counts.get("closed", 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))
    return counts


async def latency(path: str, count: int) -> dict[str, list[float | None]]:
    took: list[float | None] = []
    for _ in range(count):
        start = time.monotonic()
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(REQUEST % b"status")
            ok = await asyncio.wait_for(answer(reader), 10) == 200
            writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            ok = False
        took.append(time.monotonic() - start if ok else None)
        await asyncio.sleep(0.05)
    return {"latency": took}


def churn(path: str, total: int, wave: int, late: float) -> dict[str, int]:
    fates: dict[str, int] = {}

    def count(key: str) -> None:
        fates[key] = fates.get(key, 0) + 1

    for _ in range(0, total, wave):
        socks = []
        for i in range(wave):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError:
                s.close()
                count("connect-failed")
                continue
            socks.append((i % 3, s))
        for fate, s in socks:
            if fate == 0:
                s.close()  # goes away without a word
            elif fate == 1:
                s.sendall(REQUEST % b"health")  # asks in time
        time.sleep(late)
        for fate, s in socks:
            if fate == 2:
                with contextlib.suppress(OSError):
                    s.sendall(REQUEST % b"health")  # after its header deadline
        for fate, s in socks:
            if fate:
                s.settimeout(5)
                try:
                    got = s.recv(65536)
                except OSError:
                    got = b""
                count(f"{fate}:{'answered' if got.startswith(b'HTTP/1.1 200') else 'closed'}")
                s.close()
    return fates


def main(argv: list[str]) -> None:
    kind, path, *rest = argv
    if kind == "hold":
        result: object = asyncio.run(hold(path, int(rest[0]), float(rest[1])))
    elif kind == "hammer":
        result = asyncio.run(hammer(path, int(rest[0]), float(rest[1])))
    elif kind == "churn":
        result = churn(path, int(rest[0]), int(rest[1]), float(rest[2]))
    else:
        result = asyncio.run(latency(path, int(rest[0])))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
