"""qus-register, the drop-in for qus' register.sh (and the qemu-binfmt-conf.sh
it drives), run as its users run it: the installed command, as root, in a
sandbox with its own binfmt_misc table. qus' documented examples, the
invocations of qus' own test suite, the export modes proven by their real
consumers (systemd-binfmt, and Debian's update-binfmts extracted from its
package), and the image's entrypoint: tests/test_image.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from qusd import catalog, provision
from qusd.binfmt import Entry, Rule
from tests.conftest import ROOT, Sandbox, busybox_path, interpreter
from tests.containers import CACHE
from tests.test_action import SYSTEMD_BINFMT, load_distribution_rules

QUS = str(Path(sys.executable).parent / "qus-register")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT)}
HOST_FAMILY = catalog.family_of(os.uname().machine)
FOREIGN = [t.name for t in catalog.builtin() if t.family != HOST_FAMILY]


def qus(
    sbx: Sandbox, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return sbx.run([QUS, *args], env={**ENV, **(env or {})})


def table(out: str) -> list[list[str]]:
    """A printed table's rows, header first."""
    return [line.split() for line in out.splitlines() if line.strip()]


def arm64_runs(sbx: Sandbox) -> bool:
    res = sbx.run([busybox_path("arm64"), "uname", "-m"])
    return res.returncode == 0 and res.stdout.strip() == "aarch64"


# -- qus' documented examples -----------------------------------------------------------


def test_static_persistent_aarch64(sbx: Sandbox) -> None:
    """`docker run --rm --privileged aptman/qus -s -- -p aarch64`: the
    -static interpreter, with F."""
    res = qus(sbx, "-s", "--", "-p", "aarch64")
    assert res.returncode == 0, res.stderr
    assert table(res.stdout) == [
        ["TARGET", "NAME", "FLAGS", "RESULT", "INTERPRETER"],
        ["aarch64", "qemu-aarch64", "F", "registered", "/usr/bin/qemu-aarch64-static"],
    ]
    assert sbx.kernel.names() == ["qemu-aarch64"]
    assert arm64_runs(sbx)


