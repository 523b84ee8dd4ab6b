"""The HTTP API against the real daemon, over its real Unix socket.

Every test runs `qusd --sandbox` (a private binfmt_misc) and talks to it
twice over: once through aiohttp's Unix connector, once through
`curl --unix-socket`. Every refused request is shown to leave the kernel
table, the global switch and the state file exactly as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from openapi_spec_validator import validate
from yarl import URL

from qusd import __version__, catalog, interpreters
from qusd.api import MAX_BODY, ROUTES
from qusd.binfmt import DEFAULT_PATH, Entry, Rule
from qusd.state import FILENAME
from tests.conftest import (
    DEBIAN_TARGET,
    FOREIGN_ARCHS,
    Daemon,
    busybox_path,
    interpreter,
    needs_sandbox,
)

CURL = "/usr/bin/curl"
KINDS = ("aiohttp", "curl")
BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(os.uname().machine)
PROBLEM_JSON = "application/problem+json"
NO_BODY: Final[Any] = object()

#: the keys of a registration, as every route returns one
REG_KEYS = set(
    "name enabled type offset magic mask extension interpreter flags "
    "managed persistent target interpreter_stale owner kept raw".split()
)
TARGET_KEYS = set(
    "name family native native_by native_detail offset magic mask interpreter static "
    "provisioned".split()
)
STATUS_KEYS = set(
    "version kernel machine family binfmt_misc sandbox catalog state_file counts warnings".split()
)
#: entries other tools make, written straight to the kernel, never through qusd
WINE = Rule(name="DOSWin", interpreter="/usr/bin/wine", extension="exe")
PYC = Rule(name="python3.11", interpreter="/usr/bin/python3.11", magic=b"\xa7\x0d\x0d\x0a")


# -- two clients, one interface --------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def content_type(self) -> str:
        """The media type, without parameters (charset)."""
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"{self.status} {self.content_type}: {self.body[:3000]!r}"


class Api:
    """One HTTP client on the daemon's socket."""

    kind = ""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    async def request(
        self,
        method: str,
        path: str,
        body: Any = NO_BODY,
        *,
        raw: bytes | None = None,
        content_type: str | None = None,
    ) -> Reply:
        """Send body as JSON (or raw bytes as they are); path is sent verbatim."""
        if body is not NO_BODY:
            raw = json.dumps(body).encode()
            content_type = content_type or "application/json"
        return await self.send(method, path, raw, content_type)

    async def send(
        self, method: str, path: str, data: bytes | None, content_type: str | None
    ) -> Reply:
        raise NotImplementedError


class AiohttpApi(Api):
    kind = "aiohttp"

    def __init__(self, socket: str, session: aiohttp.ClientSession) -> None:
        super().__init__(socket)
        self.session = session

    async def send(
        self, method: str, path: str, data: bytes | None, content_type: str | None
    ) -> Reply:
        headers = {"Content-Type": content_type} if content_type else {}
        url = URL("http://qusd" + path, encoded=True)
        async with self.session.request(method, url, data=data, headers=headers) as resp:
            body = await resp.read()
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)


class CurlApi(Api):
    kind = "curl"

    async def send(
        self, method: str, path: str, data: bytes | None, content_type: str | None
    ) -> Reply:
        argv = [CURL, "-s", "-i", "--path-as-is", "--unix-socket", self.socket, "-X", method]
        argv += ["-H", "Expect:"]  # no 100-continue round trip for big bodies
        if content_type is not None:
            argv += ["-H", f"Content-Type: {content_type}"]
        if data is not None:
            argv += ["--data-binary", "@-"]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "http://qusd" + path,
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate(data)
        assert proc.returncode == 0, f"curl exited {proc.returncode}: {err!r}"
        return parse_http(out)


def parse_http(raw: bytes) -> Reply:
    """curl -i's output: status line, headers, blank line, body (1xx skipped)."""
    while True:
        head, sep, body = raw.partition(b"\r\n\r\n")
        assert sep, f"no end of headers in {raw[:500]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if status >= 200:
            break
        raw = body
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body)


@contextlib.asynccontextmanager
async def connect(kind: str, socket: str) -> AsyncIterator[Api]:
    if kind == "curl":
        yield CurlApi(socket)
        return
    connector = aiohttp.UnixConnector(path=socket)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield AiohttpApi(socket, session)


@pytest.fixture(params=KINDS)
async def api(request: pytest.FixtureRequest, daemon: Daemon) -> AsyncIterator[Api]:
    """A client of the `daemon` fixture: aiohttp, then curl."""
    async with connect(request.param, daemon.socket) as client:
        yield client


# -- helpers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    table: list[Entry]
    enabled: bool
    state: dict[str, bytes]


def snapshot(daemon: Daemon) -> Snapshot:
    return Snapshot(daemon.table(), bool(daemon.inside.kernel.enabled()), daemon.state_files())


@contextlib.contextmanager
def unchanged(daemon: Daemon) -> Iterator[Snapshot]:
    """The kernel table, binfmt_misc's global switch and the state file must
    be the same after the block as before it."""
    before = snapshot(daemon)
    yield before
    after = snapshot(daemon)
    assert after.table == before.table, "the kernel table changed"
    assert after.enabled == before.enabled, "binfmt_misc's global status changed"
    assert after.state == before.state, "the state file changed"


def documented(method: str, path: str) -> set[int] | None:
    """The statuses ROUTES declares for a request, None if no route matches."""
    for r in ROUTES:
        if r.method == method and re.fullmatch(r.path.replace("{name}", "[^/]+"), path):
            return {r.status, *r.errors, 500}
    return None


async def ok(api: Api, method: str, path: str, body: Any = NO_BODY, status: int = 200) -> Any:
    """The JSON of a successful answer."""
    reply = await api.request(method, path, body)
    assert reply.status == status, str(reply)
    assert reply.content_type == "application/json", str(reply)
    return reply.json()


