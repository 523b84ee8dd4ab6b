"""Service on the fake kernel: restore's every branch, registration all or
nothing, the roles' decisions, events."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from qusd.binfmt import Entry, Rule
from qusd.errors import (
    ConflictError,
    ForbiddenError,
    InterpreterError,
    KernelError,
    NotMountedError,
    StateError,
    UntrustedInterpreterError,
)
from qusd.events import Event
from qusd.policy import Caller
from qusd.service import Overrides, Service
from qusd.state import Record, State
from tests.unit.conftest import ADMIN, CAT, READER, ROOT, USER, USERS_GID, World


def entry(rule: Rule, enabled: bool = True) -> Entry:
    n = rule.normalized()
    return Entry(n.name, enabled, n.interpreter, n.flags, n.type, n.offset, n.magic, n.mask,
                 n.extension)  # fmt: skip


def rule(world: World, target: str, flags: str = "F") -> Rule:
    return CAT.get(target).rule(world.interpreter(target), flags).normalized()


def recorded(world: World, *records: Record) -> None:
    State(world.state_dir).save({r.rule.name: r for r in records})


def events(svc: Service) -> list[Event]:
    seen: list[Event] = []
    svc.events.subscribe(seen.append)
    return seen


# -- restore --------------------------------------------------------------------------


def test_restore_every_branch(world: World) -> None:
    aarch64, s390x, riscv = rule(world, "aarch64"), rule(world, "s390x"), rule(world, "riscv64")
    ppc, m68k, sh4 = rule(world, "ppc64le"), rule(world, "m68k"), rule(world, "sh4")
    other = Rule("qemu-s390x", "/usr/libexec/qemu-binfmt/s390x-binfmt-P", s390x.magic,
                 s390x.mask, flags="POF")  # fmt: skip
    theirs = replace(other, name="qemu-m68k", magic=m68k.magic, mask=m68k.mask)
    world.kernel.table.update(
        {"qemu-aarch64": entry(aarch64), "qemu-s390x": entry(other), "qemu-m68k": entry(theirs)}
    )
    recorded(
        world,
        Record(aarch64),  # there as recorded: adopted
        Record(s390x, owned=True),  # taken by another definition, owned: taken back
        Record(m68k),  # taken, not owned: a conflict, left alone
        Record(riscv, enabled=False),  # missing, persistent: restored, disabled
        Record(ppc, persistent=False),  # missing, not persistent: dropped
        Record(sh4),  # missing, cannot come back: failed
    )
    world.kernel.fail("register", errno.ENOENT, name="qemu-sh4")
    svc = world.service()
    seen = events(svc)
    report = svc.restore()
    assert report.adopted == ["qemu-aarch64"]
    assert sorted(report.restored) == ["qemu-riscv64", "qemu-s390x"]
    assert report.conflicts == ["qemu-m68k"] and report.failed == ["qemu-sh4"]
    assert report.dropped == ["qemu-ppc64le"]
    assert report.summary() == "restored 2, adopted 1, 1 in conflict, 1 failed"
    k = world.kernel.table
    assert k["qemu-s390x"].rule() == s390x and k["qemu-m68k"].rule() == theirs
    assert not k["qemu-riscv64"].enabled and "qemu-sh4" not in k
    assert "qemu-ppc64le" not in State.load(world.state_dir).records  # dropped is saved
    codes = {w.partition(":")[0] for w in svc.warnings}
    assert codes == {"conflict", "restore"}
    assert "could not restore qemu-sh4: the F flag opens" in svc.warnings["restore:qemu-sh4"]
    assert [(e.kind, e.names) for e in seen] == [
        ("conflict", ("qemu-m68k",)),
        ("drift", ("qemu-s390x",)),  # another definition in its place: told, then
        ("restored", ("qemu-s390x",)),  # put back
        ("restored", ("qemu-riscv64",)),
    ]
    assert all(e.actor == "qusd" for e in seen) and [e.seq for e in seen] == [1, 2, 3, 4]

    again = svc.restore()  # nothing new: the conflict is not told twice
    assert sorted(again.adopted) == ["qemu-aarch64", "qemu-riscv64", "qemu-s390x"]
    assert len(seen) == 4


def test_restore_without_binfmt_misc_does_nothing(world: World) -> None:
    recorded(world, Record(rule(world, "aarch64")))
    world.kernel.mounted = False
    svc = world.service()
    assert svc.restore().summary() == "restored 0, adopted 0"
    svc.reconcile()  # mounts first, then restores
    assert list(world.kernel.table) == ["qemu-aarch64"]


# -- register ----------------------------------------------------------------------------


def test_register_records_and_tells(world: World) -> None:
    svc = world.service()
    seen = events(svc)
    result = svc.register_targets(USER, ["arm64", "s390x"])
    assert [r.entry.name for r in result.registered] == ["qemu-aarch64", "qemu-s390x"]
    assert all(r.managed and r.persistent and r.entry.flags == "F" for r in result.registered)
    assert set(State.load(world.state_dir).records) == {"qemu-aarch64", "qemu-s390x"}
    assert [(e.kind, e.actor) for e in seen] == [("registered", USER.uid)] * 2
    again = svc.register_targets(USER, ["aarch64"])
    assert not again.registered and [r.entry.name for r in again.unchanged] == ["qemu-aarch64"]


def test_a_conflict_changes_nothing(world: World) -> None:
    other = replace(rule(world, "s390x"), interpreter="/other", flags="POF")
    world.kernel.table["qemu-s390x"] = entry(other)
    svc = world.service()
    with pytest.raises(ConflictError, match=r"qusctl register --replace"):
        svc.register_targets(ADMIN, ["aarch64", "s390x"])
    assert list(world.kernel.table) == ["qemu-s390x"] and world.kernel.writes == []
    assert not (world.state_dir / "state.json").exists()


def test_replace_is_owned_and_admin_only_for_foreign_entries(world: World) -> None:
    other = replace(rule(world, "s390x"), interpreter="/other", flags="POF")
    world.kernel.table["qemu-s390x"] = entry(other, enabled=False)
    svc = world.service()
    with pytest.raises(ForbiddenError, match="only admins may replace it"):
        svc.register_targets(USER, ["s390x"], replace_existing=True)
    svc.register_targets(ADMIN, ["s390x"], replace_existing=True)
    rec = State.load(world.state_dir).records["qemu-s390x"]
    assert rec.owned and rec.enabled and world.kernel.table["qemu-s390x"].enabled


def test_a_state_write_failure_undoes_the_kernel(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = entry(replace(rule(world, "s390x"), interpreter="/other", flags="POF"), enabled=False)
    world.kernel.table["qemu-s390x"] = old
    svc = world.service()

    def full(records: object) -> None:
        raise StateError("cannot write state.json: No space left on device; rolled back")

    monkeypatch.setattr(svc.state, "save", full)
    with pytest.raises(StateError):
        svc.register_targets(ROOT, ["aarch64", "s390x"], replace_existing=True)
    assert world.kernel.table == {"qemu-s390x": old}


def test_the_nth_write_failing_undoes_the_others(world: World) -> None:
    svc = world.service()
    world.kernel.fail("register", errno.EINVAL, nth=3)
    with pytest.raises(KernelError):
        svc.register_targets(ROOT, ["aarch64", "s390x", "riscv64"])
    assert world.kernel.table == {}
    assert svc.state.records == {}


def test_enable_unregister_reset_roll_back_on_a_state_failure(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = world.service()
    svc.register_targets(USER, ["aarch64", "s390x"])
    before = dict(world.kernel.table)

    def full(records: object) -> None:
        raise StateError("disk full")

    monkeypatch.setattr(svc.state, "save", full)
    for call in (
        lambda: svc.set_enabled(USER, "qemu-aarch64", False),
        lambda: svc.unregister(USER, "qemu-aarch64"),
        lambda: svc.reset(USER),
    ):
        with pytest.raises(StateError):
            call()
        assert world.kernel.table == before


def test_disable_then_enable_is_recorded(world: World) -> None:
    svc = world.service()
    svc.register_targets(USER, ["aarch64"])
    assert not svc.set_enabled(USER, "qemu-aarch64", False).entry.enabled
    assert not State.load(world.state_dir).records["qemu-aarch64"].enabled
    assert svc.set_enabled(USER, "qemu-aarch64", True).entry.enabled
    assert State.load(world.state_dir).records["qemu-aarch64"].enabled


def test_not_mounted(world: World) -> None:
    world.kernel.mounted = False
    with pytest.raises(NotMountedError):
        world.service().register_targets(ROOT, ["aarch64"])


def test_no_interpreter(world: World) -> None:
    (world.interpreters / "qemu-aarch64-static").unlink()
    with pytest.raises(InterpreterError, match="no interpreter for aarch64"):
        world.service().register_targets(ROOT, ["aarch64"])


# -- roles ---------------------------------------------------------------------------------


def test_roles_from_injected_groups(world: World) -> None:
    svc = world.service()
    assert [svc.policy.role(c).value for c in (ROOT, ADMIN, USER, READER)] == [
        "admin", "admin", "user", "reader"
    ]  # fmt: skip
    with pytest.raises(ForbiddenError, match="needs membership in the 'qusd' group"):
        svc.register_targets(READER, ["aarch64"])
    with pytest.raises(ForbiddenError, match="of the host's own family"):
        svc.register_targets(USER, ["x86_64"])
    with pytest.raises(ForbiddenError, match="admin-only"):
        svc.register_targets(USER, ["aarch64"], "OCF")
    with pytest.raises(ForbiddenError, match="custom rules"):
        svc.register_entry(USER, Rule("x", "/bin/true", magic=b"QUSD"))
    with pytest.raises(ForbiddenError, match="force is admin-only"):
        svc.register_targets(USER, ["aarch64"], overrides=Overrides(force=True))
    with pytest.raises(ForbiddenError, match="scope 'all' is admin-only"):
        svc.reset(USER, "all")
    assert world.kernel.writes == []


def test_users_touch_only_what_qusd_manages(world: World) -> None:
    world.kernel.table["DOSWin"] = entry(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    svc = world.service()
    with pytest.raises(ForbiddenError, match="users may disable only entries qusd manages"):
        svc.set_enabled(USER, "DOSWin", False)
    with pytest.raises(ForbiddenError, match="users may unregister only"):
        svc.unregister(USER, "DOSWin")
    svc.set_enabled(ADMIN, "DOSWin", False)
    assert not world.kernel.table["DOSWin"].enabled


def test_an_admin_may_adopt_another_tools_identical_entry_a_user_may_not(world: World) -> None:
    world.kernel.table["qemu-aarch64"] = entry(rule(world, "aarch64"))
    svc = world.service()
    svc.register_targets(USER, ["aarch64"])
    assert not svc.state.records
    svc.register_targets(ADMIN, ["aarch64"])
    assert list(svc.state.records) == ["qemu-aarch64"]


# -- ownership -------------------------------------------------------------------------------

OTHER_USER = Caller(1004, 100, 5, frozenset({100, USERS_GID}))


def test_records_name_their_owner_and_an_admins_is_kept(world: World) -> None:
    svc = world.service()
    svc.register_targets(USER, ["aarch64"])
    svc.register_targets(ADMIN, ["s390x"], overrides=Overrides(allow_untrusted_interpreter=True))
    recs = State.load(world.state_dir).records
    got = {n: (r.owner, r.owned, r.allow_untrusted_interpreter) for n, r in recs.items()}
    assert got == {"qemu-aarch64": (USER.uid, False, False), "qemu-s390x": (ADMIN.uid, True, True)}
    views = {r.entry.name: (r.owner, r.kept) for r in svc.registrations()}
    assert views == {"qemu-aarch64": (USER.uid, False), "qemu-s390x": (ADMIN.uid, True)}
    world.kernel.table["DOSWin"] = entry(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    assert (svc.registration("DOSWin").owner, svc.registration("DOSWin").kept) == (None, False)


def test_users_change_replace_and_reset_only_their_own(world: World) -> None:
    svc = world.service()
    svc.register_targets(USER, ["aarch64"])
    svc.register_targets(OTHER_USER, ["s390x"])
    svc.register_targets(ADMIN, ["riscv64"])
    writes = len(world.kernel.writes)
    for name, owner in (("qemu-s390x", OTHER_USER.uid), ("qemu-riscv64", ADMIN.uid)):
        with pytest.raises(ForbiddenError, match=f"registered by uid {owner}: users may disable"):
            svc.set_enabled(USER, name, False)
        with pytest.raises(ForbiddenError, match="users may unregister only entries they"):
            svc.unregister(USER, name)
        with pytest.raises(ForbiddenError, match="users may replace only entries they"):
            svc.register_targets(USER, [name.removeprefix("qemu-")], "P", replace_existing=True)
    assert len(world.kernel.writes) == writes  # refused: nothing written
    svc.register_targets(USER, ["aarch64"], "P", replace_existing=True)  # their own
    rec = State.load(world.state_dir).records["qemu-aarch64"]
    assert world.kernel.table["qemu-aarch64"].flags == "P"
    assert (rec.owner, rec.owned) == (USER.uid, False)
    assert svc.reset(USER, "managed") == ["qemu-aarch64"]
    assert sorted(world.kernel.table) == ["qemu-riscv64", "qemu-s390x"]
    assert sorted(State.load(world.state_dir).records) == ["qemu-riscv64", "qemu-s390x"]
    svc.set_enabled(ADMIN, "qemu-s390x", False)  # admins: any
    assert sorted(svc.reset(ADMIN, "managed")) == ["qemu-riscv64", "qemu-s390x"]


def test_a_user_takes_no_record_of_someone_else(world: World) -> None:
    """An admin's record whose entry is not in the kernel now (its restore
    failed): a user's registration does not take the name over."""
    recorded(world, Record(rule(world, "aarch64"), owned=True, owner=ADMIN.uid))
    svc = world.service()
    with pytest.raises(ForbiddenError, match=f"registered by uid {ADMIN.uid}"):
        svc.register_targets(USER, ["aarch64"])
    assert world.kernel.table == {}


