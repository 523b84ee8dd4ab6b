"""GET /v1/registrations with 10 and with 1000 entries, and what a big
table does to everyone else: two daemons, measured alternately.

- listing: the median answer, asked again and again (steady), and just
  after the table changed (each GET follows a register or an unregister of
  another entry);
- stall: a health probe every 5 ms while another client lists in a loop,
  a third registers and unregisters (each in a process of its own), and
  the reconcile runs every second.

Target: listing linear in entries, and the probe no slower with 1000.

    python -m bench.large_table [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import time

from bench import harness

REGISTER = json.dumps({"targets": ["aarch64"]}).encode()


def listing(server: harness.Server, count: int = 30) -> dict[str, float]:
    steady, changed = [], []
    for _ in range(count):
        start = time.perf_counter()
        status, _ = harness.request(server.socket, "GET", "/v1/registrations")
        steady.append(time.perf_counter() - start)
        assert status == 200
    for i in range(count):
        if i % 2 == 0:
            harness.request(server.socket, "POST", "/v1/registrations", REGISTER)
        else:
            harness.request(server.socket, "DELETE", "/v1/registrations/qemu-aarch64")
        start = time.perf_counter()
        status, _ = harness.request(server.socket, "GET", "/v1/registrations")
        changed.append(time.perf_counter() - start)
        assert status == 200
    harness.request(server.socket, "DELETE", "/v1/registrations/qemu-aarch64")
    return {"steady": harness.median(steady) * 1000, "changed": harness.median(changed) * 1000}


def _list_forever(path: str) -> None:
    while True:
        harness.request(path, "GET", "/v1/registrations")


def _change_forever(path: str) -> None:
    while True:
        harness.request(path, "POST", "/v1/registrations", REGISTER)
        harness.request(path, "DELETE", "/v1/registrations/qemu-aarch64")
        time.sleep(0.05)


def stall(server: harness.Server, seconds: float = 4.0) -> dict[str, float]:
    """Health probe latencies while others list and change the table (in
    processes of their own: the probe never waits for the client's GIL)."""
    fork = multiprocessing.get_context("fork")
    others = [fork.Process(target=fn, args=(server.socket,), daemon=True)
              for fn in (_list_forever, _change_forever)]  # fmt: skip
    for p in others:
        p.start()
    probes: list[float] = []
    try:
        time.sleep(0.2)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            status, _ = harness.request(server.socket, "GET", "/v1/health")
            probes.append(time.perf_counter() - start)
            assert status == 200
            time.sleep(0.005)
    finally:
        for p in others:
            p.kill()
            p.join()
    harness.request(server.socket, "DELETE", "/v1/registrations/qemu-aarch64")
    probes.sort()
    return {
        "probe p50": probes[len(probes) // 2] * 1000,
        "probe p99": probes[int(len(probes) * 0.99)] * 1000,
        "probe max": probes[-1] * 1000,
    }


def both(server: harness.Server) -> dict[str, float]:
    return {**listing(server), **stall(server)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ns = ap.parse_args()
    with harness.workspace() as tmp:
        servers = {
            n: harness.start_qusd(tmp / str(n), harness.filler_rules(n), {"reconcile_interval": 1})
            for n in (10, 1000)
        }
        try:
            for server in servers.values():  # the first registration finds what the host runs
                harness.request(server.socket, "POST", "/v1/registrations", REGISTER)
                harness.request(server.socket, "DELETE", "/v1/registrations/qemu-aarch64")
            figures = harness.alternate(
                ns.rounds,
                {f"{n} entries": functools.partial(both, server) for n, server in servers.items()},
            )
        finally:
            for server in servers.values():
                server.stop()
    print(f"{harness.machine()}; {ns.rounds} alternate rounds, median [min-max] ms:")
    keys = ["steady", "changed", "probe p50", "probe p99", "probe max"]
    rows = [
        ["table", "GET list", "GET list after a change", "health p50", "health p99", "health max"]
    ]
    for name, f in figures.items():
        rows.append([name, *(harness.span(f[k], "{:.2f}") for k in keys)])
    small, big = figures["10 entries"], figures["1000 entries"]
    per = [(b - s) / 990 * 1000 for s, b in zip(small["changed"], big["changed"], strict=True)]
    harness.show("", rows)
    print(f"listing after a change, per entry beyond 10: {harness.span(per, '{:.1f}')} us")


if __name__ == "__main__":
    main()
