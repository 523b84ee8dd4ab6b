"""The Debian package `make deb` builds (packaging/debian, dh-virtualenv).

Nothing here installs anything on this machine. The tests look at
dist/qusd_*.deb: what lintian says of it; its control fields and maintainer
scripts; its files unpacked into scratch roots, where systemd-analyze
verifies the units and systemd-sysusers creates the groups; the bundled
virtualenv, its pins and its compiled extensions; the package's /usr run
from a private mount namespace (the daemon itself in a sandbox); and a real
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
from collections import Counter
from pathlib import Path

import pytest

from qusd import handoff
from tests import test_completion
from tests.conftest import FOREIGN_DIR, ROOT, needs_sandbox

VENV = "/usr/lib/qusd"
COMMANDS = ("qusd", "qusctl", "qusd-binfmt", "qusd-oci-hook", "qus-register")
#: the commands people type, which have shell completion (the OCI hook is
#: run by the container runtime; qus-register speaks register.sh's options)
INTERACTIVE = ("qusd", "qusctl", "qusd-binfmt")
CONSTRAINTS = ROOT / "packaging/constraints.txt"
#: What builds the venv (pinned too) but is not in the package.
BUILD_ONLY = {"pip", "setuptools", "shtab"}
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


def site_packages(root: Path) -> Path:
    return root / VENV.lstrip("/") / f"lib/python{venv_python_version(root)}/site-packages"


def maintainer() -> str:
    """packaging/maintainer.env's "Name <address>", the one place it is set."""
    env = (ROOT / "packaging/maintainer.env").read_text()
    values = dict(re.findall(r'^(DEBFULLNAME|DEBEMAIL)="([^"]*)"$', env, re.M))
    return f"{values['DEBFULLNAME']} <{values['DEBEMAIL']}>"


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- What lintian says ---

#: One line of lintian's: severity (or O: overridden, M: masked by one of
#: lintian's screens), tag, the rest.
LINTIAN_LINE = re.compile(r"^([EWIPXOM]): qusd(?: \w+)?: (\S+)(?: (.*))?$")


def test_lintian(deb: Path) -> None:
    """lintian --pedantic, with info and experimental tags, finds nothing that
    is not overridden; no error is overridden; no override goes unused."""
    lintian = need("lintian")
    need("lintian-explain-tags")
    # What --fail-on error,warning,info,pedantic would do, read from the
    # output: lintian counts the overridden hints it shows (--show-overrides)
    # and those its own screens mask (M:) as failures. Exit 1: lintian broke.
    cmd = [
        lintian, "--no-cfg", "--ignore-lintian-env", "--no-user-dirs",
        "--pedantic", "--display-info", "--display-experimental", "--show-overrides",
        "--tag-display-limit", "0", "--fail-on", "none", str(deb),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    hints = [m for m in map(LINTIAN_LINE.match, res.stdout.splitlines()) if m]
    found = [m.group(0) for m in hints if m.group(1) in "EWIPX"]
    overridden = Counter(m.group(2) for m in hints if m.group(1) == "O")
    print("lintian, overridden:", dict(overridden) or "none")
    print("lintian, not overridden:", found or "none")
    assert not found, "lintian --pedantic found:\n" + "\n".join(found)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}:\n{res.stdout}{res.stderr}"

    # The severity of what the overrides silence: never an error.
    explained = run(["lintian-explain-tags", *sorted(overridden)]).stdout
    severity = {tag: level for level, tag in re.findall(r"^([EWIPX]): (\S+)$", explained, re.M)}
    assert set(severity) == set(overridden), explained
    errors = [tag for tag, level in severity.items() if level == "E"]
    assert not errors, f"errors may not be overridden: {errors}"


def test_lintian_overrides_say_why() -> None:
    """Every override (or run of one tag's overrides) comes right after a
    comment line saying why."""
    lines = (ROOT / "packaging/debian/qusd.lintian-overrides").read_text().splitlines()
    previous = ""
    overrides = 0
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.startswith("#"):
            m = re.match(r"qusd: (\S+)", line)
            assert m, f"line {number}: not 'qusd: TAG [CONTEXT]': {line!r}"
            same_tag = re.match(rf"qusd: {re.escape(m.group(1))}\b", previous)
            assert (previous.startswith("#") and previous.strip("# ")) or same_tag, (
                f"line {number}: override {line!r} without a comment line saying why above it"
            )
            overrides += 1
        previous = line
    assert overrides > 0


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
    # A real address (lintian's bogus-mail-host wants a host in a domain),
    # from packaging/maintainer.env.
    assert field(deb, "Maintainer") == maintainer()
    host = maintainer().rpartition("@")[2].rstrip(">")
    assert "." in host and host != "localhost", host

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


