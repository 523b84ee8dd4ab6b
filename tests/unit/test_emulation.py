"""The emulation checks in-process: what the host runs (settings and the
family table), who may install interpreters, verify's refusals, doctor's
pure reasoning (the kernel's pick, paths inside a chroot) and the record of
F interpreter files. The real-kernel suite shows each again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from qusd import api, doctor, native, openapi
from qusd.binfmt import Entry, Rule
from qusd.errors import ForbiddenError, NotMountedError
from qusd.interpreters import FileId
from tests.unit.conftest import ADMIN, CAT, READER, ROOT, USER, World
from tests.unit.test_api import MakeClient, client_for, problem
from tests.unit.test_service import entry

AARCH64 = CAT.get("aarch64")
OFF = {"detect_native": False}  # the family table: no probes in the unit layer


def test_the_family_table_and_the_settings_decide_without_probes(world: World) -> None:
    svc = world.service(detect_native=False, native_targets=("armhf",),
                        emulated_targets=("x86_64",))  # fmt: skip
    infos = {i.target.name: i for i in svc.targets()}
    assert (infos["arm"].native, infos["arm"].verdict) == (
        True, native.Verdict(True, "setting", "native_targets in the settings"))  # fmt: skip
    assert (infos["x86_64"].native, infos["x86_64"].verdict.how) == (False, "setting")  # type: ignore[union-attr]
    for t in CAT:
        if t.name not in ("arm", "x86_64"):
            v = infos[t.name].verdict
            assert v is not None and v.how == "family" and v.native is (t.family == svc.family)
            assert "not tried: probing is off in the settings" in v.detail
    assert svc.policy.native_targets == frozenset(n for n, i in infos.items() if i.native)


def test_a_user_may_register_what_the_settings_call_foreign(world: World) -> None:
    svc = world.service(detect_native=False, emulated_targets=("i386",))
    if svc.family != "i386":
        pytest.skip("an x86 host's question")
    done = svc.register_targets(USER, ["i386"])
    assert [r.entry.name for r in done.registered] == ["qemu-i386"]
    with pytest.raises(ForbiddenError, match="x86_64 is of the host's own family"):
        svc.register_targets(USER, ["x86_64"])
    everything = world.service(**OFF)._chosen(None)
    assert "i386" not in [t.name for t in everything]
    assert "i386" in [t.name for t in svc._chosen(None)]


def test_only_admins_install_interpreters_and_only_with_a_store(world: World) -> None:
    svc = world.service(**OFF)
    for who in (READER, USER):
        with pytest.raises(ForbiddenError, match="installing interpreters is admin-only"):
            svc.install_interpreters(who, ["aarch64"], "/nonexistent.deb")
    with pytest.raises(ForbiddenError, match="no interpreter_store is set"):
        world.service(interpreter_store="", **OFF).install_interpreters(ADMIN, ["aarch64"])
    assert svc.interpreters() == ([], {})


def test_verify_needs_the_mount(world: World) -> None:
    world.kernel.mounted = False
    svc = world.service(**OFF)
    with pytest.raises(NotMountedError, match="so no entry can be seen or verified"):
        svc.verify()
    svc.warnings["not-mounted"] = "cannot mount binfmt_misc at /x: it needs CAP_SYS_ADMIN"
    with pytest.raises(NotMountedError, match="it needs CAP_SYS_ADMIN"):
        svc.verify()


def test_f_interpreter_files_are_recorded_as_registered(world: World, tmp_path: Path) -> None:
    svc = world.service(**OFF)
    svc.register_targets(ROOT, ["aarch64", "s390x"], "F")
    svc.register_targets(ROOT, ["riscv64"], "")
    st = os.stat(world.interpreter("aarch64"))
    assert set(svc.fixed()) == {"qemu-aarch64", "qemu-s390x"}
    assert svc.fixed()["qemu-aarch64"].same_file(FileId(st.st_dev, st.st_ino))
    again = world.service(**OFF)  # kept in the state
    assert again.fixed() == svc.fixed()
    svc.unregister(ROOT, "qemu-s390x")
    assert set(world.service(**OFF).fixed()) == {"qemu-aarch64"}
    svc.reset(ROOT)
    assert world.service(**OFF).fixed() == {}


# -- doctor's reasoning --------------------------------------------------------------------


def test_the_kernel_picks_the_newest_enabled_match() -> None:
    prog = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\xb7\x00"
    older = entry(AARCH64.rule("/a", "F"))
    newer = Entry("mine", False, "/b", "", "M", 0, AARCH64.magic, AARCH64.mask)
    wine = entry(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    assert doctor.pick([newer, older], prog) == (older, [newer])
    assert doctor.pick([older, newer], prog) == (older, [])
    assert doctor.pick([wine, newer, older], prog, "setup.exe") == (wine, [])
    assert doctor.pick([wine], prog, "setup.exe.bak") == (None, [])
    assert doctor.pick([wine], prog, "exe") == (None, [])  # no dot, no extension
    # a file shorter than the magic compares against zeros, as the kernel's buffer
    short = Entry("z", True, "/z", "", "M", 2, b"\x00\x00", b"\xff\xff")
    assert doctor.entry_matches(short, b"MZ", "")


def test_paths_inside_a_root_stay_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/qemu").write_text("")
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("/usr/bin")  # absolute: inside the root
    (root / "up").symlink_to("../../..")  # cannot climb out
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert doctor.resolve_in_root(r, "/bin/qemu") == f"{r}/usr/bin/qemu"
    assert doctor.resolve_in_root(r, "/lib/qemu") == f"{r}/usr/bin/qemu"
    assert doctor.resolve_in_root(r, "/up/usr/bin/qemu") == f"{r}/usr/bin/qemu"
    assert doctor.resolve_in_root(r, "/../../usr/bin/qemu") == f"{r}/usr/bin/qemu"
    assert doctor.resolve_in_root(r, "/usr/bin/missing") is None
    assert doctor.resolve_in_root(r, "/loop/x") is None
    assert doctor.resolve_in_root("/", "/bin/sh") == "/usr/bin/sh" or os.path.exists("/bin/sh")


# -- the API -------------------------------------------------------------------------------


Client = TestClient[web.Request, web.Application]


async def test_the_routes(aiohttp_client: MakeClient, world: World) -> None:
    c = await client_for(aiohttp_client, world.service(**OFF))
    resp = await c.post("/v1/verify", json={"targets": ["vax"]})
    await problem(resp, 422, "validation")
    world.kernel.mounted = False
    await problem(await c.post("/v1/verify", json={}), 503, "not-mounted")
    world.kernel.mounted = True
    resp = await c.post("/v1/verify", json={"targets": []})
    assert resp.status == 200 and await resp.json() == {"ok": True, "results": []}
    listed = await (await c.get("/v1/interpreters")).json()
    assert listed == {"store": "/var/lib/qusd/interpreters", "provisioned": [], "fixed": []}
    body = {"targets": ["arm64"], "deb": "/x.deb"}
    for who in ("reader", "user"):
        resp = await c.post("/v1/interpreters", json=body, headers={"X-Test-As": who})
        await problem(resp, 403, "forbidden")
    resp = await c.post("/v1/interpreters", json={**body, "deb": "x.deb"},
                        headers={"X-Test-As": "admin"})  # fmt: skip
    assert "deb: must be an absolute path" in (await problem(resp, 422, "validation"))["detail"]
    targets = await (await c.get("/v1/targets")).json()
    assert {t["native_by"] for t in targets} == {"family"}
    assert all(t["provisioned"] is None for t in targets)
    paths = api_paths()
    assert {"/v1/verify", "/v1/interpreters"} <= set(paths)
    assert set(paths["/v1/interpreters"]) == {"get", "post"}


def api_paths() -> dict[str, dict[str, object]]:
    import json  # noqa: PLC0415

    doc: dict[str, dict[str, dict[str, object]]] = json.loads(openapi.document_json())
    return doc["paths"]


def test_the_routes_are_in_the_table() -> None:
    routes = {(r.method, r.path) for r in api.ROUTES}
    assert {("POST", "/v1/verify"), ("GET", "/v1/interpreters"),
            ("POST", "/v1/interpreters")} <= routes  # fmt: skip
