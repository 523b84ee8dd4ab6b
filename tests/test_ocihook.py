"""qusd-oci-hook: a container's own binfmt_misc table, as its users meet it.

The hook's checks run here directly; everything else runs through Debian's
rootless podman (crun) as an ordinary user made for the run (subuid/subgid
ranges, its own XDG_RUNTIME_DIR, removed at the end), with an arm64 image
made here from Debian's busybox-static (no registry is reachable) and the
hook configured by a hooks.d file generated from the packaged one.

This machine's cgroups are hybrid with a controller on the v2 hierarchy,
which crun refuses outright ("cgroups in hybrid mode not supported, drop all
controllers from cgroupv2"). Where that is so, podman runs in a mount
namespace of its own with an empty tmpfs over /sys/fs/cgroup/unified, so crun
sees plain v1; a machine with a unified hierarchy (Debian 12's default) runs
podman as it is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from qusd import catalog, ocihook, sandbox
from qusd.binfmt import BinfmtMisc
from qusd.errors import (
    ForbiddenError,
    InterpreterError,
    InvalidRuleError,
    MalformedRequestError,
    SandboxError,
    UnknownTargetError,
)
from tests.conftest import (
    DEBIAN_TARGET,
    ROOT,
    STATIC_DIR,
    Sandbox,
    Shared,
    busybox_path,
    interpreter,
    needs_sandbox,
)

pytestmark = needs_sandbox

PACKAGED_HOOK = ROOT / "packaging" / "oci" / "qusd-emulate.json"
BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(catalog.host_machine())
#: this run's own suffix: parallel runs keep their accounts apart
RUN = secrets.token_hex(3)
USER = f"qusdt-oci-{RUN}"
AARCH64_QEMU = f"{STATIC_DIR}/qemu-aarch64-static"
#: Debian's python3 runs the hook (the package's virtualenv is bound to it);
#: the hook needs nothing but the standard library and qusd
SYSTEM_PYTHON = "/usr/bin/python3"
#: a file only the probe's container has (a bind mount of a harmless program)
IMAGE_ONLY = "/opt/image-only-interpreter"
SUBIDS_BASE, SUBIDS_COUNT, SUBIDS_SLOTS = 1_000_000_000, 4 * 65536, 10_000


def host_table() -> tuple[bool, list[str]]:
    """Whether the host's binfmt_misc is mounted, and its entries."""
    host = BinfmtMisc()
    return (True, host.names()) if host.is_mounted() else (False, [])


def state(pid: int, bundle: Path, **annotations: str) -> ocihook.State:
    return ocihook.State("0123456789abcdef", pid, str(bundle), annotations)


# -- the hook's checks: nothing is touched before all of them pass -----------------------


def test_packaged_hook_config_asks_for_the_annotation_at_create_runtime() -> None:
    doc = json.loads(PACKAGED_HOOK.read_text())
    assert doc["version"] == "1.0.0"
    assert doc["hook"] == {"path": "/usr/bin/qusd-oci-hook", "args": ["qusd-oci-hook"]}
    assert doc["stages"] == ["createRuntime"]
    ((key, value),) = doc["when"]["annotations"].items()
    assert re.search(key, ocihook.ANNOTATION)
    assert not re.search(key, ocihook.FLAGS_ANNOTATION)
    assert re.search(value, "aarch64") and not re.search(value, "")


def test_console_script() -> None:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "qusd-oci-hook"]
    assert ep.value == "qusd.ocihook:main"


def test_containers_that_do_not_ask_are_left_alone() -> None:
    doc = {"ociVersion": "1.0.2", "id": "x", "pid": 1, "bundle": "/nonexistent"}
    res = subprocess.run(
        [sys.executable, "-m", "qusd.ocihook"],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_a_malformed_state_fails_with_the_reason() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "qusd.ocihook"],
        input="not json",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == MalformedRequestError.exit_status
    assert res.stderr.startswith("qusd-oci-hook: the OCI state on stdin is not JSON")