async def refused(
    api: Api,
    daemon: Daemon,
    method: str,
    path: str,
    body: Any = NO_BODY,
    *,
    status: int,
    code: str,
    raw: bytes | None = None,
    content_type: str | None = None,
) -> dict[str, Any]:
    """Send a request that must be refused with a problem, changing nothing."""
    with unchanged(daemon):
        reply = await api.request(method, path, body, raw=raw, content_type=content_type)
        assert reply.status == status, str(reply)
    assert reply.content_type == PROBLEM_JSON, str(reply)
    problem: dict[str, Any] = reply.json()
    assert set(problem) - {"errors", "field"} == {
        "type",
        "title",
        "status",
        "detail",
        "code",
        "reason",
    }, problem
    # the reason alone, and the detail people read: the field it is about, then why
    field = f"{problem['field']}: " if "field" in problem else ""
    assert problem["detail"] == field + problem["reason"], problem
    assert problem["type"] == f"urn:qusd:problem:{code}", problem
    assert problem["code"] == code and problem["status"] == status, problem
    assert isinstance(problem["title"], str) and problem["title"], problem
    assert isinstance(problem["detail"], str) and problem["detail"], problem
    if code == "validation":
        assert problem["errors"], problem
        for e in problem["errors"]:
            assert set(e) == {"loc", "msg", "type"} and e["loc"][0] == "body", e
    else:
        assert "errors" not in problem, problem
    statuses = documented(method, path)
    assert statuses is None or status in statuses, f"{status} is not documented for {path}"
    return problem


def kernel_view(e: Entry) -> dict[str, Any]:
    """What the API must say of a kernel entry, apart from managed/persistent/target."""
    magic = e.type == "M"
    return {
        "name": e.name,
        "enabled": e.enabled,
        "type": "magic" if magic else "extension",
        "offset": e.offset,
        "magic": e.magic.hex() if magic else None,
        "mask": e.mask.hex() if e.mask is not None else None,
        "extension": e.extension,
        "interpreter": e.interpreter,
        "flags": e.flags,
    }


def in_kernel(daemon: Daemon) -> dict[str, Entry]:
    return {e.name: e for e in daemon.table()}


def foreign_qemu(name: str) -> Rule:
    """The catalog rule for a target, as another tool would write it."""
    target = BUILTIN.get(name)
    return target.rule(interpreter(target.cpu), "F")


async def seed(api: Api, daemon: Daemon) -> None:
    """A managed qemu-aarch64 and a foreign entry: what a refusal must not touch."""
    await ok(api, "POST", "/v1/registrations", {"targets": ["aarch64"]}, status=201)
    daemon.inside.kernel.register(WINE)
    assert sorted(in_kernel(daemon)) == ["DOSWin", "qemu-aarch64"]


# -- the routes, one by one --------------------------------------------------------


async def test_health(api: Api) -> None:
    assert await ok(api, "GET", "/v1/health") == {"status": "ok"}


async def test_status(api: Api, daemon: Daemon) -> None:
    status = await ok(api, "GET", "/v1/status")
    assert set(status) == STATUS_KEYS
    assert status["sandbox"] == {"pid": daemon.pid}
    assert (status["version"], status["kernel"], status["machine"], status["family"]) == (
        __version__,
        os.uname().release,
        os.uname().machine,
        HOST_FAMILY,
    )
    assert status["binfmt_misc"] == {"path": DEFAULT_PATH, "mounted": True, "enabled": True}
    assert status["counts"] == {"entries": 0, "managed": 0, "persistent": 0, "recorded": 0}
    assert status["warnings"] == []
    assert status["catalog"] == "builtin"
    assert status["state_file"] == str(daemon.state_dir / FILENAME)

    await seed(api, daemon)
    await ok(
        api, "POST", "/v1/registrations", {"targets": ["s390x"], "persistent": False}, status=201
    )
    daemon.inside.kernel.register(PYC)
    status = await ok(api, "GET", "/v1/status")
    assert status["counts"] == {"entries": 4, "managed": 2, "persistent": 1, "recorded": 2}
    assert status["warnings"] == []


async def test_targets(api: Api) -> None:
    targets = await ok(api, "GET", "/v1/targets")
    assert len(targets) == 34
    assert [t["name"] for t in targets] == BUILTIN.names()
    for t, want in zip(targets, BUILTIN, strict=True):
        assert set(t) == TARGET_KEYS
        assert (t["family"], t["native"], t["offset"]) == (
            want.family,
            want.family == HOST_FAMILY,
            want.offset,
        )
        assert re.fullmatch(r"([0-9a-f]{2})+", t["magic"] + t["mask"]), t
        assert (bytes.fromhex(t["magic"]), bytes.fromhex(t["mask"])) == (want.magic, want.mask)
        found = interpreters.find(want)
        if found is None:  # not installed here: null, never a guess
            assert (t["interpreter"], t["static"]) == (None, None), t
            continue
        path = t["interpreter"]
        assert path == found.path and os.path.basename(path) in interpreters.candidates(want), t
        assert os.access(path, os.X_OK)
        assert t["static"] is (interpreters.is_static_elf(path) is True), t
    native = {t["name"] for t in targets if t["native"]}
    if HOST_FAMILY == "i386":
        assert native == {"i386", "i486", "x86_64"}


