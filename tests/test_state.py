"""The state file: round trip, atomic replacement, failures, corrupt files."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qusd import catalog
from qusd.binfmt import Rule
from qusd.errors import StateError, UnsafeStateError
from qusd.state import FILENAME, VERSION, Record, State

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
    directory = tmp_path / "var" / "lib" / "qusd"
    st = State(directory)
    st.save(records())
    first = (directory / FILENAME).stat().st_ino
    st.save({"qemu-aarch64": records()["qemu-aarch64"]})
    assert os.listdir(directory) == [FILENAME]  # no temp file left
    info = (directory / FILENAME).stat()
    assert stat.S_IMODE(info.st_mode) == 0o644
    assert info.st_ino != first  # a new file renamed over the old one, not rewritten in place
    assert set(st.records) == {"qemu-aarch64"}
    assert set(State.load(directory).records) == {"qemu-aarch64"}


def test_save_failure_raises_and_keeps_the_old_records(tmp_path: Path) -> None:
    st = State(tmp_path)
    st.save(records())
    before = (tmp_path / FILENAME).read_bytes()
    # the temp file's name taken by a directory: the write fails (even for root)
    (tmp_path / f".{FILENAME}.{os.getpid()}.tmp").mkdir()
    with pytest.raises(StateError) as info:
        st.save({})
    assert info.value.message.startswith(f"cannot write {tmp_path / FILENAME}: ")
    assert info.value.message.endswith("the change was rolled back")
    assert (info.value.exit_status, info.value.http_status, info.value.code) == (74, 500, "state")
    assert st.records == records()
    assert (tmp_path / FILENAME).read_bytes() == before


def test_failure_after_the_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = State(tmp_path)
    st.save(records())
    before = (tmp_path / FILENAME).read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StateError, match="No space left on device"):
        st.save({})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [FILENAME]
    assert (tmp_path / FILENAME).read_bytes() == before
    assert st.records == records()


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
    (warning,) = st.warnings
    assert "was unreadable (Input/output error); moved to" in warning
    assert len(list(tmp_path.glob(f"{FILENAME}.corrupt-*"))) == 1


@pytest.mark.parametrize("kind", ["directory", "FIFO", "symlink"])
def test_a_state_file_that_is_not_regular_is_refused(tmp_path: Path, kind: str) -> None:
    """Opened with O_NONBLOCK|O_NOFOLLOW: a FIFO does not hang the start, a
    symlink is not followed; the daemon refuses to start (78), naming the fix."""
    path = tmp_path / FILENAME
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
    assert sorted(os.listdir(tmp_path)) == [FILENAME, "victim"]


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
