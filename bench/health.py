"""GET /v1/health at 1, 8 and 64 connections: qusd against a bare aiohttp
app answering the same bytes. It held at 0.82-1.02 of the bare app before
the listing work: the target is to keep it (p99 at 64 included).

    python -m bench.health [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse

from bench.listing import compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8, 64])
    ns = ap.parse_args()
    compare("/v1/health", ns.connections, ns.rounds, ns.seconds)


if __name__ == "__main__":
    main()