@needs_sandbox
@pytest.mark.parametrize("kind", KINDS)
async def test_targets_without_interpreters(kind: str, tmp_path: Path) -> None:
    """Interpreters looked up in an empty directory: null, and nothing to register."""
    empty = tmp_path / "no-interpreters"
    empty.mkdir()
    d = Daemon(tmp_path, "--interpreter-dir", str(empty))
    try:
        async with connect(kind, d.socket) as api:
            targets = await ok(api, "GET", "/v1/targets")
            assert len(targets) == 34
            assert all(t["interpreter"] is None and t["static"] is None for t in targets)
            # omitted targets: every foreign one that has an interpreter, so none
            done = await ok(api, "POST", "/v1/registrations", {}, status=201)
            assert done == {"registered": [], "unchanged": []}
            problem = await refused(
                api,
                d,
                "POST",
                "/v1/registrations",
                {"targets": ["arm64"]},
                status=422,
                code="interpreter",
            )
            assert "no interpreter for aarch64" in problem["detail"]
            assert str(empty) in problem["detail"]
            assert d.table() == []
    finally:
        d.stop()


async def test_registrations_list_every_kernel_entry(api: Api, daemon: Daemon) -> None:
    assert await ok(api, "GET", "/v1/registrations") == []
    await ok(api, "POST", "/v1/registrations", {"targets": ["aarch64"]}, status=201)
    for rule in (WINE, PYC, foreign_qemu("s390x")):
        daemon.inside.kernel.register(rule)
    daemon.inside.kernel.disable("python3.11")

    listed = await ok(api, "GET", "/v1/registrations")
    kernel = in_kernel(daemon)
    assert [r["name"] for r in listed] == sorted(kernel)
    assert sorted(kernel) == ["DOSWin", "python3.11", "qemu-aarch64", "qemu-s390x"]
    by_name = {r["name"]: r for r in listed}
    for name, entry in kernel.items():
        assert set(by_name[name]) == REG_KEYS
        assert {k: by_name[name][k] for k in kernel_view(entry)} == kernel_view(entry)
    owner = {n: (r["managed"], r["persistent"], r["target"]) for n, r in by_name.items()}
    assert owner == {
        "DOSWin": (False, False, None),
        "python3.11": (False, False, None),
        "qemu-aarch64": (True, True, "aarch64"),
        "qemu-s390x": (False, False, "s390x"),  # recognized by its magic, not qusd's
    }
    assert by_name["DOSWin"]["type"] == "extension" and by_name["DOSWin"]["extension"] == "exe"
    assert by_name["python3.11"]["enabled"] is False
    assert by_name["python3.11"]["magic"] == "a70d0d0a" and by_name["python3.11"]["mask"] is None


async def test_get_one_registration(api: Api, daemon: Daemon) -> None:
    await seed(api, daemon)
    listed = {r["name"]: r for r in await ok(api, "GET", "/v1/registrations")}
    for name in ("qemu-aarch64", "DOSWin"):
        assert await ok(api, "GET", f"/v1/registrations/{name}") == listed[name]
    aarch64 = listed["qemu-aarch64"]
    assert aarch64 == {
        **kernel_view(in_kernel(daemon)["qemu-aarch64"]),
        "managed": True,
        "persistent": True,
        "target": "aarch64",
        "interpreter_stale": False,
        "owner": 0,  # root registered it through qusd
        "kept": True,  # an admin's: qusd keeps it
        "raw": None,  # every field is UTF-8
    }
    assert (aarch64["interpreter"], aarch64["flags"]) == (interpreter("aarch64"), "F")
    problem = await refused(
        api, daemon, "GET", "/v1/registrations/qemu-s390x", status=404, code="not-found"
    )
    assert problem["detail"] == "no binfmt_misc entry named 'qemu-s390x'"


async def test_register_every_foreign_target_by_default(api: Api, daemon: Daemon) -> None:
    want = [t.name for t in BUILTIN.foreign(HOST_FAMILY) if interpreters.find(t)]
    assert len(want) >= 28
    done = await ok(api, "POST", "/v1/registrations", {}, status=201)
    assert done["unchanged"] == []
    assert [r["target"] for r in done["registered"]] == want  # in catalog order
    assert not {t.name for t in BUILTIN if t.family == HOST_FAMILY} & set(want)
    kernel = in_kernel(daemon)
    assert sorted(kernel) == sorted(f"qemu-{n}" for n in want)
    for reg in done["registered"]:
        assert set(reg) == REG_KEYS
        assert {k: reg[k] for k in kernel_view(kernel[reg["name"]])} == kernel_view(
            kernel[reg["name"]]
        )
        assert (reg["flags"], reg["managed"], reg["persistent"], reg["enabled"]) == (
            "F",
            True,
            True,
            True,
        )
        target = BUILTIN.get(reg["target"])
        assert (reg["magic"], reg["mask"]) == (target.magic.hex(), target.mask.hex())

    # the same again, even with no body at all: nothing to do
    with unchanged(daemon):
        again = await ok(api, "POST", "/v1/registrations", status=201)
    assert again == {"registered": [], "unchanged": done["registered"]}
    status = await ok(api, "GET", "/v1/status")
    assert status["counts"] == {
        "entries": len(want),
        "managed": len(want),
        "persistent": len(want),
        "recorded": len(want),
    }


