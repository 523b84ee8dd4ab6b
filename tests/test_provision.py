"""Interpreter provisioning with Debian's real qemu-user-static package:
only the named interpreters are extracted into qusd's own directory, with
their version and sha256 recorded; /v1/targets shows them, a registration
uses them, and a foreign busybox runs through them. The package is fetched
with apt-get once and kept in .cache/qemu-user-static (reused while it is
apt's candidate)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qusd import provision
from tests.conftest import (
    ROOT,
    Daemon,
    Sandbox,
    busybox_path,
    interpreter,
    needs_sandbox,
    open_dir,
    write_settings,
)

pytestmark = needs_sandbox

QUSCTL = str(Path(sys.executable).parent / "qusctl")
ONESHOT = [sys.executable, "-m", "qusd.oneshot"]
CACHE = ROOT / ".cache" / "qemu-user-static"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="session")
def deb() -> Path:
    """Debian's qemu-user-static, as apt-get downloads it (once per version)."""
    return Path(provision.fetch(str(CACHE)))


def control(path: Path, field: str) -> str:
    res = subprocess.run(["dpkg-deb", "-f", str(path), field], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return res.stdout.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store_root() -> Iterator[Path]:
    """Where the store goes: root's, 755, not under the world-writable /tmp."""
    with open_dir("qusd-store-", "/run") as path:
        yield path


def daemon_with(workdir: Path, **settings: str) -> Daemon:
    write_settings(workdir, **settings)
    return Daemon(workdir)


def qusctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QUSCTL, "--socket", d.socket, *args], capture_output=True,
                          text=True, timeout=1200, check=False)  # fmt: skip


def test_install_from_debians_package_then_register_and_run(
    tmp_path: Path, store_root: Path, deb: Path
) -> None:
    store = store_root / "interpreters"
    d = daemon_with(tmp_path, interpreter_store=str(store))
    try:
        res = qusctl(d, "interpreters", "install", "--from", str(deb), "arm64", "riscv64")
        assert res.returncode == 0, res.stderr
        version = control(deb, "Version")
        rows = [line.split() for line in res.stdout.splitlines()]
        assert rows[0] == ["INTERPRETER", "TARGETS", "VERSION", "SHA256"]
        aarch64 = store / "qemu-aarch64-static"
        assert rows[1:] == [
            [str(aarch64), "aarch64", version, sha256(aarch64)],
            [str(store / "qemu-riscv64-static"), "riscv64", version,
             sha256(store / "qemu-riscv64-static")],
        ]  # fmt: skip
        # only what was asked for, root's and closed to others, and the manifest
        assert sorted(os.listdir(store)) == ["manifest.json", "qemu-aarch64-static",
                                             "qemu-riscv64-static"]  # fmt: skip
        st = os.stat(aarch64)
        assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, "0o755")
        ts = {t["name"]: t for t in d.client.get("/v1/targets")}
        assert ts["aarch64"]["interpreter"] == str(aarch64) and ts["aarch64"]["static"]
        prov = ts["aarch64"]["provisioned"]
        assert (prov["package"], prov["version"], prov["sha256"], prov["source"]) == (
            "qemu-user-static", version, sha256(aarch64), deb.name)  # fmt: skip
        assert ts["s390x"]["provisioned"] is None
        assert ts["s390x"]["interpreter"] == interpreter("s390x")  # the rest: as before
        listed = qusctl(d, "interpreters", "list", "--json")
        assert [i["path"] for i in json.loads(listed.stdout)["provisioned"]] == [
            str(aarch64), str(store / "qemu-riscv64-static")]  # fmt: skip

        assert qusctl(d, "register", "aarch64").returncode == 0
        assert d.table()[0].interpreter == str(aarch64)
        res = d.inside.run([busybox_path("arm64"), "uname", "-m"])
        assert res.stdout == "aarch64\n", res.stderr
        [check] = d.client.request("POST", "/v1/verify", {})["results"]
        assert (check["ok"], check["interpreter"]) == (True, str(aarch64))
        assert (
            check["qemu_version"]
            and version.split(":")[-1].split("+")[0] in (check["qemu_version"])
        )
    finally:
        d.stop()