def test_changelog_signed_by_the_maintainer(root: Path) -> None:
    changelog = gzip.decompress((root / "usr/share/doc/qusd/changelog.Debian.gz").read_bytes())
    signatures = re.findall(r"^ -- (.*?)  ", changelog.decode(), re.M)
    assert signatures and set(signatures) == {maintainer()}, signatures


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
    # The venv ships no byte code: compiled at install, removed at removal.
    assert re.search(r"^\s*py3compile -p qusd /usr/lib/qusd$", postinst, re.M), postinst
    assert re.search(r"^\s*py3clean -p qusd$", (control / "prerm").read_text(), re.M)
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

    # The boot hand-off (qusd/handoff.py): systemd-binfmt loads the file
    # qusd keeps in its state directory, after Debian's qemu-*.conf.
    link = root / handoff.LINK.lstrip("/")
    assert link.is_symlink(), link
    assert os.readlink(link) == f"/var/lib/qusd/{handoff.FILENAME}"  # across top dirs: absolute

    pages = ("man8/qusd.8", "man1/qusctl.1", "man1/qusd-binfmt.1", "man1/qusd-oci-hook.1",
             "man5/qusd.toml.5", "man1/qus-register.1")  # fmt: skip
    hook = root / "usr/share/containers/oci/hooks.d/qusd-emulate.json"
    assert hook.read_bytes() == (ROOT / "packaging/oci/qusd-emulate.json").read_bytes()
    for page in pages:
        installed = root / "usr/share/man" / f"{page}.gz"
        assert installed.is_file(), f"no {installed} (debian/qusd.manpages)"
        source = ROOT / "docs/man" / page.split("/")[1]
        assert gzip.decompress(installed.read_bytes()) == source.read_bytes(), installed

    # The commands are in /usr/bin, run by the venv's python.
    for prog in COMMANDS:
        script = root / "usr/bin" / prog
        assert script.is_file() and not script.is_symlink(), script
        assert script.read_text().startswith(f"#!{VENV}/bin/python\n"), script
        assert script.stat().st_mode & 0o7777 == 0o755, script

    # Nothing in /opt (Debian leaves it to add-on software), no byte code
    # (compiled at install), nothing that only installs packages.
    everything = [p.relative_to(root) for p in root.rglob("*")]
    assert not [p for p in everything if p.parts[0] == "opt"]
    assert not [p for p in everything if p.name == "__pycache__" or p.suffix in {".pyc", ".pyo"}]
    assert sorted(p.name for p in (root / VENV.lstrip("/") / "bin").iterdir()) == [
        "python", "python3", f"python{venv_python_version(root)}",
    ]  # fmt: skip


def test_shell_completion(root: Path, tmp_path: Path) -> None:
    """bash, zsh and fish complete qusd, qusctl and qusd-binfmt from the
    files the package installs where each shell looks for them (generated
    at build time from the parsers by shtab, which is not shipped)."""
    share = root / "usr/share"
    for prog in INTERACTIVE:
        for path in (f"bash-completion/completions/{prog}", f"zsh/vendor-completions/_{prog}",
                     f"fish/vendor_completions.d/{prog}.fish"):  # fmt: skip
            assert (share / path).stat().st_mode & 0o7777 == 0o644, path
    for shell in sorted(test_completion.COMPLETERS):
        test_completion.check_completes(share, shell, tmp_path)