@pytest.mark.parametrize(
    ("names", "flags", "error", "says"),
    [
        ("x86_64", "F", ForbiddenError, f"x86_64 is of the host's own family ({HOST_FAMILY})"),
        ("aarch64,amd64", "F", ForbiddenError, "containers may register only foreign targets"),
        ("i386", "F", ForbiddenError, "i386 is of the host's own family"),
        ("aarch64", "C", ForbiddenError, "flag(s) C are not allowed (containers may use: FP)"),
        ("aarch64", "O", ForbiddenError, "flag(s) O are not allowed"),
        ("aarch64", "FOC", ForbiddenError, "flag(s) CO are not allowed"),
        ("aarch64", "Z", InvalidRuleError, "unknown flag(s) 'Z'"),
        ("vax", "F", UnknownTargetError, "unknown target 'vax'"),
    ],
)
def test_refused_requests(names: str, flags: str, error: type[Exception], says: str) -> None:
    req = ocihook.request_of({ocihook.ANNOTATION: names, ocihook.FLAGS_ANNOTATION: flags})
    assert req is not None
    with pytest.raises(error) as info:
        ocihook.plan(req, BUILTIN, HOST_FAMILY, ["/usr/bin"])
    assert says in str(info.value)


def test_empty_annotation_is_refused() -> None:
    with pytest.raises(MalformedRequestError, match="is empty"):
        ocihook.request_of({ocihook.ANNOTATION: " , "})


def test_a_request_becomes_catalog_rules_with_trusted_static_interpreters() -> None:
    interpreter("aarch64")
    req = ocihook.request_of({ocihook.ANNOTATION: "arm64, riscv64"})
    assert req == ocihook.Request(("arm64", "riscv64"), "FP")
    rules = ocihook.plan(req, BUILTIN, HOST_FAMILY, ["/usr/bin"])
    assert [(r.name, r.interpreter, r.flags) for r in rules] == [
        ("qemu-aarch64", AARCH64_QEMU, "PF"),
        ("qemu-riscv64", f"{STATIC_DIR}/qemu-riscv64-static", "PF"),
    ]
    assert rules[0] == BUILTIN.get("aarch64").rule(AARCH64_QEMU, "PF")


def test_all_is_every_foreign_target_with_a_static_interpreter() -> None:
    interpreter("aarch64")
    req = ocihook.request_of({ocihook.ANNOTATION: "all", ocihook.FLAGS_ANNOTATION: "F"})
    assert req is not None
    rules = ocihook.plan(req, BUILTIN, HOST_FAMILY, ["/usr/bin"])
    names = {r.name for r in rules}
    assert {"qemu-aarch64", "qemu-riscv64", "qemu-s390x"} <= names
    assert not names & {f"qemu-{t.name}" for t in BUILTIN if t.family == HOST_FAMILY}
    assert all(r.interpreter.endswith("-static") and r.flags == "F" for r in rules)


def test_all_without_interpreters_is_refused(tmp_path: Path) -> None:
    req = ocihook.Request(("all",), "FP")
    with pytest.raises(InterpreterError, match="'all' found no static interpreter"):
        ocihook.plan(req, BUILTIN, HOST_FAMILY, [str(tmp_path)])


def test_a_dynamic_interpreter_is_refused(tmp_path: Path) -> None:
    """In the container the libraries of a dynamic interpreter are missing."""
    dynamic = Path("/usr/bin/qemu-aarch64")
    assert dynamic.exists(), "Debian's qemu-user must be installed (tools/setup-system.sh)"
    only = tmp_path / "interpreters"
    only.mkdir()
    (only / dynamic.name).symlink_to(dynamic)
    req = ocihook.Request(("aarch64",), "FP")
    with pytest.raises(InterpreterError, match="qemu-aarch64 is dynamically linked"):
        ocihook.plan(req, BUILTIN, HOST_FAMILY, [str(only)])


def test_the_host_user_namespace_is_refused(tmp_path: Path) -> None:
    """Rootful podman without --userns: the container's table would be the
    machine's, so the hook refuses (this test runs in the initial namespace)."""
    assert os.stat("/proc/self/ns/user").st_ino == ocihook.PROC_USER_INIT_INO
    with pytest.raises(SandboxError, match="runs in the host's user namespace"):
        ocihook.check_user_namespace(os.getpid())


def test_an_old_kernel_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "kernel_release", lambda: (6, 6))
    with pytest.raises(SandboxError, match=r"private tables need Linux >= 6\.7; not registering"):
        ocihook.check_kernel()


