"""RSS growth over 100k mixed requests: reads of every kind, answers 404
and 422 (each 422 is audited), and the connection pattern of issue 10's
guard leak: connections whose request head arrives after the header
deadline (header_timeout is 0.3 s here to make that quick). qusd against
a bare aiohttp app given the same traffic; growth from after a warm-up.
Target: hold (about +1 MiB).

    python -m bench.growth [--requests 100000] [--late 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import time

from bench import harness

HEADER_TIMEOUT = 0.3


def mixed(name: str) -> list[bytes]:
    get = harness.http_request
    return [
        get("GET", "/v1/health"),
        get("GET", "/v1/registrations"),
        get("GET", "/v1/health"),
        get("GET", f"/v1/registrations/{name}"),
        get("GET", "/v1/status"),
        get("GET", "/v1/registrations/no-such-entry"),
        get("GET", "/v1/health"),
        get("POST", "/v1/reset", b'{"scope": "everything"}'),
        get("GET", "/metrics"),
        get("GET", "/v1/registrations"),
    ]


def late_heads(path: str, count: int, batch: int = 200) -> None:
    """count connections that send half a request head, wait past the
    header deadline, then send the rest (the server may have closed them)."""
    head = harness.http_request("GET", "/v1/health")
    for _ in range(0, count, batch):
        socks = []
        for _ in range(batch):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.sendall(head[:20])
            socks.append(s)
        time.sleep(HEADER_TIMEOUT + 0.1)
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(head[20:])
        deadline = time.monotonic() + 2
        for s in socks:
            s.setblocking(False)
            while time.monotonic() < deadline:
                ready, _, _ = select.select([s], [], [], 0.05)
                if ready:
                    with contextlib.suppress(OSError):
                        s.recv(1 << 16)
                    break
            s.close()


def traffic(server: harness.Server, requests: int, late: int, name: str) -> dict[str, float]:
    mix = mixed(name)
    harness.load(server.socket, mix, 8, 60, warmup=0, limit=5000)  # warm-up
    time.sleep(0.5)
    before = server.rss()
    harness.load(server.socket, mix, 16, 600, warmup=0, limit=requests)
    late_heads(server.socket, late)
    time.sleep(HEADER_TIMEOUT + 1)
    after = server.rss()
    return {"before": before / 1024, "after": after / 1024, "growth": (after - before) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--late", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1)
    ns = ap.parse_args()
    rules = harness.foreign_rules()
    name = rules[0].name
    with harness.workspace() as tmp:

        def qusd() -> dict[str, float]:
            server = harness.start_qusd(tmp / "qusd", rules, {"header_timeout": HEADER_TIMEOUT})
            try:
                return traffic(server, ns.requests, ns.late, name)
            finally:
                server.stop()

        def bare() -> dict[str, float]:
            paths = [
                "/v1/health",
                "/v1/registrations",
                f"/v1/registrations/{name}",
                "/v1/status",
                "/metrics",
            ]
            server = harness.start_bare(tmp / "bare", b'{"status":"ok"}', paths)
            try:
                return traffic(server, ns.requests, ns.late, name)
            finally:
                server.stop()

        figures = harness.alternate(ns.rounds, {"qusd": qusd, "bare aiohttp": bare})
    print(
        f"{harness.machine()}; {ns.requests} mixed requests and {ns.late} late request "
        f"heads, RSS (MiB) after a warm-up and after, median [min-max] of {ns.rounds}:"
    )
    for server_name, f in figures.items():
        print(
            f"  {server_name:14s} before {harness.span(f['before'])}  after "
            f"{harness.span(f['after'])}  growth {harness.span(f['growth'], '{:+.2f}')}"
        )


if __name__ == "__main__":
    main()
