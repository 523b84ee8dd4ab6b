"""The unit layer (tests/unit, `make test-unit`) needs neither root nor
binfmt_misc: shown by running it as nobody, in a mount namespace where
/proc/sys/fs has no binfmt_misc at all."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import NOBODY, ROOT, Shared, python_for


def test_unit_layer_runs_as_nobody_without_binfmt_misc(shared: Shared, tmp_path: Path) -> None:
    tree = shared.root / "unit-run"
    (tree / "tests").mkdir(parents=True)
    for f in ("__init__.py", "conftest.py", "worker.py"):
        shutil.copy(ROOT / "tests" / f, tree / "tests" / f)
    shutil.copytree(ROOT / "tests" / "unit", tree / "tests" / "unit",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(ROOT / "pyproject.toml", tree)
    scratch = tmp_path / "hypothesis"
    scratch.mkdir()
    os.chown(scratch, NOBODY, NOBODY)
    tmp_path.chmod(0o755)
    py = python_for(NOBODY)
    script = (
        "mount -t tmpfs none /proc/sys/fs && test ! -e /proc/sys/fs/binfmt_misc && "
        f'exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- "$@"'
    )
    argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"]
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": f"{tree}:{shared.pythonpath}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HYPOTHESIS_STORAGE_DIRECTORY": str(scratch),
    }
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary
