"""The Debian package `make deb` builds (packaging/debian, dh-virtualenv).

Nothing here installs anything on this machine. The tests look at
dist/qusd_*.deb: its control fields and maintainer scripts; its files
unpacked into scratch roots, where systemd-analyze verifies the units and
systemd-sysusers creates the groups; the bundled virtualenv run from a
private mount namespace (the daemon itself in a sandbox); and a real
`dpkg -i` and purge in a chroot whose root is an overlay of this machine's,
thrown away with its mount namespace.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import FOREIGN_DIR, ROOT, needs_sandbox

VENV = "/opt/venvs/qusd"
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
HOST_UNITS = Path("/usr/lib/systemd/system")
#: The caller's Python settings must not reach the bundled interpreter.
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def run(
    cmd: list[str], timeout: float = 120, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        cmd, capture_output=True, text=True, check=False, timeout=timeout, env=CLEAN_ENV, cwd=cwd
    )
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
    return res


def extract(deb: Path, dest: Path) -> Path:
    dest.mkdir()
    run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


@pytest.fixture(scope="module")
def deb() -> Path:
    need("dpkg-deb")
    debs = sorted((ROOT / "dist").glob("qusd_*.deb"))
    if not debs:
        pytest.skip("dist/qusd_*.deb is missing: `make deb` (and `make test`) build it")
    assert len(debs) == 1, f"more than one qusd package in dist/: {debs}"
    return debs[0]


@pytest.fixture(scope="module")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's files, unpacked (read-only use: tests that add files
    unpack their own)."""
    return extract(deb, tmp_path_factory.mktemp("deb") / "root")


@pytest.fixture(scope="module")
def control(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's control files: control, conffiles, postinst, ..."""
    dest = tmp_path_factory.mktemp("deb") / "DEBIAN"
    run(["dpkg-deb", "-e", str(deb), str(dest)])
    return dest


def field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()


def relations(value: str) -> list[list[tuple[str, str]]]:
    """Depends: a list of alternatives, each (package, version constraint)."""
    out = []
    for group in value.split(","):
        alts = []
        for alt in group.split("|"):
            m = re.fullmatch(r"\s*([a-z0-9][a-z0-9.+-]*)(?::\w+)?\s*(?:\((.*)\))?\s*", alt)
            assert m, f"cannot parse {alt!r} in {value!r}"
            alts.append((m.group(1), (m.group(2) or "").strip()))
        out.append(alts)
    return out


def venv_python_version(root: Path) -> str:
    cfg = venv_cfg(root)
    return ".".join(cfg["version"].split(".")[:2])


def venv_cfg(root: Path) -> dict[str, str]:
    lines = (root / VENV.lstrip("/") / "pyvenv.cfg").read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines)}


# --- The package's metadata and maintainer scripts ---


def test_control_fields(deb: Path, root: Path) -> None:
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    version = field(deb, "Version")
    assert field(deb, "Package") == "qusd"
    assert version.startswith(f"{VERSION}-"), "the upstream version is pyproject.toml's"
    assert field(deb, "Architecture") == arch
    if os.uname().machine == "x86_64":
        assert arch == "amd64"
    assert deb.name == f"qusd_{version}_{arch}.deb"
    assert field(deb, "Maintainer") == "qusd developers <qusd@localhost>"

    depends = relations(field(deb, "Depends"))
    assert [("qemu-user-static", "")] in depends
    # The venv's bin/python is Debian's python3, and the bundled C
    # extensions are for its minor version only.
    py = venv_python_version(root)
    major, minor = map(int, py.split("."))
    assert [("python3", f">= {py}~")] in depends
    assert [("python3", f"<< {major}.{minor + 1}")] in depends
    # ${shlibs:Depends}: systemd-python is linked against libsystemd.
    assert any(alts[0][0] == "libsystemd0" for alts in depends)
    # ${misc:Depends}: dh_installsysusers needs a systemd-sysusers.
    assert any(alts[0][0] == "systemd" and len(alts) > 1 for alts in depends)


def test_conffiles(control: Path) -> None:
    assert (control / "conffiles").read_text().split() == ["/etc/qusd/qusd.toml"]


