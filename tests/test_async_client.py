"""qusd.client.AsyncClient against a running daemon: one method per route of
the table qusd.api serves, answers as the API's pydantic models, problems as
the errors of their codes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest
from aiohttp import web

from qusd import models
from qusd.api import ROUTES
from qusd.client import AsyncClient
from qusd.errors import (
    ConflictError,
    DaemonUnavailableError,
    NoSuchEntryError,
    RequestValidationError,
)
from tests.conftest import Daemon, busybox_path, interpreter


async def test_every_route_is_a_method(daemon: Daemon) -> None:
    async with AsyncClient(daemon.socket) as qusd:
        for r in ROUTES:
            method = getattr(qusd, r.handler.__name__)
            assert method.__doc__ == r.summary
        assert {r.handler.__name__ for r in ROUTES} <= set(dir(qusd))
        with pytest.raises(AttributeError, match="no operation 'frobnicate'"):
            qusd.frobnicate  # noqa: B018


async def test_reads_answer_models(daemon: Daemon) -> None:
    async with AsyncClient(daemon.socket) as qusd:
        assert await qusd.health() == models.Health(status="ok")
        status = await qusd.status()
        assert isinstance(status, models.Status)
        assert status.sandbox == models.SandboxInfo(pid=daemon.pid)
        targets = await qusd.targets()
        assert all(isinstance(t, models.TargetOut) for t in targets)
        assert "aarch64" in {t.name for t in targets}
        assert await qusd.list_registrations() == []
        doc = await qusd.openapi()  # a route with no model: the JSON as it is
        assert doc["openapi"].startswith("3.1")


async def test_changes_round_trip(daemon: Daemon) -> None:
    bb = str(busybox_path("arm64"))
    async with AsyncClient(daemon.socket) as qusd:
        made = await qusd.register(targets=["arm64"])
        assert isinstance(made, models.RegisterResponse)
        (entry,) = made.registered
        assert (entry.name, entry.target, entry.interpreter) == (
            "qemu-aarch64", "aarch64", interpreter("aarch64"),
        )  # fmt: skip
        # the daemon really runs arm64 programs now
        res = daemon.inside.run([bb, "uname", "-m"])
        assert res.stdout.strip() == "aarch64"
        # a request model works as well as its fields
        again = await qusd.register(
            body=models.RegisterRequest.model_validate({"targets": ["aarch64"]})
        )
        assert again.registered == [] and again.unchanged == [entry]
        got = await qusd.get_registration("qemu-aarch64")
        assert got == entry
        off = await qusd.patch_registration("qemu-aarch64", enabled=False)
        assert isinstance(off, models.RegistrationOut) and off.enabled is False
        assert daemon.inside.kernel.entry("qemu-aarch64").enabled is False
        assert await qusd.delete_registration("qemu-aarch64") is None
        assert daemon.table() == []
        await qusd.register(targets=["all"])
        gone = await qusd.reset(scope="all")
        assert isinstance(gone, models.ResetResponse) and "qemu-s390x" in gone.removed


async def test_problems_are_the_errors_of_their_codes(daemon: Daemon) -> None:
    async with AsyncClient(daemon.socket) as qusd:
        with pytest.raises(NoSuchEntryError) as missing:
            await qusd.get_registration("qemu-nope")
        assert missing.value.exit_status == 66 and "'qemu-nope'" in missing.value.message
        await qusd.register(targets=["s390x"])
        with pytest.raises(ConflictError) as taken:
            await qusd.register(targets=["s390x"], flags="FP")
        assert taken.value.exit_status == 73
        # the request model checks the body before it leaves (the server's own checks)
        with pytest.raises(ValueError, match="unknown flag"):
            await qusd.register(targets=["s390x"], flags="X")
        # what only the daemon knows comes back as its error
        with pytest.raises(RequestValidationError) as unknown:
            await qusd.register(targets=["vax"])
        assert "unknown target 'vax'" in unknown.value.message
        with pytest.raises(TypeError, match="name"):
            await qusd.get_registration()


async def test_a_route_added_to_the_table_is_a_method_too(daemon: Daemon) -> None:
    """The client is made from the table: a new route needs nothing here."""
    health = next(r for r in ROUTES if r.path == "/v1/health")

    async def ping(request: web.Request, body: Any) -> web.StreamResponse:
        raise AssertionError("the client never calls the handler")

    routes = (*ROUTES, dataclasses.replace(health, handler=ping, summary="Ping"))
    async with AsyncClient(daemon.socket, routes=routes) as qusd:
        assert await qusd.ping() == models.Health()
        assert qusd.ping.__doc__ == "Ping"


async def test_unreachable_daemon(tmp_path: object) -> None:
    missing = f"{tmp_path}/nowhere.sock"
    async with AsyncClient(missing) as qusd:
        with pytest.raises(DaemonUnavailableError, match=f"no socket at {missing}"):
            await qusd.health()


def test_qusctl_does_not_load_it() -> None:
    """The async client's imports stay out of qusctl's start."""
    code = (
        "import sys, qusd.cli, qusd.client; "
        "print('aiohttp' in sys.modules, 'pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    assert out.split() == ["False", "False"]