async def test_register_targets_flags_persistent_and_conflicts(api: Api, daemon: Daemon) -> None:
    body = {"targets": ["arm64", "linux/s390x", "aarch64"], "flags": "OC", "persistent": False}
    done = await ok(api, "POST", "/v1/registrations", body, status=201)
    assert [r["name"] for r in done["registered"]] == ["qemu-aarch64", "qemu-s390x"]
    assert done["unchanged"] == []
    for reg in done["registered"]:
        assert (reg["flags"], reg["managed"], reg["persistent"]) == ("OC", True, False)
    kernel = in_kernel(daemon)
    assert {n: e.flags for n, e in kernel.items()} == {"qemu-aarch64": "OC", "qemu-s390x": "OC"}

    # identical: unchanged, idempotent
    with unchanged(daemon):
        again = await ok(api, "POST", "/v1/registrations", body, status=201)
    assert again == {"registered": [], "unchanged": done["registered"]}

    # same name, other definition (flags default to F): 409, all or nothing
    problem = await refused(
        api,
        daemon,
        "POST",
        "/v1/registrations",
        {"targets": ["ppc64le", "aarch64"]},
        status=409,
        code="conflict",
    )
    assert "qemu-aarch64 is already registered with another definition" in problem["detail"]
    assert "replace" in problem["detail"]
    assert "qemu-ppc64le" not in in_kernel(daemon)

    # replace: overwritten, default flags F and persistent true
    done = await ok(
        api,
        "POST",
        "/v1/registrations",
        {"targets": ["ppc64le", "aarch64"], "replace": True},
        status=201,
    )
    assert [r["name"] for r in done["registered"]] == ["qemu-ppc64le", "qemu-aarch64"]
    for reg in done["registered"]:
        assert (reg["flags"], reg["managed"], reg["persistent"]) == ("F", True, True)
    kernel = in_kernel(daemon)
    assert {n: e.flags for n, e in kernel.items()} == {
        "qemu-aarch64": "F",
        "qemu-ppc64le": "F",
        "qemu-s390x": "OC",
    }


async def test_register_conflicts_with_a_foreign_entry(api: Api, daemon: Daemon) -> None:
    theirs = replace(foreign_qemu("aarch64"), interpreter="/opt/qemu-aarch64", flags="")
    daemon.inside.kernel.register(theirs)
    problem = await refused(
        api,
        daemon,
        "POST",
        "/v1/registrations",
        {"targets": ["s390x", "aarch64"]},
        status=409,
        code="conflict",
    )
    assert "/opt/qemu-aarch64" in problem["detail"]
    assert sorted(in_kernel(daemon)) == ["qemu-aarch64"]  # s390x was not registered either
    reg = await ok(api, "GET", "/v1/registrations/qemu-aarch64")
    assert (reg["managed"], reg["persistent"], reg["target"]) == (False, False, "aarch64")

    done = await ok(
        api,
        "POST",
        "/v1/registrations",
        {"targets": ["s390x", "aarch64"], "replace": True},
        status=201,
    )
    assert [(r["name"], r["managed"]) for r in done["registered"]] == [
        ("qemu-s390x", True),
        ("qemu-aarch64", True),
    ]
    assert in_kernel(daemon)["qemu-aarch64"].interpreter == interpreter("aarch64")


async def test_register_custom_entries(api: Api, daemon: Daemon) -> None:
    magic = {
        "name": "mytool",
        "type": "magic",
        "offset": 4,
        "magic": "CAFEBABE",
        "mask": "FFFF00FF",
        "interpreter": "/bin/true",
        "flags": "P",
    }
    ext = {
        "name": "scripts",
        "type": "extension",
        "extension": "qsh",
        "interpreter": "/bin/sh",
        "flags": "F",
    }
    done = await ok(api, "POST", "/v1/registrations", {"entry": magic}, status=201)
    (reg,) = done["registered"]
    assert reg == {
        "name": "mytool",
        "enabled": True,
        "type": "magic",
        "offset": 4,
        "magic": "cafebabe",
        "mask": "ffff00ff",
        "extension": None,
        "interpreter": "/bin/true",
        "flags": "P",
        "managed": True,
        "persistent": True,
        "target": None,
        "interpreter_stale": False,
        "owner": 0,
        "kept": True,
        "raw": None,
    }
    done = await ok(
        api, "POST", "/v1/registrations", {"entry": ext, "persistent": False}, status=201
    )
    (reg,) = done["registered"]
    assert (reg["type"], reg["extension"], reg["magic"], reg["mask"], reg["flags"]) == (
        "extension",
        "qsh",
        None,
        None,
        "F",
    )
    assert (reg["managed"], reg["persistent"]) == (True, False)

    kernel = in_kernel(daemon)
    assert kernel["mytool"].rule() == Rule(
        "mytool",
        "/bin/true",
        magic=bytes.fromhex("cafebabe"),
        mask=bytes.fromhex("ffff00ff"),
        offset=4,
        flags="P",
    )
    assert kernel["scripts"].rule() == Rule("scripts", "/bin/sh", extension="qsh", flags="F")

    # identical (hex in another case): unchanged
    with unchanged(daemon):
        again = await ok(
            api, "POST", "/v1/registrations", {"entry": {**magic, "magic": "cafebabe"}}, status=201
        )
    assert [r["name"] for r in again["unchanged"]] == ["mytool"] and again["registered"] == []

    # same name, another definition: 409 unless replace
    other = {**magic, "interpreter": "/bin/false"}
    problem = await refused(
        api, daemon, "POST", "/v1/registrations", {"entry": other}, status=409, code="conflict"
    )
    assert "mytool is already registered with another definition" in problem["detail"]
    done = await ok(api, "POST", "/v1/registrations", {"entry": other, "replace": True}, status=201)
    assert done["registered"][0]["interpreter"] == "/bin/false"
    assert in_kernel(daemon)["mytool"].interpreter == "/bin/false"


