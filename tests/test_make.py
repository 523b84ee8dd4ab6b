"""`make test` sets itself up once; a second run does nothing but the tests."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def test_setup_is_up_to_date_after_make() -> None:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    res = subprocess.run(
        ["make", "-q", "setup"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, "make would redo set-up work: " + res.stdout + res.stderr
