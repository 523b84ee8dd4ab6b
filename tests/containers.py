"""Container images for the tests, built and run for real, without a registry
or a daemon.

A Debian base made locally (tools/rootfs.sh: mmdebstrap) is imported with
podman; packaging/container/Containerfile is built on it with buildah; the
image runs with podman. Everything lives in a private store under the cache
directory (/var/cache/qusd-test/containers, or $QUSD_CACHE_DIR), each image
tagged with a key of its inputs, so a second `make test` (or a fresh clone on
the same machine) reuses it. A foreign image (arm64) is built in a qusd
sandbox whose own registration runs its RUN steps.

Containers run in the user namespace of a qusd sandbox (`--userns=ns:PATH`):
a --privileged container that mounts binfmt_misc there reaches the sandbox's
private table, never the host's (`check_userns` proves it per sandbox).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qusd import catalog, sandbox

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QUSD_CACHE_DIR", "/var/cache/qusd-test"))
STORE = CACHE / "containers"
#: podman's run-time state, one per store (it records the pair)
RUNROOT = Path("/run/qusd-test") / hashlib.sha256(str(STORE).encode()).hexdigest()[:12]
CONTAINERFILE = ROOT / "packaging" / "container" / "Containerfile"
ROOTFS = ROOT / "tools" / "rootfs.sh"
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
#: Debian architecture -> the OCI platform an image for it is built for
PLATFORM = {"amd64": "linux/amd64", "arm64": "linux/arm64", "i386": "linux/386"}


def unsupported_reason() -> str | None:
    """Why images cannot be built and run here, or None."""
    if os.getuid() != 0:
        return "building and running images needs root (rootful podman and buildah)"
    for tool in ("podman", "buildah", "mmdebstrap", "arch-test", "unshare", FUSE_OVERLAYFS):
        if shutil.which(tool) is None:
            return f"{tool} is missing: `make setup` installs it (tools/setup-system.sh)"
    return sandbox.unsupported_reason()


def host_arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _hard_limit(which: int) -> int:
    hard = resource.getrlimit(which)[1]
    return -1 if hard == resource.RLIM_INFINITY else hard


def _limits() -> list[str]:
    """The container's limits: the ones we have. podman's defaults (1048576
    open files) fail where root may not raise its hard limits (a machine
    that is itself a container)."""
    nofile = _hard_limit(resource.RLIMIT_NOFILE)
    # podman and buildah cap their own process limit at 32768 before they
    # start the runtime, which then may not raise it again.
    nproc = _hard_limit(resource.RLIMIT_NPROC)
    nproc = 32768 if nproc < 0 else min(nproc, 32768)
    return [f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}"]


def _cgroup2_at_root() -> bool:
    """Whether /sys/fs/cgroup is the unified hierarchy (crun refuses a hybrid
    one; with cgroups disabled it needs only to see a clean hierarchy)."""
    fstype = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if pre.split()[4] == "/sys/fs/cgroup":
                fstype = post.split()[0]
    return fstype == "cgroup2"


class Engine:
    """podman and buildah with the tests' own store and settings: no
    network unless asked, no cgroups (nothing to limit), the limits we have."""

    def __init__(self) -> None:
        STORE.mkdir(parents=True, exist_ok=True)
        RUNROOT.mkdir(parents=True, exist_ok=True)
        limits = ", ".join(f'"{x}"' for x in _limits())
        self._write(
            STORE / "containers.conf",
            "[containers]\n"
            f"default_ulimits = [{limits}]\n"
            'netns = "none"\n'
            'cgroups = "disabled"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{RUNROOT}/libpod"\n',
        )
        self._write(
            STORE / "storage.conf",
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{STORE}/storage"\n'
            f'runroot = "{RUNROOT}/storage"\n',
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(STORE / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(STORE / "storage.conf"),
        }
        self._wrap = [] if _cgroup2_at_root() else [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"', "sh",
        ]  # fmt: skip

    @staticmethod
    def _write(path: Path, text: str) -> None:
        if path.exists() and path.read_text() == text:
            return
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv (podman or buildah ...) as it must run here."""
        return [*self._wrap, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 300)
        return subprocess.run(self.command(argv), env=self.env, check=False, **kwargs)

    def check(self, argv: Sequence[str], **kwargs: Any) -> str:
        """Run argv; its stdout, or an AssertionError with everything it said."""
        res = self.run(argv, **kwargs)
        if res.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
            )
        return res.stdout

    def exists(self, image: str) -> bool:
        return self.run(["podman", "image", "exists", image]).returncode == 0

    def container(
        self,
        pid: int,
        image: str,
        *args: str,
        options: Sequence[str] = (),
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """`podman run --rm --privileged IMAGE ARGS` (what the README shows),
        in the user namespace of the sandbox of process pid."""
        argv = ["podman", "run", "--rm", "--privileged", "--pull=never",
                f"--userns=ns:/proc/{pid}/ns/user", *options, image, *args]  # fmt: skip
        return self.run(argv, timeout=timeout)

    def check_userns(self, pid: int, image: str) -> None:
        """A container started like `container` lives in the sandbox's user
        namespace (else a privileged one could reach the host's table)."""
        res = self.container(pid, image, "/proc/self/ns/user", options=["--entrypoint", "readlink"])
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == os.readlink(f"/proc/{pid}/ns/user"), res.stdout


@contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time on this machine (other checkouts share the store)."""
    with open(STORE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rootfs(arch: str, suite: str = "bookworm", include: str = "") -> Path:
    """tools/rootfs.sh's tarball (made once, then cached)."""
    argv = [str(ROOTFS), "-s", suite, *(["-i", include] if include else []), arch]
    res = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=1800, env=_python_env()
    )
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stderr}")
    return Path(res.stdout.strip().splitlines()[-1])


