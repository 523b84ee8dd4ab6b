"""aiohttp's server, without aiohttp's client and without TLS.

`import aiohttp.web` runs aiohttp/__init__.py first, which imports the
whole client: aiohttp.connector builds its SSL contexts at import (the CA
bundle read: 45-57 ms) and ssl loads libssl (10 ms, 2 MiB). A daemon that
serves a Unix socket needs none of it. load(), called by the daemon before
it imports qusd.server, puts the aiohttp package in place without running
its __init__ and imports aiohttp.web (its server modules only) with ssl
unavailable, as on a Python built without it: those modules then leave
TLS out (aiohttp supports that). The stdlib modules that were loaded along
the way without HTTPS support (urllib.request, http.client) are dropped
again, so whoever imports them later gets them whole.

The package answers every other name (aiohttp.ClientSession, ...) by
running its real __init__ then: nothing is missing, it only comes later
(and its client then lacks the classes of TLS errors).

`python -X importtime -m qusd ...` shows neither ssl nor aiohttp.connector
before READY=1 (bench/RESULTS.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from types import ModuleType
from typing import Any

#: loaded without HTTPS while ssl was unavailable: loaded again on demand
_WITHOUT_TLS = ("urllib.request", "http.client")


def load() -> None:
    """Import aiohttp.web without aiohttp's client (a no-op when aiohttp is
    imported already; when that fails, aiohttp is left to import whole)."""
    if "aiohttp" in sys.modules:
        return
    spec = importlib.util.find_spec("aiohttp")
    if spec is None or spec.loader is None or spec.origin is None:
        return  # not an ordinary package: import it as it is
    with open(spec.origin, encoding="utf-8") as f:
        found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.MULTILINE)
    if found is None:
        return
    pkg = importlib.util.module_from_spec(spec)
    setattr(pkg, "__version__", found.group(1))  # noqa: B010 - what aiohttp.http takes

    def complete(name: str) -> Any:
        """Any other name: the package's own __init__ runs, once."""
        if name.startswith("__"):
            raise AttributeError(name)
        delattr(pkg, "__getattr__")
        assert spec.loader is not None
        spec.loader.exec_module(pkg)
        return getattr(pkg, name)

    before = set(sys.modules)
    had_ssl = "ssl" in sys.modules
    sys.modules["aiohttp"] = pkg
    if not had_ssl:
        sys.modules["ssl"] = None  # type: ignore[assignment]  # "import ssl" fails
    try:
        importlib.import_module("asyncio")
        importlib.import_module("aiohttp.web")
    except Exception:  # another aiohttp than this was written for: import it whole
        _forget(set(sys.modules) - before)
        return
    finally:
        if not had_ssl:
            del sys.modules["ssl"]
    for name in _WITHOUT_TLS:
        if name not in before:
            _drop(name)
    # only now: the imports above look their submodules up on the package
    setattr(pkg, "__getattr__", complete)  # noqa: B010 - PEP 562, on this module only


def _drop(name: str) -> None:
    module = sys.modules.pop(name, None)
    parent_name, _, child = name.rpartition(".")
    parent: ModuleType | None = sys.modules.get(parent_name)
    if module is not None and parent is not None and getattr(parent, child, None) is module:
        delattr(parent, child)


def _forget(names: set[str]) -> None:
    """Undo a failed load: aiohttp is then imported as it is."""
    for name in names:
        if name == "aiohttp" or name.startswith("aiohttp."):
            sys.modules.pop(name, None)
