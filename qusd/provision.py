"""Interpreters from the distribution's package, without installing it.

qus' bandwidth-light procedure: take only the interpreters a host needs out
of Debian's qemu-user-static .deb (an ar archive holding control.tar.* and
data.tar.*; tar with xz or gzip, which the standard library reads; dpkg-deb
for the rest) into qusd's own interpreter directory, root-owned and writable
by nobody else, so the interpreters pass the trust check every registration
makes. Each one's package version and sha256 are recorded in a manifest
beside them. Without a package file, `apt-get download` fetches Debian's
into a cache directory (kept, and reused while it is apt's candidate).

Standard library only: qusd-binfmt does the same in the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from qusd import paths
from qusd.catalog import Target
from qusd.errors import InterpreterError, UntrustedInterpreterError
from qusd.interpreters import STORE_DIR
from qusd.policy import check_trusted

PACKAGE = "qemu-user-static"
CACHE_DIR = "/var/cache/qusd"
MANIFEST = "manifest.json"
DOWNLOAD_TIMEOUT = 900.0

_LOCK = threading.Lock()


@dataclass(frozen=True)
class Installed:
    """One interpreter put in the store, and where it came from."""

    path: str
    targets: tuple[str, ...]
    package: str
    version: str
    sha256: str
    source: str  # the package file's name
    installed: float  # seconds since the epoch

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Installed:
        return cls(
            str(doc["path"]), tuple(map(str, doc["targets"])), str(doc["package"]),
            str(doc["version"]), str(doc["sha256"]), str(doc["source"]),
            float(doc["installed"]),
        )  # fmt: skip


def manifest(store: str = STORE_DIR) -> dict[str, Installed]:
    """What the store holds, by path ({} when there is no store)."""
    try:
        doc = json.loads((Path(store) / MANIFEST).read_text())
        return {i.path: i for i in map(Installed.from_json, doc["interpreters"])}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InterpreterError(
            f"the interpreter manifest {store}/{MANIFEST} cannot be read ({e}): install the "
            "interpreters again to rewrite it"
        ) from None


def _save_manifest(store: str, items: Mapping[str, Installed]) -> None:
    doc = {"version": 1, "interpreters": [items[p].to_json() for p in sorted(items)]}
    paths.write_atomic(Path(store) / MANIFEST, json.dumps(doc, indent=1).encode())


# -- reading a .deb ----------------------------------------------------------------------


class _Slice(io.RawIOBase):
    """size bytes of f from offset: one member of an ar archive."""

    def __init__(self, f: IO[bytes], offset: int, size: int) -> None:
        self.f, self.pos, self.end = f, offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.end - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.pos)
        data = self.f.read(n)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _members(f: IO[bytes], path: str) -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of each member of an ar archive."""
    if f.read(8) != b"!<arch>\n":
        raise InterpreterError(f"{path} is not a Debian package (no ar archive header)")
    while True:
        head = f.read(60)
        if len(head) < 60:
            return
        name = head[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(head[48:58])
        except ValueError:
            raise InterpreterError(f"{path}: a damaged ar member header") from None
        yield name, f.tell(), size
        f.seek(size + (size & 1), os.SEEK_CUR)


def _control(deb: str) -> dict[str, str]:
    """The package's control fields (Package, Version, Architecture, ...)."""
    with open(deb, "rb") as f:
        for name, offset, size in list(_members(f, deb)):
            if not name.startswith("control.tar"):
                continue
            try:
                with tarfile.open(fileobj=io.BufferedReader(_Slice(f, offset, size)),
                                  mode="r|*") as tar:  # fmt: skip
                    for m in tar:
                        if m.name.lstrip("./") == "control" and m.isfile():
                            text = tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                            return _fields(text)
            except tarfile.TarError:
                return _fields(_dpkg_deb(["-f", deb]).decode())
    raise InterpreterError(f"{deb} has no control file: not a Debian package")


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line[:1] not in (" ", "\t") and ":" in line:
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


def _dpkg_deb(args: Sequence[str]) -> bytes:
    if shutil.which("dpkg-deb") is None:
        raise InterpreterError(
            "the package is compressed in a way Python cannot read (zstd?) and there is no "
            "dpkg-deb to read it: install dpkg, or give a package compressed with xz or gzip"
        )
    res = subprocess.run(["dpkg-deb", *args], capture_output=True, check=False)
    if res.returncode != 0:
        raise InterpreterError(f"dpkg-deb {' '.join(args)}: {res.stderr.decode().strip()}")
    return res.stdout


@contextlib.contextmanager
def _data(deb: str) -> Iterator[tarfile.TarFile]:
    """The package's file system tree, as a tar stream."""
    with open(deb, "rb") as f:
        found = [(o, s) for n, o, s in _members(f, deb) if n.startswith("data.tar")]
        if not found:
            raise InterpreterError(f"{deb} has no data.tar member: not a Debian package")
        offset, size = found[0]
        stream = io.BufferedReader(_Slice(f, offset, size))
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - closed below
        except tarfile.TarError:  # a compression Python does not read (zstd)
            raw = io.BytesIO(_dpkg_deb(["--fsys-tarfile", deb]))
            tar = tarfile.open(fileobj=raw, mode="r|")  # noqa: SIM115
        with tar:
            yield tar


# -- fetching Debian's ---------------------------------------------------------------------


def fetch(cache: str = CACHE_DIR, package: str = PACKAGE) -> str:
    """apt's candidate .deb of package, downloaded with apt-get into cache
    (kept there: reused while it is still the candidate and intact)."""
    if shutil.which("apt-get") is None:
        raise InterpreterError(
            f"there is no apt-get here to download {package}: give the package file (--from)"
        )
    os.makedirs(cache, mode=0o755, exist_ok=True)
    info = _candidate(package)
    if info:
        name = f"{package}_{info['Version'].replace(':', '%3a')}_{info['Architecture']}.deb"
        path = os.path.join(cache, name)
        if os.path.exists(path) and _sha256(path) == info.get("SHA256"):
            return path
    before = set(os.listdir(cache))
    for attempt in (1, 2):
        res = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=cache,
            capture_output=True,
            text=True,
            timeout=DOWNLOAD_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode == 0:
            break
        if attempt == 1:  # no or stale package lists (a slim image): read them once
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False,
                           timeout=DOWNLOAD_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    else:
        said = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise InterpreterError(
            f"apt-get download {package} failed: {said}; download the package elsewhere and "
            "give it with --from (under the shipped systemd unit qusd has no network)"
        )
    info = _candidate(package)
    new = sorted(set(os.listdir(cache)) - before) or sorted(
        n for n in os.listdir(cache) if n.startswith(f"{package}_") and n.endswith(".deb")
    )
    debs = [n for n in new if n.startswith(f"{package}_") and n.endswith(".deb")]
    if not debs:
        raise InterpreterError(f"apt-get download {package} left no package in {cache}")
    path = os.path.join(cache, debs[-1])
    if info and info.get("SHA256") and _sha256(path) != info["SHA256"]:
        raise InterpreterError(f"{path} does not have the sha256 apt lists for it: remove it")
    return path


def _candidate(package: str) -> dict[str, str]:
    """apt's candidate version's fields (Version, Architecture, SHA256), or {}."""
    try:
        res = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                             capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return _fields(res.stdout.split("\n\n")[0]) if res.returncode == 0 else {}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- installing ---------------------------------------------------------------------------


def install(
    targets: Sequence[Target],
    deb: str | None = None,
    store: str = STORE_DIR,
    cache: str = CACHE_DIR,
) -> list[Installed]:
    """Extract the interpreters of targets from deb (default: Debian's
    qemu-user-static, downloaded) into store, all or none; each is checked:
    it runs here (`-version`) and passes the trust check."""
    if not targets:
        raise InterpreterError("name the targets whose interpreters to install")
    with _LOCK:
        source = deb if deb is not None else fetch(cache)
        if not os.path.isfile(source):
            raise InterpreterError(
                f"{source}: no such package file (qusd must see it: its systemd unit keeps "
                "/home and /tmp private; /var/cache/qusd will do)"
            )
        fields = _control(source)
        package, version = fields.get("Package", "?"), fields.get("Version", "?")
        if not package.startswith("qemu-user"):
            raise InterpreterError(f"{source} is {package}, not qemu-user-static")
        wanted: dict[str, list[str]] = {}
        for t in targets:
            wanted.setdefault(f"qemu-{t.cpu}-static", []).append(t.name)
        os.makedirs(store, mode=0o755, exist_ok=True)
        staged = _extract(source, package, wanted, store)
        try:
            for file, (tmp, _) in staged.items():
                final = os.path.join(store, file)
                try:
                    check_trusted(tmp)
                except UntrustedInterpreterError as e:
                    raise UntrustedInterpreterError(
                        f"will not install into {store}: {e.reason.replace(tmp, final)}"
                    ) from None
                _runs_here(tmp, source)
            items = manifest(store)
            done = []
            for file, (tmp, digest) in staged.items():
                path = os.path.join(store, file)
                os.replace(tmp, path)
                item = Installed(path, tuple(wanted[file]), package, version, digest,
                                 os.path.basename(source), time.time())  # fmt: skip
                old = items.get(path)
                if old is not None:  # i386 and i486 share a file
                    names = dict.fromkeys((*old.targets, *item.targets))
                    item = Installed(**{**asdict(item), "targets": tuple(names)})
                items[path] = item
                done.append(item)
            _save_manifest(store, items)
        finally:
            for tmp, _ in staged.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return done


def _extract(
    deb: str, package: str, wanted: Mapping[str, list[str]], store: str
) -> dict[str, tuple[str, str]]:
    """Each wanted usr/bin file into a temporary file in store: (temp path, sha256)."""
    staged: dict[str, tuple[str, str]] = {}
    try:
        with _data(deb) as tar:
            for m in tar:
                parts = m.name.lstrip("./").split("/")
                if parts[:2] != ["usr", "bin"] or len(parts) != 3 or parts[2] not in wanted:
                    continue
                if not m.isfile():
                    continue
                src = tar.extractfile(m)
                assert src is not None
                fd, tmp = tempfile.mkstemp(dir=store, prefix=f".{parts[2]}-")
                h = hashlib.sha256()
                with os.fdopen(fd, "wb") as out:
                    while block := src.read(1 << 20):
                        h.update(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o755)
                staged[parts[2]] = (tmp, h.hexdigest())
                if len(staged) == len(wanted):
                    break
    except BaseException:
        for tmp, _ in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    missing = sorted(set(wanted) - set(staged))
    if missing:
        for tmp, _ in staged.values():
            os.unlink(tmp)
        names = ", ".join(f"{f} ({'/'.join(wanted[f])})" for f in missing)
        raise InterpreterError(f"{package} ({deb}) has no {names}", targets=missing)
    return staged


def _runs_here(path: str, source: str) -> None:
    try:
        res = subprocess.run([path, "-version"], capture_output=True, timeout=30, check=False)
    except OSError as e:
        raise InterpreterError(
            f"the interpreters in {source} do not run on this machine ({e.strerror}): give "
            "the package built for this host's architecture"
        ) from None
    if res.returncode != 0:
        raise InterpreterError(f"{os.path.basename(path)} from {source} does not run: "
                               f"{res.stderr.decode(errors='replace').strip()}")  # fmt: skip