async def test_f_flag_with_missing_interpreter_is_refused(api: Api, daemon: Daemon) -> None:
    await seed(api, daemon)
    entry = {
        "name": "ghost",
        "magic": "cafebabe",
        "interpreter": "/nonexistent/qemu-ghost",
        "flags": "F",
    }
    problem = await refused(
        api, daemon, "POST", "/v1/registrations", {"entry": entry}, status=422, code="interpreter"
    )
    assert "/nonexistent/qemu-ghost" in problem["detail"] and "does not exist" in problem["detail"]
    assert "ghost" not in in_kernel(daemon)
    await refused(api, daemon, "GET", "/v1/registrations/ghost", status=404, code="not-found")
    # an admin may skip qusd's check; with F the kernel itself refuses, clearly
    skip = {"allow_untrusted_interpreter": True}
    problem = await refused(
        api, daemon, "POST", "/v1/registrations", {"entry": entry, **skip},
        status=422, code="interpreter",
    )  # fmt: skip
    assert problem["detail"].startswith(
        "the F flag opens /nonexistent/qemu-ghost at registration and it does not exist"
    )
    # without F the kernel opens the interpreter only at exec: accepted
    body = {"entry": {**entry, "flags": ""}, **skip}
    done = await ok(api, "POST", "/v1/registrations", body, status=201)
    assert done["registered"][0]["name"] == "ghost" and "ghost" in in_kernel(daemon)


async def test_patch_disables_and_enables_for_real(api: Api, daemon: Daemon) -> None:
    bb = busybox_path("arm64")
    await seed(api, daemon)
    assert daemon.inside.run([bb, "uname", "-m"]).stdout.strip() == "aarch64"

    reg = await ok(api, "PATCH", "/v1/registrations/qemu-aarch64", {"enabled": False})
    assert set(reg) == REG_KEYS and (reg["name"], reg["enabled"]) == ("qemu-aarch64", False)
    assert (reg["managed"], reg["persistent"]) == (True, True)
    assert in_kernel(daemon)["qemu-aarch64"].enabled is False
    res = daemon.inside.run([bb, "uname", "-m"])
    assert res.returncode != 0 and "Exec format error" in res.stderr
    assert (await ok(api, "GET", "/v1/registrations/qemu-aarch64"))["enabled"] is False

    for _ in range(2):  # enabling an enabled entry is fine too
        reg = await ok(api, "PATCH", "/v1/registrations/qemu-aarch64", {"enabled": True})
        assert reg["enabled"] is True and in_kernel(daemon)["qemu-aarch64"].enabled is True
    res = daemon.inside.run([bb, "uname", "-m"])
    assert (res.returncode, res.stdout.strip()) == (0, "aarch64"), res.stderr

    # a foreign entry can be switched too; it stays foreign
    reg = await ok(api, "PATCH", "/v1/registrations/DOSWin", {"enabled": False})
    assert (reg["enabled"], reg["managed"]) == (False, False)
    assert in_kernel(daemon)["DOSWin"].enabled is False


async def test_delete(api: Api, daemon: Daemon) -> None:
    await seed(api, daemon)
    for name in ("qemu-aarch64", "DOSWin"):
        reply = await api.request("DELETE", f"/v1/registrations/{name}")
        assert (reply.status, reply.body) == (204, b""), str(reply)
        assert name not in in_kernel(daemon)
        await refused(api, daemon, "GET", f"/v1/registrations/{name}", status=404, code="not-found")
        problem = await refused(
            api, daemon, "DELETE", f"/v1/registrations/{name}", status=404, code="not-found"
        )
        assert problem["detail"] == f"no binfmt_misc entry named {name!r}"
    assert daemon.table() == []
    assert (await ok(api, "GET", "/v1/status"))["counts"]["recorded"] == 0


#: scope -> (removed, left, recorded): after a managed qemu-aarch64, qemu-s390x and
#: mytool, and a foreign qemu-arm and DOSWin
RESET = {
    None: (["mytool", "qemu-aarch64", "qemu-s390x"], ["DOSWin", "qemu-arm"], 0),
    "managed": (["mytool", "qemu-aarch64", "qemu-s390x"], ["DOSWin", "qemu-arm"], 0),
    "qemu": (["qemu-aarch64", "qemu-arm", "qemu-s390x"], ["DOSWin", "mytool"], 1),
    "all": (["DOSWin", "mytool", "qemu-aarch64", "qemu-arm", "qemu-s390x"], [], 0),
}


@pytest.mark.parametrize("scope", list(RESET), ids=lambda s: s or "default")
async def test_reset(api: Api, daemon: Daemon, scope: str | None) -> None:
    removed, left, recorded = RESET[scope]
    await ok(api, "POST", "/v1/registrations", {"targets": ["aarch64", "s390x"]}, status=201)
    await ok(
        api,
        "POST",
        "/v1/registrations",
        {"entry": {"name": "mytool", "magic": "cafebabe", "interpreter": "/bin/true"}},
        status=201,
    )
    daemon.inside.kernel.register(WINE)
    daemon.inside.kernel.register(foreign_qemu("arm"))  # qemu-*, but not qusd's

    body = NO_BODY if scope is None else {"scope": scope}
    done = await ok(api, "POST", "/v1/reset", body)
    assert set(done) == {"removed"} and sorted(done["removed"]) == removed
    assert sorted(in_kernel(daemon)) == left
    assert [r["name"] for r in await ok(api, "GET", "/v1/registrations")] == left
    assert (await ok(api, "GET", "/v1/status"))["counts"]["recorded"] == recorded
    if "mytool" in left:
        assert (await ok(api, "GET", "/v1/registrations/mytool"))["managed"] is True

    with unchanged(daemon):  # again: nothing left to remove
        assert await ok(api, "POST", "/v1/reset", body) == {"removed": []}


