"""The daemon's settings: built-in defaults, then /etc/qusd/qusd.toml, then
QUSD_* environment variables, then command-line flags (last wins).

Plain dataclasses and tomllib: the boot-restore path reads this.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qusd.binfmt import DEFAULT_PATH
from qusd.catalog import builtin
from qusd.errors import ConfigError
from qusd.interpreters import DEFAULT_DIRS, STORE_DIR, search_path

DEFAULT_CONFIG_FILE = "/etc/qusd/qusd.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
DRIFT = ("restore", "report")
CATALOG_SOURCES = ("builtin", "binfmt.d")


@dataclass(frozen=True)
class Config:
    socket: str = "/run/qusd/qusd.sock"
    state_dir: str = "/var/lib/qusd"
    binfmt_path: str = DEFAULT_PATH
    interpreter_dirs: tuple[str, ...] = DEFAULT_DIRS
    log_level: str = "info"
    sandbox: bool = False
    catalog: str = "builtin"
    #: seconds between checks that persistent entries are still in the
    #: kernel (systemd-binfmt and others flush the whole table); 0: never
    reconcile_interval: float = 5.0
    socket_mode: int = 0o660
    #: the socket's group: members may connect (and are "users")
    socket_group: str = "qusd"
    #: members may register catalog targets of foreign families, and touch
    #: only what qusd manages
    user_group: str = "qusd"
    #: members (and root) may do everything
    admin_group: str = "qusd-admin"
    #: flags users may ask for; C and O are never allowed to them
    user_flags: str = "FP"
    #: open connections at most; more are closed at once
    max_connections: int = 256
    #: open connections of one uid at most (root and admins: no cap of
    #: their own); at most max_connections minus the reserved ones
    max_connections_per_uid: int = 32
    #: connections only root and admins may use, so that users filling
    #: theirs never lock them out; at most half of max_connections
    reserved_connections: int = 16
    #: seconds a client has to send a request's headers, then its body
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    #: seconds an idle keep-alive connection stays open
    keepalive_timeout: float = 15.0
    #: mutations per second per uid (a token bucket of rate_burst), for
    #: users; admins too when rate_limit_admins
    rate_limit: float = 5.0
    rate_burst: int = 20
    rate_limit_admins: bool = False
    #: find which targets the host runs itself by running their built-in
    #: programs with no binfmt_misc entry (else: by the family table)
    detect_native: bool = True
    #: targets to count as run by the host itself, or as needing emulation,
    #: whatever detection finds
    native_targets: tuple[str, ...] = ()
    emulated_targets: tuple[str, ...] = ()
    #: qusd's own interpreter directory (`interpreters install` fills it),
    #: searched before interpreter_dirs; "" for none
    interpreter_store: str = STORE_DIR
    #: where `interpreters install` keeps the packages it downloads
    interpreter_cache: str = "/var/cache/qusd"
    #: reads (GET) per second per uid, in bursts of read_rate_burst: for
    #: users; admins too when rate_limit_admins
    read_rate_limit: float = 20.0
    read_rate_burst: int = 40
    #: when another tool puts a different definition under a name qusd keeps
    #: (an admin registered it): "restore" puts qusd's back, "report" only
    #: reports it
    drift: str = "restore"
    #: where the settings came from, for `status` and error messages
    sources: tuple[str, ...] = field(default=(), compare=False)

    @property
    def reserved(self) -> int:
        """The connections kept for root and admins (at most half)."""
        return min(self.reserved_connections, self.max_connections // 2)

    @property
    def per_uid(self) -> int:
        """The connections one user may hold."""
        return max(1, min(self.max_connections_per_uid, self.max_connections - self.reserved))

    def validated(self) -> Config:
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.catalog not in CATALOG_SOURCES:
            raise ConfigError(f"catalog must be one of {', '.join(CATALOG_SOURCES)}")
        if not math.isfinite(self.reconcile_interval) or self.reconcile_interval < 0:
            raise ConfigError("reconcile_interval must be >= 0 seconds")
        if self.drift not in DRIFT:
            raise ConfigError(f"drift must be one of {', '.join(DRIFT)}")
        for name in (
            "header_timeout", "body_timeout", "keepalive_timeout", "rate_limit", "read_rate_limit",
        ):  # fmt: skip
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number")
        for name in ("max_connections", "max_connections_per_uid", "rate_burst",
                     "read_rate_burst"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.reserved_connections < 0:
            raise ConfigError("reserved_connections must be 0 or more")
        if set(self.user_flags) - set("POCF"):
            raise ConfigError("user_flags must be made of P, O, C, F")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError("socket_mode must be permission bits, e.g. 660")
        for name in ("socket", "state_dir", "binfmt_path"):
            if not os.path.isabs(getattr(self, name)):
                raise ConfigError(f"{name} must be an absolute path")
        if not self.interpreter_dirs or not all(os.path.isabs(d) for d in self.interpreter_dirs):
            raise ConfigError("interpreter_dirs must be a non-empty list of absolute paths")
        if self.interpreter_store and not os.path.isabs(self.interpreter_store):
            raise ConfigError('interpreter_store must be an absolute path (or "" for none)')
        if not os.path.isabs(self.interpreter_cache):
            raise ConfigError("interpreter_cache must be an absolute path")
        self._check_targets()
        if any(".." in d.split("/") for d in self.interpreter_dirs):
            raise ConfigError(
                "interpreter_dirs must not contain '..': the kernel follows a symlink before "
                "'..', so such a path may lead elsewhere than it reads"
            )
        return self

    @property
    def search_dirs(self) -> tuple[str, ...]:
        """Where interpreters are looked up: the store first, then interpreter_dirs."""
        return search_path(self.interpreter_dirs, self.interpreter_store or None)

    def _check_targets(self) -> None:
        for name in ("native_targets", "emulated_targets"):
            for target in getattr(self, name):
                if builtin().find(target) is None:
                    raise ConfigError(
                        f"{name}: unknown target {target!r}; known: {', '.join(builtin().names())}"
                    )
        both = {builtin().get(t).name for t in self.native_targets} & {
            builtin().get(t).name for t in self.emulated_targets
        }
        if both:
            raise ConfigError(
                f"{', '.join(sorted(both))} in both native_targets and emulated_targets"
            )


def _coerce(name: str, value: Any, origin: str) -> Any:
    """A value from TOML or the environment as the field's type."""
    default = getattr(Config(), name)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            if not isinstance(value, bool):
                raise TypeError(type(value).__name__)
            return value
        if isinstance(default, tuple):
            items = value.split(":") if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise TypeError("a list of paths")
            return tuple(i for i in items if i)
        if name == "socket_mode" and isinstance(value, str):
            return int(value, 8)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError("bool")
            return float(value)
        if isinstance(default, int):
            if isinstance(value, bool):
                raise TypeError("bool")
            return int(value)
        if not isinstance(value, str):
            raise TypeError(type(value).__name__)
        return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{origin}: bad value for {name}: {e}") from None


_SETTABLE = [f.name for f in fields(Config) if f.name != "sources"]


def load(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    config_file: str | None = None,
) -> Config:
    """Merge the sources; flags holds only the options given on the command line."""
    values: dict[str, Any] = {}
    sources = ["defaults"]
    path = config_file or environ.get("QUSD_CONFIG") or DEFAULT_CONFIG_FILE
    explicit = config_file is not None or "QUSD_CONFIG" in environ
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        data = {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    else:
        sources.append(path)
    section = data.get("qusd", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [qusd] must be a table")
    for key, value in section.items():
        name = key.replace("-", "_")
        if name not in _SETTABLE:
            if isinstance(value, dict):
                continue  # other sections belong to later features
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(_SETTABLE)}")
        values[name] = _coerce(name, value, path)
    for name in _SETTABLE:
        env = f"QUSD_{name.upper()}"
        if env in environ:
            values[name] = _coerce(name, environ[env], env)
            sources.append(env)
    for name, value in flags.items():
        if value is not None:
            values[name] = _coerce(name, value, "command line")
    if any(v is not None for v in flags.values()):
        sources.append("command line")
    return replace(Config(), **values, sources=tuple(sources)).validated()
