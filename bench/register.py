"""Registering one entry (and removing it again) with 10 and with 1000
entries in the table, all of them qusd's own persistent records: two
daemons, measured alternately. Target: 1000 costs <= 1.2x what 10 does.

    python -m bench.register [--rounds 5] [--cycles 40]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

from bench import harness

REGISTER = json.dumps({"targets": ["aarch64"]}).encode()


def cycles(server: harness.Server, count: int) -> dict[str, float]:
    """count register + unregister cycles: median latency of each (ms) and
    the daemon's CPU per cycle (ms)."""
    post, delete = [], []
    cpu = server.cpu()
    for _ in range(count):
        start = time.perf_counter()
        status, body = harness.request(server.socket, "POST", "/v1/registrations", REGISTER)
        post.append(time.perf_counter() - start)
        assert status == 201, (status, body)
        start = time.perf_counter()
        status, body = harness.request(server.socket, "DELETE", "/v1/registrations/qemu-aarch64")
        delete.append(time.perf_counter() - start)
        assert status == 204, (status, body)
    return {
        "register": harness.median(post) * 1000,
        "unregister": harness.median(delete) * 1000,
        "cpu": (server.cpu() - cpu) / count * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=40)
    ns = ap.parse_args()
    with harness.workspace() as tmp:
        servers = {n: harness.start_qusd(tmp / str(n), harness.filler_rules(n)) for n in (10, 1000)}
        try:
            for server in servers.values():
                cycles(server, 2)  # the first registration finds what the host runs natively
            figures = harness.alternate(
                ns.rounds,
                {
                    f"{n} entries": functools.partial(cycles, server, ns.cycles)
                    for n, server in servers.items()
                },
            )
        finally:
            for server in servers.values():
                server.stop()
    print(
        f"{harness.machine()}; {ns.rounds} alternate rounds of {ns.cycles} cycles "
        "(POST /v1/registrations, DELETE), median [min-max] ms:"
    )
    rows = [["table", "register", "unregister", "daemon CPU per cycle"]]
    for name, f in figures.items():
        rows.append(
            [
                name,
                harness.span(f["register"], "{:.2f}"),
                harness.span(f["unregister"], "{:.2f}"),
                harness.span(f["cpu"], "{:.2f}"),
            ]
        )
    small, big = figures["10 entries"], figures["1000 entries"]
    ratio = [b / s for s, b in zip(small["register"], big["register"], strict=True)]
    ratio_cpu = [b / s for s, b in zip(small["cpu"], big["cpu"], strict=True)]
    rows.append(
        [
            "1000 / 10",
            harness.span(ratio, "{:.2f}x"),
            harness.span(
                [b / s for s, b in zip(small["unregister"], big["unregister"], strict=True)],
                "{:.2f}x",
            ),
            harness.span(ratio_cpu, "{:.2f}x"),
        ]
    )
    harness.show("", rows)


if __name__ == "__main__":
    main()
