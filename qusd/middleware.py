"""What every request passes through, one concern per middleware:

- `audit` (outermost): one audit record for every mutation, whatever its
  outcome: key="value" pairs on one line (every value quoted and escaped,
  so no request can forge a field or a line), and QUSD_* journal fields;
- `errors`: the one place an exception becomes a response (problem+json);
  a client that went away is logged as such, not as a failure;
- `limits` (innermost): the connection guard's bookkeeping and the per-uid
  rate limits, one for changes and one for reads.

And the caller: who is asking, from the kernel's peer credentials.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from qusd import views
from qusd.binfmt import printable
from qusd.config import Config
from qusd.errors import (
    BadRequestError,
    ClientGoneError,
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
READ_BUCKETS: web.AppKey[RateLimiter] = web.AppKey("read_buckets", RateLimiter)
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
    """The peer, from the kernel (SO_PEERCRED), never from anything it says:
    read once, when the connection guard admitted the connection."""
    known = getattr(request.protocol, "peer", None)
    if isinstance(known, Caller):
        return known
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
    for key in ("detail", "reason"):  # text from the kernel may carry any bytes
        if isinstance(body.get(key), str):
            body[key] = printable(body[key])
    headers = {}
    if isinstance(err, RateLimitedError):
        headers["Retry-After"] = str(err.retry_after)
    if "accept_encoding" in err.details:  # RFC 7694: the codings a 415 would take
        headers["Accept-Encoding"] = str(err.details["accept_encoding"])
    text = views.problem(body)
    resp = web.Response(status=err.http_status, text=text, content_type=PROBLEM_JSON,
                        headers=headers)  # fmt: skip
    if isinstance(err, RequestTimeoutError):
        resp.force_close()  # the client is stalled: do not wait for the rest
    return resp


@web.middleware
async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every mutation leaves an audit record: who, what, which names, the result."""
    response = await handler(request)
    if request.method in MUTATING:
        who = caller(request)
        result = "client-gone" if response.status == ClientGoneError.http_status else None
        fields = {
            "uid": str(who.uid),
            "pid": str(who.pid),
            "exe": who.exe() or "?",
            "action": f"{request.method} {request.raw_path}",
            "names": ",".join(request.get(NAMES, [])) or "-",
            "result": result or str(response.status),
        }
        journal = {f"QUSD_{k.upper()}": printable(v) for k, v in fields.items()}
        if response.status == 403:
            journal.update(journal_fields("refused"))
        audit_log.info("audit: %s", record(fields), extra=journal)
    return response


def quoted(text: str) -> str:
    """A value for a record: in double quotes, with quotes, backslashes and
    every character that is not printable (newlines, escapes, NEL, line
    separators) escaped as in JSON, so a value can neither end early nor
    start a line. Bytes that are not UTF-8 show as \\xHH first."""
    body = "".join(
        c if c.isprintable() and c not in '"\\' else json.dumps(c)[1:-1] for c in printable(text)
    )
    return f'"{body}"'


def record(fields: Mapping[str, str]) -> str:
    """key="value" pairs: one line, each value in its own quotes."""
    return " ".join(f"{k}={quoted(v)}" for k, v in fields.items())


def escaped(text: str) -> str:
    """Text on one line: control characters (and backslashes) escaped, so
    nothing a client sends can start a line of its own."""
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
    except ClientGoneError as e:
        return _gone(request, e)
    except QusdError as e:
        return problem_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = _HTTP_ERRORS.get(e.status) or error_class("")
        resp = problem_response(kind(e.text or e.reason))
        for header in ("Allow",):
            if header in e.headers:
                resp.headers[header] = e.headers[header]
        return resp
    except RequestPayloadError as e:
        err = BadRequestError("the request's body is malformed (its framing: chunks or length)")
        log_bad_request(caller(request), err, e)
        resp = problem_response(err)
        resp.force_close()  # where this request ends is unknown
        return resp
    except ConnectionError:
        return _gone(request, ClientGoneError("the client went away before its request was read"))
    except Exception as e:
        if _is_validation_error(e):
            return _validation_problem(e)
        log.error("internal error on %s %s: %s", request.method, escaped(request.raw_path),
                  escaped(f"{type(e).__name__}: {e}"))  # fmt: skip
        log.debug("the traceback of that internal error", exc_info=e)
        return problem_response(InternalError("internal error; see the daemon's log"))


def _is_validation_error(e: Exception) -> bool:
    """Whether e is pydantic's ValidationError (pydantic is loaded only when
    a request body is validated: until then no such error can be raised)."""
    core = sys.modules.get("pydantic_core")
    return core is not None and isinstance(e, core.ValidationError)


def _validation_problem(e: Any) -> web.Response:
    """A body the request's model refused: 422, each field's error."""
    fields = [
        {"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]}
        for e_ in e.errors(include_url=False, include_input=False)
    ]
    detail = "; ".join(f"{'.'.join(map(str, f['loc'][1:])) or 'body'}: {f['msg']}" for f in fields)
    return problem_response(RequestValidationError(detail), errors=fields)


def _gone(request: web.Request, err: ClientGoneError) -> web.Response:
    """Nobody is left to answer: one log line, and a 499 for the audit."""
    who = caller(request)
    log.info("uid %d (pid %d) went away during %s %s: %s", who.uid, who.pid, request.method,
             escaped(request.raw_path), err.message)  # fmt: skip
    resp = problem_response(err)
    resp.force_close()
    return resp


def log_bad_request(who: Caller | None, err: QusdError, exc: BaseException | None) -> None:
    """What the HTTP layer refused, on one line, the client's bytes escaped."""
    said = escaped(str(exc))[:200] if exc is not None else ""
    log.warning("bad HTTP request from uid %s (pid %s): %s%s",
                who.uid if who else "?", who.pid if who else "?", err.reason,
                f" ({said})" if said else "")  # fmt: skip


@web.middleware
async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The connection guard learns that a request arrived; changes and reads
    are rate limited per uid, each with its own bucket."""
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.started(request)
    if request.method in MUTATING:
        _rate_limit(request, BUCKETS, "changes", "rate_limit", "rate_burst")
    else:
        _rate_limit(request, READ_BUCKETS, "reads", "read_rate_limit", "read_rate_burst")
    return await handler(request)


def _rate_limit(
    request: web.Request, key: web.AppKey[RateLimiter], what: str, rate: str, burst: str
) -> None:
    cfg, who = request.app[CONFIG], caller(request)
    buckets = request.app.get(key)
    if buckets is None:
        return
    if not cfg.rate_limit_admins and request.app[SERVICE].policy.role(who) is Role.ADMIN:
        return
    wait = buckets.take(who.uid)
    if wait > 0:
        raise RateLimitedError(
            f"uid {who.uid} sent more than {getattr(cfg, burst)} {what} in a burst "
            f"(at most {getattr(cfg, rate):g} a second); retry in {math.ceil(wait)} s",
            retry_after=math.ceil(wait),
        )
