"""Idle RSS: qusd with its 31 registrations, started and asked once for
its health, its registrations and its status, against a bare aiohttp app
that answered the same requests. Target: <= 45 MiB.

    python -m bench.memory [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

from bench import harness

PATHS = ("/v1/health", "/v1/registrations", "/v1/status")


def idle(server: harness.Server) -> dict[str, float]:
    for path in PATHS:
        status, _ = harness.request(server.socket, "GET", path)
        assert status == 200, (server.name, path, status)
    time.sleep(1.0)
    return {"MiB": server.rss() / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args()
    with harness.workspace() as tmp:
        rules = harness.foreign_rules()
        body = b""

        def qusd() -> dict[str, float]:
            nonlocal body
            server = harness.start_qusd(tmp / "qusd", rules)
            try:
                body = harness.request(server.socket, "GET", "/v1/registrations")[1]
                return idle(server)
            finally:
                server.stop()

        def bare() -> dict[str, float]:
            server = harness.start_bare(tmp / "bare", body, PATHS)
            try:
                return idle(server)
            finally:
                server.stop()

        figures = harness.alternate(ns.rounds, {"qusd": qusd, "bare aiohttp": bare})
    q, b = harness.median(figures["qusd"]["MiB"]), harness.median(figures["bare aiohttp"]["MiB"])
    print(
        f"{harness.machine()}; {len(rules)} registrations; idle RSS after "
        f"GET {', '.join(PATHS)}, {ns.rounds} alternate rounds, median [min-max] MiB:"
    )
    for name, f in figures.items():
        print(f"  {name:14s} {harness.span(f['MiB'])}")
    print(f"qusd / bare: {q / b:.2f}")


if __name__ == "__main__":
    main()
