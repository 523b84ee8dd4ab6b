"""The OpenAPI document is a contract the daemon keeps: schemathesis makes
requests from it (a short run, fixed seed) and sends them to a real daemon
over its Unix socket; every answer must conform (status, content type,
headers, body), none may be a server error, and a request the document
calls valid must be accepted, or refused only for the machine's state (an
existing entry, the caller's role, a missing interpreter), never as
invalid."""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from qusd.api import ROUTES
from qusd.stream import NDJSON
from tests.conftest import SANDBOX_REASON, Daemon

#: requests per operation: a short run, as make test can afford
EXAMPLES = 40
SEED = 15
#: the codes of a request refused before it reaches the service
VALIDATION = {"validation", "malformed-json", "unsupported-media-type", "too-large"}
#: an entry that is there when each request is made
KNOWN = "qemu-aarch64"


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.unix_path)
        self.sock = sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def _new_conn(self) -> urllib3.connection.HTTPConnection:
        return _UnixConnection(self.unix_path)


class UnixAdapter(requests.adapters.HTTPAdapter):
    """requests over a Unix socket: every URL goes to the daemon's socket."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.pool = _UnixPool(path)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
        return self.pool


def accepted_unless_the_machine_says_no(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' positive_data_acceptance, but for a missing or unusable
    interpreter (422, code "interpreter"): that is the machine's state (a
    path no one installed), not a request the document should have refused."""
    if response.status_code == 422 and response.json().get("code") == "interpreter":
        return None
    return positive_data_acceptance(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    accepted_unless_the_machine_says_no,
]


def unstatable(case: Any) -> None:
    """What JSON Schema cannot state, made so: a mask is as long as its
    magic, and the rules of one request have names of their own."""
    body = case.body if isinstance(case.body, dict) else {}
    entries = [body.get("entry"), *(body.get("entries") or [])]
    names: set[str] = set()
    for entry in (e for e in entries if isinstance(e, dict)):
        if entry.get("magic") and entry.get("mask"):
            magic, mask = entry["magic"], entry["mask"]
            entry["mask"] = (mask * len(magic))[: len(magic)]
        while entry.get("name") in names:
            entry["name"] = f"{entry['name']}~"[-255:]
        names.add(entry.get("name", ""))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    d = Daemon(tmp_path_factory.mktemp("contract"), "--reconcile-interval", "0")
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def schema(served: Daemon) -> Any:
    doc = served.client.get("/openapi.json")
    return schemathesis.openapi.from_dict(doc)


@pytest.fixture(scope="module")
def session(served: Daemon) -> Iterator[requests.Session]:
    s = requests.Session()
    s.mount("http://", UnixAdapter(served.socket))
    try:
        yield s
    finally:
        s.close()


def operations() -> list[str]:
    """Every route but the event stream, whose answer never ends (its
    parameters are declared with the bounds the daemon checks: below)."""
    return [f"{r.method} {r.path}" for r in ROUTES if r.media != NDJSON]


@pytest.mark.parametrize("operation", operations())
def test_the_daemon_keeps_the_documented_contract(
    operation: str, schema: Any, session: requests.Session, served: Daemon
) -> None:
    method, path = operation.split(" ", 1)
    op = schema[path][method]
    strategy = op.as_strategy()
    if "{name}" in path:  # random names find nothing: ask for an entry that exists too
        strategy = st.one_of(strategy, op.as_strategy(path_parameters={"name": KNOWN}))
    seen: Counter[str] = Counter()

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=strategy)
    def check(case: Any) -> None:
        served.client.request(
            "POST", "/v1/registrations", {"targets": ["aarch64"], "replace": True}
        )
        unstatable(case)
        response = case.call(base_url="http://localhost", session=session)
        code = response.json().get("code") if response.status_code >= 400 else None
        seen[code or str(response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    check()
    # the run reached the service, not only the validation in front of it
    assert set(seen) - VALIDATION, seen
    assert served.proc.poll() is None and served.probe()


def test_the_document_declares_what_the_server_sends(daemon: Daemon) -> None:
    """The headers and the requirements schemathesis cannot miss by chance."""
    served = daemon
    doc = served.client.get("/openapi.json")
    post = doc["paths"]["/v1/registrations"]["post"]
    assert post["responses"]["201"]["headers"]["Location"]["required"] is True
    assert post["responses"]["429"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    patch = doc["paths"]["/v1/registrations/{name}"]["patch"]
    assert patch["requestBody"]["required"] is True  # {} is refused: enabled is required
    assert post["requestBody"]["required"] is False  # {}: every foreign target
    entry = doc["components"]["schemas"]["EntrySpec"]["properties"]
    assert entry["flags"]["pattern"] == "^[POCF]*$"
    targets = doc["components"]["schemas"]["RegisterRequest"]["properties"]["targets"]["anyOf"]
    names = targets[0]["items"]["enum"]
    assert {"aarch64", "arm64", "linux/arm64", "linux/arm/v7", "s390x"} <= set(names)
    assert "all" not in names and targets[1] == {"const": ["all"], **targets[1]}
    stream = doc["paths"]["/v1/events"]["get"]["parameters"]
    assert {p["name"]: p["schema"] for p in stream} == {
        "since": {"type": "integer", "minimum": 0, "maximum": 2**63},
        "keepalive": {"type": "number", "minimum": 0.05, "maximum": 3600.0},
    }
    # and the server does what the document says: Location names what was made
    resp = requests_session_post(served, {"targets": ["linux/arm64"]})
    assert (resp.status_code, resp.headers["Location"]) == (201, "/v1/registrations/qemu-aarch64")
    assert resp.json()["registered"][0]["name"] == "qemu-aarch64"
    again = requests_session_post(served, {"targets": ["all"]})
    assert (again.status_code, again.headers["Location"]) == (201, "/v1/registrations")
    names_made = [r["name"] for r in again.json()["registered"]]
    assert len(names_made) > 20 and "qemu-aarch64" not in names_made  # unchanged, not made
    assert not re.search(r"\s", json.dumps(again.json()["unchanged"][0]["name"]))


def requests_session_post(d: Daemon, body: Any) -> requests.Response:
    with requests.Session() as s:
        s.mount("http://", UnixAdapter(d.socket))
        return s.post("http://localhost/v1/registrations", json=body, timeout=60)
