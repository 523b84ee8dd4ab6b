"""The OpenAPI 3.1 document, generated from the route table and the pydantic
models, built once on first request (not at start: it costs milliseconds
the boot path does not need)."""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from qusd import __version__
from qusd.api import ROUTES
from qusd.middleware import PROBLEM_JSON
from qusd.models import Problem


def document() -> dict[str, Any]:
    """OpenAPI 3.1, generated from the route table and the models."""
    models: set[type[BaseModel]] = {Problem}
    for r in ROUTES:
        models.update(m for m in (r.request, r.response) if m is not None)
    _, schemas = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
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
            {"name": q, "in": "query", "required": False, "schema": {"type": kind},
             "description": about}
            for q, kind, about in r.query
        ]  # fmt: skip
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {
                "required": False,
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
        else:
            op["responses"][str(r.status)] = {"description": r.summary}
        for code in (*r.errors, 500):
            op["responses"][str(code)] = {
                "description": "problem details",
                "content": {PROBLEM_JSON: {"schema": problem_ref}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "qusd", "version": __version__,
                 "description": "QEMU user-mode binfmt_misc registrations, over a Unix socket"},
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {})},
    }  # fmt: skip


@functools.cache
def document_json() -> str:
    return json.dumps(document())


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}
