"""qusd-binfmt (the container image's entrypoint), run on the real kernel in
sandboxes, outside any container (the image itself: test_image.py; the
GitHub Action: test_action.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from qusd import catalog
from qusd.binfmt import Rule
from tests.conftest import ROOT, Sandbox, busybox_path, interpreter

ONESHOT = [sys.executable, "-m", "qusd.oneshot"]
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT)}


def oneshot(sbx: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    return sbx.run([*ONESHOT, *args], env=ENV)


def test_register_list_reset(sbx: Sandbox) -> None:
    sbx.kernel.register(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    res = oneshot(sbx, "register", "aarch64,\n  linux/riscv64\n\n")  # as a YAML block gives it
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    assert rows[0] == ["NAME", "FLAGS", "RESULT", "INTERPRETER"]
    assert [r[:3] for r in rows[1:]] == [["qemu-aarch64", "F", "registered"],
                                         ["qemu-riscv64", "F", "registered"]]  # fmt: skip
    assert sbx.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"

    again = oneshot(sbx, "--json", "register", "arm64")
    assert [(r["name"], r["result"]) for r in json.loads(again.stdout)] == [
        ("qemu-aarch64", "unchanged")
    ]
    listed = json.loads(oneshot(sbx, "--json", "list").stdout)
    assert [r["name"] for r in listed] == ["DOSWin", "qemu-aarch64", "qemu-riscv64"]

    gone = json.loads(oneshot(sbx, "--json", "reset").stdout)  # qemu-* only, as qus does
    assert [r["name"] for r in gone] == ["qemu-aarch64", "qemu-riscv64"]
    assert sbx.kernel.names() == ["DOSWin"]
    assert oneshot(sbx, "reset", "--scope", "all").returncode == 0
    assert sbx.kernel.names() == []


def test_default_registers_every_foreign_target_with_f_and_never_c(sbx: Sandbox) -> None:
    res = oneshot(sbx, "--json", "register")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) >= 28
    assert {r["flags"] for r in rows} == {"F"}
    assert not {"qemu-x86_64", "qemu-i386", "qemu-i486"} & {r["name"] for r in rows}


def test_failures_are_loud_and_change_nothing(sbx: Sandbox, tmp_path: Path) -> None:
    res = oneshot(sbx, "register", "aarch64 vax")
    assert res.returncode == 65 and "unknown target 'vax'" in res.stderr
    assert sbx.kernel.names() == []

    tmp_path.chmod(0o755)
    res = oneshot(sbx, "register", "--interpreter-dir", str(tmp_path), "aarch64")
    assert res.returncode == 72 and "no interpreter for aarch64" in res.stderr

    sbx.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x"), "OC"))
    res = oneshot(sbx, "register", "aarch64", "s390x")
    assert res.returncode == 73 and "pass --replace" in res.stderr
    assert sbx.kernel.names() == ["qemu-s390x"]  # aarch64 was rolled back
    res = oneshot(sbx, "register", "--replace", "aarch64", "s390x")
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.entry("qemu-s390x").flags == "F"


def test_interpreters_from_a_mounted_host_directory(sbx: Sandbox, tmp_path: Path) -> None:
    """The image without interpreters: F opens the host's at registration,
    so the entry keeps working when the directory goes away."""
    host = tmp_path / "host"
    host.mkdir()
    tmp_path.chmod(0o755)
    shutil.copy(interpreter("aarch64"), host / "qemu-aarch64-static")
    res = oneshot(sbx, "register", "--interpreter-dir", str(host), "arm64")
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.entry("qemu-aarch64").interpreter == str(host / "qemu-aarch64-static")
    shutil.rmtree(host)
    assert sbx.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"


def test_mounts_binfmt_misc_when_needed_and_leaves_it(sbx: Sandbox, tmp_path: Path) -> None:
    where = tmp_path / "bm"
    where.mkdir()
    tmp_path.chmod(0o755)
    res = oneshot(sbx, "--binfmt-path", str(where), "register", "s390x")
    assert res.returncode == 0, res.stderr
    # it mounted the sandbox's instance there and did not unmount it
    assert sbx.kernel.names() == ["qemu-s390x"]


def test_needs_only_the_standard_library() -> None:
    """The image's entrypoint (qusd-binfmt and qus-register) imports nothing
    outside the standard library, and the image copies exactly its modules."""
    code = (
        "import sys; import qusd.entrypoint; "
        "print(sorted(m for m in sys.modules if m.startswith('qusd')));"
        "print(sorted({'aiohttp', 'pydantic', 'systemd'} & set(sys.modules)))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules, heavy = res.stdout.splitlines()
    assert heavy == "[]"
    # and the image copies exactly those modules
    containerfile = (ROOT / "packaging/container/Containerfile").read_text()
    copied = set(re.findall(r"qusd/(\w+)\.py", containerfile))
    needed = {
        m.split(".")[1] if "." in m else "__init__" for m in json.loads(modules.replace("'", '"'))
    }
    assert needed - {"__main__"} == copied
    assert containerfile.count('ENTRYPOINT ["python3", "-m", "qusd.entrypoint"]') == 2


def test_the_kernel_refusing_the_second_rule_puts_the_table_back(
    sbx: Sandbox, tmp_path: Path
) -> None:
    """The kernel refuses the second target's rule (its F-flag interpreter is
    open for writing, as during an upgrade: ETXTBSY): the user sees the
    kernel's error and 71, and the table is what it was, including the entry
    the first target replaced, with its definition and its disabled state."""
    tmp_path.chmod(0o755)
    for cpu in ("aarch64", "s390x"):
        shutil.copy(interpreter(cpu), tmp_path / f"qemu-{cpu}-static")
    theirs = catalog.builtin().get("aarch64").rule("/usr/bin/qemu-aarch64-static", "P")
    sbx.kernel.register(theirs)
    sbx.kernel.disable("qemu-aarch64")
    sbx.kernel.register(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    before = sbx.kernel.entries()
    busy = os.open(tmp_path / "qemu-s390x-static", os.O_WRONLY)  # "being upgraded"
    try:
        res = oneshot(sbx, "register", "--replace", "--interpreter-dir", str(tmp_path),
                      "aarch64", "s390x")  # fmt: skip
    finally:
        os.close(busy)
    assert res.returncode == 71, res.stderr
    assert res.stderr == (
        f"qusd-binfmt: the F flag opens {tmp_path}/qemu-s390x-static at registration and it "
        "is open for writing (being installed or upgraded?): register again once that is done\n"
    )
    assert sbx.kernel.entries() == before
    back = sbx.kernel.entry("qemu-aarch64")
    assert (back.interpreter, back.flags, back.enabled) == ("/usr/bin/qemu-aarch64-static", "P",
                                                           False)  # fmt: skip
    # and once the file is closed, the same command goes through
    res = oneshot(sbx, "register", "--replace", "--interpreter-dir", str(tmp_path),
                  "aarch64", "s390x")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [(r.split()[0], r.split()[2]) for r in res.stdout.splitlines()[1:]] == [
        ("qemu-aarch64", "replaced"), ("qemu-s390x", "registered")
    ]  # fmt: skip


def test_json_before_or_after_the_command_and_all(sbx: Sandbox) -> None:
    after = oneshot(sbx, "register", "all", "--json")
    assert after.returncode == 0, after.stderr
    names = [r["name"] for r in json.loads(after.stdout)]
    assert "qemu-aarch64" in names and "qemu-x86_64" not in names
    assert json.loads(oneshot(sbx, "list", "--json").stdout) == json.loads(
        oneshot(sbx, "--json", "list").stdout
    )
    res = oneshot(sbx, "register", "all", "arm64")
    assert res.returncode == 65 and "'all' means every foreign target" in res.stderr
