"""The unit layer of issue 12: the watcher's bookkeeping (own writes told
apart, bursts coalesced), the status and interpreter repairs, the event
ring and stream, import/export parsing, the new routes. The real kernel
shows each of these again in tests/test_events.py."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qusd import feed, interchange, stream
from qusd.binfmt import Rule
from qusd.errors import InvalidRuleError
from qusd.events import Events
from qusd.interpreters import FileId
from qusd.repair import in_thread
from qusd.service import SWAP_NAME, RestoreReport
from qusd.state import Record, State
from qusd.watch import IN_DELETE, IN_IGNORED, IN_MODIFY, IN_UNMOUNT, Notice, OwnWrites, TableWatch
from tests.unit.conftest import ADMIN, CAT, World
from tests.unit.fake_kernel import FakeKernel
from tests.unit.test_api import MakeClient, client_for
from tests.unit.test_service import events, recorded, rule

# -- the watcher's bookkeeping ------------------------------------------------------------


async def test_own_writes_are_told_apart_and_bursts_coalesced() -> None:
    own = OwnWrites()
    watch = TableWatch("/nowhere", own, quiet=0.01, latest=0.05)
    watch._wd = 1  # as if watching
    seen: list[Notice] = []
    mine: list[Notice] = []
    watch.subscribe(seen.append)
    watch.subscribe(mine.append, own=True)

    own.expect([("register", "modify"), ("qemu-x", "modify"), ("qemu-x", "delete")])
    for mask, name in [(IN_MODIFY, "register"), (IN_MODIFY, "qemu-x"), (IN_DELETE, "qemu-x")]:
        watch.feed(1, mask, name)
    await asyncio.sleep(0.05)
    assert seen == [] and mine == [Notice(frozenset({"register", "qemu-x"}), own=True)]

    # a flush by someone else: one notice for the whole burst
    for name in ["status", "qemu-a", "qemu-b"]:
        watch.feed(1, IN_MODIFY if name == "status" else IN_DELETE, name)
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.05)
    assert seen == [Notice(frozenset({"status", "qemu-a", "qemu-b"}))]
    assert watch.notices == 1

    # a write the kernel refused raised no event: its note is withdrawn
    with pytest.raises(OSError, match="EEXIST"), own.writing([("register", "modify")]):
        raise OSError("EEXIST")
    watch.feed(1, IN_MODIFY, "register")
    await asyncio.sleep(0.05)
    assert len(seen) == 2 and seen[-1].names == {"register"}

    # an unmount ends the watch and is told
    watch.feed(1, IN_UNMOUNT, "")
    watch.feed(1, IN_IGNORED, "")
    await asyncio.sleep(0.05)
    assert seen[-1].unmounted and not watch.watching


async def test_a_long_burst_is_told_by_the_latest_deadline() -> None:
    watch = TableWatch("/nowhere", quiet=0.02, latest=0.05)
    watch._wd = 1
    seen: list[float] = []
    loop = asyncio.get_running_loop()
    watch.subscribe(lambda n: seen.append(loop.time()))
    start = loop.time()
    for _ in range(20):  # an event every 10 ms for 200 ms: never quiet
        watch.feed(1, IN_MODIFY, "register")
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert seen and seen[0] - start < 0.09


# -- status, interpreters ------------------------------------------------------------------


def test_status_0_is_set_back_or_reported(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = world.service()
    seen = events(svc)
    world.kernel.global_enabled = False
    report = svc.reconcile()
    assert world.kernel.global_enabled and report.repaired == ["enabled"]
    assert [e.kind for e in seen] == ["drift", "restored"]

    monkeypatch.setattr(svc, "should_restore", lambda what: False)  # drift = report
    world.kernel.global_enabled = False
    assert svc.reconcile().repaired == []
    svc.reconcile()  # told once
    assert not world.kernel.global_enabled
    assert [e.kind for e in seen] == ["drift", "restored", "drift"]
    assert "drift = report" in svc.warnings["disabled:status"]
    world.kernel.global_enabled = True
    svc.reconcile()
    assert "disabled:status" not in svc.warnings


def _upgrade(path: str) -> None:
    tmp = path + ".dpkg-new"
    Path(tmp).write_bytes(b"new")
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)


def test_an_upgraded_interpreter_is_swapped_with_a_bridge(world: World) -> None:
    svc = world.service()
    svc.register_targets(svc_admin(), ["arm64", "s390x"])
    svc.set_enabled(svc_admin(), "qemu-s390x", False)
    stamps = {n: r.stamp for n, r in State.load(world.state_dir).records.items()}
    assert all(stamps.values())
    _upgrade(world.interpreter("aarch64"))
    _upgrade(world.interpreter("s390x"))
    assert svc.registration("qemu-aarch64").interpreter_stale
    seen = events(svc)
    world.kernel.writes.clear()
    report = svc.reconcile()
    assert sorted(report.updated) == ["qemu-aarch64", "qemu-s390x"]
    aarch64 = [w for w in world.kernel.writes if w[1] in ("qemu-aarch64", SWAP_NAME)]
    assert aarch64 == [
        ("register", SWAP_NAME),  # the bridge first: programs always find an entry
        ("remove", "qemu-aarch64"),
        ("register", "qemu-aarch64"),
        ("remove", SWAP_NAME),
    ]
    assert not world.kernel.table["qemu-s390x"].enabled  # disabled stays disabled
    assert SWAP_NAME not in world.kernel.table
    assert not svc.registration("qemu-aarch64").interpreter_stale
    after = State.load(world.state_dir).records
    assert after["qemu-aarch64"].stamp != stamps["qemu-aarch64"]
    assert [e.kind for e in seen].count("interpreter-updated") == 2
    assert svc.reconcile().updated == []  # followed once


def test_a_failed_swap_puts_the_old_entry_back(world: World) -> None:
    svc = world.service()
    svc.register_targets(svc_admin(), ["arm64"])
    before = dict(world.kernel.table)
    _upgrade(world.interpreter("aarch64"))
    world.kernel.fail("register", name="qemu-aarch64", nth=1)
    report = svc.reconcile()
    assert report.failed == ["qemu-aarch64"] and report.updated == []
    assert world.kernel.table == before  # the transaction undid it all
    assert svc.registration("qemu-aarch64").interpreter_stale


def test_a_record_without_a_stamp_takes_one(world: World) -> None:
    aarch64 = rule(world, "aarch64")
    recorded(world, Record(aarch64))
    svc = world.service()
    svc.restore()
    assert State.load(world.state_dir).records["qemu-aarch64"].stamp is None
    svc.reconcile()
    assert State.load(world.state_dir).records["qemu-aarch64"].stamp is not None


def svc_admin() -> Any:
    from tests.unit.conftest import ADMIN  # noqa: PLC0415

    return ADMIN


# -- the ring ------------------------------------------------------------------------------


def test_the_ring_says_what_is_lost() -> None:
    ev = Events()
    ring = feed.Ring(ev, size=3)
    for i in range(5):
        ev.emit("registered", f"r{i}")
    back = ring.since(0)
    assert [e.seq for e in back.events] == [3, 4, 5] and back.lost == 2
    back = ring.since(3)
    assert [e.seq for e in back.events] == [4, 5] and back.lost == 0
    assert ring.since(5).events == [] and ring.since(5).lost == 0
    back = ring.since(99)
    assert back.restarted and [e.seq for e in back.events] == [3, 4, 5]
    assert feed.ring(ev) is not ring  # ring() attaches its own, once
    assert feed.ring(ev) is feed.ring(ev)


async def test_a_stream_that_is_not_read_is_cut_off() -> None:
    ev = Events()

    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    t = Transport()
    listener = stream.Listener(ev, t, size=4)  # type: ignore[arg-type]
    for i in range(4):
        ev.emit("registered", f"r{i}")
    assert not listener.cut and (await listener.next(0.1)) is not None
    for i in range(5):
        ev.emit("registered", f"more {i}")
    assert listener.cut and t.aborted and listener.done
    listener.close()
    ev.emit("registered", "after")  # no longer subscribed


# -- the routes ----------------------------------------------------------------------------


async def test_events_route_replays_and_streams(aiohttp_client: MakeClient, world: World) -> None:
    svc = world.service()
    c = await client_for(aiohttp_client, svc)
    await c.post("/v1/registrations", json={"targets": ["arm64"]}, headers={"X-Test-As": "user"})
    resp = await c.get("/v1/events?since=0&keepalive=0.05")
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    first = await resp.content.readline()
    assert b'"kind":"registered"' in first and b'"seq":1' in first
    assert b'"kind":"keep-alive"' in await resp.content.readline()
    resp.close()
    bad = await c.get("/v1/events?since=-1")
    assert bad.status == 422 and (await bad.json())["field"] == "since"


async def test_reconcile_route_is_admin_only(aiohttp_client: MakeClient, world: World) -> None:
    svc = world.service()
    c = await client_for(aiohttp_client, svc)
    assert (await c.post("/v1/reconcile", headers={"X-Test-As": "user"})).status == 403
    resp = await c.post("/v1/reconcile", headers={"X-Test-As": "admin"})
    doc = await resp.json()
    assert resp.status == 200 and doc["summary"] == RestoreReport().summary()


async def test_import_route(aiohttp_client: MakeClient, world: World) -> None:
    svc = world.service()
    c = await client_for(aiohttp_client, svc)
    t = CAT.get("s390x")
    spec = {"name": "qemu-s390x", "magic": t.magic.hex(), "mask": t.mask.hex(),
            "interpreter": world.interpreter("s390x"), "flags": "F"}  # fmt: skip
    resp = await c.post("/v1/import", json={"entries": [spec]}, headers={"X-Test-As": "user"})
    assert resp.status == 403
    resp = await c.post("/v1/import", json={"entries": [spec]}, headers={"X-Test-As": "admin"})
    doc = await resp.json()
    assert resp.status == 201 and doc["registered"][0]["target"] == "s390x"
    assert State.load(world.state_dir).records["qemu-s390x"].target == "s390x"


# -- import and export ----------------------------------------------------------------------


def test_binfmt_d_round_trip(tmp_path: Path) -> None:
    rules = [
        CAT.get("aarch64").rule("/usr/bin/qemu-aarch64-static", "OCF").normalized(),
        Rule("py", "/usr/bin/python3", magic=b"\xa7\x0d\x0d\x0a"),
        Rule("jar", "/usr/bin/jexec", extension="jar", flags="P"),
        Rule("odd", "/bin/odd", magic=b":\0#", mask=b"\xff\xff\xff", offset=7),
    ]
    for r in rules:
        interchange.write_binfmt_d(tmp_path, r)
    back = {f.rule.name: f.rule for f in interchange.read_paths([tmp_path])}
    assert back == {r.name: r for r in rules}


def test_update_binfmts_formats() -> None:
    admin = "pkg\nextension\n\njar\n\n/usr/bin/jexec\n\nno\nyes\nno\n"
    assert interchange.read_binfmts_admin("jar", admin, "x") == Rule(
        "jar", "/usr/bin/jexec", extension="jar", flags="P"
    )
    imported = "package qemu\ninterpreter /usr/bin/q\nmagic \\x7fELF\noffset 0\ncredentials yes\n"
    assert interchange.read_binfmts_import("q", imported, "x") == Rule(
        "q", "/usr/bin/q", magic=b"\x7fELF", flags="C"
    )
    with pytest.raises(InvalidRuleError, match="detector"):
        interchange.read_binfmts_admin("d", "p\nmagic\n0\nMZ\n\n/usr/bin/w\n/usr/bin/det\n", "x")


def test_import_refuses_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text(":a:M::\\x01::/bin/a:\n")
    (tmp_path / "b.conf").write_text("# the same name twice\n:a:M::\\x02::/bin/b:\n")
    with pytest.raises(InvalidRuleError, match="defined twice"):
        interchange.read_paths([tmp_path])
    (tmp_path / "b.conf").write_text(":b:X::\\x02::/bin/b:\n")
    with pytest.raises(InvalidRuleError, match=r"b\.conf:1: type 'X'"):
        interchange.read_paths([tmp_path])
    (tmp_path / "b.conf").write_text(":b:M\n")
    with pytest.raises(InvalidRuleError, match=r"not a binfmt\.d rule"):
        interchange.read_paths([tmp_path])


def test_record_stamp_survives_the_state_file(tmp_path: Path) -> None:
    r = Record(Rule("x", "/bin/x", magic=b"\x01"), stamp=FileId(1, 2, 3, 4, 5))
    State(tmp_path).save({"x": r, "y": replace(r, rule=replace(r.rule, name="y"), stamp=None)})
    back = State.load(tmp_path).records
    assert back["x"].stamp == FileId(1, 2, 3, 4, 5) and back["y"].stamp is None


# -- reads while a change is in flight -----------------------------------------------------


class WatchedKernel(FakeKernel):
    """A fake kernel as a watched one looks to the service: its version
    moves with every write (ObservedKernel: qusd's writes and the events)."""

    def version(self) -> tuple[int, int] | None:
        return (len(self.writes), 0)

    def watch_files(self, directories: frozenset[str]) -> int | None:
        return 0


async def test_a_read_during_a_change_never_shows_less_than_a_change_already_answered(
    world: World,
) -> None:
    """A read while a change runs in its thread is answered from the last
    snapshot only if that shows the table the change found; one taken
    before changes that were since answered (here: before a registration)
    would contradict what the client was told, so the table is read."""
    world.kernel = WatchedKernel()
    svc = world.service()
    assert svc.snapshot().registrations == ()  # as the daemon's start takes one
    svc.register_targets(ADMIN, ["arm64"])  # answered: the client knows it is there
    started, release = threading.Event(), threading.Event()

    def in_flight() -> None:  # a reconcile, say, that takes its time
        started.set()
        release.wait(10)

    call = asyncio.ensure_future(in_thread(svc, in_flight))
    await asyncio.to_thread(started.wait, 10)
    try:
        seen = [r.entry.name for r in svc.snapshot(settled=True).registrations]
        assert seen == ["qemu-aarch64"]
        # and a snapshot that does show the table the change found is kept
        assert svc.snapshot(settled=True) is svc.snapshot(settled=True)
    finally:
        release.set()
        await call