def test_restore_keeps_an_admins_entry_and_lets_a_users_defer(world: World) -> None:
    aarch64, s390x = rule(world, "aarch64"), rule(world, "s390x")
    theirs = {r.name: replace(r, interpreter="/usr/libexec/qemu-binfmt/x", flags="POF")
              for r in (aarch64, s390x)}  # fmt: skip
    world.kernel.table.update({n: entry(r) for n, r in theirs.items()})
    recorded(world, Record(aarch64, owned=True, owner=ADMIN.uid), Record(s390x, owner=USER.uid))
    report_only = world.service(drift="report")
    report_only.restore()
    assert {n: e.rule() for n, e in world.kernel.table.items()} == theirs  # nothing fought
    assert sorted(report_only.warnings) == ["conflict:qemu-s390x", "drift:qemu-aarch64"]
    svc = world.service()
    seen = events(svc)
    report = svc.restore()
    assert report.restored == ["qemu-aarch64"] and report.conflicts == ["qemu-s390x"]
    assert world.kernel.table["qemu-aarch64"].rule() == aarch64
    assert world.kernel.table["qemu-s390x"].rule() == theirs["qemu-s390x"]
    assert [(e.kind, e.names) for e in seen] == [
        ("conflict", ("qemu-s390x",)),
        ("drift", ("qemu-aarch64",)),
        ("restored", ("qemu-aarch64",)),
    ]
    # the user's record under the other definition goes alone: that entry is not qusd's
    svc.unregister(USER, "qemu-s390x")
    assert world.kernel.table["qemu-s390x"].rule() == theirs["qemu-s390x"]
    assert "qemu-s390x" not in State.load(world.state_dir).records


def test_restore_checks_records_as_requests_are_checked(world: World) -> None:
    elf = Rule("elf", "/bin/true", magic=b"\x7fELF")
    evil = Rule("evil", "/tmp/anyone-may-write", magic=b"QUSD")
    allowed = Record(replace(evil, name="allowed"), allow_untrusted_interpreter=True)
    recorded(world, Record(elf), Record(replace(elf, name="forced"), force=True), Record(evil),
             allowed)  # fmt: skip

    def trusted(path: str) -> None:
        if path == evil.interpreter:
            raise UntrustedInterpreterError(f"{path} is writable by group or others")

    world.trusted = trusted
    svc = world.service()
    seen = events(svc)
    report = svc.restore()
    assert sorted(report.failed) == ["elf", "evil"] and sorted(world.kernel.table) == [
        "allowed", "forced",
    ]  # fmt: skip
    assert "would match the host's own programs" in svc.warnings["restore:elf"]
    assert "writable by group or others" in svc.warnings["restore:evil"]
    assert {e.kind for e in seen} == {"refused", "restored"}
    assert set(State.load(world.state_dir).records) == {"elf", "evil", "allowed", "forced"}
