"""The boot hand-off on the fake kernel: the file follows the state, is
written only when its text changed, and what a stale file brought back is
taken back (tests/test_handoff.py shows it all with the real kernel and the
real systemd-binfmt)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qusd import handoff
from qusd.binfmt import Rule
from qusd.state import Record
from tests.unit.conftest import ADMIN, USER, World


def test_the_file_follows_the_state_and_is_written_only_when_it_changed(world: World) -> None:
    svc = world.service()
    assert svc.write_handoff()  # the first time: whatever the file held
    assert handoff.read(world.state_dir) == []
    svc.register_targets(ADMIN, ["arm64", "s390x"])
    svc.register_targets(USER, ["riscv64"])  # a user's: waits for qusd
    assert svc.write_handoff()
    assert [r.name for r in handoff.read(world.state_dir)] == ["qemu-aarch64", "qemu-s390x"]
    written = (world.state_dir / handoff.FILENAME).stat().st_mtime_ns
    assert not svc.write_handoff()  # the state did not change
    svc.set_enabled(USER, "qemu-riscv64", False)  # the state changed, the file's text did not
    assert not svc.write_handoff()
    assert (world.state_dir / handoff.FILENAME).stat().st_mtime_ns == written
    svc.unregister(ADMIN, "qemu-aarch64")
    assert svc.write_handoff()
    assert [r.name for r in handoff.read(world.state_dir)] == ["qemu-s390x"]


def test_a_stale_files_entries_are_taken_back_and_only_those(world: World) -> None:
    svc = world.service()
    svc.register_targets(ADMIN, ["arm64", "s390x", "riscv64"])
    svc.write_handoff()
    stale = (world.state_dir / handoff.FILENAME).read_text()
    svc.unregister(ADMIN, "qemu-aarch64")
    svc.unregister(ADMIN, "qemu-s390x")
    (world.state_dir / handoff.FILENAME).write_text(stale)  # a crash before it followed
    for rule in handoff.read(world.state_dir):  # the next boot
        if world.kernel.get(rule.name) is None:
            world.kernel.register(rule)
    world.kernel.remove("qemu-s390x")  # since defined otherwise by another tool
    other = next(r for r in handoff.read(world.state_dir) if r.name == "qemu-s390x")
    world.kernel.register(Rule(other.name, "/usr/bin/true", magic=other.magic, mask=other.mask))
    again = world.service()
    assert again.take_back_handoff() == ["qemu-aarch64"]
    assert world.kernel.get("qemu-aarch64") is None
    assert world.kernel.get("qemu-s390x") is not None
    assert world.kernel.get("qemu-riscv64") is not None
    assert again.take_back_handoff() == []


POOL = [
    Record(Rule(f"r{i}", "/bin/true", magic=b"\x7fELF%d" % i), owned=i % 3 != 0, enabled=i != 4)
    for i in range(8)
] + [Record(Rule(f"r{i}", "/bin/false", magic=b"\x7fELF%d" % i), owned=True) for i in range(4)]


@given(st.lists(st.lists(st.sampled_from(POOL), unique=True), max_size=8))
def test_the_kept_lines_give_what_a_fresh_render_does(sequence: list[list[Record]]) -> None:
    """Whatever the records from one write to the next (added, removed,
    reordered, replaced), the renderer that keeps lines writes the text a
    fresh one does."""
    renderer = handoff.Renderer()
    for records in sequence:
        assert renderer(records) == handoff.render(records)
