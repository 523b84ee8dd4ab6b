"""verify on the real kernel: every registered target's built-in program
runs through the kernel, in the daemon's sandbox, with the QEMU version
behind it; a disabled entry, a removed interpreter, a missing mount and an
F interpreter replaced since registration are named. Through qusctl (the
daemon), qusd-binfmt and the GitHub Action's script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qusd import catalog, interpreters, probes, verify
from tests.conftest import (
    ROOT,
    Daemon,
    Sandbox,
    busybox_path,
    interpreter,
    needs_sandbox,
    open_dir,
    write_settings,
)

pytestmark = needs_sandbox

BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(catalog.host_machine())
QUSCTL = str(Path(sys.executable).parent / "qusctl")
ONESHOT = [sys.executable, "-m", "qusd.oneshot"]
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT),
       "QUSD_SOCKET": "/nonexistent/qusd.sock"}  # fmt: skip


def qusctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QUSCTL, "--socket", d.socket, *args], capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


def version_of(path: str) -> str:
    """What QEMU says of itself, as verify reports it."""
    res = subprocess.run([path, "-version"], capture_output=True, text=True, check=True)
    return res.stdout.splitlines()[0].split(" version ", 1)[1].strip()


@pytest.fixture
def trusted_dir() -> Iterator[Path]:
    """A directory the trust check accepts (root's, mode 755, under /run):
    pytest's tmp_path is under the world-writable /tmp."""
    with open_dir("qusd-verify-", "/run") as path:
        yield path


def daemon_with(workdir: Path, **settings: object) -> Daemon:
    write_settings(workdir, **settings)
    return Daemon(workdir)


# -- everything registered runs ---------------------------------------------------------


def test_verify_every_target_registered_in_a_sandbox(daemon: Daemon) -> None:
    """Register every foreign target (Debian's static interpreters, F):
    each one's program runs through the kernel, the QEMU version is the
    interpreter's own; a target whose catalog rule does not match its own
    programs (if any) is named as such."""
    res = qusctl(daemon, "register")
    assert res.returncode == 0, res.stderr
    res = qusctl(daemon, "verify", "--json")
    doc = json.loads(res.stdout)
    registered = [t for t in BUILTIN if interpreters.find(t) and t.family != HOST_FAMILY]
    assert [r["target"] for r in doc["results"]] == [t.name for t in registered]
    assert len(registered) >= 28
    broken = {t.name for t in registered if not t.matches(probes.program(t.name))}
    for r, t in zip(doc["results"], registered, strict=True):
        path = interpreter(t.cpu)
        assert (r["entry"], r["interpreter"], r["flags"], r["static"]) == (
            t.entry_name, path, "F", True)  # fmt: skip
        assert r["qemu_version"] == version_of(path), r
        assert r["native"] is False and r["stale"] is None
        if t.name in broken:
            assert not r["ok"] and f"{t.entry_name}'s rule does not match" in r["reason"]
        else:
            assert r["ok"] and r["reason"] is None, r
    assert doc["ok"] is (not broken)
    assert res.returncode == (verify.FAILED if broken else 0)
    text = qusctl(daemon, "verify", "aarch64", "s390x")
    assert text.returncode == 0, text.stderr
    header, aarch64, s390x = text.stdout.splitlines()
    assert header.split() == ["TARGET", "RESULT", "ENTRY", "INTERPRETER", "LINKING", "QEMU"]
    assert aarch64.split()[:5] == ["aarch64", "ok", "qemu-aarch64", interpreter("aarch64"),
                                   "static"]  # fmt: skip
    assert s390x.split()[1] == "ok"


def test_verify_names_each_reason(daemon: Daemon, trusted_dir: Path) -> None:
    """A disabled entry, an interpreter removed after registration (no F),
    an unregistered target: each failure says why and what to do; the one
    that works still works; the exit status is 1."""
    copy = trusted_dir / "qemu-riscv64-static"
    shutil.copy(interpreter("riscv64"), copy)
    d = daemon
    d.client.request("POST", "/v1/registrations", {"targets": ["aarch64", "s390x"]})
    d.client.request("POST", "/v1/registrations", {"entry": {
        "name": "qemu-riscv64", "magic": BUILTIN.get("riscv64").magic.hex(),
        "mask": BUILTIN.get("riscv64").mask.hex(), "interpreter": str(copy)}})  # fmt: skip
    assert qusctl(d, "verify").returncode == 0
    qusctl(d, "disable", "qemu-s390x")
    copy.unlink()
    res = qusctl(d, "verify", "aarch64", "s390x", "riscv64", "mips")
    assert res.returncode == verify.FAILED, res.stderr
    lines = res.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert {t: r[1] for t, r in rows.items()} == {
        "aarch64": "ok", "s390x": "FAILED", "riscv64": "FAILED", "mips": "FAILED"}  # fmt: skip
    reasons = lines[5:]
    assert reasons == [
        "s390x: the kernel refused it: Exec format error: qemu-s390x is disabled: the kernel "
        "skips it; qusctl enable qemu-s390x",
        f"riscv64: the kernel refused it: No such file or directory: the interpreter {copy} of "
        "qemu-riscv64 does not exist: the kernel opens it at every exec and fails with 'No "
        "such file or directory': install it (qemu-user-static), or qusctl unregister "
        "qemu-riscv64, then qusctl register riscv64 with an interpreter that exists",
        "mips: the kernel refused it: Exec format error: no entry runs mips: register it "
        "(qusctl register mips)",
    ]


def test_verify_says_when_binfmt_misc_is_not_mounted(tmp_path: Path) -> None:
    d = daemon_with(tmp_path, reconcile_interval=0)  # nothing mounts it again
    try:
        d.client.request("POST", "/v1/registrations", {"targets": ["aarch64"]})
        d.inside.func("tests.test_doctor:unmount", "/proc/sys/fs/binfmt_misc")
        res = qusctl(d, "verify")
        assert res.returncode == 69, res.stdout
        assert res.stderr == (
            "qusctl: binfmt_misc is not mounted at /proc/sys/fs/binfmt_misc, so no entry can be "
            "seen or verified: mount it (mount -t binfmt_misc binfmt_misc "
            "/proc/sys/fs/binfmt_misc)\n"
        )
    finally:
        d.stop()


# -- a stale F interpreter -----------------------------------------------------------------


def test_an_f_interpreter_replaced_after_registration(tmp_path: Path, trusted_dir: Path) -> None:
    """With F the kernel keeps the file it opened. An upgrade puts a new
    file at the path: verify still runs (the old QEMU) and says it is stale,
    so does doctor; a mere chmod changes the file's ctime but not the file:
    qusd, which recorded the file at registration, says nothing, while
    doctor without qusd can only suspect it. Registering again fixes it."""
    path = trusted_dir / "qemu-aarch64-static"
    shutil.copy(interpreter("aarch64"), path)
    d = daemon_with(tmp_path, interpreter_dirs=[str(trusted_dir)], interpreter_store="")
    try:
        res = qusctl(d, "register", "aarch64")
        assert res.returncode == 0, res.stderr
        fixed = d.client.get("/v1/interpreters")["fixed"]
        st = os.stat(path)
        assert [(f["entry"], f["dev"], f["ino"]) for f in fixed] == [
            ("qemu-aarch64", st.st_dev, st.st_ino)]  # fmt: skip
        busybox = str(busybox_path("arm64"))
        qusctl_inside = [QUSCTL, "--socket", d.socket, "doctor", "--json", busybox]
        alone = [*ONESHOT, "doctor", "--json", busybox]

        path.chmod(0o750)  # the same file, a newer ctime
        [r] = d.client.request("POST", "/v1/verify", {})["results"]
        assert (r["ok"], r["stale"]) == (True, None)
        with_qusd = json.loads(d.inside.run(qusctl_inside).stdout)
        assert "interpreter-stale" not in [f["code"] for f in with_qusd]
        assert "(qusd manages it)" in next(f for f in with_qusd if f["code"] == "picked")[
            "message"]  # fmt: skip
        without = json.loads(d.inside.run(alone, env=ENV).stdout)
        [suspect] = [f for f in without if f["code"] == "interpreter-stale"]
        assert suspect["message"] == (
            f"{path} changed after qemu-aarch64 was registered with F (an upgrade?): the kernel "
            "may still run the file it opened then"
        )

        new = trusted_dir / ".new"
        shutil.copy(interpreter("aarch64"), new)
        new.chmod(0o755)
        new.rename(path)  # as dpkg installs a new version
        [r] = d.client.request("POST", "/v1/verify", {})["results"]
        stale = (
            f"{path} was replaced after qemu-aarch64 was registered with F (an upgrade?): the "
            "kernel still runs the file it opened then, the old QEMU: qusctl unregister "
            "qemu-aarch64, then qusctl register aarch64 to run the new one"
        )
        assert (r["ok"], r["stale"]) == (True, stale)
        text = qusctl(d, "verify")
        assert text.returncode == 0 and f"aarch64: {stale}" in text.stdout.splitlines()
        with_qusd = json.loads(d.inside.run(qusctl_inside).stdout)
        [found] = [f for f in with_qusd if f["code"] == "interpreter-stale"]
        assert str(found["message"]) + ": " + str(found["fix"]) == stale

        assert qusctl(d, "unregister", "qemu-aarch64").returncode == 0
        assert qusctl(d, "register", "aarch64").returncode == 0
        [r] = d.client.request("POST", "/v1/verify", {})["results"]
        assert (r["ok"], r["stale"]) == (True, None)
    finally:
        d.stop()


# -- qusd-binfmt and the Action -------------------------------------------------------------


def test_qusd_binfmt_verify(sbx: Sandbox) -> None:
    def oneshot(*args: str) -> subprocess.CompletedProcess[str]:
        return sbx.run([*ONESHOT, *args], env=ENV)

    assert oneshot("verify").stdout == "nothing registered to verify\n"
    assert oneshot("register", "aarch64", "s390x").returncode == 0
    res = oneshot("verify")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    assert [r[:3] for r in rows[1:]] == [["s390x", "ok", "qemu-s390x"],
                                         ["aarch64", "ok", "qemu-aarch64"]]  # fmt: skip
    doc = json.loads(oneshot("verify", "--json", "arm64").stdout)
    assert [(c["target"], c["ok"], c["qemu_version"]) for c in doc] == [
        ("aarch64", True, version_of(interpreter("aarch64")))]  # fmt: skip
    sbx.kernel.disable("qemu-s390x")
    res = oneshot("verify")
    assert res.returncode == verify.FAILED
    assert res.stdout.splitlines()[-1] == (
        "s390x: the kernel refused it: Exec format error: qemu-s390x is disabled: the kernel "
        "skips it; qusctl enable qemu-s390x"
    )


def test_the_action_fails_when_a_registration_does_not_run(sbx: Sandbox, tmp_path: Path) -> None:
    """An interpreter that is not QEMU (it exits 1) registers fine with F:
    the Action's verify step catches it and fails the step, naming it."""
    tmp_path.chmod(0o755)
    fake = tmp_path / "qemu-aarch64-static"
    fake.write_text("#!/bin/sh\necho 'not QEMU' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**ENV, "PYTHON": sys.executable, "QUSD_SKIP_INSTALL": "1", "QUSD_TARGETS": "arm64"}
    script = str(ROOT / "packaging/action/register.sh")
    res = sbx.run(["sh", script], env={**env, "QUSD_INTERPRETER_DIRS": str(tmp_path)})
    assert res.returncode == 1, res.stdout
    assert "::error title=qusd binfmt::verify: aarch64: it exited with status 1 (not QEMU)" in (
        res.stdout
    )
    sbx.kernel.remove("qemu-aarch64")
    res = sbx.run(["sh", script], env=env)
    assert res.returncode == 0, res.stdout
    assert any(line.split()[:2] == ["aarch64", "ok"] for line in res.stdout.splitlines())
    res = sbx.run(["sh", script], env={**env, "QUSD_VERIFY": "false", "QUSD_TARGETS": "s390x"})
    assert res.returncode == 0 and "QEMU" not in res.stdout


# -- the QEMU version ---------------------------------------------------------------------------


def test_the_qemu_version_is_asked_once_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    real = verify._ask_version

    def ask(path: str, timeout: float) -> str | None:
        asked.append(path)
        return real(path, timeout)

    monkeypatch.setattr(verify, "_ask_version", ask)
    path = tmp_path / "qemu-arm-static"
    shutil.copy(interpreter("arm"), path)
    link = tmp_path / "arm-binfmt-P"
    link.symlink_to(path.name)
    want = version_of(interpreter("arm"))
    assert verify.qemu_version(str(path)) == want
    assert verify.qemu_version(str(link)) == want  # the file behind the link: asked already
    assert asked == [str(path)]
    new = tmp_path / "new"
    shutil.copy(interpreter("arm"), new)
    new.rename(path)  # another file at the path: asked again
    assert verify.qemu_version(str(path)) == want and len(asked) == 2
    assert verify.qemu_version("/nonexistent") is None
    assert verify.qemu_version("/bin/true") is None
