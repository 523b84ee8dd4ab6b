"""`qusd check-config [FILE]`: the settings read and validated by the code
the daemon starts with; a bad one named, exit 78; a good one printed as a
settings file that loads back to the same settings."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qusd import config
from tests.conftest import ROOT

QUSD = str(Path(sys.executable).parent / "qusd")
#: no QUSD_* of the caller's; the default file of this machine is not read
ENV = {k: v for k, v in os.environ.items() if not k.startswith("QUSD_")}


def qusd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QUSD, *args], capture_output=True, text=True, timeout=60,
                          check=False, env={**ENV, **(env or {})})  # fmt: skip


def test_the_shipped_file_is_valid_and_prints_back(tmp_path: Path) -> None:
    shipped = str(ROOT / "packaging/qusd.toml")
    res = qusd("check-config", shipped)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.splitlines()[0] == f"# valid; from defaults, {shipped}"
    printed = tmp_path / "printed.toml"
    printed.write_text(res.stdout)
    tomllib.loads(res.stdout)  # a settings file
    assert config.load({}, {}, str(printed)) == config.load({}, {}, shipped)


def test_file_environment_and_options_as_at_start(tmp_path: Path) -> None:
    path = tmp_path / "qusd.toml"
    path.write_text('[qusd]\nsocket = "/file.sock"\nlog_level = "debug"\nsocket_mode = 0o600\n')
    res = qusd("check-config", "--log-level", "error", str(path),
               env={"QUSD_STATE_DIR": "/env/state"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = tomllib.loads(res.stdout)["qusd"]
    assert (got["socket"], got["state_dir"], got["log_level"]) == ("/file.sock", "/env/state",
                                                                   "error")  # fmt: skip
    assert got["socket_mode"] == "600"  # TOML's 0o600, printed as qusd.toml(5) spells it
    # --config, before the command or after it, names the file too
    for args in (["--config", str(path), "check-config"], ["check-config", "--config", str(path)]):
        assert tomllib.loads(qusd(*args).stdout)["qusd"]["socket"] == "/file.sock"


@pytest.mark.parametrize(
    ("text", "env", "says"),
    [
        ('log_level = "loud"\n', {}, "log_level must be one of debug, info, warning, error"),
        ("reconcile_interval = -1\n", {}, "reconcile_interval must be >= 0 seconds"),
        ('sockett = "/x"\n', {}, "unknown setting 'sockett'"),
        ("rate_burst = true\n", {}, "bad value for rate_burst"),
        ("", {"QUSD_RECONCILE_INTERVAL": "soon"}, "QUSD_RECONCILE_INTERVAL: bad value for "
         "reconcile_interval"),
    ],
)  # fmt: skip
def test_a_bad_setting_is_named_and_exits_78_as_at_start(
    tmp_path: Path, text: str, env: dict[str, str], says: str
) -> None:
    path = tmp_path / "qusd.toml"
    path.write_text(text)
    res = qusd("check-config", str(path), env=env)
    assert res.returncode == 78 and res.stdout == ""
    assert res.stderr.startswith("qusd: ") and says in res.stderr, res.stderr
    # the daemon itself refuses to start with the same words
    start = qusd("--config", str(path), "--socket", str(tmp_path / "s.sock"), "--state-dir",
                 str(tmp_path / "state"), "restore", env=env)  # fmt: skip
    assert (start.returncode, start.stderr) == (78, res.stderr)
    assert not (tmp_path / "state").exists()


def test_a_missing_file_named_on_purpose(tmp_path: Path) -> None:
    res = qusd("check-config", str(tmp_path / "nope.toml"))
    assert res.returncode == 78
    assert res.stderr == f"qusd: config file {tmp_path / 'nope.toml'} does not exist\n"
