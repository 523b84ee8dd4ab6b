"""Start to READY=1: `qusd --sandbox` with 31 persistent entries in its
state (restored at start, into a fresh private binfmt_misc each time),
from exec to the READY=1 it sends to NOTIFY_SOCKET, against `python -c
pass` and `python -c "import aiohttp.web, pydantic"` (each to its exit).
Target: < 250 ms.

    python -m bench.startup [--rounds 15] [--importtime]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import harness


def ready_time(workdir: Path, notify: socket.socket, path: str, importtime: bool) -> float:
    """Seconds from exec to READY=1; the daemon is stopped again."""
    sock = str(workdir / "qusd.sock")
    argv = [
        harness.QUSD,
        "--sandbox",
        "--socket",
        sock,
        "--state-dir",
        str(workdir / "state"),
        "--config",
        str(workdir / "qusd.toml"),
        "--log-level",
        "warning",
    ]
    if importtime:
        argv = [sys.executable, "-X", "importtime", *argv]
    env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": path}
    log = (workdir / "imports.txt").open("wb")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        notify.settimeout(30)
        while True:
            msg = notify.recv(4096)
            if b"READY=1" in msg.split(b"\n"):
                took = time.perf_counter() - start
                break
        got = len(harness.request_json(sock, "GET", "/v1/registrations"))
        assert got == 31 or got == len(harness.foreign_rules()), got
    finally:
        proc.terminate()
        proc.wait()
        log.close()
    return took


def exit_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument(
        "--importtime",
        action="store_true",
        help="print the slowest imports of one start (python -X importtime)",
    )
    ns = ap.parse_args()
    with harness.workspace() as tmp:
        harness.write_state(tmp / "state", harness.foreign_rules())
        (tmp / "qusd.toml").write_text('[qusd]\ninterpreter_store = ""\n')
        path = str(tmp / "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(path)
        if ns.importtime:
            ready_time(tmp, notify, path, True)
            print((tmp / "imports.txt").read_text())
            return
        py = sys.executable
        figures = harness.alternate(
            ns.rounds,
            {
                "qusd start to READY=1": lambda: {"s": ready_time(tmp, notify, path, False)},
                "python -c pass": lambda: {"s": exit_time([py, "-c", "pass"])},
                "import aiohttp.web, pydantic": lambda: {
                    "s": exit_time([py, "-c", "import aiohttp.web, pydantic"])
                },
            },
        )
    med = {name: harness.median(f["s"]) * 1000 for name, f in figures.items()}
    print(f"{harness.machine()}; {ns.rounds} alternate rounds, median [min-max] ms:")
    for name, f in figures.items():
        print(f"  {name:30s} {harness.span([s * 1000 for s in f['s']])}")
    q = med["qusd start to READY=1"]
    print(f"qusd / import aiohttp.web, pydantic: {q / med['import aiohttp.web, pydantic']:.2f}")
    print(f"qusd / python -c pass:               {q / med['python -c pass']:.1f}")


if __name__ == "__main__":
    main()
