"""The state file: round trip, atomic replacement, failures, corrupt files."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.strategies import booleans as st_booleans
from hypothesis.strategies import lists as st_lists
from hypothesis.strategies import sampled_from as st_sampled_from

from qusd import catalog
from qusd import state as state_module
from qusd.binfmt import Rule
from qusd.errors import StateError, UnsafeStateError
from qusd.state import FILENAME, JOURNAL, VERSION, Record, State

AARCH64 = catalog.builtin().get("aarch64")


def records() -> dict[str, Record]:
    rs = [
        Record(AARCH64.rule("/usr/bin/qemu-aarch64-static", "F"), target="aarch64"),
        Record(
            Rule(name="raw", interpreter="/bin/true", magic=b"\x00:\n\\x", offset=200, flags="C"),
            persistent=False,
            enabled=False,
        ),
        Record(Rule(name="DOSWin", interpreter="/usr/bin/wine", extension="exe", flags="P")),
    ]
    return {r.rule.name: r for r in rs}


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    st = State.load(tmp_path / "state")
    assert (st.records, st.warnings) == ({}, [])
    assert not (tmp_path / "state").exists()  # loading writes nothing


def test_round_trip(tmp_path: Path) -> None:
    State(tmp_path).save(records())
    again = State.load(tmp_path)
    assert again.warnings == []
    # what was saved is what comes back; rules in the form the kernel reports
    want = {n: Record(r.rule.normalized(), r.persistent, r.enabled, r.target)
            for n, r in records().items()}  # fmt: skip
    assert again.records == want
    assert again.records["raw"].rule.flags == "OC"
    assert again.records["DOSWin"].rule.type == "E"
    doc = json.loads((tmp_path / FILENAME).read_text())
    assert doc["version"] == VERSION == 1
    assert [r["name"] for r in doc["registrations"]] == ["qemu-aarch64", "raw", "DOSWin"]
    assert doc["registrations"][1]["magic"] == "003a0a5c78"
    assert doc["registrations"][2]["mask"] is None


def test_save_creates_the_directory_and_replaces_atomically(
    tmp_path: Path, umask_022: None
) -> None:
    """A process's first save writes a snapshot: a new file renamed over the
    old one, never rewritten in place."""
    directory = tmp_path / "var" / "lib" / "qusd"
    State(directory).save(records())
    first = (directory / FILENAME).stat().st_ino
    st = State.load(directory)
    st.save({"qemu-aarch64": records()["qemu-aarch64"]})
    assert sorted(os.listdir(directory)) == [JOURNAL, FILENAME]  # no temp file left
    info = (directory / FILENAME).stat()
    assert stat.S_IMODE(info.st_mode) == 0o644
    assert stat.S_IMODE((directory / JOURNAL).stat().st_mode) == 0o644
    assert info.st_ino != first
    assert (directory / JOURNAL).read_bytes() == b""  # emptied: all in the snapshot
    assert set(st.records) == {"qemu-aarch64"}
    assert set(State.load(directory).records) == {"qemu-aarch64"}


def test_later_saves_append_what_changed(tmp_path: Path) -> None:
    """Among 1000 records, a save writes one journal line the size of the
    change and leaves the snapshot alone: its cost does not grow with the
    table."""
    many = {
        f"r{i}": Record(Rule(name=f"r{i}", interpreter="/bin/true", magic=b"%d" % i))
        for i in range(1000)
    }
    st = State(tmp_path)
    st.save(many)
    snapshot = (tmp_path / FILENAME).stat()
    assert snapshot.st_size > 200_000
    new = Record(AARCH64.rule("/usr/bin/qemu-aarch64-static", "F"), target="aarch64")
    st.save({**many, new.rule.name: new})
    st.save(many)
    assert (tmp_path / FILENAME).stat().st_mtime_ns == snapshot.st_mtime_ns
    lines = (tmp_path / JOURNAL).read_bytes().splitlines()
    assert len(lines) == 2 and all(len(line) < 600 for line in lines)
    assert json.loads(lines[0])["put"] == [new.to_json()]
    assert json.loads(lines[1]) == {"seq": 3, "put": [], "drop": ["qemu-aarch64"]}
    assert list(State.load(tmp_path).records) == list(many)


def test_the_journal_is_compacted_when_it_reaches_the_snapshots_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "JOURNAL_MIN", 0)
    st, base = State(tmp_path), records()
    st.save(base)
    size = (tmp_path / FILENAME).stat().st_size
    saves = 0
    while (tmp_path / JOURNAL).stat().st_size or saves == 0:
        st.save({**base, "raw": replace(base["raw"], enabled=saves % 2 == 0)})
        saves += 1
        assert (tmp_path / JOURNAL).stat().st_size <= size
    assert saves > 2  # lines were appended before the snapshot was written anew
    assert json.loads((tmp_path / FILENAME).read_bytes())["seq"] == st.seq == saves + 1
    loaded = State.load(tmp_path).records
    assert [(n, r.enabled) for n, r in loaded.items()] == [
        (n, r.enabled) for n, r in st.records.items()
    ]


def test_a_change_of_order_writes_a_snapshot(tmp_path: Path) -> None:
    """The order of the records is the order of registration (newest entry
    matched first): a save that changes it is not a journal line."""
    st = State(tmp_path)
    st.save(records())
    backwards = dict(reversed(records().items()))
    st.save(backwards)
    assert (tmp_path / JOURNAL).read_bytes() == b""
    assert list(State.load(tmp_path).records) == list(backwards)


def test_save_failure_raises_and_keeps_the_old_records(tmp_path: Path) -> None:
    State(tmp_path).save(records())
    before = (tmp_path / FILENAME).read_bytes()
    st = State.load(tmp_path)  # its first save writes a snapshot
    # the temp file's name taken by a directory: the write fails (even for root)
    (tmp_path / f".{FILENAME}.{os.getpid()}.tmp").mkdir()
    with pytest.raises(StateError) as info:
        st.save({})
    assert info.value.message.startswith(f"cannot write {tmp_path / FILENAME}: ")
    assert info.value.message.endswith("the change was rolled back")
    assert (info.value.exit_status, info.value.http_status, info.value.code) == (74, 500, "state")
    assert st.records == State.load(tmp_path).records == State.load(tmp_path).records
    assert set(st.records) == set(records())
    assert (tmp_path / FILENAME).read_bytes() == before


def test_failure_after_the_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    State(tmp_path).save(records())
    before = (tmp_path / FILENAME).read_bytes()
    st = State.load(tmp_path)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StateError, match="No space left on device"):
        st.save({})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [JOURNAL, FILENAME]
    assert (tmp_path / FILENAME).read_bytes() == before
    assert set(st.records) == set(records())


def test_a_failed_append_is_cut_back_and_a_snapshot_written_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = State(tmp_path)
    st.save(records())

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", eio)
    st.save({"raw": records()["raw"]})
    monkeypatch.undo()
    assert (tmp_path / JOURNAL).read_bytes() == b""  # no partial line left behind
    assert list(State.load(tmp_path).records) == ["raw"]
    st.save({})  # and the journal works again
    assert (tmp_path / JOURNAL).read_bytes().count(b"\n") == 1
    assert State.load(tmp_path).records == {}


def test_after_a_failed_append_nothing_is_appended_to_what_it_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line could not be synced nor cut back, and the snapshot instead
    failed too: the save fails, and the next one writes a snapshot (and
    empties the journal) rather than append after a partial line."""
    st = State(tmp_path)
    st.save(records())

    def eio(*args: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", eio)
    monkeypatch.setattr(os, "ftruncate", eio)
    blocker = tmp_path / f".{FILENAME}.{os.getpid()}.tmp"
    blocker.mkdir()
    with pytest.raises(StateError):
        st.save({"raw": records()["raw"]})
    monkeypatch.undo()
    blocker.rmdir()
    assert set(st.records) == set(records())
    st.save({"DOSWin": records()["DOSWin"]})
    assert (tmp_path / JOURNAL).read_bytes() == b""
    assert list(State.load(tmp_path).records) == ["DOSWin"]


def test_a_line_torn_by_a_crash_is_a_save_that_never_happened(tmp_path: Path) -> None:
    st = State(tmp_path)
    st.save(records())
    st.save({"raw": records()["raw"]})
    journal = (tmp_path / JOURNAL).read_bytes()
    with (tmp_path / JOURNAL).open("ab") as f:
        f.write(b'{"seq":3,"put":[],"dro')  # the crash came mid-write
    again = State.load(tmp_path)
    assert list(again.records) == ["raw"] and again.warnings == []
    again.save({})  # the first save of a process writes a snapshot and
    assert (tmp_path / JOURNAL).read_bytes() == b""  # leaves no torn bytes to append after
    assert journal and State.load(tmp_path).records == {}


def test_a_crash_between_snapshot_and_emptied_journal_replays_nothing_twice(
    tmp_path: Path,
) -> None:
    """The journal's lines are numbered, the snapshot holds the last number
    in it: lines the snapshot already has are skipped (a drop then a put
    again, replayed, would move the entry to the end: the order matters)."""
    st = State(tmp_path)
    st.save(records())
    st.save({n: r for n, r in records().items() if n != "qemu-aarch64"})
    st.save({**st.records, "qemu-aarch64": records()["qemu-aarch64"]})
    journal = (tmp_path / JOURNAL).read_bytes()
    want = list(st.records)
    State.load(tmp_path).save(dict(st.records))  # compacts
    (tmp_path / JOURNAL).write_bytes(journal)  # as if emptying it never reached the disk
    assert list(State.load(tmp_path).records) == want == ["raw", "DOSWin", "qemu-aarch64"]


def test_a_corrupt_journal_line_stops_the_replay_and_is_kept(tmp_path: Path) -> None:
    st = State(tmp_path)
    st.save(records())
    st.save({"raw": records()["raw"]})
    with (tmp_path / JOURNAL).open("ab") as f:
        f.write(b'{"seq":3,"put":[{"name":"a/b"}],"drop":[]}\n{"seq":4,"put":[],"drop":["raw"]}\n')
    content = (tmp_path / JOURNAL).read_bytes()
    again = State.load(tmp_path)
    assert list(again.records) == ["raw"]  # the lines before the bad one
    (aside,) = tmp_path.glob(f"{JOURNAL}.corrupt-*")
    assert aside.read_bytes() == content
    (warning,) = again.warnings
    assert warning.startswith(f"state file {tmp_path / JOURNAL} was corrupt at line 2 (")
    assert warning.endswith(f"moved to {aside}; starting with the records before it")


def test_a_journal_without_its_snapshot_is_set_aside(tmp_path: Path) -> None:
    """state.json removed by hand means no records: the changes that were
    made to it are not replayed on nothing."""
    st = State(tmp_path)
    st.save(records())
    st.save({"raw": records()["raw"]})
    (tmp_path / FILENAME).unlink()
    again = State.load(tmp_path)
    assert again.records == {}
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.glob("*.corrupt-*")] == [JOURNAL]
    assert "left without its snapshot" in again.warnings[0]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    saves=st_lists(st_lists(st_sampled_from(["a", "b", "c", "d", "e"]), unique=True), max_size=12),
    flips=st_lists(st_booleans(), min_size=12, max_size=12),
    small=st_booleans(),
)
def test_load_gives_the_last_save_in_its_order(
    tmp_path: Path, saves: list[list[str]], flips: list[bool], small: bool
) -> None:
    """Whatever the sequence of saves (adds, drops, changes, reorders),
    with compactions anywhere between them, a load finds the last one."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    st = State(directory)
    base = Rule(name="x", interpreter="/bin/true", magic=b"\x7fELF")
    last: dict[str, Record] = {}
    old_min = state_module.JOURNAL_MIN
    state_module.JOURNAL_MIN = 0 if small else old_min
    try:
        for i, names in enumerate(saves):
            last = {
                n: Record(replace(base, name=n), enabled=flips[i])
                if flips[i] or n not in st.records
                else st.records[n]
                for n in names
            }
            st.save(last)
            if i % 5 == 4:
                st = State.load(directory)  # a restart in between
    finally:
        state_module.JOURNAL_MIN = old_min
    loaded = State.load(directory)
    assert list(loaded.records.items()) == list(last.items())
    assert loaded.warnings == []


def valid_record(**override: Any) -> dict[str, Any]:
    return {**records()["qemu-aarch64"].to_json(), **override}


def doc(*regs: dict[str, Any], version: Any = 1) -> bytes:
    return json.dumps({"version": version, "registrations": list(regs)}).encode()


CORRUPT: dict[str, bytes] = {
    "garbage": b"\x00\xff\xfe\x80 not json {{{",
    "empty": b"",
    "truncated": doc(valid_record())[:-20],
    "a-list": b"[]",
    "wrong-version": doc(valid_record(), version=2),
    "no-version": json.dumps({"registrations": []}).encode(),
    "no-registrations": json.dumps({"version": 1}).encode(),
    "registrations-not-a-list": json.dumps({"version": 1, "registrations": 5}).encode(),
    "record-not-an-object": doc("qemu-aarch64"),  # type: ignore[arg-type]
    "name-with-slash": doc(valid_record(name="a/b")),
    "reserved-name": doc(valid_record(name="register")),
    "missing-field": doc({k: v for k, v in valid_record().items() if k != "interpreter"}),
    "bad-hex": doc(valid_record(magic="zz")),
    "mask-length": doc(valid_record(mask="ff")),
    "relative-interpreter": doc(valid_record(interpreter="qemu-aarch64")),
    "persistent-not-bool": doc(valid_record(persistent="yes")),
    "offset-bool": doc(valid_record(offset=True)),
    "offset-too-far": doc(valid_record(offset=250)),
}


@pytest.mark.parametrize(
    "content",
    [
        *[pytest.param(v, id=k) for k, v in CORRUPT.items()],
        pytest.param(
            doc(valid_record(flags="FX")),
            id="unknown-flag",
        ),
    ],
)
def test_corrupt_file_is_moved_aside(tmp_path: Path, content: bytes) -> None:
    (tmp_path / FILENAME).write_bytes(content)
    st = State.load(tmp_path)
    assert st.records == {}
    (aside,) = tmp_path.glob(f"{FILENAME}.corrupt-*")
    assert aside.read_bytes() == content  # kept for a human, never dropped
    assert not (tmp_path / FILENAME).exists()
    (warning,) = st.warnings
    assert warning.startswith(f"state file {tmp_path / FILENAME} was corrupt (")
    assert warning.endswith(f"; moved to {aside}; starting with no records")
    # the next save starts afresh next to it
    st.save(records())
    assert set(State.load(tmp_path).records) == set(records())
    assert aside.read_bytes() == content


def test_corrupt_files_never_overwrite_each_other(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / FILENAME).write_bytes(b"garbage %d" % i)
        assert len(State.load(tmp_path).warnings) == 1
    kept = sorted(p.read_bytes() for p in tmp_path.glob(f"{FILENAME}.corrupt-*"))
    assert kept == [b"garbage 0", b"garbage 1", b"garbage 2"]


def test_unreadable_file_is_moved_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    State(tmp_path).save(records())

    def eio(fd: int, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdopen", eio)  # reading it fails: EIO
    st = State.load(tmp_path)
    monkeypatch.undo()
    assert st.records == {}
    assert "was unreadable (Input/output error); moved to" in st.warnings[0]
    assert len(list(tmp_path.glob(f"{FILENAME}.corrupt-*"))) == 1


@pytest.mark.parametrize("name", [FILENAME, JOURNAL])
@pytest.mark.parametrize("kind", ["directory", "FIFO", "symlink"])
def test_a_state_file_that_is_not_regular_is_refused(tmp_path: Path, kind: str, name: str) -> None:
    """Opened with O_NONBLOCK|O_NOFOLLOW: a FIFO does not hang the start, a
    symlink is not followed; the daemon refuses to start (78), naming the fix."""
    if name == JOURNAL:
        State(tmp_path).save(records())
        (tmp_path / JOURNAL).unlink()
    path = tmp_path / name
    if kind == "directory":
        path.mkdir()
    elif kind == "FIFO":
        os.mkfifo(path)
    else:
        (tmp_path / "elsewhere.json").write_text('{"version": 1, "registrations": []}')
        path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UnsafeStateError) as info:
        State.load(tmp_path)
    assert f"{path} is not a regular file (a {kind})" in info.value.message
    assert "remove it" in info.value.message and info.value.exit_status == 78


def test_the_temporary_file_is_never_followed(tmp_path: Path) -> None:
    """A symlink planted at the temporary file's name: removed, not written
    through (O_EXCL|O_NOFOLLOW)."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / f".{FILENAME}.{os.getpid()}.tmp").symlink_to(victim)
    State(tmp_path).save(records())
    assert victim.read_text() == "untouched"
    assert set(State.load(tmp_path).records) == set(records())
    assert sorted(os.listdir(tmp_path)) == [JOURNAL, FILENAME, "victim"]


def test_owners_and_overrides_round_trip_and_old_records_are_roots(tmp_path: Path) -> None:
    rec = Record(AARCH64.rule("/usr/bin/qemu-aarch64-static", "F"), owned=True, owner=1001,
                 force=True, allow_untrusted_interpreter=True)  # fmt: skip
    State(tmp_path).save({rec.rule.name: rec})
    assert State.load(tmp_path).records == {rec.rule.name: rec}
    old = {k: v for k, v in rec.to_json().items()
           if k not in ("owner", "force", "allow_untrusted_interpreter")}  # fmt: skip
    (tmp_path / FILENAME).write_text(json.dumps({"version": 1, "registrations": [old]}))
    (back,) = State.load(tmp_path).records.values()
    assert (back.owner, back.owned, back.force, back.allow_untrusted_interpreter) == (
        0, True, False, False,
    )  # fmt: skip


def test_deeply_nested_json_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(b"[" * 100_000)
    st = State.load(tmp_path)
    assert st.records == {} and len(st.warnings) == 1