# -- the kernel: a sandbox stands in for the container ----------------------------------


def test_hook_gives_a_user_namespace_its_sealed_table(tmp_path: Path) -> None:
    """Rootful with a user namespace of its own: the hook mounts the table at
    the 'container's' /proc/sys/fs/binfmt_misc, registers with the host's
    paths, then makes that mount read-only."""
    bb = busybox_path("arm64")
    interpreter("aarch64")
    elsewhere = tmp_path / "binfmt"
    elsewhere.mkdir()
    box = Sandbox(str(elsewhere))  # its own table, mounted elsewhere
    try:
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"root": {"path": "/"}}))
        before = host_table()
        req = ocihook.request_of({ocihook.ANNOTATION: "arm64"})
        assert req is not None
        lines = ocihook.emulate(state(box.pid, bundle), req, BUILTIN, ["/usr/bin"])
        assert lines == [f"qemu-aarch64: registered (interpreter {AARCH64_QEMU}, flags PF)"]
        (entry,) = box.kernel.entries()
        assert (entry.name, entry.interpreter, entry.flags) == ("qemu-aarch64", AARCH64_QEMU, "PF")
        assert box.run([bb, "uname", "-m"]).stdout == "aarch64\n"
        write = box.run(["sh", "-c", "echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64"])
        assert write.returncode != 0 and "Read-only file system" in write.stderr
        assert host_table() == before
        # asked again (a second container of the same user namespace): kept
        again = ocihook.emulate(state(box.pid, bundle), req, BUILTIN, ["/usr/bin"])
        assert again == [f"qemu-aarch64: unchanged (interpreter {AARCH64_QEMU}, flags PF)"]
        # other flags for the same target: refused, nothing changed
        other = ocihook.Request(("arm64",), "F")
        with pytest.raises(Exception, match="containers that share a user namespace share one"):
            ocihook.emulate(state(box.pid, bundle), other, BUILTIN, ["/usr/bin"])
        assert [e.flags for e in box.kernel.entries()] == ["PF"]
    finally:
        box.close()


def test_no_proc_under_the_root_fails_clearly(tmp_path: Path) -> None:
    box = Sandbox(str(tmp_path))
    try:
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
        (bundle / "rootfs" / "proc").mkdir(parents=True)
        req = ocihook.Request(("aarch64",), "FP")
        with pytest.raises(SandboxError, match="run the hook at the createRuntime stage"):
            ocihook.emulate(state(box.pid, bundle), req, BUILTIN, ["/usr/bin"])
    finally:
        box.close()


# -- rootless podman, as an ordinary user meets it ------------------------------------------


