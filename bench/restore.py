"""The boot restore: `qusd restore` putting the 31 foreign targets back
into a fresh table, against the real /usr/lib/systemd/systemd-binfmt
registering the same rules (a binfmt.d file), and against the floor of any
Python tool: `python -c pass`, and the leanest Python doing systemd-binfmt's
whole job (Debian's /usr/bin/python3 -I -S, no import at all, writing each
line of the same binfmt.d file to the register file). And the boot path as
shipped: systemd-binfmt loading the file qusd hands it
(`<state_dir>/binfmt.conf`, qusd/handoff.py), which is what registers an
admin's entries at boot before qusd starts. Inside one sandbox (a private
binfmt_misc: nothing on the host changes); every run starts from an empty
table and is checked to leave every entry there. Target: <= 2.0x
systemd-binfmt.

    python -m bench.restore [--rounds 21] [--importtime]
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
from pathlib import Path

from bench import harness
from qusd import handoff, sandbox
from qusd.binfmt import BinfmtMisc

SYSTEMD_BINFMT = "/usr/lib/systemd/systemd-binfmt"
SYSTEM_PYTHON = "/usr/bin/python3"
#: systemd-binfmt's job in Python, as lean as Python goes: no module imported
LEAN = "import sys\nfor line in open(sys.argv[1]):\n    open(sys.argv[2], 'w').write(line)\n"


def measure(rounds: int, importtime: bool) -> None:
    """Inside the sandbox: each command from an empty table, alternately."""
    rules = harness.foreign_rules()
    kernel = BinfmtMisc()
    with harness.workspace() as tmp:
        harness.write_state(tmp / "state", rules)
        (tmp / "qusd.toml").write_text('[qusd]\ninterpreter_store = ""\n')
        conf = tmp / "qemu.conf"  # binfmt.d(5): one register line a line
        conf.write_text("".join(r.encode().decode() + "\n" for r in rules))
        restore = [
            harness.QUSD,
            "restore",
            "--state-dir",
            str(tmp / "state"),
            "--config",
            str(tmp / "qusd.toml"),
        ]
        kernel.remove_all()
        subprocess.run(restore, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        handed = tmp / "state" / handoff.FILENAME  # written by that restore
        assert len(handoff.read(tmp / "state")) == len(rules)
        if importtime:
            kernel.remove_all()
            out = subprocess.run(
                [sys.executable, "-X", "importtime", *restore],
                capture_output=True,
                text=True,
                check=True,
            )
            print("\n".join(line for line in out.stderr.splitlines() if "import time" in line))
            kernel.remove_all()
            return
        commands = {
            "qusd restore": (restore, len(rules)),
            "systemd-binfmt": ([SYSTEMD_BINFMT, str(conf)], len(rules)),
            "boot hand-off": ([SYSTEMD_BINFMT, str(handed)], len(rules)),
            "python -c pass": ([sys.executable, "-c", "pass"], 0),
            "lean python": (
                [SYSTEM_PYTHON, "-I", "-S", "-c", LEAN, str(conf), str(kernel.path / "register")],
                len(rules),
            ),
        }

        def timed(argv: list[str], expect: int) -> dict[str, float]:
            kernel.remove_all()
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            took = time.perf_counter() - start
            assert len(kernel.names()) == expect, (argv, kernel.names())
            return {"ms": took * 1000}

        figures = harness.alternate(
            rounds,
            {name: functools.partial(timed, argv, n) for name, (argv, n) in commands.items()},
        )
        kernel.remove_all()
    med = {name: harness.median(f["ms"]) for name, f in figures.items()}
    print(f"{harness.machine()}")
    print(
        f"{len(rules)} registrations from an empty table, {rounds} alternate rounds, "
        "median [min-max] ms:"
    )
    for name, f in figures.items():
        print(f"  {name:16s} {harness.span(f['ms'])}")
    print(f"qusd restore / systemd-binfmt: {med['qusd restore'] / med['systemd-binfmt']:.1f}x")
    print(
        "boot hand-off (systemd-binfmt with qusd's binfmt.conf) / systemd-binfmt: "
        f"{med['boot hand-off'] / med['systemd-binfmt']:.2f}x"
    )
    print(f"qusd restore / python -c pass: {med['qusd restore'] / med['python -c pass']:.2f}x")
    print(
        f"lean python (python3 -I -S doing systemd-binfmt's job) / systemd-binfmt: "
        f"{med['lean python'] / med['systemd-binfmt']:.1f}x"
    )
    floor = med["python -c pass"] + med["systemd-binfmt"]
    print(
        f"floor for a Python tool (python -c pass + systemd-binfmt's work): {floor:.1f} ms = "
        f"{floor / med['systemd-binfmt']:.1f}x systemd-binfmt"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument(
        "--importtime",
        action="store_true",
        help="print `python -X importtime` of one restore instead",
    )
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.inside:
        measure(ns.rounds, ns.importtime)
        return
    cmd = [sys.executable, "-m", "bench.restore", "--inside", "--rounds", str(ns.rounds)]
    if ns.importtime:
        cmd.append("--importtime")
    subprocess.run(sandbox.command(cmd), check=True, cwd=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    main()
