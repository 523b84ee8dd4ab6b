"""The boot path, in a real Debian 12 booted twice (`make test-vm`).

tools/vm/run.sh boots the image tools/vm/image.sh builds (debootstrap,
cached outside the checkout) under qemu-system-x86_64 -accel tcg, with
dist/qusd_*.deb and tools/vm/check.sh on a second disk. Inside, check.sh
installs the package with apt-get and checks, as an admin and users live
them, the promises of README's "Running under systemd" and "Living with the
distribution's binfmt.d rules"; it reports each step on the second serial
port. Here every step is one test, failing with the step's name and what it
printed; the logs and the VM's disk stay in build/vm/.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field

import pytest

from tests.conftest import FOREIGN_DIR, ROOT

#: What check.sh runs at each boot, in order.
STEPS = {
    "boot1": (
        "install",
        "units",
        "socket",
        "accounts",
        "user-debian-rule",
        "user-free-target",
        "user-refused",
        "outsider-refused",
        "admin-replace",
        "record",
    ),
    "boot2": (
        "restored",
        "journal",
        "chroot-f",
        "binfmt-restart",
        "sigkill",
        "watchdog",
        "handoff",
        "stop-keeps",
        "security",
    ),
}
NAMES = [f"{boot}/{step}" for boot, steps in STEPS.items() for step in steps]
OUT = ROOT / "build" / "vm"
LINE = re.compile(r"^qusd-vm: (begin|end|done) (\S+)(?: (ok|FAIL))?(?: (.*))?$")


@dataclass
class Step:
    result: str = ""  # "ok" or "FAIL"; "" when the step never ended
    details: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


@dataclass
class Run:
    steps: dict[str, Step]  # "boot1/install" -> its report
    done: set[str]  # boots whose checks all ran
    output: str  # run.sh's, with its exit status

    def stopped_at(self, boot: str) -> str | None:
        """The first step of boot that did not report its end."""
        return next(
            (n for n in NAMES if n.startswith(f"{boot}/") and not self.steps.get(n, Step()).result),
            None,
        )

    def console_tail(self, boot: str, n: int = 40) -> str:
        log = OUT / f"console-{boot}.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return f"--- last lines of {log}:\n" + "\n".join(lines[-n:])


def parse(text: str, steps: dict[str, Step], done: set[str]) -> None:
    """check.sh's report: begin/end lines around what each step printed."""
    current: Step | None = None
    for line in text.replace("\r", "").splitlines():
        m = LINE.match(line)
        if m is None:
            if current is not None:
                current.lines.append(line)
        elif m.group(1) == "begin":
            current = steps[m.group(2)] = Step()
        elif m.group(1) == "end":
            step = steps.setdefault(m.group(2), Step())
            step.result = m.group(3) or "FAIL"
            step.details = dict(kv.split("=", 1) for kv in (m.group(4) or "").split() if "=" in kv)
            current = None
        else:
            done.add(m.group(2))


@pytest.fixture(scope="module")
def vm() -> Run:
    if os.geteuid() != 0:
        pytest.skip("the VM's image is built with debootstrap, as root")
    debs = sorted((ROOT / "dist").glob("qusd_*.deb"))
    if not debs:
        pytest.skip("dist/qusd_*.deb is missing: `make deb` (and `make test`) build it")
    assert len(debs) == 1, f"more than one qusd package in dist/: {debs}"
    res = subprocess.run(
        ["sh", str(ROOT / "tools/vm/run.sh"), str(debs[0]), str(OUT)],
        capture_output=True, text=True, check=False, timeout=3600,
        env=dict(os.environ, QUSD_FOREIGN_DIR=str(FOREIGN_DIR)),
    )  # fmt: skip
    steps: dict[str, Step] = {}
    done: set[str] = set()
    for boot in STEPS:
        report = OUT / f"report-{boot}.log"
        if report.exists():
            parse(report.read_text(errors="replace"), steps, done)
    output = f"--- tools/vm/run.sh exited {res.returncode}:\n{res.stdout}{res.stderr}"
    return Run(steps, done, output)


@pytest.mark.parametrize("name", NAMES)
def test_step(vm: Run, name: str) -> None:
    boot = name.split("/", 1)[0]
    step = vm.steps.get(name, Step())
    text = "\n".join(step.lines)
    if not step.result:
        first = vm.stopped_at(boot)
        if first != name:  # that step's test shows the logs
            pytest.fail(f"{name} was not reported: the checks of {boot} stopped at {first}")
        how = "never ended" if name in vm.steps else "was not reported"
        pytest.fail(f"{name} {how}:\n{text}\n{vm.output}\n{vm.console_tail(boot)}")
    assert step.result == "ok", f"{name} failed in the VM:\n{text}"


def test_every_boot_ran_its_steps(vm: Run) -> None:
    unknown = set(vm.steps) - set(NAMES)
    assert not unknown, f"steps tests/test_vm.py does not know: {unknown}"
    assert vm.done == set(STEPS), f"boots that did not finish: {set(STEPS) - vm.done}\n{vm.output}"


def test_figures(vm: Run) -> None:
    """The figures README quotes, as the VM measured them."""

    def details(name: str) -> dict[str, str]:
        step = vm.steps.get(name)
        assert step is not None and step.result == "ok", f"{name} did not pass"
        return step.details

    back = details("boot2/binfmt-restart")
    assert float(back["reconcile_interval_s"]) > 0, back
    assert len(back["back_after_s"].split(",")) == 3, back
    for seconds in back["back_after_s"].split(","):
        assert float(seconds) <= float(back["bound_s"]), back
    assert float(details("boot2/security")["exposure"]) <= 2.5
    # the restart came from the watchdog: not before WatchdogSec
    watchdog = details("boot2/watchdog")
    assert float(watchdog["restarted_after_s"]) >= float(watchdog["watchdog"].removesuffix("s"))


def test_parse_report() -> None:
    """The host's reading of check.sh's report (no VM needed): serial line
    ends, output between the lines, details, a step cut short."""
    report = (
        "[   12.3] noise before\r\n"
        "qusd-vm: begin boot2/binfmt-restart\r\n"
        "# systemctl restart systemd-binfmt\r\n"
        "qusd-vm: end boot2/binfmt-restart ok back_after_s=1.2,3.4 bound_s=6.0\r\n"
        "qusd-vm: begin boot2/sigkill\r\n"
        "FAIL: not restarted after 60 s\r\n"
        "qusd-vm: end boot2/sigkill FAIL step_s=60.1\r\n"
        "qusd-vm: begin boot2/watchdog\r\n"
        "# kill -STOP 786\r\n"
    )
    steps: dict[str, Step] = {}
    done: set[str] = set()
    parse(report, steps, done)
    assert list(steps) == ["boot2/binfmt-restart", "boot2/sigkill", "boot2/watchdog"]
    ok, failed, cut = steps.values()
    assert (ok.result, ok.lines) == ("ok", ["# systemctl restart systemd-binfmt"])
    assert ok.details == {"back_after_s": "1.2,3.4", "bound_s": "6.0"}
    assert (failed.result, failed.lines) == ("FAIL", ["FAIL: not restarted after 60 s"])
    assert (cut.result, cut.lines) == ("", ["# kill -STOP 786"])
    assert done == set()
    parse("qusd-vm: done boot2\n", steps, done)
    assert done == {"boot2"}
