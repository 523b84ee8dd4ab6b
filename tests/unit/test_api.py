"""The aiohttp app in-process (pytest-aiohttp) over the fake kernel: routes,
problems, audit lines, limits, and every code the API answers known to
errors.py with its exit status."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from qusd import api, errors, openapi
from qusd.binfmt import Rule
from qusd.errors import CODES, QusdError, error_class
from qusd.middleware import PROBLEM_JSON
from qusd.service import Service
from tests.unit.conftest import CALLERS, World
from tests.unit.test_service import entry

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


async def client_for(aiohttp_client: MakeClient, svc: Service) -> Client:
    """The app, with the caller named by the X-Test-As header (the tests'
    own caller_of: the daemon's reads the kernel's peer credentials), served
    as the daemon serves it: bodies never decoded."""
    app = api.make_app(svc, caller_of=lambda r: CALLERS[r.headers.get("X-Test-As", "reader")])
    server = TestServer(app)
    await server.start_server(auto_decompress=False)
    return await aiohttp_client(server)


async def problem(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM_JSON
    doc: dict[str, Any] = await resp.json()
    assert doc["code"] == code and doc["status"] == status
    assert code in CODES and CODES[code][0] == status  # known, with its statuses
    return doc


async def test_register_list_patch_delete(aiohttp_client: MakeClient, world: World) -> None:
    c = await client_for(aiohttp_client, world.service())
    resp = await c.post("/v1/registrations", json={"targets": ["arm64"]},
                        headers={"X-Test-As": "user"})  # fmt: skip
    assert resp.status == 201, await resp.text()
    assert [r["name"] for r in (await resp.json())["registered"]] == ["qemu-aarch64"]
    listed = await (await c.get("/v1/registrations")).json()
    assert [(r["name"], r["managed"], r["target"]) for r in listed] == [
        ("qemu-aarch64", True, "aarch64")
    ]
    resp = await c.patch("/v1/registrations/qemu-aarch64", json={"enabled": False},
                         headers={"X-Test-As": "user"})  # fmt: skip
    assert (await resp.json())["enabled"] is False
    resp = await c.delete("/v1/registrations/qemu-aarch64", headers={"X-Test-As": "user"})
    assert resp.status == 204 and world.kernel.table == {}


async def test_problems(aiohttp_client: MakeClient, world: World) -> None:
    world.kernel.table["qemu-s390x"] = entry(Rule("qemu-s390x", "/other", magic=b"QUSD"))
    c = await client_for(aiohttp_client, world.service())
    admin = {"X-Test-As": "admin"}
    doc = await problem(await c.post("/v1/registrations", json={"targets": ["s390x"]},
                                     headers=admin), 409, "conflict")  # fmt: skip
    assert doc["reason"].startswith("qemu-s390x is already registered")
    doc = await problem(await c.post("/v1/registrations", json={"targets": ["vax"]},
                                     headers=admin), 422, "validation")  # fmt: skip
    assert doc["errors"][0]["loc"] == ["body", "targets"]
    doc = await problem(await c.post("/v1/registrations", json={"targets": ["arm64"]}),
                        403, "forbidden")  # fmt: skip
    await problem(await c.get("/v1/nothing"), 404, "not-found")
    resp = await c.put("/v1/health")
    await problem(resp, 405, "method-not-allowed")
    assert resp.headers["Allow"] == "GET"
    await problem(await c.post("/v1/reset", data=b"x" * (api.MAX_BODY + 1),
                               headers=admin), 413, "too-large")  # fmt: skip
    await problem(await c.post("/v1/reset", data=b"{", headers={**admin,
                  "Content-Type": "application/json"}), 400, "malformed-json")  # fmt: skip
    await problem(await c.post("/v1/reset", data=b"{}", headers={**admin,
                  "Content-Type": "text/plain"}), 415, "unsupported-media-type")  # fmt: skip
    assert world.kernel.writes == []


async def test_a_bug_is_an_internal_problem(
    aiohttp_client: MakeClient, world: World, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    svc = world.service()

    def broken(**_: Any) -> list[Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(svc, "snapshot", broken)
    c = await client_for(aiohttp_client, svc)
    doc = await problem(await c.get("/v1/registrations"), 500, "internal")
    assert "a bug" not in json.dumps(doc)  # the log has it, the client does not
    assert "RuntimeError: a bug" in caplog.text
    assert error_class("internal").exit_status == 70


async def test_audit_names_come_from_the_route(
    aiohttp_client: MakeClient, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qusd.audit")
    c = await client_for(aiohttp_client, world.service())
    user = {"X-Test-As": "user"}
    await c.post("/v1/registrations", json={"targets": ["arm64"]}, headers=user)
    await c.patch("/v1/registrations/qemu-aarch64", data=b"{", headers={
        **user, "Content-Type": "application/json"})  # fmt: skip
    await c.post("/v1/reset", json={"scope": "all"}, headers=user)
    await c.post("/v1/registrations", json={"nonsense": 1}, headers=user)
    await c.get("/v1/registrations")  # reads leave no audit line
    lines = [r.getMessage() for r in caplog.records if r.name == "qusd.audit"]
    assert [(line.split("names=")[1]) for line in lines] == [
        '"arm64" result="201"',
        '"qemu-aarch64" result="400"',  # a refused body, the path's name still audited
        '"scope=all" result="403"',
        '"-" result="422"',
    ]
    assert all(f'uid="{CALLERS["user"].uid}" ' in line for line in lines)


async def test_rate_limit(aiohttp_client: MakeClient, world: World) -> None:
    c = await client_for(aiohttp_client, world.service(rate_burst=2, rate_limit=0.5))
    user = {"X-Test-As": "user"}
    statuses = [(await c.post("/v1/reset", json={}, headers=user)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    resp = await c.post("/v1/reset", json={}, headers=user)
    doc = await problem(resp, 429, "rate-limited")
    assert resp.headers["Retry-After"] == "2" and "retry in 2 s" in doc["detail"]
    assert (await c.post("/v1/reset", json={}, headers={"X-Test-As": "root"})).status == 200


async def test_openapi_is_built_on_first_request(aiohttp_client: MakeClient, world: World) -> None:
    openapi.document_json.cache_clear()
    c = await client_for(aiohttp_client, world.service())
    assert openapi.document_json.cache_info().currsize == 0
    doc = await (await c.get("/openapi.json")).json()
    assert set(doc["paths"]) == {r.path for r in api.ROUTES}
    assert openapi.document_json.cache_info().currsize == 1


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_error_survives_the_trip_to_a_client(code: str) -> None:
    """problem() on the daemon, from_problem() in the client: the same class,
    reason, field and message, whatever the error."""
    cls = error_class(code)
    err = cls("something is wrong; do this", field="flags" if code == "invalid-rule" else None)
    back = QusdError.from_problem(json.loads(json.dumps(err.problem())), err.http_status)
    assert type(back) is cls
    assert (back.reason, back.field, back.message) == (err.reason, err.field, err.message)
    assert back.exit_status == cls.exit_status != 1 or cls is QusdError


def test_every_class_has_its_own_code() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, QusdError)]
    assert len({c.code for c in classes}) == len(classes)


async def test_a_body_with_a_content_encoding_is_refused(
    aiohttp_client: MakeClient, world: World
) -> None:
    c = await client_for(aiohttp_client, world.service())
    for coding in ("gzip", "br", "deflate, gzip"):
        resp = await c.post("/v1/reset", data=b'{"scope": "all"}', headers={
            "X-Test-As": "admin", "Content-Type": "application/json",
            "Content-Encoding": coding})  # fmt: skip
        doc = await problem(resp, 415, "unsupported-media-type")
        assert "send the body without Content-Encoding" in doc["detail"]
        assert resp.headers["Accept-Encoding"] == "identity"
    assert world.kernel.writes == []


async def test_bytes_that_are_not_utf8_are_shown_losslessly(
    aiohttp_client: MakeClient, world: World
) -> None:
    odd = Rule("x\udcff", "/opt/caf\udce9/qemu", extension="qusdt")  # as os.fsdecode reads them
    world.kernel.table[odd.name] = entry(odd)
    c = await client_for(aiohttp_client, world.service())
    (reg,) = await (await c.get("/v1/registrations")).json()
    assert (reg["name"], reg["interpreter"]) == ("x\\xff", "/opt/caf\\xe9/qemu")
    assert reg["raw"] == {"name": "78ff", "interpreter": "2f6f70742f636166e92f71656d75",
                          "extension": None}  # fmt: skip
    assert (await c.get("/v1/status")).status == 200
