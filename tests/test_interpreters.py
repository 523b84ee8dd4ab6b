"""Interpreter discovery and static detection."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from qusd import catalog, interpreters
from tests.conftest import busybox_path, interpreter

AARCH64 = catalog.builtin().get("aarch64")


def test_static_detection_on_real_files() -> None:
    assert interpreters.is_static_elf(interpreter("aarch64")) is True
    assert interpreters.is_static_elf(busybox_path("arm64")) is True  # 64-bit, little-endian
    assert interpreters.is_static_elf(busybox_path("s390x")) is True  # 64-bit, big-endian
    assert interpreters.is_static_elf(busybox_path("armhf")) is True  # 32-bit
    assert interpreters.is_static_elf(shutil.which("ls") or "/bin/ls") is False
    assert interpreters.is_static_elf(sys.executable) is False
    assert interpreters.is_static_elf("/etc/hostname") is None
    assert interpreters.is_static_elf("/nonexistent") is None


def place(d: Path, name: str, source: str, mode: int = 0o755) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    shutil.copy(source, p)
    p.chmod(mode)
    return p


def test_static_is_preferred_across_directories(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    dynamic = place(first, "qemu-aarch64", shutil.which("true") or "/bin/true")
    static = place(second, "qemu-aarch64-static", interpreter("aarch64"))
    found = interpreters.find(AARCH64, [str(first), str(second)])
    assert found == interpreters.Interpreter(str(static), True)
    static.unlink()
    assert interpreters.find(AARCH64, [str(first), str(second)]) == interpreters.Interpreter(
        str(dynamic), False
    )


def test_directory_order_and_executability(tmp_path: Path) -> None:
    a = place(tmp_path / "a", "qemu-aarch64-static", interpreter("aarch64"), mode=0o644)
    b = place(tmp_path / "b", "qemu-aarch64-static", interpreter("aarch64"))
    assert interpreters.find(AARCH64, [str(a.parent), str(b.parent)]) == interpreters.Interpreter(
        str(b), True
    )
    assert interpreters.find(AARCH64, [str(tmp_path / "none")]) is None


def test_i486_uses_the_i386_interpreter(tmp_path: Path) -> None:
    p = place(tmp_path, "qemu-i386-static", interpreter("i386"))
    assert interpreters.find(catalog.builtin().get("i486"), [str(tmp_path)]) == (
        interpreters.Interpreter(str(p), True)
    )


def test_default_dirs_find_debians_static_interpreters() -> None:
    found = interpreters.find(AARCH64)
    assert found == interpreters.Interpreter(interpreter("aarch64"), True)