async def test_openapi(api: Api, daemon: Daemon) -> None:
    doc = await ok(api, "GET", "/openapi.json")
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["version"] == __version__
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops == {(r.method, r.path) for r in ROUTES} | {("GET", "/openapi.json")}
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        assert set(op["responses"]) == {str(s) for s in (r.status, *r.errors, 500)}, r.path
        for s in r.errors:
            content = op["responses"][str(s)]["content"]
            assert content == {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        if r.request is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{r.request.__name__}"
            assert r.request.__name__ in doc["components"]["schemas"]

    # every documented operation is served, and answers a documented status
    with unchanged(daemon):
        for r in ROUTES:
            path = r.path.replace("{name}", "qemu-nothing")
            if r.media != "application/json":  # a stream (tests/test_events.py): a bad query
                path += "?since=-1"
            body = {"no-such-field": True} if r.request is not None else NO_BODY
            reply = await api.request(r.method, path, body)
            assert reply.status in {r.status, *r.errors}, (r.method, path, str(reply))


# -- refusals: every one is a problem, and changes nothing -------------------------


@dataclass(frozen=True)
class Bad:
    """A request that must be refused, and the problem expected back."""

    id: str
    body: Any = NO_BODY
    method: str = "POST"
    path: str = "/v1/registrations"
    status: int = 422
    code: str = "validation"
    #: the failing field, under "body" (the only field error), for 422 validation
    loc: tuple[str | int, ...] | None = None
    #: in the field error's msg (validation) or else in the detail
    msg: str = ""
    raw: bytes | None = None
    content_type: str | None = None


async def check(api: Api, daemon: Daemon, bad: Bad) -> dict[str, Any]:
    problem = await refused(
        api,
        daemon,
        bad.method,
        bad.path,
        bad.body,
        status=bad.status,
        code=bad.code,
        raw=bad.raw,
        content_type=bad.content_type,
    )
    if bad.loc is not None:
        (error,) = problem["errors"]
        assert error["loc"] == ["body", *bad.loc], problem
        assert bad.msg in error["msg"], problem
        assert bad.msg in problem["detail"], problem
    else:
        assert bad.msg in problem["detail"], problem
    return problem


async def check_all(api: Api, daemon: Daemon, subtests: pytest.Subtests, cases: list[Bad]) -> None:
    await seed(api, daemon)
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids)
    for bad in cases:
        with subtests.test(msg=bad.id):
            await check(api, daemon, bad)
    # the seed survived every one of them
    assert sorted(in_kernel(daemon)) == ["DOSWin", "qemu-aarch64"]
    assert all(e.enabled for e in daemon.table())


ENTRY = {"name": "mytool", "magic": "cafebabe", "interpreter": "/bin/true"}


def entry(**changes: Any) -> dict[str, Any]:
    """A valid custom entry with changes; a change to None removes the field."""
    spec = {**ENTRY, **changes}
    return {"entry": {k: v for k, v in spec.items() if v is not None}}


TARGET_CASES = [
    Bad("unknown-target", {"targets": ["arm64", "vax"]}, loc=("targets",),
        msg="unknown target 'vax'; known targets: " + ", ".join(BUILTIN.names())),
    Bad("flags-X", {"targets": ["arm64"], "flags": "X"}, loc=("flags",),
        msg="unknown flag(s) 'X'; use any of P, O, C, F"),
    Bad("flags-lowercase", {"targets": ["arm64"], "flags": "f"}, loc=("flags",),
        msg="unknown flag(s) 'f'"),
    Bad("flags-not-a-string", {"targets": ["arm64"], "flags": 1}, loc=("flags",),
        msg="valid string"),
    Bad("targets-not-a-list", {"targets": "arm64"}, loc=("targets",), msg="valid list"),
    Bad("target-empty", {"targets": [""]}, loc=("targets", 0), msg="at least 1 character"),
    Bad("target-too-long", {"targets": ["a" * 60000]}, loc=("targets", 0),
        msg="at most 64 characters"),
    Bad("persistent-string", {"targets": ["arm64"], "persistent": "yes"},
        loc=("persistent",), msg="valid boolean"),
    Bad("persistent-int", {"targets": ["arm64"], "persistent": 1},
        loc=("persistent",), msg="valid boolean"),
    Bad("replace-string", {"targets": ["arm64"], "replace": "true"},
        loc=("replace",), msg="valid boolean"),
    Bad("unknown-field", {"targets": ["arm64"], "forced": True}, loc=("forced",),
        msg="Extra inputs are not permitted"),
    Bad("targets-and-entry", {"targets": ["arm64"], **entry()}, loc=(),
        msg="give either targets (and flags) or entry, not both"),
    Bad("flags-and-entry", {"flags": "F", **entry()}, loc=(),
        msg="give either targets (and flags) or entry, not both"),
    Bad("not-an-object", ["arm64"], loc=(), msg="valid dictionary"),
]  # fmt: skip


async def test_refused_target_requests(api: Api, daemon: Daemon, subtests: pytest.Subtests) -> None:
    await check_all(api, daemon, subtests, TARGET_CASES)