def test_maintainer_scripts(control: Path) -> None:
    for name in ("postinst", "prerm", "postrm"):
        run(["sh", "-n", str(control / name)])
    postinst = (control / "postinst").read_text()
    # The groups first (the socket is root:qusd), then the directories, then
    # the units: enabled on install, started (restarted on upgrade).
    sysusers = re.search(r"^\s*systemd-sysusers .*\bqusd\.conf$", postinst, re.M)
    tmpfiles = re.search(r"^\s*systemd-tmpfiles .*--create qusd\.conf\b", postinst, re.M)
    start = re.search(r"deb-systemd-invoke \$_dh_action 'qusd\.service' 'qusd\.socket'", postinst)
    assert sysusers and tmpfiles and start, postinst
    assert sysusers.start() < tmpfiles.start() < start.start()
    for unit in ("qusd.service", "qusd.socket"):
        assert f"deb-systemd-helper unmask '{unit}'" in postinst
        assert f"deb-systemd-helper enable '{unit}'" in postinst
    assert "_dh_action=start" in postinst
    assert "deb-systemd-invoke stop 'qusd.service' 'qusd.socket'" in (control / "prerm").read_text()
    assert (
        "deb-systemd-helper purge 'qusd.service' 'qusd.socket'" in (control / "postrm").read_text()
    )


# --- The files, unpacked ---


def test_files(root: Path) -> None:
    units = next(
        (root / d for d in ("lib/systemd/system", "usr/lib/systemd/system")
         if (root / d / "qusd.service").is_file()),
        None,
    )  # fmt: skip
    assert units is not None, "no qusd.service in /lib/systemd/system or /usr/lib/systemd/system"
    shipped = {
        units / "qusd.service": ROOT / "systemd/qusd.service",
        units / "qusd.socket": ROOT / "systemd/qusd.socket",
        root / "usr/lib/sysusers.d/qusd.conf": ROOT / "systemd/qusd.sysusers",
        root / "usr/lib/tmpfiles.d/qusd.conf": ROOT / "systemd/qusd.tmpfiles",
        root / "etc/qusd/qusd.toml": ROOT / "packaging/qusd.toml",
    }
    for installed, source in shipped.items():
        assert installed.read_bytes() == source.read_bytes(), (
            f"{installed} differs from {source} (`make deb` rebuilds the package)"
        )
        assert installed.stat().st_mode & 0o7777 == 0o644, installed

    for page in ("man8/qusd.8", "man1/qusctl.1", "man1/qusd-binfmt.1", "man5/qusd.toml.5"):
        installed = root / "usr/share/man" / f"{page}.gz"
        assert installed.is_file(), f"no {installed} (debian/qusd.manpages)"
        source = ROOT / "docs/man" / page.split("/")[1]
        assert gzip.decompress(installed.read_bytes()) == source.read_bytes(), installed

    for prog in ("qusd", "qusctl", "qusd-binfmt"):
        link = root / "usr/bin" / prog
        assert link.is_symlink(), link
        assert os.path.normpath(os.path.join("/usr/bin", os.readlink(link))) == f"{VENV}/bin/{prog}"
        script = root / VENV.lstrip("/") / "bin" / prog
        assert script.read_text().startswith(f"#!{VENV}/bin/python\n"), script
        assert script.stat().st_mode & 0o111 == 0o111, script


def test_venv_is_debians_python(root: Path) -> None:
    venv = root / VENV.lstrip("/")
    cfg = venv_cfg(root)
    assert cfg["home"] == "/usr/bin"
    assert cfg["include-system-site-packages"] == "false"
    assert os.readlink(venv / "bin/python3") == "/usr/bin/python3"
    site = venv / f"lib/python{venv_python_version(root)}/site-packages"
    names = {p.name.lower() for p in site.iterdir()}
    for dist in ("qusd", "aiohttp", "pydantic", "pydantic_core", "systemd_python"):
        assert any(n.startswith(f"{dist}-") and n.endswith(".dist-info") for n in names), dist
    assert "setuptools" not in names, "nothing at run time needs setuptools"
    # Nothing refers to where the package was built.
    for path in [venv / "pyvenv.cfg", *(venv / "bin").iterdir()]:
        if path.is_file() and not path.is_symlink():
            assert "/debian/qusd/" not in path.read_text(errors="replace"), path


