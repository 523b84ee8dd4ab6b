"""The OpenAPI 3.1 document, generated from the route table and the pydantic
models, built once on first request (not at start: it costs milliseconds
the boot path does not need)."""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from qusd import __version__, catalog
from qusd.api import ROUTES
from qusd.catalog import ALIASES, ALL, Catalog
from qusd.middleware import PROBLEM_JSON
from qusd.models import Problem

#: the headers qusd sends with a status, whatever the route
HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    201: {"Location": {"description": "the entry registered (or, for several or none, the "
                       "collection)", "required": True,
                       "schema": {"type": "string", "format": "uri-reference"}}},
    405: {"Allow": {"description": "the methods the path takes", "required": True,
                    "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds until a change is allowed again",
                          "required": True, "schema": {"type": "integer", "minimum": 1}}},
}  # fmt: skip


def target_names(cat: Catalog) -> list[str]:
    """Every spelling of a target the daemon's catalog takes: its names, the
    aliases that lead to one, each also as a Docker platform (linux/...)."""
    names = [*cat.names(), *(a for a in sorted(ALIASES) if cat.find(a) is not None)]
    return [*names, *(f"linux/{n}" for n in names)]


def _takes_empty(model: type[BaseModel]) -> bool:
    """Whether the model accepts {}: then a request may leave the body out."""
    try:
        model.model_validate({})
    except ValidationError:
        return False
    return True


def document(cat: Catalog | None = None) -> dict[str, Any]:
    """OpenAPI 3.1, generated from the route table and the models; target
    names from the daemon's catalog."""
    models: set[type[BaseModel]] = {Problem}
    for r in ROUTES:
        models.update(m for m in (r.request, r.response) if m is not None)
    _, schemas = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    names = target_names(cat or catalog.builtin())
    for model in schemas["$defs"].values():  # every request that names targets
        targets = model.get("properties", {}).get("targets")
        if targets is None:
            continue
        optional = any(s.get("type") == "null" for s in targets.get("anyOf", []))
        for key in ("anyOf", "type", "items", "minItems", "maxItems"):
            targets.pop(key, None)
        targets["anyOf"] = [
            {"type": "array", "minItems": 0 if optional else 1, "maxItems": 64,
             "items": {"type": "string", "enum": names}},
            {"const": [ALL], "description": "every target of another family than the host's"},
            *([{"type": "null"}] if optional else []),
        ]  # fmt: skip
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "responses": {},
        }
        params = [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
        ] if "{name}" in r.path else []  # fmt: skip
        params += [
            {"name": q, "in": "query", "required": False,
             "schema": kind if isinstance(kind, dict) else {"type": kind},
             "description": about}
            for q, kind, about in r.query
        ]  # fmt: skip
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {
                "required": not _takes_empty(r.request),
                "content": {"application/json": {"schema": _ref(r.request)}},
            }
        if r.response is not None:
            schema: dict[str, Any] = _ref(r.response)
            if r.many:
                schema = {"type": "array", "items": schema}
            op["responses"][str(r.status)] = {
                "description": r.summary,
                "content": {r.media: {"schema": schema}},
            }
        elif r.status == 204:
            op["responses"][str(r.status)] = {"description": r.summary}
        else:  # a document of its own (this one), or text (the metrics)
            free = {"type": "object"} if r.media == "application/json" else {"type": "string"}
            op["responses"][str(r.status)] = {
                "description": r.summary,
                "content": {r.media.split(";")[0]: {"schema": free}},
            }
        for code in (*r.errors, 500):
            op["responses"][str(code)] = {
                "description": "problem details",
                "content": {PROBLEM_JSON: {"schema": problem_ref}},
            }
        for code, headers in HEADERS.items():
            if str(code) in op["responses"]:
                op["responses"][str(code)]["headers"] = headers
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "qusd", "version": __version__,
                 "description": "QEMU user-mode binfmt_misc registrations, over a Unix socket"},
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {})},
    }  # fmt: skip


@functools.cache
def document_json(cat: Catalog | None = None) -> str:
    return json.dumps(document(cat))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}
