"""Real foreign programs (Debian's busybox-static) through real registrations."""

from __future__ import annotations

import pytest

from qusd import catalog, interpreters
from tests.conftest import DEBIAN_TARGET, FOREIGN_ARCHS, Sandbox, busybox_path

BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(catalog.host_machine())


@pytest.mark.parametrize("arch", sorted(FOREIGN_ARCHS))
def test_busybox_runs_through_its_target(sbx: Sandbox, arch: str) -> None:
    bb = busybox_path(arch)
    target = BUILTIN.get(arch)  # Debian names are aliases
    assert target.name == DEBIAN_TARGET[arch]
    if target.family == HOST_FAMILY:
        # the host runs it itself: nothing registered, and it still runs
        assert sbx.kernel.names() == []
    else:
        res = sbx.run([bb, "uname", "-m"])
        assert res.returncode != 0 and "Exec format error" in res.stderr
        interp = interpreters.find(target)
        assert interp is not None and interp.static, f"no static interpreter for {target.name}"
        sbx.kernel.register(target.rule(interp.path, "F"))
    res = sbx.run([bb, "uname", "-m"])
    assert (res.returncode, res.stdout.strip()) == (0, FOREIGN_ARCHS[arch]), res.stderr


def test_all_foreign_targets_at_once(sbx: Sandbox) -> None:
    """What `register` with no target does: every other family that has an
    interpreter; each busybox then runs through its own entry."""
    registered = []
    for t in BUILTIN.foreign(HOST_FAMILY):
        interp = interpreters.find(t)
        if interp is not None:
            sbx.kernel.register(t.rule(interp.path, "F"))
            registered.append(t.entry_name)
    assert len(registered) >= 28
    assert sbx.kernel.names() == sorted(registered)
    for arch, machine in FOREIGN_ARCHS.items():
        res = sbx.run([busybox_path(arch), "uname", "-m"])
        assert res.stdout.strip() == machine, (arch, res.stderr)