def test_units_verify(deb: Path, tmp_path: Path) -> None:
    need("systemd-analyze")
    if not (HOST_UNITS / "sysinit.target").is_file():
        pytest.skip(f"no systemd units in {HOST_UNITS} for the package's units to hook into")
    scratch = extract(deb, tmp_path / "root")
    # The targets and units qusd's units refer to are systemd's: this machine's.
    shutil.copytree(
        HOST_UNITS, scratch / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("qusd.*"),
    )  # fmt: skip
    res = subprocess.run(
        ["systemd-analyze", "verify", f"--root={scratch}", "qusd.service", "qusd.socket"],
        capture_output=True, text=True, check=False, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_sysusers_and_tmpfiles(deb: Path, tmp_path: Path) -> None:
    need("systemd-sysusers")
    need("systemd-tmpfiles")
    scratch = extract(deb, tmp_path / "root")
    (scratch / "etc").mkdir(exist_ok=True)
    run(["systemd-sysusers", f"--root={scratch}"])
    groups = {line.split(":")[0] for line in (scratch / "etc/group").read_text().splitlines()}
    assert {"qusd", "qusd-admin"} <= groups
    if os.geteuid() == 0:  # the directories are root's
        run(["systemd-tmpfiles", f"--root={scratch}", "--create"])
        for d in ("var/lib/qusd", "run/qusd"):
            assert (scratch / d).is_dir(), d
            assert (scratch / d).stat().st_mode & 0o7777 == 0o755, d


# --- The bundled virtualenv, running ---

#: Makes /opt/venvs/qusd the unpacked venv in a private mount namespace (on a
#: tmpfs over /opt: nothing of this machine's /opt is touched), then runs $2.
IN_VENV_NS = r"""
set -eu
mount -t tmpfs -o mode=0755 tmpfs /opt
mkdir -p /opt/venvs/qusd
mount --bind "$1/opt/venvs/qusd" /opt/venvs/qusd
shift
exec sh -euc "$@"
"""


def in_venv(root: Path, script: str, *args: str, timeout: float = 60) -> str:
    need("unshare")
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.insert(1, "--map-root-user")
    cmd = [*unshare, "--", "sh", "-euc", IN_VENV_NS, "sh", str(root), script, "sh", *args]
    # Not from the checkout: python -c would import its qusd package.
    return run(cmd, timeout=timeout, cwd="/").stdout


def test_venv_runs(root: Path) -> None:
    out = in_venv(root, f"{VENV}/bin/qusd --version; {VENV}/bin/qusctl --version")
    assert out.split("\n")[:2] == [f"qusd {VERSION}", f"qusctl {VERSION}"], out

    probe = r"""
import importlib, json, pkgutil, sys
import aiohttp, pydantic, systemd.daemon, systemd.journal, qusd
mods = [m.name for m in pkgutil.walk_packages(qusd.__path__, "qusd.")
        if not m.name.endswith("__main__")]
for m in mods:
    importlib.import_module(m)
print(json.dumps({
    "prefix": sys.prefix, "base_prefix": sys.base_prefix,
    "pydantic": pydantic.VERSION, "aiohttp": aiohttp.__version__,
    "files": [x.__file__ for x in (aiohttp, pydantic, systemd.daemon, qusd)],
    "modules": len(mods),
}))
"""
    info = json.loads(in_venv(root, f'{VENV}/bin/python -I -c "$1"', probe))
    assert info["prefix"] == VENV
    assert info["base_prefix"] == "/usr", "the venv runs Debian's python3"
    assert int(info["pydantic"].split(".")[0]) == 2
    assert tuple(map(int, info["aiohttp"].split(".")[:2])) >= (3, 9)
    for path in info["files"]:
        assert path.startswith(f"{VENV}/lib/python"), f"{path} is not the bundled copy"
    assert info["modules"] > 5


@needs_sandbox
def test_packaged_daemon_serves(root: Path, tmp_path: Path) -> None:
    """The packaged qusd, with the packaged settings file, in a sandbox (its
    own binfmt_misc): qusctl registers aarch64 and runs a foreign program."""
    busybox = FOREIGN_DIR / "arm64" / "busybox"
    script = r"""
d=$1 conf=$2 busybox=$3
/opt/venvs/qusd/bin/qusd --sandbox --socket "$d/qusd.sock" --state-dir "$d/state" \
    --config "$conf" 2>"$d/daemon.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
i=0
while [ ! -S "$d/qusd.sock" ]; do
    kill -0 $pid 2>/dev/null || { echo "qusd exited:" >&2; cat "$d/daemon.log" >&2; exit 1; }
    i=$((i + 1)); [ $i -le 300 ] || { echo "no socket after 30 s" >&2; exit 1; }
    sleep 0.1
done
q() { /opt/venvs/qusd/bin/qusctl --socket "$d/qusd.sock" "$@"; }
echo "== status"; q status
echo "== register"; q register aarch64
echo "== list"; q list
if [ -x "$busybox" ]; then echo "== run"; q run -- "$busybox" uname -m; fi
kill -TERM $pid
rc=0; wait $pid || rc=$?
trap - EXIT
echo "== exit"; echo $rc
"""
    conf = root / "etc/qusd/qusd.toml"
    out = in_venv(root, script, str(tmp_path), str(conf), str(busybox))
    sections = dict(re.findall(r"^== (\w+)\n(.*?)(?=^== |\Z)", out, re.M | re.S))
    assert sections["status"].startswith(f"qusd {VERSION} "), out
    assert re.search(r"^qemu-aarch64\s+yes\s+aarch64\b", sections["list"], re.M), out
    if busybox.exists():
        assert sections["run"].strip() == "aarch64", out
    assert sections["exit"].strip() == "0", out


# --- A real installation, in a throw-away chroot ---

#: In a private mount namespace: an overlay of / (writes go to a tmpfs),
#: with fresh /run and /tmp (so no service manager is found: nothing is
#: started) and a policy-rc.d that forbids starting anything anyway.
#: dpkg -i, look around, dpkg --purge, look again.
CHROOT_INSTALL = r"""
set -eu
t=$1 deb=$2
mount -t tmpfs tmpfs "$t"
mkdir "$t/upper" "$t/work" "$t/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$t/upper,workdir=$t/work" "$t/root" || exit 77
r=$t/root
[ "$(stat -f -c %T "$r")" = overlayfs ] || exit 77
mount -t tmpfs tmpfs "$r/run"
mount -t tmpfs tmpfs "$r/tmp"
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
chmod 755 "$r/usr/sbin/policy-rc.d"
cp "$deb" "$r/tmp/qusd.deb"
ch() { chroot "$r" "$@"; }
echo "== install"; ch dpkg -i /tmp/qusd.deb 2>&1
echo "== status"; ch dpkg-query -W -f='${Status} ${Version}\n${Conffiles}\n' qusd
echo "== version"; ch qusd --version; ch qusctl --version
echo "== verify"; ch systemd-analyze verify qusd.service qusd.socket 2>&1 && echo ok
echo "== group"; grep '^qusd' "$r/etc/group"
echo "== wants"
readlink "$r/etc/systemd/system/multi-user.target.wants/qusd.service"
readlink "$r/etc/systemd/system/sockets.target.wants/qusd.socket"
echo "== dirs"; stat -c '%n %a %U' "$r/var/lib/qusd" "$r/run/qusd"
echo "== socket"; ls "$r/run/qusd"
echo "== purge"; ch dpkg --purge qusd 2>&1
echo "== after"
for p in opt/venvs/qusd etc/qusd usr/bin/qusd usr/bin/qusctl lib/systemd/system/qusd.service \
        etc/systemd/system/multi-user.target.wants/qusd.service \
        etc/systemd/system/sockets.target.wants/qusd.socket; do
    if [ -e "$r/$p" ] || [ -L "$r/$p" ]; then echo "left: /$p"; fi
done
echo "== end"
"""


def test_install_and_purge_in_chroot(deb: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the overlay chroot needs root")
    need("unshare")
    need("dpkg-query")
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    have = {line.split()[0].split(":")[0] for line in installed.splitlines() if " ii" in line}
    if "qusd" in have:
        pytest.skip("qusd is installed on this machine")
    missing = [alts for alts in relations(field(deb, "Depends")) if not {a for a, _ in alts} & have]
    if missing:
        pytest.skip(f"the chroot is this machine, which lacks the package's Depends: {missing}")

    (tmp_path / "t").mkdir()
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "sh", "-euc", CHROOT_INSTALL, "sh", str(tmp_path / "t"), str(deb)],
        capture_output=True, text=True, check=False, timeout=300, env=CLEAN_ENV,
    )  # fmt: skip
    if res.returncode == 77:
        pytest.skip("cannot mount an overlay of / here")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    s = dict(re.findall(r"^== (\w+)\n(.*?)(?=^== |\Z)", res.stdout, re.M | re.S))

    version = field(deb, "Version")
    status, conffiles = s["status"].split("\n", 1)
    assert status == f"install ok installed {version}", out
    md5 = hashlib.md5((ROOT / "packaging/qusd.toml").read_bytes(), usedforsecurity=False)
    assert conffiles.split() == ["/etc/qusd/qusd.toml", md5.hexdigest()], out
    assert s["version"].split() == ["qusd", VERSION, "qusctl", VERSION], out
    assert s["verify"].strip() == "ok", out
    assert {line.split(":")[0] for line in s["group"].split()} == {"qusd", "qusd-admin"}, out
    assert s["wants"].split() == [
        "/lib/systemd/system/qusd.service",
        "/lib/systemd/system/qusd.socket",
    ]
    assert s["dirs"].split("\n")[:2] == [
        f"{tmp_path}/t/root/var/lib/qusd 755 root",
        f"{tmp_path}/t/root/run/qusd 755 root",
    ], out
    assert s["socket"].strip() == "", "nothing may have been started"
    assert s["after"].strip() == "", out
