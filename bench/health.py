"""GET /v1/health at 1, 8 and 64 connections: qusd against a bare aiohttp
app answering the same bytes. It held at 0.82-1.02 of the bare app before
the listing work: the target is to keep it (p99 at 64 included).

    python -m bench.health [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

from bench import listing

if __name__ == "__main__":
    listing.main("/v1/health", __doc__)