def busybox_rootfs_tarball(arch: str, dest: Path) -> Path:
    """An image's root for a Debian architecture: Debian's busybox-static and
    a link per applet, all root's.

    LEAD: when tools/rootfs.sh lands, make this call it (an mmdebstrap base
    tarball of the architecture); the tests only need /bin/sh, uname, cat,
    ls and sleep in it.
    """
    bb = busybox_path(arch)
    qemu = interpreter(BUILTIN.get(DEBIAN_TARGET[arch]).cpu)
    applets = subprocess.run(
        [qemu, str(bb), "--list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert "sh" in applets and "uname" in applets

    def member(name: str, kind: bytes, mode: int, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.linkname = kind, mode, link
        info.uid = info.gid = 0
        return info

    with tarfile.open(dest, "w") as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "run"):
            tar.addfile(member(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        data = bb.read_bytes()
        info = member("bin/busybox", tarfile.REGTYPE, 0o755)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for applet in applets:
            if applet != "busybox":
                tar.addfile(member(f"bin/{applet}", tarfile.SYMTYPE, 0o777, "busybox"))
    dest.chmod(0o644)
    return dest


def _crun_refuses_these_cgroups() -> bool:
    """crun refuses hybrid cgroups with a controller on the v2 side."""
    try:
        controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().strip()
    except OSError:
        return False
    return bool(controllers) and not Path("/sys/fs/cgroup/cgroup.controllers").exists()


MASK_CGROUP2 = [
    "unshare", "--mount", "--propagation", "slave", "sh", "-c",
    'mount -t tmpfs -o ro,size=4k qusd-no-cgroup2 /sys/fs/cgroup/unified && exec "$@"', "sh",
]  # fmt: skip


@dataclass
class Rootless:
    """An ordinary user with rootless podman, and this run's images."""

    name: str
    uid: int
    gid: int
    home: Path
    runtime_dir: Path
    hooks_dir: Path
    shared: Shared
    #: the run's directory (images, probe, build context), readable by the user
    top: Path
    #: a directory the user owns (hook logs, build storage)
    work: Path

    def argv(self, cmd: Sequence[str], prefix: Sequence[str] = ()) -> list[str]:
        env = [
            f"HOME={self.home}", f"USER={self.name}", f"LOGNAME={self.name}",
            f"XDG_RUNTIME_DIR={self.runtime_dir}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ]  # fmt: skip
        mask = MASK_CGROUP2 if _crun_refuses_these_cgroups() else []
        setpriv = [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--",
        ]  # fmt: skip
        return [*mask, *prefix, *setpriv, "env", "-i", *env, *cmd]

    def sh(
        self, cmd: Sequence[str], prefix: Sequence[str] = (), timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(cmd, prefix),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            check=False,
        )

    def podman(self, *args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        glob = [
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
            "--hooks-dir",
            str(self.hooks_dir),
        ]
        return self.sh(["podman", *glob, *args], prefix)

    def run(self, *args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """podman run --rm, no network (none is needed)."""
        return self.podman("run", "--rm", "--network=none", *args, prefix=prefix)

    def ok(self, *args: str) -> str:
        res = self.run(*args)
        assert res.returncode == 0, f"podman run {' '.join(args)}: {res.stderr}"
        return res.stdout

    @contextlib.contextmanager
    def running(self, *args: str) -> Iterator[str]:
        """A container left running (`podman run -d`, no network) for the
        block: its id; removed after."""
        started = self.podman("run", "-d", "--network=none", *args)
        assert started.returncode == 0, started.stderr
        cid = started.stdout.strip()
        try:
            yield cid
        finally:
            self.podman("rm", "--force", "--time", "0", cid)

    def reset(self) -> None:
        """A fresh rootless user namespace (no table yet): no container, and
        podman's pause process, which holds the namespace, gone."""
        res = self.podman("rm", "--all", "--force", "--time", "0")
        assert res.returncode == 0, res.stderr
        pidfile = self.runtime_dir / "libpod" / "tmp" / "pause.pid"
        if pidfile.exists():
            _kill(int(pidfile.read_text()))
        for pid in _processes_of(self.uid):
            _kill(pid)

    def hook_stderr(self) -> tuple[list[str], Path]:
        """crun's annotation that keeps the hook's stderr (crun drops it)."""
        path = self.work / f"hook-{secrets.token_hex(4)}.err"
        return ["--annotation", f"run.oci.hooks.stderr={path}"], path


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except OSError:
            continue
    return pids


def _kill(pid: int) -> None:
    """End a process of the test user's (by its id) and wait for it to go."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return  # a zombie: gone but for its parent's wait
        except OSError:
            return
        time.sleep(0.02)


def _subids(name: str, path: str) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line.split(":")[0] == name]


def _remove_user(name: str) -> None:
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    for pid in _processes_of(uid):
        _kill(pid)
    res = subprocess.run(
        ["userdel", "--remove", name], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode in (0, 12), res.stderr  # 12: the home was gone already
    lock = Path(f"/dev/shm/libpod_rootless_lock_{uid}")  # podman's, per uid
    if lock.exists() and lock.stat().st_uid == uid:
        lock.unlink()


def _run(argv: Sequence[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"


@pytest.fixture(scope="module")
def rootless(shared: Shared) -> Iterator[Rootless]:
    """An ordinary user with subordinate ids, rootless podman, the hook
    configured from the packaged file, and the images imported."""
    for tool in ("podman", "crun", "newuidmap", "setpriv", "unshare"):
        assert shutil.which(tool), f"{tool} is missing: tools/setup-system.sh installs it"
    work = Path(tempfile.mkdtemp(prefix=f"qusdt-oci-{RUN}-", dir="/tmp"))
    work.chmod(0o755)
    home, runtime_dir, hooks_dir = work / "home", work / "run", work / "hooks.d"
    _remove_user(USER)
    try:
        argv = ["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh"]
        _run([*argv, "--key", "SUB_UID_COUNT=0", "--key", "SUB_GID_COUNT=0", USER])
        pw = pwd.getpwnam(USER)
        # podman gives each --userns=auto container 65536 ids here (the image
        # has no /etc/passwd to size it by): room for several at once, in a
        # slot of this run's own far above what useradd hands out
        base = SUBIDS_BASE + int(RUN, 16) % SUBIDS_SLOTS * SUBIDS_COUNT
        for path, option in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
            _run(["usermod", option, f"{base}-{base + SUBIDS_COUNT - 1}", USER])
            assert _subids(USER, path) == [f"{USER}:{base}:{SUBIDS_COUNT}"]
        runtime_dir.mkdir(mode=0o700)
        os.chown(runtime_dir, pw.pw_uid, pw.pw_gid)
        logs = work / "logs"
        logs.mkdir()
        os.chown(logs, pw.pw_uid, pw.pw_gid)
        hooks_dir.mkdir()
        config = json.loads(PACKAGED_HOOK.read_text())
        config["hook"] = {
            "path": SYSTEM_PYTHON,
            "args": [SYSTEM_PYTHON, "-m", "qusd.ocihook"],
            "env": [f"PYTHONPATH={shared.root}"],
        }
        (hooks_dir / PACKAGED_HOOK.name).write_text(json.dumps(config, indent=2))
        probe = work / "fflag_probe.py"
        shutil.copy(ROOT / "tests" / "fflag_probe.py", probe)
        probe.chmod(0o644)
        user = Rootless(
            USER, pw.pw_uid, pw.pw_gid, home, runtime_dir, hooks_dir, shared, work, logs
        )
        for arch in ("arm64", "s390x"):
            tar = busybox_rootfs_tarball(arch, work / f"{arch}.tar")
            res = user.podman("import", "--arch", arch, str(tar), f"localhost/qusdt-{arch}")
            assert res.returncode == 0, res.stderr
        yield user
    finally:
        _remove_user(USER)
        shutil.rmtree(work, ignore_errors=True)
        assert not _subids(USER, "/etc/subuid"), "userdel left the subordinate ids behind"


ARM64, S390X = "localhost/qusdt-arm64", "localhost/qusdt-s390x"
EMULATE = ocihook.ANNOTATION


def test_without_the_annotation_arm64_does_not_run(rootless: Rootless) -> None:
    rootless.reset()
    res = rootless.run(ARM64, "uname", "-m")
    assert res.returncode != 0
    assert "Exec format error" in res.stderr


def test_with_the_annotation_arm64_runs_and_the_host_is_untouched(rootless: Rootless) -> None:
    rootless.reset()
    before = host_table()
    err_opts, err = rootless.hook_stderr()
    out = rootless.ok("--annotation", f"{EMULATE}=arm64", *err_opts, ARM64, "uname", "-m")
    assert out == "aarch64\n"
    # the container's table: the host's interpreter, by its host path; the
    # container's filesystem holds no interpreter
    script = "ls /proc/sys/fs/binfmt_misc; cat /proc/sys/fs/binfmt_misc/qemu-aarch64; " \
        f"ls {AARCH64_QEMU} 2>&1; true"  # fmt: skip
    out = rootless.ok("--annotation", f"{EMULATE}=aarch64", ARM64, "sh", "-c", script)
    lines = out.splitlines()
    assert lines[:3] == ["qemu-aarch64", "register", "status"]
    assert f"interpreter {AARCH64_QEMU}" in lines and "flags: PF" in lines
    assert lines[-1].endswith("No such file or directory")
    assert host_table() == before
    assert not err.exists() or err.read_text() == ""


def test_the_container_cannot_change_its_table(rootless: Rootless) -> None:
    """The mount is read-only: the container's root owns the entry files and
    could otherwise register interpreters of its choosing."""
    script = (
        "echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64; "
        "echo ':x:E::x::/bin/sh:' > /proc/sys/fs/binfmt_misc/register; "
        "grep ' /proc/sys/fs/binfmt_misc ' /proc/self/mountinfo; uname -m"
    )
    res = rootless.run("--annotation", f"{EMULATE}=aarch64", ARM64, "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("Read-only file system") == 2
    mounts = [line for line in res.stdout.splitlines() if "binfmt_misc" in line]
    assert mounts and all(" ro," in line for line in mounts)
    assert res.stdout.endswith("aarch64\n")


def test_default_userns_containers_share_one_table_while_it_is_mounted(
    rootless: Rootless,
) -> None:
    """Rootless podman's default: every container of the user runs in the one
    user namespace podman made, so they share one table, for as long as a
    container that mounted it runs (the kernel drops a table's entries with
    its last mount); containers in namespaces of their own below podman's,
    without a table, fall through to it."""
    rootless.reset()
    with rootless.running("--annotation", f"{EMULATE}=aarch64", ARM64, "sleep", "120") as cid:
        # not annotated, same namespace: the table is there
        assert rootless.ok(ARM64, "uname", "-m") == "aarch64\n"
        # not annotated, a namespace of its own below podman's: exec walks up to it
        assert rootless.ok("--userns=auto", ARM64, "uname", "-m") == "aarch64\n"
        # a second request adds to the shared table, which the first container sees
        assert rootless.ok("--annotation", f"{EMULATE}=s390x", S390X, "uname", "-m") == "s390x\n"
        listing = rootless.podman("exec", cid, "ls", "/proc/sys/fs/binfmt_misc")
        assert listing.stdout.split() == ["qemu-aarch64", "qemu-s390x", "register", "status"]
    # the last container that mounted the table is gone, and the table with it
    assert "Exec format error" in rootless.run(ARM64, "uname", "-m").stderr


def test_own_userns_containers_have_their_own_tables(rootless: Rootless) -> None:
    """--userns=auto: each container its own user namespace, so its own table:
    one asking for riscv64 and s390x cannot run aarch64 while another, asking
    for aarch64, runs it; neither table reaches podman's or the host's."""
    rootless.reset()
    before = host_table()
    bb = rootless.shared.busybox("arm64")
    with rootless.running(
        "--userns=auto", "--annotation", f"{EMULATE}=aarch64", ARM64, "sleep", "120"
    ) as cid:
        y = rootless.run(
            "--userns=auto", "--annotation", f"{EMULATE}=riscv64 s390x",
            "-v", f"{bb}:/arm64/busybox:ro", S390X,
            "sh", "-c", "uname -m; ls /proc/sys/fs/binfmt_misc; /arm64/busybox uname -m",
        )  # fmt: skip
        assert y.stdout.split() == ["s390x", "qemu-riscv64", "qemu-s390x", "register", "status"], (
            y.stderr
        )
        # (the kernel said ENOEXEC; busybox sh then tried the file as a script)
        assert "/arm64/busybox: line 1: syntax error" in y.stderr
        y2 = rootless.run(
            "--userns=auto", "--annotation", f"{EMULATE}=riscv64 s390x",
            "-v", f"{bb}:/arm64/busybox:ro", S390X, "/arm64/busybox", "uname", "-m",
        )  # fmt: skip
        assert y2.returncode != 0 and "Exec format error" in y2.stderr
        x_table = rootless.podman("exec", cid, "ls", "/proc/sys/fs/binfmt_misc")
        assert x_table.stdout.split() == ["qemu-aarch64", "register", "status"], x_table.stderr
        assert rootless.podman("exec", cid, "uname", "-m").stdout == "aarch64\n"
        # podman's own namespace got no table: a default container cannot run arm64
        assert "Exec format error" in rootless.run(ARM64, "uname", "-m").stderr
        assert host_table() == before


@pytest.mark.parametrize("mode", ["auto", "nomap", "keep-id"])
def test_userns_modes_with_a_namespace_of_their_own(rootless: Rootless, mode: str) -> None:
    """Each of these makes the container a user namespace below podman's: the
    hook gives that one its table."""
    podmans = rootless.podman("unshare", "readlink", "/proc/self/ns/user").stdout
    script = "uname -m; readlink /proc/self/ns/user; ls /proc/sys/fs/binfmt_misc"
    out = rootless.ok(
        f"--userns={mode}", "--annotation", f"{EMULATE}=arm64", ARM64, "sh", "-c", script
    )
    machine, userns, *table = out.split()
    assert (machine, table) == ("aarch64", ["qemu-aarch64", "register", "status"])
    assert userns.startswith("user:[") and userns != podmans.strip()


def test_a_container_with_sys_admin_is_root_of_its_own_table_only(rootless: Rootless) -> None:
    """Given CAP_SYS_ADMIN a container may remount its table writable and change
    it: that changes its own user namespace's table, nobody else's."""
    rootless.reset()
    bb = rootless.shared.busybox("arm64")
    with rootless.running(
        "--userns=auto", "--annotation", f"{EMULATE}=aarch64", ARM64, "sleep", "120"
    ) as cid:
        script = (
            "mount -o remount,rw /proc/sys/fs/binfmt_misc && "
            "echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64 && ls /proc/sys/fs/binfmt_misc; "
            "/arm64/busybox uname -m"
        )
        # podman splits --annotation at commas unless the value is quoted, CSV style
        res = rootless.run(
            "--userns=auto", "--cap-add=SYS_ADMIN", "--annotation", f'"{EMULATE}=aarch64,s390x"',
            "-v", f"{bb}:/arm64/busybox:ro", S390X, "sh", "-c", script,
        )  # fmt: skip
        # its own table lost aarch64: the kernel refuses the arm64 program (ENOEXEC,
        # and busybox sh then tries it as a script)
        assert res.stdout.split() == ["qemu-s390x", "register", "status"], res.stderr
        assert "/arm64/busybox: line 1: syntax error" in res.stderr
        # the other container's table is as the hook left it
        assert rootless.podman("exec", cid, "uname", "-m").stdout == "aarch64\n"


@pytest.mark.parametrize(
    ("annotations", "says"),
    [
        ({EMULATE: "x86_64"}, "x86_64 is of the host's own family"),
        ({EMULATE: "aarch64", ocihook.FLAGS_ANNOTATION: "FC"}, "flag(s) C are not allowed"),
        ({EMULATE: "aarch64", ocihook.FLAGS_ANNOTATION: "O"}, "flag(s) O are not allowed"),
    ],
)
def test_refused_requests_fail_the_start_with_the_reason(
    rootless: Rootless, annotations: dict[str, str], says: str
) -> None:
    rootless.reset()
    opts = [a for k, v in annotations.items() for a in ("--annotation", f"{k}={v}")]
    err_opts, err = rootless.hook_stderr()
    name = f"refused-{secrets.token_hex(3)}"
    res = rootless.podman(
        "run", "--name", name, "--network=none", *opts, *err_opts, ARM64, "uname", "-m"
    )
    assert res.returncode != 0 and res.stdout == ""
    assert "error executing hook" in res.stderr
    assert says in err.read_text()
    # the runtime's own log holds the reason, just before its own error line
    cid = rootless.podman("inspect", "--format", "{{.Id}}", name).stdout.strip()
    (log,) = rootless.runtime_dir.glob(f"containers/*-containers/{cid}/userdata/oci-log")
    lines = [json.loads(line)["msg"] for line in log.read_text().splitlines()]
    assert says in lines[-2] and lines[-2].startswith(f"qusd-oci-hook: container {cid[:12]}: ")
    assert "error executing hook" in lines[-1]
    rootless.podman("rm", "--force", name)
    # nothing was mounted or registered
    assert "Exec format error" in rootless.run(ARM64, "uname", "-m").stderr


def test_a_kernel_without_private_tables_fails_the_start(rootless: Rootless) -> None:
    """The kernel itself says it is older: `setarch --uname-2.6` makes uname(2)
    report 2.6.x to podman, conmon, crun and the hook. The container must not
    start, rather than get the host's table."""
    rootless.reset()
    err_opts, err = rootless.hook_stderr()
    res = rootless.run(
        "--annotation", f"{EMULATE}=aarch64", *err_opts, ARM64, "uname", "-m",
        prefix=["setarch", os.uname().machine, "--uname-2.6"],
    )  # fmt: skip
    assert res.returncode != 0 and "error executing hook" in res.stderr
    assert re.search(
        r"Linux 2\.6 has one binfmt_misc table for the whole machine; private tables need "
        r"Linux >= 6\.7; not registering in the host's table",
        err.read_text(),
    )


def test_f_flag_path_forms(rootless: Rootless) -> None:
    """Which interpreter path the kernel's F-flag open takes for a container
    (the kernel's answer, by tests/fflag_probe.py, in the hook's namespaces:
    `podman unshare`), against a running container that holds no QEMU (only, at
    IMAGE_ONLY, a file the host lacks)."""
    bb = rootless.shared.busybox("arm64")
    with rootless.running(
        "--userns=auto", "--annotation", f"{EMULATE}=s390x",
        "-v", f"{bb}:/arm64/busybox:ro", "-v", f"{bb}:{IMAGE_ONLY}:ro", S390X, "sleep", "120",
    ) as cid:  # fmt: skip
        assert not os.path.exists(IMAGE_ONLY)
        pid = rootless.podman("inspect", "--format", "{{.State.Pid}}", cid).stdout.strip()
        probe = rootless.top / "fflag_probe.py"
        res = rootless.podman("unshare", SYSTEM_PYTHON, str(probe), pid, AARCH64_QEMU, IMAGE_ONLY)
        assert res.returncode == 0, res.stderr
        forms = json.loads(res.stdout)
        assert "root inside" in forms, forms
        assert forms.pop("root inside") == "arm64,bin,dev,etc,opt,proc,run,sys,tmp"
        assert forms == {
            "A /proc/self/fd/N": "ENOENT",
            "B /proc/HOOKPID/root/PATH": "ENOENT",
            "C PATH, written inside": "ENOENT",
            "C2 a path of the image's, written inside": "ACCEPTED",
            "D1 PATH, register opened inside, written outside": "ACCEPTED",
            "D2 PATH, through the mount's directory (the hook)": "ACCEPTED",
            "E /proc/self/fd/N, writer in the pid namespace too": "ACCEPTED",
        }
        entries = "/proc/sys/fs/binfmt_misc/probe-"
        show = rootless.podman("exec", cid, "cat", f"{entries}c2", f"{entries}d2", f"{entries}e")
        # C2: a naive hook's plain path names whatever the image holds there
        c2, d2, e = (part.splitlines()[0] for part in show.stdout.split("enabled\n")[1:])
        assert (c2, d2) == (f"interpreter {IMAGE_ONLY}", f"interpreter {AARCH64_QEMU}")
        assert re.fullmatch(r"interpreter /proc/self/fd/\d+", e)
        assert rootless.podman("exec", cid, "/arm64/busybox", "uname", "-m").stdout == "aarch64\n"


# -- runtimes without hooks: inside `qusctl sandbox` -----------------------------------------


def test_buildah_bud_arch_inside_qusctl_sandbox(rootless: Rootless) -> None:
    """An ordinary user builds an arm64 image with buildah inside `qusctl
    sandbox --register arm64`: the RUN step runs under the sandbox's table
    (the same build outside fails with Exec format error)."""
    store = rootless.work / "buildah"
    ctx = rootless.top / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Containerfile").write_text(
        f"FROM {ARM64}-base\nRUN uname -m > /built-on && cat /built-on\n"
    )
    ctx.chmod(0o755)
    (ctx / "Containerfile").chmod(0o644)
    tar = rootless.top / "arm64.tar"
    buildah = (
        f"b='buildah --root {store}/root --runroot {store}/run --storage-driver vfs'; "
        f"c=$($b from scratch) && $b add $c {tar} / && $b config --arch arm64 $c && "
        f"$b commit -q $c {ARM64}-base >/dev/null && "
        f"$b bud -q --arch arm64 --isolation oci --network none -t {ARM64}-built {ctx} && "
        f"m=$($b mount $($b from {ARM64}-built)) && cat $m/built-on"
    )
    rootless.reset()  # rootless buildah below must not find a table podman's namespace has
    qusctl = [SYSTEM_PYTHON, "-m", "qusd.cli", "sandbox", "--register", "arm64", "--flags", "FP"]
    env = ["env", f"PYTHONPATH={rootless.shared.root}"]
    res = rootless.sh([*env, *qusctl, "--", "sh", "-c", buildah])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "aarch64"
    outside = rootless.sh(["sh", "-c", buildah.replace(str(store), f"{store}-outside")])
    assert outside.returncode != 0 and "Exec format error" in outside.stderr
