"""Settings: defaults < file < QUSD_* environment < command-line flags."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from qusd import config
from qusd.config import Config
from qusd.errors import ConfigError


@pytest.fixture(autouse=True)
def no_system_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever /etc/qusd/qusd.toml this machine has, the tests do not see it."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent" / "qusd.toml"))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "qusd.toml"
    path.write_text(text)
    return str(path)


def test_defaults_when_there_is_nothing() -> None:
    cfg = config.load({}, {})
    assert cfg == Config()
    assert cfg.sources == ("defaults",)
    assert (cfg.socket, cfg.state_dir, cfg.reconcile_interval) == (
        "/run/qusd/qusd.sock",
        "/var/lib/qusd",
        5.0,
    )
    assert (cfg.log_level, cfg.sandbox, cfg.catalog, cfg.socket_mode) == (
        "info",
        False,
        "builtin",
        0o660,
    )


def test_file_env_and_flags_each_win_over_the_one_before(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[qusd]\nsocket = "/file/s.sock"\nstate-dir = "/file/state"\nlog_level = "debug"\n'
        "reconcile_interval = 1\n",
    )
    env = {"QUSD_STATE_DIR": "/env/state", "QUSD_LOG_LEVEL": "warning"}
    flags: dict[str, Any] = {"log_level": "error", "socket": None, "state_dir": None}
    cfg = config.load(flags, env, path)
    assert cfg.socket == "/file/s.sock"  # file over default; the None flag changes nothing
    assert cfg.state_dir == "/env/state"  # env over file
    assert cfg.log_level == "error"  # flag over env
    assert cfg.reconcile_interval == 1.0 and isinstance(cfg.reconcile_interval, float)
    assert cfg.binfmt_path == Config().binfmt_path  # default where nobody said anything
    assert cfg.sources == ("defaults", path, "QUSD_STATE_DIR", "QUSD_LOG_LEVEL", "command line")


def test_file_without_a_section_and_other_sections_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, 'catalog = "binfmt.d"\n[later-feature]\nanything = 1\n')
    assert config.load({}, {}, path).catalog == "binfmt.d"


def test_qusd_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "sandbox = true\n")
    cfg = config.load({}, {"QUSD_CONFIG": path})
    assert cfg.sandbox is True and path in cfg.sources
    # an explicit file beats the variable
    other = tmp_path / "other.toml"
    other.write_text("sandbox = false\n")
    assert config.load({}, {"QUSD_CONFIG": path}, str(other)).sandbox is False


def test_environment_values_are_converted() -> None:
    env = {
        "QUSD_INTERPRETER_DIRS": "/opt/qemu:/usr/bin:",
        "QUSD_SANDBOX": "yes",
        "QUSD_SOCKET_MODE": "600",
        "QUSD_RECONCILE_INTERVAL": "0.25",
    }
    cfg = config.load({}, env)
    assert cfg.interpreter_dirs == ("/opt/qemu", "/usr/bin")
    assert cfg.sandbox is True
    assert cfg.socket_mode == 0o600
    assert cfg.reconcile_interval == 0.25
    assert config.load({}, {"QUSD_SANDBOX": "0"}).sandbox is False


def test_flags_as_the_daemon_passes_them() -> None:
    cfg = config.load({"interpreter_dirs": ("/a", "/b"), "reconcile_interval": 0.0}, {})
    assert cfg.interpreter_dirs == ("/a", "/b")
    assert cfg.reconcile_interval == 0.0  # 0 is a value (never reconcile), not "unset"


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[qusd]\nsockett = "/x"\n')
    with pytest.raises(ConfigError) as info:
        config.load({}, {}, path)
    assert info.value.message.startswith(f"{path}: unknown setting 'sockett'; known: socket, ")
    assert info.value.exit_status == 78


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ('log_level = "loud"', {}, "log_level must be one of debug, info, warning, error"),
        ('catalog = "web"', {}, "catalog must be one of builtin, binfmt.d"),
        ("reconcile_interval = -1", {}, "reconcile_interval must be >= 0 seconds"),
        ("reconcile_interval = true", {}, "bad value for reconcile_interval: bool"),
        ('socket = "run/qusd.sock"', {}, "socket must be an absolute path"),
        ('state_dir = ""', {}, "state_dir must be an absolute path"),
        ('interpreter_dirs = ["usr/bin"]', {}, "interpreter_dirs must be a non-empty list"),
        ("interpreter_dirs = [1]", {}, "bad value for interpreter_dirs: a list of paths"),
        ("sandbox = 1", {}, "bad value for sandbox: int"),
        ("log_level = 5", {}, "bad value for log_level: int"),
        ("qusd = 5", {}, "[qusd] must be a table"),
        ("socket = ", {}, "cannot read config file"),
        ("", {"QUSD_RECONCILE_INTERVAL": "soon"}, "QUSD_RECONCILE_INTERVAL: bad value"),
        ("", {"QUSD_SANDBOX": "maybe"}, "QUSD_SANDBOX: bad value for sandbox: maybe"),
        ("", {"QUSD_SOCKET_MODE": "999"}, "QUSD_SOCKET_MODE: bad value for socket_mode"),
        ("", {"QUSD_INTERPRETER_DIRS": ""}, "interpreter_dirs must be a non-empty list"),
    ],
)
def test_bad_values(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    path = write(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as info:
        config.load({}, env, path)
    assert message in info.value.message


def test_bad_flag_value() -> None:
    with pytest.raises(ConfigError, match="command line: bad value for reconcile_interval"):
        config.load({"reconcile_interval": "often"}, {})


@pytest.mark.parametrize("value", [math.nan, "nan"], ids=["flag", "env"])
def test_nan_reconcile_interval_is_refused(value: Any) -> None:
    source = {"reconcile_interval": value} if isinstance(value, float) else {}
    env = {"QUSD_RECONCILE_INTERVAL": value} if isinstance(value, str) else {}
    with pytest.raises(ConfigError):
        config.load(source, env)


def test_explicit_config_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    for env, explicit in [({}, missing), ({"QUSD_CONFIG": missing}, None)]:
        with pytest.raises(ConfigError) as info:
            config.load({}, env, explicit)
        assert info.value.message == f"config file {missing} does not exist"


def test_the_default_file_is_read_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'log_level = "debug"\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", path)
    cfg = config.load({}, {})
    assert cfg.log_level == "debug" and cfg.sources == ("defaults", path)


def test_the_shipped_example_shows_the_defaults(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parent.parent / "packaging" / "qusd.toml"
    assert config.load({}, {}, str(shipped)) == Config()
    # every commented-out setting, switched on, is the built-in default
    text, n = re.subn(r"^#(\w+ = )", r"\1", shipped.read_text(), flags=re.MULTILINE)
    assert n == len(fields(Config)) - 1  # every setting but `sources` is shown
    assert config.load({}, {}, write(tmp_path, text)) == Config()
