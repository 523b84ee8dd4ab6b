"""GET /v1/registrations (31 entries) at 1, 8 and 64 connections: qusd
against a bare aiohttp app serving the same bytes on the same kind of Unix
socket. Target: >= 0.6 of the bare app everywhere, p99 < 50 ms at 64.

    python -m bench.listing [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse

from bench import harness


def compare(target: str, connections: list[int], rounds: int, seconds: float) -> None:
    """qusd and the bare app answering the same bytes on target."""
    with harness.workspace() as tmp:
        qusd = harness.start_qusd(tmp / "qusd", harness.foreign_rules())
        try:
            status, body = harness.request(qusd.socket, "GET", target)
            assert status == 200, (status, body)
            bare = harness.start_bare(tmp / "bare", body, [target])
            try:
                n = len(body)
                print(f"GET {target}: {n} bytes; {harness.machine()}")
                req = [harness.http_request("GET", target)]
                rows = [
                    [
                        "conns",
                        "qusd req/s",
                        "bare req/s",
                        "ratio",
                        "qusd p99 ms",
                        "bare p99 ms",
                        "qusd max ms",
                    ]
                ]
                for conns in connections:

                    def run(server: harness.Server, conns: int = conns) -> dict[str, float]:
                        got = harness.load(server.socket, req, conns, seconds)
                        assert got.errors == 0, f"{server.name}: {got.errors} errors"
                        return {"rate": got.rate, "p99": got.percentile(99), "max": got.worst}

                    figures = harness.alternate(
                        rounds, {"qusd": lambda: run(qusd), "bare": lambda: run(bare)}
                    )
                    q, b = figures["qusd"], figures["bare"]
                    ratios = [x / y for x, y in zip(q["rate"], b["rate"], strict=True)]
                    rows.append(
                        [
                            str(conns),
                            harness.span(q["rate"], "{:.0f}"),
                            harness.span(b["rate"], "{:.0f}"),
                            harness.span(ratios, "{:.2f}"),
                            harness.span(q["p99"]),
                            harness.span(b["p99"]),
                            harness.span(q["max"]),
                        ]
                    )
                harness.show(
                    f"median [min-max] of {rounds} alternate rounds of {seconds:g} s:", rows
                )
            finally:
                bare.stop()
        finally:
            qusd.stop()


def main(target: str = "/v1/registrations", doc: str | None = __doc__) -> None:
    """The command line of this script and of bench/health.py (another target)."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8, 64])
    ns = ap.parse_args()
    compare(target, ns.connections, ns.rounds, ns.seconds)


if __name__ == "__main__":
    main()
