"""The boot hand-off (qusd/handoff.py), on the real kernel with the real
systemd-binfmt: what qusd keeps is written as a binfmt.d file, which
systemd-binfmt registers at boot (and at every restart of it, which
flushes the table) without qusd; qusd adopts it at start and takes back
what a file one change behind brought back."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from qusd import catalog, handoff
from qusd.binfmt import Rule
from qusd.state import Record, State
from tests.conftest import Daemon, Sandbox, busybox_path, interpreter, wait_for

SYSTEMD_BINFMT = "/usr/lib/systemd/systemd-binfmt"
QUSD = str(Path(sys.executable).parent / "qusd")
CAT = catalog.builtin()


def record(target: str, **kw: object) -> Record:
    t = CAT.get(target)
    return Record(t.rule(interpreter(t.cpu), "F").normalized(), target=target,
                  **{"owned": True, **kw})  # type: ignore[arg-type]  # fmt: skip


def qusd_restore(box: Sandbox, state: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    config = workdir / "qusd.toml"
    config.write_text('[qusd]\ninterpreter_store = ""\n')
    res = box.run(
        [QUSD, "restore", "--state-dir", state, "--config", config, "--log-level", "info"]
    )
    assert res.returncode == 0, res.stderr
    return res


def systemd_binfmt(box: Sandbox, conf: Path) -> None:
    """What boot (or `systemctl restart systemd-binfmt`) does with the file:
    the table flushed, then every line registered."""
    box.kernel.remove_all()
    res = box.run([SYSTEMD_BINFMT, str(conf)])
    assert res.returncode == 0, res.stderr


def files(box: Sandbox) -> dict[str, str]:
    """Each entry's file, as the kernel shows it."""
    return {e.name: box.run(["cat", f"/proc/sys/fs/binfmt_misc/{e.name}"]).stdout
            for e in box.kernel.entries()}  # fmt: skip


def test_systemd_binfmt_registers_what_qusd_keeps(sbx: Sandbox, workdir: Path) -> None:
    """Only what qusd would register again without asking goes to the
    file: an admin's persistent, enabled entries without overrides; a
    user's entry, a disabled one, a forced one and one for this boot only
    wait for qusd."""
    state = workdir / "state"
    kept = [record("aarch64"), record("s390x"), record("riscv64")]
    waiting = [
        record("ppc64le", owned=False, owner=1000),
        record("mips", enabled=False),
        record("arm", force=True),
        record("m68k", persistent=False),
    ]
    State(state).save({r.rule.name: r for r in [*kept, *waiting]})
    out = qusd_restore(sbx, state, workdir)
    assert "restore: restored 6, adopted 0" in out.stderr  # m68k was for one boot only
    conf = state / handoff.FILENAME
    assert [r.name for r in handoff.read(state)] == [r.rule.name for r in kept]
    assert conf.read_text().startswith("# Written by qusd")
    by_qusd = files(sbx)

    systemd_binfmt(sbx, conf)
    # byte for byte what qusd registers, F included: the kernel opened the
    # interpreter when systemd-binfmt registered it
    assert files(sbx) == {r.rule.name: by_qusd[r.rule.name] for r in kept}
    bb = busybox_path("arm64")
    assert sbx.run([bb, "uname", "-m"]).stdout.strip() == "aarch64"

    # qusd then starts: adopts the three, restores the others
    out = qusd_restore(sbx, state, workdir)
    assert "restore: restored 3, adopted 3" in out.stderr
    assert set(files(sbx)) == {r.rule.name for r in [*kept, *waiting]} - {"qemu-m68k"}


def test_what_a_file_one_change_behind_brought_back_is_taken_back(
    sbx: Sandbox, workdir: Path
) -> None:
    """qusd removed qemu-aarch64 and qemu-s390x, and stopped (crashed) before
    the file followed: at the next boot systemd-binfmt registers them again.
    qusd's start removes qemu-aarch64 (exactly the file's definition) and
    leaves qemu-s390x, which another tool has since defined otherwise."""
    state = workdir / "state"
    recs = {r.rule.name: r for r in [record("aarch64"), record("s390x"), record("riscv64")]}
    State(state).save(recs)
    qusd_restore(sbx, state, workdir)
    stale = (state / handoff.FILENAME).read_text()
    st = State.load(state)
    st.save({"qemu-riscv64": recs["qemu-riscv64"]})
    (state / handoff.FILENAME).write_text(stale)  # as the crash left it

    systemd_binfmt(sbx, state / handoff.FILENAME)
    other = replace(recs["qemu-s390x"].rule, interpreter="/usr/bin/true", flags="")
    sbx.kernel.remove("qemu-s390x")
    sbx.kernel.register(other)
    out = qusd_restore(sbx, state, workdir)
    assert "removed qemu-aarch64: registered at boot from" in out.stderr
    assert sbx.kernel.get("qemu-aarch64") is None
    there = sbx.kernel.get("qemu-s390x")
    assert there is not None and there.rule() == other.normalized()
    assert sbx.kernel.get("qemu-riscv64") is not None
    assert [r.name for r in handoff.read(state)] == ["qemu-riscv64"]


def test_the_daemon_keeps_the_file_in_step_and_adopts_it(daemon: Daemon) -> None:
    """Changes through the API reach the file a moment later, off the
    request's path; systemd-binfmt restarting (a flush, then the files)
    puts the admin's entries back by itself, and qusd sees them as its own
    (no repair, no drift)."""
    interpreter("aarch64")
    interpreter("s390x")
    conf = daemon.state_dir / handoff.FILENAME
    daemon.client.request("POST", "/v1/registrations", {"targets": ["arm64", "s390x"]})

    def names() -> list[str]:
        return [r.name for r in handoff.read(daemon.state_dir)]

    wait_for(lambda: names() == ["qemu-aarch64", "qemu-s390x"], "both in the file")
    daemon.client.request("PATCH", "/v1/registrations/qemu-s390x", {"enabled": False})
    wait_for(lambda: names() == ["qemu-aarch64"], "the disabled one gone from the file")
    daemon.client.request("PATCH", "/v1/registrations/qemu-s390x", {"enabled": True})
    wait_for(lambda: names() == ["qemu-aarch64", "qemu-s390x"], "both in the file")
    before = files(daemon.inside)

    systemd_binfmt(daemon.inside, conf)
    assert files(daemon.inside) == before  # back when systemd-binfmt returns
    regs = daemon.client.get("/v1/registrations")
    assert {r["name"]: r["managed"] for r in regs} == {"qemu-aarch64": True, "qemu-s390x": True}

    daemon.client.request("DELETE", "/v1/registrations/qemu-aarch64")
    wait_for(lambda: names() == ["qemu-s390x"], "the removed one gone from the file")
    assert daemon.stop() == 0
    assert names() == ["qemu-s390x"]


def test_render_keeps_the_order_and_only_what_is_eligible() -> None:
    """Pure: the file's lines are the eligible records' register lines, in
    the order of registration (newest matched first after a boot too)."""
    rules = [Rule(f"r{i}", "/bin/true", magic=b"\x7fELF%d" % i) for i in range(4)]
    recs = [Record(r, owned=i != 2) for i, r in enumerate(rules)]
    text = handoff.render(recs)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [r.encode().decode() for i, r in enumerate(rules) if i != 2]
