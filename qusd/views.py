"""The JSON of the answers clients poll (health, the registrations, status)
and of every problem, written without pydantic.

Byte for byte what qusd.models' Health, RegistrationOut, Status and
Problem write (tests/unit/test_views.py holds them to it, on generated
entries too): the models stay the contract and the OpenAPI document; this
only lets a daemon that answers nothing else never load pydantic and the
models (50 ms at start, 9 MiB). Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from qusd.binfmt import Entry, printable, raw
from qusd.service import Registration

#: Health()
HEALTH = b'{"status":"ok"}'

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: Problem's fields, in its order; None ones are left out (exclude_none)
_PROBLEM = ("type", "title", "status", "detail", "code", "reason", "field", "errors")
_FIELD_ERROR = ("loc", "msg", "type")


def registration(reg: Registration) -> bytes:
    """RegistrationOut.of(reg).model_dump_json()"""
    e: Entry = reg.entry
    magic = e.type == "M"
    doc = {
        "name": printable(e.name),
        "enabled": e.enabled,
        "type": "magic" if magic else "extension",
        "offset": e.offset,
        "magic": e.magic.hex() if magic else None,
        "mask": e.mask.hex() if e.mask is not None else None,
        "extension": printable(e.extension) if e.extension is not None else None,
        "interpreter": printable(e.interpreter),
        "flags": e.flags,
        "managed": reg.managed,
        "persistent": reg.persistent,
        "target": reg.target,
        "interpreter_stale": reg.interpreter_stale,
        "owner": reg.owner,
        "kept": reg.kept,
        "raw": _raw(e),
    }
    return _dumps(doc).encode()


def _raw(e: Entry) -> dict[str, str | None] | None:
    """RawFields: the hex of each text field that is not UTF-8."""
    texts = {"name": e.name, "interpreter": e.interpreter, "extension": e.extension}
    found = {
        name: data.hex()
        for name, text in texts.items()
        if text is not None and (data := raw(text)) is not None
    }
    if not found:
        return None
    return {name: found.get(name) for name in texts}


def status(doc: Mapping[str, Any]) -> bytes:
    """Status.model_validate(doc).model_dump_json(), for the document
    Service.status() makes."""
    fs, counts, sandbox = doc["binfmt_misc"], doc["counts"], doc["sandbox"]
    out = {
        "version": doc["version"],
        "kernel": doc["kernel"],
        "machine": doc["machine"],
        "family": doc["family"],
        "binfmt_misc": {"path": fs["path"], "mounted": fs["mounted"], "enabled": fs["enabled"]},
        "sandbox": {"pid": sandbox["pid"]} if sandbox is not None else None,
        "catalog": doc["catalog"],
        "state_file": doc["state_file"],
        "counts": {k: counts[k] for k in ("entries", "managed", "persistent", "recorded")},
        "warnings": [{"code": w["code"], "message": w["message"]} for w in doc["warnings"]],
    }
    return _dumps(out).encode()


def problem(body: Mapping[str, Any]) -> str:
    """Problem.model_validate(body).model_dump_json(exclude_none=True)"""
    doc: dict[str, Any] = {k: body[k] for k in _PROBLEM if body.get(k) is not None}
    errors: Sequence[Mapping[str, Any]] | None = doc.get("errors")
    if errors is not None:
        doc["errors"] = [{k: e[k] for k in _FIELD_ERROR} for e in errors]
    return _dumps(doc)