def _python_env() -> dict[str, str]:
    """rootfs.sh runs qusd's sandbox with this Python."""
    return {**os.environ, "PYTHON": sys.executable}


def base(engine: Engine, arch: str, suite: str = "bookworm", include: str = "") -> str:
    """The rootfs tarball imported as an image (named after the tarball,
    whose name is the key of its inputs)."""
    tarball = rootfs(arch, suite, include)
    image = f"localhost/qusd-test-base:{tarball.stem}"
    with _locked():
        if not engine.exists(image):
            engine.check(["podman", "import", "--arch", arch, str(tarball), image])
    return image


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() + b"\0")
    for f in [CONTAINERFILE, ROOT / ".containerignore", *sorted((ROOT / "qusd").glob("*.py"))]:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def image(engine: Engine, target: str, arch: str) -> str:
    """The Containerfile's stage `target` (python, register or full) built
    for arch on the local base, with buildah; built once per change of the
    Containerfile or of qusd's modules. The build runs in a qusd sandbox, so
    no RUN step can reach the host's binfmt_misc table; for a foreign arch
    the sandbox registered qusd's own emulation, which runs the RUN steps."""
    base_image = base(engine, arch)
    native = catalog.family_of(arch) == catalog.family_of(catalog.host_machine())
    # In the sandbox's user namespace the kernel's overlayfs cannot rename
    # the directories dpkg unpacks; fuse-overlayfs can.
    build = [*sandbox_command(None if native else arch),
             "buildah", "--storage-opt", f"overlay.mount_program={FUSE_OVERLAYFS}",
             "build", "--isolation", "chroot", "--network", "host", "--layers", "--pull=never",
             "--platform", PLATFORM[arch], "-f", str(CONTAINERFILE),
             "--build-arg", f"BASE={base_image}", "--target", target]  # fmt: skip
    tag = f"localhost/qusd-binfmt:{target}-{arch}-{_key(*build[build.index('buildah') :])}"
    with _locked():
        if not engine.exists(tag):
            engine.check([*build, "-t", tag, str(ROOT)], timeout=1800)
            _prune(engine, f"localhost/qusd-binfmt:{target}-{arch}-", keep=tag)
    return tag


def sandbox_command(arch: str | None) -> list[str]:
    """The command prefix that runs something in a new sandbox, with arch's
    QEMU target registered (qusctl sandbox --register) if given."""
    register = ["--register", arch] if arch else []
    return [sys.executable, "-m", "qusd.cli", "sandbox", *register, "--"]


def _prune(engine: Engine, prefix: str, keep: str, newest: int = 2) -> None:
    """Drop older builds of the same image (other checkouts may still use the
    newest few; an image in use is not removed)."""
    out = engine.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout
    tags = [t for t in out.split() if t.startswith(prefix) and t != keep]
    for old in tags[max(0, newest - 1) :]:  # podman lists the newest first
        engine.run(["podman", "rmi", old])