NAME = ("entry", "name")
INTERP = ("entry", "interpreter")
ENTRY_CASES = [
    Bad("magic-not-hex", entry(magic="zz"), loc=("entry", "magic"), msg="must be hex digits"),
    Bad("magic-odd-length", entry(magic="abc"), loc=("entry", "magic"), msg="must be hex"),
    Bad("mask-not-hex", entry(mask="zzzzzzzz"), loc=("entry", "mask"), msg="must be hex"),
    Bad("mask-odd-length", entry(mask="abc"), loc=("entry", "mask"), msg="must be hex"),
    Bad("mask-length", entry(mask="ffff"), loc=("entry", "mask"),
        msg="is 2 bytes, magic is 4: they must be equal"),
    Bad("name-slash", entry(name="a/b"), loc=NAME, msg="must not contain '/'"),
    Bad("name-dotdot", entry(name=".."), loc=NAME, msg="'..' is reserved"),
    Bad("name-dot", entry(name="."), loc=NAME, msg="'.' is reserved"),
    Bad("name-register", entry(name="register"), loc=NAME, msg="'register' is reserved"),
    Bad("name-status", entry(name="status"), loc=NAME, msg="'status' is reserved"),
    Bad("name-colon", entry(name="a:b"), loc=NAME, msg="must not contain ':'"),
    Bad("name-newline", entry(name="a\nb"), loc=NAME, msg="must not contain control"),
    Bad("name-nul", entry(name="a\0b"), loc=NAME, msg="must not contain control"),
    Bad("name-256-chars", entry(name="a" * 256), loc=NAME, msg="at most 255 characters"),
    Bad("name-256-bytes", entry(name="é" * 128), loc=NAME, msg="is 256 bytes; at most 255"),
    Bad("name-empty", entry(name=""), loc=NAME, msg="at least 1 character"),
    Bad("name-missing", entry(name=None), loc=NAME, msg="Field required"),
    Bad("interpreter-relative", entry(interpreter="usr/bin/qemu"), loc=INTERP,
        msg="must be an absolute path"),
    Bad("interpreter-colon", entry(interpreter="/usr/bin/qemu:x"), loc=INTERP,
        msg="must not contain ':'"),
    Bad("interpreter-newline", entry(interpreter="/usr/bin/qemu\n"), loc=INTERP,
        msg="must not contain control"),
    Bad("interpreter-empty", entry(interpreter=""), loc=INTERP, msg="must not be empty"),
    Bad("interpreter-missing", entry(interpreter=None), loc=INTERP, msg="Field required"),
    Bad("entry-flags-X", entry(flags="X"), loc=("entry", "flags"), msg="unknown flag(s) 'X'"),
    Bad("entry-flags-lowercase", entry(flags="f"), loc=("entry", "flags"),
        msg="unknown flag(s) 'f'"),
    Bad("offset-string", entry(offset="0"), loc=("entry", "offset"), msg="valid integer"),
    # 1.0 is the integer 1 (JSON has one kind of number; JSON Schema agrees): 1.5 is not
    Bad("offset-fraction", entry(offset=1.5), loc=("entry", "offset"), msg="valid integer"),
    Bad("offset-negative", entry(offset=-1), loc=("entry", "offset"),
        msg="greater than or equal to 0"),
    Bad("offset-256", entry(offset=256), loc=("entry", "offset"), msg="less than 256"),
    Bad("magic-past-256-bytes", entry(offset=254), loc=("entry", "magic"),
        msg="offset 254 + 4 bytes of magic exceed the 256 bytes the kernel reads"),
    Bad("type-unknown", entry(type="elf"), loc=("entry", "type"), msg="'magic' or 'extension'"),
    Bad("magic-missing", entry(magic=None), loc=("entry",),
        msg="a magic rule needs magic (hex) and no extension"),
    Bad("magic-with-extension", entry(extension="exe"), loc=("entry",),
        msg="a magic rule needs magic (hex) and no extension"),
    Bad("extension-with-mask", entry(type="extension", magic=None, extension="exe", mask="ff"),
        loc=("entry",), msg="an extension rule needs extension and no magic or mask"),
    Bad("extension-missing", entry(type="extension", magic=None), loc=("entry",),
        msg="an extension rule needs extension and no magic or mask"),
    Bad("extension-dot", entry(type="extension", magic=None, extension="tar.gz"),
        loc=("entry", "extension"), msg="must not contain '.'"),
    Bad("entry-unknown-field", entry(enabled=True), loc=("entry", "enabled"),
        msg="Extra inputs are not permitted"),
    Bad("entry-not-an-object", {"entry": "mytool"}, loc=("entry",), msg="valid dictionary"),
    Bad("entry-persistent-string", {**entry(), "persistent": "no"}, loc=("persistent",),
        msg="valid boolean"),
]  # fmt: skip


async def test_refused_entries(api: Api, daemon: Daemon, subtests: pytest.Subtests) -> None:
    await check_all(api, daemon, subtests, ENTRY_CASES)


AARCH64 = "/v1/registrations/qemu-aarch64"
TOO_BIG = b'{"targets": ["' + b"a" * MAX_BODY + b'"]}'
BODY_CASES = [
    # malformed JSON: 400
    *(
        Bad(f"malformed-{i}-{method}-{path}", method=method, path=path, raw=raw,
            content_type="application/json", status=400, code="malformed-json",
            msg="the body is not JSON")
        for i, (method, path, raw) in enumerate([
            ("POST", "/v1/registrations", b'{"targets": ["arm64"'),
            ("POST", "/v1/registrations", b'{"targets": ["arm64"]} {}'),
            ("PATCH", AARCH64, b"{enabled: false}"),
            ("POST", "/v1/reset", b"{'scope': 'all'}"),
            ("POST", "/v1/reset", b'{"scope": "\xff"}'),
        ])
    ),
    # JSON, but not said to be: 415
    *(
        Bad(f"{ct}-{method}-{path}", method=method, path=path, body=body, content_type=ct,
            status=415, code="unsupported-media-type", msg=f"the body is {ct}")
        for ct in ("text/plain", "application/x-www-form-urlencoded")
        for method, path, body in [
            ("POST", "/v1/registrations", {"targets": ["s390x"]}),
            ("PATCH", AARCH64, {"enabled": False}),
            ("POST", "/v1/reset", {"scope": "all"}),
        ]
    ),
    # over 64 KiB: 413
    *(
        Bad(f"too-large-{method}-{path}", method=method, path=path, raw=TOO_BIG,
            content_type="application/json", status=413, code="too-large",
            msg=str(MAX_BODY))
        for method, path in [
            ("POST", "/v1/registrations"), ("PATCH", AARCH64), ("POST", "/v1/reset"),
        ]
    ),
    Bad("patch-enabled-string", {"enabled": "false"}, method="PATCH", path=AARCH64,
        loc=("enabled",), msg="valid boolean"),
    Bad("patch-enabled-int", {"enabled": 0}, method="PATCH", path=AARCH64,
        loc=("enabled",), msg="valid boolean"),
    Bad("patch-empty", method="PATCH", path=AARCH64, loc=("enabled",), msg="Field required"),
    Bad("patch-unknown-field", {"enabled": False, "flags": "F"}, method="PATCH", path=AARCH64,
        loc=("flags",), msg="Extra inputs are not permitted"),
    Bad("reset-unknown-scope", {"scope": "everything"}, path="/v1/reset", loc=("scope",),
        msg="'managed', 'qemu' or 'all'"),
    Bad("reset-scope-not-a-string", {"scope": 1}, path="/v1/reset", loc=("scope",),
        msg="'managed', 'qemu' or 'all'"),
    Bad("reset-unknown-field", {"scope": "all", "force": True}, path="/v1/reset",
        loc=("force",), msg="Extra inputs are not permitted"),
    Bad("reset-not-an-object", "all", path="/v1/reset", loc=(), msg="valid dictionary"),
]  # fmt: skip