def test_venv_is_debians_python(root: Path) -> None:
    venv = root / VENV.lstrip("/")
    cfg = venv_cfg(root)
    assert cfg["home"] == "/usr/bin"
    assert cfg["include-system-site-packages"] == "false"
    python3 = os.path.normpath(os.path.join(f"{VENV}/bin", os.readlink(venv / "bin/python3")))
    assert python3 == "/usr/bin/python3"
    names = {p.name.lower() for p in site_packages(root).iterdir()}
    for dist in ("qusd", "aiohttp", "pydantic", "pydantic_core", "systemd_python"):
        assert any(n.startswith(f"{dist}-") and n.endswith(".dist-info") for n in names), dist
    for tool in ("pip", "setuptools", "wheel", "_distutils_hack", "shtab"):
        assert tool not in names, f"nothing at run time needs {tool}"
    # Nothing refers to where the package was built.
    for path in [venv / "pyvenv.cfg", *(root / "usr/bin/" / p for p in COMMANDS)]:
        assert "/debian/qusd/" not in path.read_text(errors="replace"), path


def test_venv_is_pinned(root: Path) -> None:
    """The venv holds exactly packaging/constraints.txt's versions (and qusd):
    pip-deps.sh wrote the pins for this dependency set, and the build used
    them."""
    pins = {
        canonical(name): version
        for name, version in re.findall(
            r"^([A-Za-z0-9._-]+)==(\S+)$", CONSTRAINTS.read_text(), re.M
        )
    }
    bundled = {}
    for info in site_packages(root).glob("*.dist-info"):
        meta = (info / "METADATA").read_text()
        name = re.search(r"^Name: (.*)$", meta, re.M)
        version = re.search(r"^Version: (.*)$", meta, re.M)
        assert name and version, info
        bundled[canonical(name.group(1))] = version.group(1)
    assert bundled.pop("qusd") == VERSION
    runtime = {k: v for k, v in pins.items() if k not in BUILD_ONLY}
    assert bundled == runtime, "bundled vs packaging/constraints.txt (sh packaging/pin-deps.sh)"
    assert set(pins) >= BUILD_ONLY, "the build tools are pinned too"


def test_extensions_built_here(root: Path) -> None:
    """No compiled extension looks for libraries where a build machine kept
    them (RUNPATH/RPATH), none links a libpython (Debian's python3 has none);
    systemd-python's, compiled here, carries Debian's hardening (bind now)."""
    readelf = need("readelf")
    extensions = sorted(site_packages(root).rglob("*.so"))
    assert len(extensions) >= 5, extensions
    suffix = f".cpython-{venv_python_version(root).replace('.', '')}-"
    for so in extensions:
        dynamic = run([readelf, "-d", "-W", str(so)]).stdout
        paths = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:run)?path: \[(.*)\]", dynamic)
        foreign = [p for p in ":".join(paths).split(":") if p and not p.startswith("$ORIGIN")]
        assert not foreign, f"{so}: RUNPATH/RPATH {paths}"
        assert "libpython" not in dynamic, f"{so} links a libpython:\n{dynamic}"
        assert suffix in so.name, f"{so} is not for python{venv_python_version(root)}"
    systemd = [so for so in extensions if so.parent.name == "systemd"]
    assert len(systemd) >= 5, extensions
    for so in systemd:
        dynamic = run([readelf, "-d", "-W", str(so)]).stdout
        assert re.search(r"\(FLAGS\).*\bBIND_NOW\b", dynamic), f"{so}: not linked -z now"
        assert "libsystemd.so.0" in dynamic, so


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

