"""What every request passes through, one concern per middleware:

- `audit` (outermost): one audit line for every mutation, whatever its outcome;
- `errors`: the one place an exception becomes a response (problem+json);
- `limits` (innermost): the connection guard's bookkeeping and the per-uid
  rate limit.

And the caller: who is asking, from the kernel's peer credentials.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from pydantic import ValidationError

from qusd.config import Config
from qusd.errors import (
    InternalError,
    MalformedRequestError,
    MethodNotAllowedError,
    NoSuchEntryError,
    QusdError,
    RateLimitedError,
    RequestTimeoutError,
    RequestValidationError,
    TooLargeError,
    error_class,
)
from qusd.events import journal_fields
from qusd.models import Problem, printable
from qusd.policy import Caller, RateLimiter, Role
from qusd.service import Service

log = logging.getLogger("qusd.api")
audit_log = logging.getLogger("qusd.audit")

PROBLEM_JSON = "application/problem+json"
MUTATING = frozenset({"POST", "PATCH", "DELETE"})
NOBODY = Caller(uid=-1, gid=-1, pid=0)  # no peer credentials: may only read

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CallerOf = Callable[[web.Request], Caller]


class Guard(Protocol):
    """The server's connection guard: told when a connection's request arrived."""

    def started(self, request: web.BaseRequest) -> None: ...


SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
BUCKETS: web.AppKey[RateLimiter] = web.AppKey("buckets", RateLimiter)
CALLER_OF: web.AppKey[CallerOf] = web.AppKey("caller_of")
GUARD: web.AppKey[Guard] = web.AppKey("guard", Guard)
#: who is asking, looked up once per request
CALLER: web.RequestKey[Caller] = web.RequestKey("caller", Caller)
#: the entry names a request touches, for its audit line
NAMES: web.RequestKey[list[str]] = web.RequestKey("names", list)

#: HTTP errors aiohttp raises itself, as qusd's errors
_HTTP_ERRORS: dict[int, type[QusdError]] = {
    400: MalformedRequestError,
    404: NoSuchEntryError,
    405: MethodNotAllowedError,
    413: TooLargeError,
}


def peer(request: web.Request) -> Caller:
    """The peer, from the kernel (SO_PEERCRED), never from anything it says."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    try:
        return Caller.of_socket(sock) if sock is not None else NOBODY
    except OSError:
        return NOBODY


def caller(request: web.Request) -> Caller:
    """Who is asking (looked up once per request)."""
    found = request.get(CALLER)
    if found is None:
        found = request[CALLER] = request.app[CALLER_OF](request)
    return found


def problem_response(err: QusdError, **extra: Any) -> web.Response:
    body = {**err.problem(), **extra}
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, RateLimitedError) else None
    text = Problem.model_validate(body).model_dump_json(exclude_none=True)
    resp = web.Response(status=err.http_status, text=text, content_type=PROBLEM_JSON,
                        headers=headers)  # fmt: skip
    if isinstance(err, RequestTimeoutError):
        resp.force_close()  # the client is stalled: do not wait for the rest
    return resp


@web.middleware
async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every mutation leaves an audit line: who, what, which names, the result."""
    response = await handler(request)
    if request.method in MUTATING:
        who = caller(request)
        audit_log.info(
            "audit: uid=%d pid=%d exe=%s action=%s %s names=%s result=%d",
            who.uid, who.pid, escaped(who.exe() or "?"), request.method, request.raw_path,
            escaped(",".join(request.get(NAMES, [])) or "-"), response.status,
            extra=journal_fields("refused") if response.status == 403 else None,
        )  # fmt: skip
    return response


def escaped(text: str) -> str:
    """One audit record is one line: control characters (and backslashes)
    escaped, so no request can forge a record."""
    return "".join(
        c
        if c.isprintable() and c != "\\"
        else c.encode("unicode_escape", "backslashreplace").decode()
        for c in printable(text)
    )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become responses: problem+json with a stable code."""
    try:
        return await handler(request)
    except QusdError as e:
        return problem_response(e)
    except ValidationError as e:
        fields = [
            {"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]}
            for e_ in e.errors(include_url=False, include_input=False)
        ]
        detail = "; ".join(
            f"{'.'.join(map(str, f['loc'][1:])) or 'body'}: {f['msg']}" for f in fields
        )
        return problem_response(RequestValidationError(detail), errors=fields)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = _HTTP_ERRORS.get(e.status) or error_class("")
        resp = problem_response(kind(e.text or e.reason))
        for header in ("Allow",):
            if header in e.headers:
                resp.headers[header] = e.headers[header]
        return resp
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return problem_response(InternalError("internal error; see the daemon's log"))


@web.middleware
async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The connection guard learns that a request arrived; mutations are
    rate limited per uid."""
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.started(request)
    if request.method in MUTATING:
        _rate_limit(request)
    return await handler(request)


def _rate_limit(request: web.Request) -> None:
    cfg, who = request.app[CONFIG], caller(request)
    if request.app[SERVICE].policy.role(who) is Role.ADMIN and not cfg.rate_limit_admins:
        return
    wait = request.app[BUCKETS].take(who.uid)
    if wait > 0:
        raise RateLimitedError(
            f"uid {who.uid} sent more than {cfg.rate_burst} changes in a burst "
            f"(at most {cfg.rate_limit:g} a second); retry in {math.ceil(wait)} s",
            retry_after=math.ceil(wait),
        )
