"""The unit layer: Service and the aiohttp app in-process, on the fake
kernel, with roles from injected group ids. No root, no binfmt_misc."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qusd import catalog
from qusd.config import Config
from qusd.policy import Caller, Policy, native_headers
from qusd.service import Service
from qusd.state import State
from tests.unit.fake_kernel import FakeKernel

CAT = catalog.builtin()
USERS_GID, ADMINS_GID = 5001, 5002
ROOT = Caller(0, 0, 1)
ADMIN = Caller(1002, 100, 2, frozenset({100, ADMINS_GID}))
USER = Caller(1001, 100, 3, frozenset({100, USERS_GID}))
READER = Caller(1003, 100, 4, frozenset({100}))
CALLERS = {"root": ROOT, "admin": ADMIN, "user": USER, "reader": READER}
GROUPS = {"qusd": USERS_GID, "qusd-admin": ADMINS_GID}


def fake_interpreters(directory: Path) -> Path:
    """qemu-<cpu>-static for every catalog target, as empty executables."""
    directory.mkdir(exist_ok=True)
    for t in CAT:
        f = directory / f"qemu-{t.cpu}-static"
        f.write_bytes(b"")
        f.chmod(0o755)
    return directory


@dataclass
class World:
    kernel: FakeKernel
    state_dir: Path
    interpreters: Path
    trusted: Callable[[str], None]

    def service(self, **settings: object) -> Service:
        """A Service over the fake kernel, the state in state_dir, and the
        policy's group lookup and trust check injected."""
        cfg = Config(interpreter_dirs=(str(self.interpreters),), **settings)  # type: ignore[arg-type]
        cat = CAT
        svc = Service(self.kernel, State.load(self.state_dir), cat, cfg)
        svc.policy = Policy(
            cfg, svc.family, cat, native_headers(cat, svc.family, ["/proc/self/exe"]),
            gid_of=GROUPS.get, check_interpreter=self.trusted,
        )  # fmt: skip
        return svc

    def interpreter(self, target: str) -> str:
        return str(self.interpreters / f"qemu-{CAT.get(target).cpu}-static")


@pytest.fixture
def world(tmp_path: Path) -> World:
    def trusted(path: str) -> None:
        """Our fake interpreters are ours, not root's: trusted here."""

    return World(FakeKernel(), tmp_path / "state", fake_interpreters(tmp_path / "bin"), trusted)