#: In a private mount namespace, /usr becomes a read-only overlay of the
#: package's /usr over this machine's (nothing of it is touched; read-only as
#: the service sees it), then runs $2.
IN_VENV_NS = r"""
set -eu
mount -t overlay overlay -o "ro,lowerdir=$1/usr:/usr" /usr
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
    out = in_venv(root, "qusd --version; qusctl --version; command -v qusd")
    assert out.split("\n")[:3] == [f"qusd {VERSION}", f"qusctl {VERSION}", "/usr/bin/qusd"], out

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
/usr/bin/qusd --sandbox --socket "$d/qusd.sock" --state-dir "$d/state" \
    --config "$conf" 2>"$d/daemon.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
i=0
while [ ! -S "$d/qusd.sock" ]; do
    kill -0 $pid 2>/dev/null || { echo "qusd exited:" >&2; cat "$d/daemon.log" >&2; exit 1; }
    i=$((i + 1)); [ $i -le 300 ] || { echo "no socket after 30 s" >&2; exit 1; }
    sleep 0.1
done
q() { /usr/bin/qusctl --socket "$d/qusd.sock" "$@"; }
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
echo "== pyc"
find "$r/usr/lib/qusd" -name '*.pyc' | wc -l
find "$r/usr/lib/qusd" -name '*.py' -path '*/site-packages/qusd/*' | while read -r py; do
    d=${py%/*} m=${py##*/}
    ls "$d/__pycache__/${m%.py}".cpython-*.pyc >/dev/null 2>&1 || echo "not compiled: $py"
done
echo "== verify"; ch systemd-analyze verify qusd.service qusd.socket 2>&1 && echo ok
echo "== group"; grep -E '^qusd(-admin)?:' "$r/etc/group"
echo "== wants"
readlink "$r/etc/systemd/system/multi-user.target.wants/qusd.service"
readlink "$r/etc/systemd/system/sockets.target.wants/qusd.socket"
echo "== dirs"; stat -c '%n %a %U' "$r/var/lib/qusd" "$r/run/qusd"
echo "== socket"; ls "$r/run/qusd"
echo "== trigger"
# a package that installs a file where QEMU's interpreters live: dpkg runs
# qusd's postinst "triggered"; a fake systemctl (a booted system, qusd
# running) records what it was asked
mkdir -p "$t/dummy/DEBIAN" "$t/dummy/usr/libexec/qemu-binfmt"
printf 'Package: qusd-trigger-test\nVersion: 1\nArchitecture: all\n%s\n%s\n' \
    'Maintainer: t <t@t>' 'Description: t' >"$t/dummy/DEBIAN/control"
: >"$t/dummy/usr/libexec/qemu-binfmt/qusd-trigger-test"
dpkg-deb -b "$t/dummy" "$r/tmp/dummy.deb" >/dev/null
mkdir -p "$r/run/systemd/system"
printf '#!/bin/sh\necho "systemctl $*" >>/tmp/systemctl.log\n' >"$r/usr/local/sbin/systemctl"
chmod 755 "$r/usr/local/sbin/systemctl"
printf '#!/bin/sh\nexit 0\n' >"$r/usr/sbin/policy-rc.d"
ch dpkg -i /tmp/dummy.deb 2>&1
cat "$r/tmp/systemctl.log"
printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
rm "$r/usr/local/sbin/systemctl"; rmdir "$r/run/systemd/system"
ch dpkg --purge qusd-trigger-test >/dev/null 2>&1
echo "== purge"; ch dpkg --purge qusd 2>&1
echo "== after"
for p in usr/lib/qusd etc/qusd usr/bin/qusd usr/bin/qusctl usr/bin/qusd-binfmt \
        usr/bin/qusd-oci-hook usr/bin/qus-register \
        usr/share/containers/oci/hooks.d/qusd-emulate.json \
        lib/systemd/system/qusd.service \
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
    # The postinst compiled every module of the venv (py3compile).
    compiled, *uncompiled = s["pyc"].strip().split("\n")
    assert int(compiled) > 100 and not uncompiled, out
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
    assert "not empty" not in s["purge"], "the prerm leaves byte code behind:\n" + out
    # an interpreter installed or upgraded: dpkg runs the trigger, the
    # postinst asks the running daemon to reconcile (SIGHUP)
    assert "Processing triggers for qusd" in s["trigger"], out
    assert s["trigger"].strip().endswith("systemctl try-reload-or-restart qusd.service"), out


def test_triggers_cover_every_interpreter_qusd_looks_up(control: Path) -> None:
    """qusd.triggers names each qemu-CPU[-static] of the catalog in /usr/bin
    (dpkg file triggers match a path and what is below it, not a prefix)."""
    from qusd import catalog  # noqa: PLC0415

    lines = (control / "triggers").read_text().split("\n")
    paths = {line.split()[1] for line in lines if line.startswith("interest-noawait ")}
    rest = [x for x in lines if x.strip() and not x.startswith(("#", "interest-noawait "))]
    assert rest == []
    wanted = {f"/usr/bin/qemu-{t.cpu}{s}" for t in catalog.builtin() for s in ("", "-static")}
    assert paths == wanted | {"/usr/libexec/qemu-binfmt"}
