"""How fast does `qusd restore` put the registrations back at boot?

Restores every foreign target qusd finds an interpreter for, inside a
sandbox (a private binfmt_misc: nothing on the host changes), against the
baseline every peer uses: a shell loop writing the same rules to `register`
(what QEMU's qemu-binfmt-conf.sh and qus do), and against a bare Python
start (the floor for any Python tool). Each run starts from an empty table
and checks that every entry is there afterwards. Prints medians and ratios:

    .venv/bin/python bench/restore.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qusd import catalog, interpreters, sandbox
from qusd.binfmt import BinfmtMisc
from qusd.state import Record, State

QUSD = str(Path(sys.executable).parent / "qusd")


def measure(runs: int) -> None:
    """Inside the sandbox: time each command from an empty table."""
    cat = catalog.builtin()
    family = catalog.family_of(catalog.host_machine())
    rules = [t.rule(f.path, "F") for t in cat.foreign(family) if (f := interpreters.find(t))]
    kernel = BinfmtMisc()
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        State(state_dir).save({r.name: Record(r, persistent=True) for r in rules})
        (Path(tmp) / "empty.toml").write_text("")
        script = Path(tmp) / "register.sh"
        script.write_bytes(
            b"".join(
                b"printf '%s\\n' '" + r.encode().replace(b"\\", b"\\\\") + b"'"
                b" > /proc/sys/fs/binfmt_misc/register\n"
                for r in rules
            )
        )
        commands = {
            "python -c pass": ([sys.executable, "-c", "pass"], 0),
            "shell loop": (["sh", str(script)], len(rules)),
            "qusd restore": (
                [
                    QUSD,
                    "restore",
                    "--state-dir",
                    str(state_dir),
                    "--config",
                    str(Path(tmp) / "empty.toml"),
                ],
                len(rules),
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, (argv, expect) in commands.items():
                kernel.remove_all()
                start = time.perf_counter()
                subprocess.run(
                    argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                times[name].append(time.perf_counter() - start)
                assert len(kernel.names()) == expect, (name, kernel.names())
        kernel.remove_all()
    med = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    print(f"{len(rules)} registrations, {runs} runs each, median wall time from an empty table:")
    for name, ms in med.items():
        print(f"  {name:15s} {ms:7.1f} ms")
    print(f"qusd restore / shell loop:     {med['qusd restore'] / med['shell loop']:.1f}x")
    print(f"qusd restore / python -c pass: {med['qusd restore'] / med['python -c pass']:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.inside:
        measure(ns.runs)
        return
    cmd = [sys.executable, str(Path(__file__).resolve()), "--inside", "--runs", str(ns.runs)]
    subprocess.run(sandbox.command(cmd), check=True)


if __name__ == "__main__":
    main()
