"""qusd.views writes, without pydantic, exactly what the API's models write:
health, registrations (generated ones too, with bytes that are not UTF-8),
status and problems. And a daemon answering only those never loads
pydantic."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from qusd import errors, views
from qusd.binfmt import Entry
from qusd.models import Health, Problem, RegistrationOut, Status
from qusd.service import Registration
from tests.unit.conftest import World

#: text as the kernel may show it: any bytes, decoded as qusd decodes them
kernel_text = st.binary(min_size=1, max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
entries = st.builds(
    Entry,
    name=kernel_text,
    enabled=st.booleans(),
    interpreter=kernel_text,
    flags=st.sampled_from(["", "F", "POCF", "OC"]),
    type=st.sampled_from(["M", "E"]),
    offset=st.integers(0, 255),
    magic=st.binary(max_size=8),
    mask=st.none() | st.binary(max_size=8),
    extension=st.none() | kernel_text,
)
registrations = st.builds(
    Registration,
    entry=entries,
    managed=st.booleans(),
    persistent=st.booleans(),
    target=st.none() | st.sampled_from(["aarch64", "s390x"]),
    interpreter_stale=st.booleans(),
    owner=st.none() | st.integers(0, 2**31),
    kept=st.booleans(),
)


def test_health() -> None:
    assert Health().model_dump_json().encode() == views.HEALTH


@settings(max_examples=300, deadline=None)
@given(registrations)
def test_registrations(reg: Registration) -> None:
    assert views.registration(reg) == RegistrationOut.of(reg).model_dump_json().encode()


def test_status(world: World) -> None:
    svc = world.service()
    svc.warnings["conflict:x"] = 'qemu-x is "elsewhere"\n\t\\ é'
    for doc in (svc.status(), {**svc.status(), "sandbox": {"pid": 42}}):
        assert views.status(doc) == Status.model_validate(doc).model_dump_json().encode()


def _problems() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for cls in (errors.NoSuchEntryError, errors.ConflictError, errors.RequestValidationError):
        err = cls('qemu-"x"\n is \\ \x01 gone é 😀', field="name")
        found.append(err.problem())
        found.append({**err.problem(), "field": None})
    fields = [{"loc": ["body", "targets", 0], "msg": "bad\nvalue", "type": "invalid"}]
    found.append({**errors.RequestValidationError("bad").problem(), "errors": fields})
    found.append({**errors.RequestValidationError("bad").problem(), "errors": []})
    return found


def test_problems() -> None:
    for body in _problems():
        assert views.problem(body) == Problem.model_validate(body).model_dump_json(
            exclude_none=True
        )


def test_polled_answers_never_load_pydantic(world: World) -> None:
    """The app answers health, the registrations, one entry, status and an
    error (404), without pydantic in the process; a body to validate loads it."""
    code = """
import asyncio, sys
from pathlib import Path
from aiohttp.test_utils import TestClient, TestServer
from qusd import api
from tests.unit.conftest import CALLERS, World, fake_interpreters
from tests.unit.fake_kernel import FakeKernel

async def main():
    base = Path(sys.argv[1])
    world = World(FakeKernel(), base / "state", fake_interpreters(base / "bin"), lambda p: None)
    app = api.make_app(world.service(), caller_of=lambda r: CALLERS["root"])
    async with TestClient(TestServer(app)) as c:
        for path in ("/v1/health", "/v1/registrations", "/v1/status", "/v1/registrations/x"):
            await (await c.get(path)).read()
        print("pydantic" in sys.modules)
        await (await c.post("/v1/reset", json={"scope": "nothing"})).read()
        print("pydantic" in sys.modules)

asyncio.run(main())
"""
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    # as nobody (tests/test_unit_layer.py), a venv under /root may start
    # Python but not be executable again: the system's then
    python = sys.executable if os.access(sys.executable, os.X_OK) else "/usr/bin/python3"
    argv = [python, "-c", code, str(world.interpreters.parent)]
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert res.stdout.split() == ["False", "True"], res.stderr