def test_install_downloads_debians_package_with_apt(
    tmp_path: Path, store_root: Path, deb: Path
) -> None:
    """No package given: the daemon fetches Debian's with apt-get into its
    cache (here the tests' own, where the fixture put it: reused)."""
    store = store_root / "interpreters"
    d = daemon_with(tmp_path, interpreter_store=str(store), interpreter_cache=str(CACHE))
    try:
        res = qusctl(d, "interpreters", "install", "s390x", "--json")
        assert res.returncode == 0, res.stderr
        [item] = json.loads(res.stdout)["installed"]
        assert (item["targets"], item["source"]) == (["s390x"], deb.name)
        assert d.client.request("POST", "/v1/registrations", {"targets": ["s390x"]})
        res = d.inside.run([busybox_path("s390x"), "uname", "-m"])
        assert res.stdout == "s390x\n", res.stderr
    finally:
        d.stop()


def test_qusd_binfmt_installs_then_registers_from_its_directory(
    sbx: Sandbox, store_root: Path, deb: Path
) -> None:
    store = store_root / "interpreters"
    res = sbx.run([*ONESHOT, "interpreters", "install", "--from", str(deb), "--dir", str(store),
                   "linux/arm/v7"], env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1].split()[:2] == [str(store / "qemu-arm-static"), "arm"]
    res = sbx.run([*ONESHOT, "register", "--interpreter-dir", str(store), "arm"], env=ENV)
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.entry("qemu-arm").interpreter == str(store / "qemu-arm-static")
    res = sbx.run([busybox_path("armhf"), "uname", "-m"])
    assert res.stdout == "armv7l\n", res.stderr
    doc = json.loads(sbx.run([*ONESHOT, "verify", "--json"], env=ENV).stdout)
    assert [(c["target"], c["ok"]) for c in doc] == [("arm", True)]


def _package(tree: Path, out: Path, files: dict[str, str], compression: str) -> Path:
    """A .deb of our own, built by dpkg-deb."""
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: qemu-user-static\nVersion: 1:9.9-test\nArchitecture: amd64\n"
        "Maintainer: qusd tests <tests@invalid>\nDescription: a test package\n"
    )
    for name, source in files.items():
        (tree / "usr" / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy(source, tree / "usr" / "bin" / name)
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(tree),
                    str(out)], check=True, capture_output=True)  # fmt: skip
    return out


def test_packages_it_cannot_use_are_refused(tmp_path: Path, store_root: Path) -> None:
    """Not a package; a package without the target; a store others may
    write to: each refused, naming why, and nothing installed. A package
    compressed with zstd (which Python does not read) goes through dpkg-deb."""
    store = store_root / "interpreters"

    def install(deb: Path, *targets: str, into: Path = store) -> subprocess.CompletedProcess[str]:
        argv = [*ONESHOT, "interpreters", "install", "--from", str(deb), "--dir", str(into),
                *targets]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                              env=ENV)  # fmt: skip

    res = install(Path("/bin/true"), "aarch64")
    assert res.returncode == 72
    assert res.stderr == "qusd-binfmt: /bin/true is not a Debian package (no ar archive header)\n"
    zst = _package(tmp_path / "tree", tmp_path / "test.deb",
                   {"qemu-aarch64-static": interpreter("aarch64")}, "zstd")  # fmt: skip
    res = install(zst, "aarch64", "riscv64")
    assert res.returncode == 72
    assert res.stderr == (
        f"qusd-binfmt: qemu-user-static ({zst}) has no qemu-riscv64-static (riscv64)\n"
    )
    assert sorted(os.listdir(store)) == []  # all or none
    res = install(zst, "aarch64")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1].split()[2] == "1:9.9-test"
    open_dir = store_root / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    res = install(zst, "aarch64", into=open_dir)
    assert res.returncode == 77
    assert res.stderr == (
        f"qusd-binfmt: will not install into {open_dir}: {open_dir} (for "
        f"{open_dir}/qemu-aarch64-static) is writable by group or others (mode 777): they "
        "could replace the interpreter\n"
    )
    assert os.listdir(open_dir) == []