def test_clear_removes_every_qemu_entry_and_only_those(sbx: Sandbox) -> None:
    """`-- -r`: every qemu-* entry, whoever made it (not a fixed list of
    targets: qemu-cris is Debian's, unknown to QEMU's table), then stop."""
    sbx.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x"), "F"))
    sbx.kernel.register(Rule("qemu-cris", "/usr/bin/qemu-cris", extension="cris"))
    sbx.kernel.register(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    res = qus(sbx, "--", "-r")
    assert res.returncode == 0, res.stderr
    assert [r[:3] for r in table(res.stdout)[1:]] == [
        ["qemu-cris", "-", "removed"],
        ["qemu-s390x", "F", "removed"],
    ]
    assert sbx.kernel.names() == ["DOSWin"]
    again = qus(sbx, "--", "-r")
    assert (again.returncode, again.stdout.strip()) == (0, "nothing to remove")


def test_clear_named_targets(sbx: Sandbox) -> None:
    for cpu in ("s390x", "aarch64"):
        sbx.kernel.register(catalog.builtin().get(cpu).rule(interpreter(cpu), "F"))
    res = qus(sbx, "--", "--clear", "arm64")
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.names() == ["qemu-s390x"]


def test_list_alone_lists_and_registers_nothing(sbx: Sandbox) -> None:
    """`-l` (register.sh without -t registered everything after listing)."""
    sbx.kernel.register(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    for spelling in ("-l", "--list", "-list"):
        res = qus(sbx, spelling)
        assert res.returncode == 0, res.stderr
        assert table(res.stdout) == [
            ["NAME", "FLAGS", "RESULT", "INTERPRETER"],
            ["DOSWin", "-", "enabled", "/usr/bin/wine"],
        ]
    assert sbx.kernel.names() == ["DOSWin"]


def test_help(sbx: Sandbox) -> None:
    for spelling in ("-h", "--help", "-help"):
        res = qus(sbx, spelling)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("Usage: qus-register ")
        assert "-s, --static, -static" in res.stdout and "QEMU_BIN_DIR" in res.stdout
    assert sbx.kernel.names() == []


# -- the invocations of qus' own test suite ---------------------------------------------


def test_list_then_test_registers_nothing(sbx: Sandbox) -> None:
    """qus' `list`: `register.sh -l -- -t`: the table, then what would be
    registered (every foreign target), and nothing is."""
    sbx.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x"), "F"))
    res = qus(sbx, "-l", "--", "-t")
    assert res.returncode == 0, res.stderr
    rows = table(res.stdout)
    assert rows[:2] == [
        ["NAME", "FLAGS", "RESULT", "INTERPRETER"],
        ["qemu-s390x", "F", "enabled", "/usr/bin/qemu-s390x-static"],
    ]
    plan = rows[3:]
    assert rows[2] == ["TARGET", "NAME", "FLAGS", "RESULT", "INTERPRETER"]
    assert [r[0] for r in plan] == FOREIGN
    by_target = {r[0]: r[3:] for r in plan}
    assert by_target["aarch64"] == ["would", "register", "/usr/bin/qemu-aarch64"]
    assert by_target["s390x"] == ["provided", "/usr/bin/qemu-s390x-static"]
    assert sbx.kernel.names() == ["qemu-s390x"]


def test_static_without_f_names_a_file_the_kernel_opens_at_each_exec(
    sbx: Sandbox, tmp_path: Path
) -> None:
    """qus' v/V case, `-s -- aarch64`: no F, so the interpreter is looked
    up at each exec (in containers: theirs); it is registered even where it
    is not (yet), with a note, as QEMU's script does."""
    tmp_path.chmod(0o755)
    res = qus(sbx, "-s", "--", "aarch64", env={"QEMU_BIN_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert table(res.stdout)[1] == [
        "aarch64", "qemu-aarch64", "-", "registered", f"{tmp_path}/qemu-aarch64-static"
    ]  # fmt: skip
    assert "note: 1 interpreter(s) are not here" in res.stderr
    assert not arm64_runs(sbx)
    shutil.copy(interpreter("aarch64"), tmp_path / "qemu-aarch64-static")  # "bind-mounted"
    assert arm64_runs(sbx)


def test_dynamic_qemu_user(sbx: Sandbox) -> None:
    """qus' d/D case, `-- aarch64`: Debian's dynamic qemu-user
    (/usr/bin/qemu-aarch64), without F; it runs on the host, whose libraries
    it finds."""
    assert shutil.which("qemu-aarch64") == "/usr/bin/qemu-aarch64"
    res = qus(sbx, "--", "aarch64")
    assert res.returncode == 0, res.stderr
    entry = sbx.kernel.entry("qemu-aarch64")
    assert (entry.interpreter, entry.flags) == ("/usr/bin/qemu-aarch64", "")
    assert res.stderr == ""  # it is there: no note
    assert arm64_runs(sbx)


def test_qemu_bin_dir_with_f(sbx: Sandbox, tmp_path: Path) -> None:
    """qus' c/C case: `QEMU_BIN_DIR=$(pwd) register.sh -s -- -p aarch64`:
    F opens the interpreter now, so it keeps working once the directory is
    gone."""
    tmp_path.chmod(0o755)
    shutil.copy(interpreter("aarch64"), tmp_path / "qemu-aarch64-static")
    res = qus(sbx, "-s", "--", "-p", "aarch64", env={"QEMU_BIN_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    entry = sbx.kernel.entry("qemu-aarch64")
    assert (entry.interpreter, entry.flags) == (f"{tmp_path}/qemu-aarch64-static", "F")
    shutil.rmtree(tmp_path)
    assert arm64_runs(sbx)


def test_distributions_rules_then_reset_then_register(sbx: Sandbox) -> None:
    """qus' r/R case: qemu-user-static's rules loaded (by the real
    systemd-binfmt), `-- -r`, then `-s -- -p aarch64`. Before the reset
    that request is already served by the distribution's entry: reported,
    kept, exit 0 (register.sh printed "write error: File exists")."""
    load_distribution_rules(box=sbx)
    debian = sbx.kernel.entry("qemu-aarch64")
    res = qus(sbx, "-s", "--", "-p", "aarch64")
    assert res.returncode == 0, res.stderr
    assert table(res.stdout)[1][:4] == ["aarch64", "qemu-aarch64", "POF", "provided"]
    assert sbx.kernel.entry("qemu-aarch64") == debian

    res = qus(sbx, "--", "-r")
    assert res.returncode == 0, res.stderr
    assert not [n for n in sbx.kernel.names() if n.startswith("qemu-")]
    res = qus(sbx, "-s", "--", "-p", "aarch64")
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.entry("qemu-aarch64").flags == "F"
    assert arm64_runs(sbx)


def test_every_foreign_target_whose_interpreter_is_there(sbx: Sandbox, tmp_path: Path) -> None:
    """No target, with F: each foreign target whose interpreter is in the
    directory (QEMU's script tried them all, and F failed with ENOENT for
    each missing one); without any, a clear error."""
    tmp_path.chmod(0o755)
    res = qus(sbx, "-s", "--", "-p", env={"QEMU_BIN_DIR": str(tmp_path)})
    assert res.returncode == 72, res.stdout + res.stderr
    assert f"no interpreter qemu-CPU-static in {tmp_path}" in res.stderr
    for cpu in ("aarch64", "s390x"):
        shutil.copy(interpreter(cpu), tmp_path / f"qemu-{cpu}-static")
    res = qus(sbx, "-s", "--", "-p", env={"QEMU_BIN_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.names() == ["qemu-aarch64", "qemu-s390x"]

    res = qus(sbx, "-r", "-s", "--", "-p")  # the host's /usr/bin has them all
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.names() == sorted(f"qemu-{t}" for t in FOREIGN)


def test_register_sh_reset_then_register_and_reset_exit(sbx: Sandbox) -> None:
    """register.sh's own -r removes the qemu-* entries and goes on; -r -e
    stops after removing."""
    sbx.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x"), "OCF"))
    res = qus(sbx, "-r", "-s", "--", "-p", "aarch64")
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.names() == ["qemu-aarch64"]
    res = qus(sbx, "-r", "-e")
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.names() == []


def test_an_entry_in_the_way_fails_the_whole_request(sbx: Sandbox) -> None:
    """An entry of the name that does not provide the target (C, which was
    not asked for): exit 73, the fix named, and the other target is not
    registered either (register.sh went on and exited with the last
    target's status)."""
    sbx.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x"), "OCF"))
    res = qus(sbx, "-s", "--", "-p", "aarch64", "s390x")
    assert res.returncode == 73, res.stdout + res.stderr
    assert res.stderr.splitlines() == [
        "qus-register: qemu-s390x is registered (interpreter /usr/bin/qemu-s390x-static, "
        "flags OCF) but does not provide s390x with flags F: it has the C flag (set-uid "
        "binaries would run their interpreter as root); remove it first (qus-register -- -r "
        "s390x, or -r for every qemu-* entry)"
    ]
    rows = table(res.stdout)[1:]
    assert [r[3:5] for r in rows] == [["not", "registered"], ["conflict", interpreter("s390x")]]
    assert sbx.kernel.names() == ["qemu-s390x"]


def test_unknown_target_and_bad_options(sbx: Sandbox) -> None:
    res = qus(sbx, "-s", "--", "-p", "aarch64", "vax")
    assert res.returncode == 65 and "unknown target 'vax'" in res.stderr
    res = qus(sbx, "-x")
    assert res.returncode == 2
    assert res.stderr == "qus-register: invalid option: -x; see qus-register -h\n"
    res = qus(sbx, "--", "-Q")
    assert res.returncode == 2 and "option -Q requires an argument" in res.stderr
    assert sbx.kernel.names() == []


def test_other_spellings_and_the_environment(sbx: Sandbox) -> None:
    """The older register.sh's -t TARGETS, QEMU's --persistent yes and
    --credential yes, bundled letters, --opt=value, -c alone, the QEMU_*
    variables: each with its meaning."""
    res = qus(sbx, "-t", "aarch64,riscv64", "-s", "--", "--persistent", "yes",
              "--credential", "yes")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert {e.name: e.flags for e in sbx.kernel.entries()} == {
        "qemu-aarch64": "OCF",
        "qemu-riscv64": "OCF",
    }
    res = qus(sbx, "--", "-r")
    res = qus(sbx, "--", "-pc", "--qemu-path=/usr/bin", "--qemu-suffix=-static",
              "--preserve-argv0", "s390x")  # fmt: skip
    assert res.returncode == 0, res.stderr
    s390x = sbx.kernel.entry("qemu-s390x")
    assert (s390x.interpreter, s390x.flags) == ("/usr/bin/qemu-s390x-static", "POCF")
    env = {"QEMU_TARGETS": "ppc64le", "QEMU_SUFFIX": "-static", "QEMU_PERSISTENT": "yes"}
    res = qus(sbx, env=env)
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.entry("qemu-ppc64le").flags == "F"
    res = qus(sbx, "-s", "--", "-p", "no", "mips64el", env={"QEMU_PERSISTENT": "yes"})
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.entry("qemu-mips64el").flags == ""
    res = qus(sbx, "--", "-r", env={"QEMU_TEST": "yes"})  # only says what it would remove
    assert res.returncode == 0, res.stderr
    assert len(sbx.kernel.names()) == 3


def test_interactive_runs_the_rest_as_given(sbx: Sandbox) -> None:
    """-i: the rest of the command line is a shell command and its
    arguments, not re-split (register.sh ran `sh -c $@`)."""
    res = qus(sbx, "-i", 'printf "%s|" "$@"; exit 3', "one arg", "two")
    assert (res.returncode, res.stdout) == (3, "one arg|two|")


# -- export modes, proven by their consumers ----------------------------------------------


def _entries(box: Sandbox) -> list[Entry]:
    return [e for e in box.kernel.entries() if e.name.startswith("qemu-")]


@pytest.fixture
def direct() -> list[Entry]:
    """What qus-register registers directly: every foreign target, F, the
    -static interpreters (in a sandbox of its own)."""
    box = Sandbox()
    try:
        res = qus(box, "-s", "--", "-p")
        assert res.returncode == 0, res.stderr
        return _entries(box)
    finally:
        box.close()


def test_systemd_export_loaded_by_systemd_binfmt(
    sbx: Sandbox, tmp_path: Path, direct: list[Entry]
) -> None:
    """`-- --systemd ALL --exportdir DIR` writes DIR/qemu-CPU.conf as QEMU's
    script does; the real systemd-binfmt loads them into exactly the
    entries qus-register registers directly. Nothing is registered by the
    export itself."""
    out = tmp_path / "binfmt.d"
    res = qus(sbx, "-s", "--", "-p", "--systemd", "ALL", "--exportdir", str(out))
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"qemu-{t}.conf" for t in FOREIGN)
    assert sbx.kernel.names() == []
    res = sbx.run([SYSTEMD_BINFMT, *sorted(str(p) for p in out.iterdir())])
    assert res.returncode == 0, res.stderr
    assert _entries(sbx) == direct
    assert arm64_runs(sbx)


def test_exportdir_alone_and_qemus_own_spelling(sbx: Sandbox, tmp_path: Path) -> None:
    """--systemd=CPU (QEMU's script), -e DIR without a mode (binfmt.d
    files: a directory to export to is what was asked for), EXPORTDIR."""
    res = qus(sbx, "--", "--systemd=aarch64", "-e", str(tmp_path / "a"),
              env={"QEMU_PERSISTENT": "yes", "QEMU_SUFFIX": "-static"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["qemu-aarch64.conf"]
    res = qus(sbx, "-s", "--", "-e", str(tmp_path / "b"), "ppc64le")
    assert res.returncode == 0, res.stderr
    res = qus(sbx, "-s", "--", "--systemd", "s390x", env={"EXPORTDIR": str(tmp_path / "b")})
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "qemu-ppc64le.conf", "qemu-s390x.conf"
    ]  # fmt: skip
    text = (tmp_path / "b" / "qemu-s390x.conf").read_text()
    assert text.splitlines()[1].startswith(":qemu-s390x:M:0:\\x7f\\x45\\x4c\\x46")
    assert text.splitlines()[1].endswith(":/usr/bin/qemu-s390x-static:")
    assert sbx.kernel.names() == []


@pytest.fixture(scope="module")
def update_binfmts() -> Path:
    """Debian's update-binfmts, from binfmt-support's package (downloaded
    once with apt-get, extracted, never installed: it would manage the
    host's table)."""
    cache = CACHE / "binfmt-support"
    cache.mkdir(parents=True, exist_ok=True)
    deb = Path(provision.fetch(str(cache), "binfmt-support"))
    root = cache / deb.stem
    if not (root / "usr/sbin/update-binfmts").exists():
        tmp = cache / f".{deb.stem}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(root)
    return root / "usr/sbin/update-binfmts"


def test_debian_export_imported_by_update_binfmts(
    sbx: Sandbox, tmp_path: Path, direct: list[Entry], update_binfmts: Path
) -> None:
    """`-- --debian --exportdir DIR` writes update-binfmts import files as
    QEMU's script does; Debian's update-binfmts imports them (its own
    database in an admin dir) into exactly the entries qus-register
    registers directly."""
    tmp_path.chmod(0o755)
    out, admin = tmp_path / "binfmts", tmp_path / "admin"
    admin.mkdir()
    res = qus(sbx, "-s", "--", "-p", "-d", "-e", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"qemu-{t}" for t in FOREIGN)
    assert sbx.kernel.names() == []
    res = sbx.run([update_binfmts, "--importdir", out, "--admindir", admin, "--import"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert _entries(sbx) == direct
    shown = sbx.run([update_binfmts, "--admindir", admin, "--display", "qemu-aarch64"])
    assert "interpreter = /usr/bin/qemu-aarch64-static" in shown.stdout, shown.stdout
    assert arm64_runs(sbx)