async def test_refused_bodies(api: Api, daemon: Daemon, subtests: pytest.Subtests) -> None:
    await check_all(api, daemon, subtests, BODY_CASES)


ROUTE_CASES = [
    *(
        Bad(f"unknown-{path}", method="GET", path=path, status=404, code="not-found",
            msg="Not Found")
        for path in ["/v1/nothing", "/v2/health", "/", "/v1", f"{AARCH64}/more",
                     "/v1/registrations/"]
    ),
    *(
        Bad(f"method-{method}-{path}", method=method, path=path, status=405,
            code="method-not-allowed", msg="Method Not Allowed")
        for method, path in [
            ("PUT", "/v1/health"), ("POST", "/v1/status"), ("DELETE", "/v1/targets"),
            ("PUT", "/v1/registrations"), ("DELETE", "/v1/registrations"),
            ("PATCH", "/v1/registrations"), ("POST", AARCH64), ("PUT", AARCH64),
            ("GET", "/v1/reset"), ("DELETE", "/v1/reset"), ("POST", "/openapi.json"),
        ]
    ),
    # no such entry: 404 from every route that takes a name
    *(
        Bad(f"missing-{method}-{name}", method=method, path=f"/v1/registrations/{name}",
            body={"enabled": False} if method == "PATCH" else NO_BODY,
            status=404, code="not-found", msg="no binfmt_misc entry named")
        for method in ("GET", "PATCH", "DELETE")
        # binfmt_misc's own files are not entries; neither is anything with a slash
        for name in ("qemu-nothing", "register", "status", "a%2Fb", "%2E%2E")
    ),
]  # fmt: skip


async def test_refused_routes(api: Api, daemon: Daemon, subtests: pytest.Subtests) -> None:
    await check_all(api, daemon, subtests, ROUTE_CASES)


# -- real programs through API registrations ---------------------------------------


async def test_busybox_runs_through_api_registrations(api: Api, daemon: Daemon) -> None:
    archs = ["arm64", "armhf", "s390x", "ppc64el", "mips64el"]
    programs = {arch: busybox_path(arch) for arch in archs}
    for bb in programs.values():
        res = daemon.inside.run([bb, "true"])
        assert res.returncode != 0 and "Exec format error" in res.stderr

    targets = [DEBIAN_TARGET[a] for a in archs]
    assert targets == ["aarch64", "arm", "s390x", "ppc64le", "mips64el"]
    done = await ok(api, "POST", "/v1/registrations", {"targets": targets}, status=201)
    assert [r["target"] for r in done["registered"]] == targets

    for arch, bb in programs.items():
        res = daemon.inside.run([bb, "uname", "-m"])
        assert (res.returncode, res.stdout.strip()) == (0, FOREIGN_ARCHS[arch]), res.stderr
    assert [FOREIGN_ARCHS[a] for a in archs] == ["aarch64", "armv7l", "s390x", "ppc64le", "mips64"]


# -- regressions -----------------------------------------------------------------------


async def test_deeply_nested_json_is_a_400(api: Api, daemon: Daemon) -> None:
    await seed(api, daemon)
    nested = b"[" * 5000 + b"]" * 5000  # 10 KB: well under the body limit
    await refused(
        api,
        daemon,
        "POST",
        "/v1/reset",
        raw=nested,
        content_type="application/json",
        status=400,
        code="malformed-json",
    )


async def test_405_names_the_allowed_methods(api: Api, daemon: Daemon) -> None:
    await refused(api, daemon, "PUT", "/v1/health", status=405, code="method-not-allowed")
    reply = await api.request("PUT", "/v1/registrations")
    assert {m.strip() for m in reply.headers.get("allow", "").split(",")} == {"GET", "POST"}


async def test_listing_survives_a_non_utf8_entry_name(api: Api, daemon: Daemon) -> None:
    daemon.inside.kernel.register(Rule(name="latin\udce9", interpreter="/bin/true", magic=b"ab"))
    assert [e.name for e in daemon.table()] == ["latin\udce9"]
    listed = await ok(api, "GET", "/v1/registrations")
    assert len(listed) == 1 and listed[0]["managed"] is False


async def test_reset_reports_a_non_utf8_entry_it_removed(api: Api, daemon: Daemon) -> None:
    daemon.inside.kernel.register(Rule(name="latin\udce9", interpreter="/bin/true", magic=b"ab"))
    reply = await api.request("POST", "/v1/reset", {"scope": "all"})
    assert daemon.table() == []  # the reset did happen
    assert reply.status == 200, str(reply)


async def test_extension_entry_with_offset_is_refused(api: Api, daemon: Daemon) -> None:
    body = entry(type="extension", magic=None, extension="qsh", offset=7)
    await refused(api, daemon, "POST", "/v1/registrations", body, status=422, code="validation")
