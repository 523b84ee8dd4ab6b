"""Host detection by trying, on the real kernel: which targets the host runs
itself is found by running each target's built-in program with no
binfmt_misc entry that could take it, not read from the family table; the
settings override it; /v1/targets says how each verdict was reached.

A kernel without 32-bit x86 (ia32_emulation=0) cannot be booted here, so a
seccomp supervisor (tests/seccomp.py no-ia32) answers exec of an i386
program the way such a kernel does: ENOEXEC unless an entry takes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qusd import catalog, interpreters, native, probes
from tests.conftest import ROOT, Daemon, Sandbox, busybox_path, needs_sandbox

pytestmark = needs_sandbox

BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(catalog.host_machine())
QUSCTL = str(Path(sys.executable).parent / "qusctl")
PY = [sys.executable, "-m"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DETECT = (
    "import json; from qusd import native, catalog; "
    "v = native.detect(catalog.builtin(), catalog.family_of(catalog.host_machine())); "
    "print(json.dumps({k: [x.native, x.how, x.detail] for k, x in v.items()}))"
)
x86_64_only = pytest.mark.skipif(
    os.uname().machine != "x86_64", reason="the stand-ins are x86_64 seccomp filters"
)


class WrappedDaemon(Daemon):
    """`qusd --sandbox` started under a wrapper (a seccomp stand-in)."""

    def __init__(self, workdir: Path, wrapper: list[str], **kwargs: Any) -> None:
        self.wrapper = wrapper
        super().__init__(workdir, **kwargs)

    @property
    def argv(self) -> list[str]:
        return self._argv

    @argv.setter
    def argv(self, value: list[str]) -> None:
        self._argv = [*self.wrapper, *value]


def wrapped(workdir: Path, mode: str, toml: str = "") -> Daemon:
    (workdir / "qusd.toml").write_text(toml or "# defaults\n")
    return WrappedDaemon(workdir, [*PY, "tests.seccomp", mode, "--"], env=ENV)


def targets(d: Daemon) -> dict[str, dict[str, object]]:
    return {t["name"]: t for t in d.client.get("/v1/targets")}


def qusctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QUSCTL, "--socket", d.socket, *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def test_every_verdict_on_this_host_comes_from_a_probe() -> None:
    """In a fresh sandbox (an empty table) each target's program ran or the
    kernel refused it: no verdict is left to the family table; the host's
    own machine runs, and no target of another family does."""
    verdicts = native.detect(BUILTIN, HOST_FAMILY)
    assert set(verdicts) == set(BUILTIN.names())
    assert {v.how for v in verdicts.values()} == {native.PROBE}
    assert all("in a sandbox" in v.detail for v in verdicts.values())
    own = catalog.canonical_name(catalog.host_machine())
    assert verdicts[own].native and verdicts[own].detail.startswith("its built-in program ran")
    for t in BUILTIN.foreign(HOST_FAMILY):
        assert not verdicts[t.name].native, (t.name, verdicts[t.name])
        assert verdicts[t.name].detail.startswith("the kernel answers 'Exec format error'")


@x86_64_only
def test_a_kernel_without_ia32_gets_i386_emulation(tmp_path: Path) -> None:
    """The daemon under the no-ia32 stand-in: its probes find that i386 does
    not run; /v1/targets says so (probe); registering everything includes
    i386, and an i386 busybox that failed with 'Exec format error' runs."""
    i386 = busybox_path("i386")
    d = wrapped(tmp_path, "no-ia32")
    try:
        inside = [*PY, "tests.seccomp", "no-ia32", "--", "sh", "-c", f"{i386} uname -m"]
        before = d.inside.run(inside, env=ENV)
        assert before.returncode == 126 and "Exec format error" in before.stderr, before
        ts = targets(d)
        for name in ("i386", "i486"):
            assert ts[name]["native"] is False and ts[name]["native_by"] == "probe", ts[name]
            assert "Exec format error" in str(ts[name]["native_detail"])
        assert ts["x86_64"]["native"] is True and ts["x86_64"]["native_by"] == "probe"
        res = qusctl(d, "register", "--json")
        assert res.returncode == 0, res.stderr
        names = {r["name"] for r in json.loads(res.stdout)["registered"]}
        assert {"qemu-i386", "qemu-i486"} <= names and "qemu-x86_64" not in names
        after = d.inside.run(inside, env=ENV)
        assert (after.returncode, after.stdout.strip()) == (0, "i686"), after
        checks = d.client.request("POST", "/v1/verify", {"targets": ["i386", "x86_64"]})
        assert checks["ok"] is True
        i386_check, x86_64_check = checks["results"]
        assert i386_check["entry"] == "qemu-i386" and not i386_check["native"]
        assert x86_64_check["entry"] is None and x86_64_check["native"]
    finally:
        d.stop()


def test_the_family_table_keeps_i386_native_where_it_runs(daemon: Daemon) -> None:
    """The same daemon without the stand-in: i386 runs, so it is native
    (decided by its probe) and registering everything leaves it out."""
    ts = targets(daemon)
    if HOST_FAMILY == "i386":
        assert ts["i386"]["native"] is True and ts["i386"]["native_by"] == "probe"
    res = qusctl(daemon, "register", "--json")
    assert res.returncode == 0, res.stderr
    names = {r["name"] for r in json.loads(res.stdout)["registered"]}
    assert not {f"qemu-{n}" for n, t in ts.items() if t["native"]} & names
    assert {f"qemu-{t.name}" for t in interpreters.foreign_with_interpreters(
        BUILTIN, HOST_FAMILY)} == names  # fmt: skip


@x86_64_only
def test_a_seccomp_filter_on_system_calls_is_not_a_kernel_without_them(sbx: Sandbox) -> None:
    """systemd's SystemCallArchitectures=native kills a process at its first
    32-bit system call: the kernel did load the program, so i386 counts as
    native (the probe says why), unlike the no-ia32 kernel's ENOEXEC."""
    res = sbx.run([*PY, "tests.seccomp", "no-ia32-syscalls", "--", sys.executable, "-c",
                   DETECT], env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["i386"][:2] == [True, "probe"]
    assert "a seccomp filter here refuses its system calls" in got["i386"][2]


@x86_64_only
def test_without_a_sandbox_only_targets_no_entry_takes_are_tried(sbx: Sandbox) -> None:
    """Where no user namespace may be made (systemd's RestrictNamespaces),
    the probes run here, but only where no entry of this table would take
    them; the rest is left to the family table, which says why."""
    aarch64 = BUILTIN.get("aarch64")
    sbx.kernel.register(aarch64.rule(interpreters.find(aarch64).path, "F"))  # type: ignore[union-attr]
    res = sbx.run([*PY, "tests.seccomp", "no-userns", "--", sys.executable, "-c", DETECT],
                  env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    how, why = got["aarch64"][1:]
    assert (got["aarch64"][0], how) == (False, "family")
    assert "unshare failed: Operation not permitted" in why
    assert "an entry here would take its built-in program" in why
    assert (
        got["arm"][:2] == [False, "probe"] and "here, where no binfmt_misc entry" in got["arm"][2]
    )
    assert got["x86_64"][:2] == [True, "probe"]


def test_settings_override_per_target(tmp_path: Path) -> None:
    (tmp_path / "qusd.toml").write_text(
        '[qusd]\nnative_targets = ["armhf"]\nemulated_targets = ["x86_64"]\n'
    )
    d = Daemon(tmp_path)
    try:
        ts = targets(d)
        assert (ts["arm"]["native"], ts["arm"]["native_by"]) == (True, "setting")
        assert ts["arm"]["native_detail"] == "native_targets in the settings"
        assert (ts["x86_64"]["native"], ts["x86_64"]["native_by"]) == (False, "setting")
        assert ts["aarch64"]["native_by"] == "probe"
        res = qusctl(d, "targets")
        row = next(line.split() for line in res.stdout.splitlines() if line.startswith("arm "))
        assert row[2:4] == ["yes", "setting"]
    finally:
        d.stop()
    (tmp_path / "qusd.toml").write_text("[qusd]\ndetect_native = false\n")
    d = Daemon(tmp_path)
    try:
        ts = targets(d)
        assert {t["native_by"] for t in ts.values()} == {"family"}
        for t in BUILTIN:
            assert ts[t.name]["native"] is (t.family == HOST_FAMILY)
        assert "not tried: probing is off" in str(ts["aarch64"]["native_detail"])
    finally:
        d.stop()


def test_unknown_override_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "qusd.toml").write_text('[qusd]\nemulated_targets = ["vax"]\n')
    res = subprocess.run(
        [str(Path(sys.executable).parent / "qusd"), "--config", str(tmp_path / "qusd.toml"),
         "restore", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 78, res.stderr
    assert "emulated_targets: unknown target 'vax'" in res.stderr


def test_probes_for_every_target_exist() -> None:
    """Detection needs a program for every catalog target."""
    assert set(probes.available()) == set(BUILTIN.names())
