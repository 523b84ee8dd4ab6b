"""The HTTP API (version 1): handlers and the route table, a thin shell over
the service.

Each route declares its request model (the body is parsed and validated
before the handler runs), its response, its error statuses, and which
entry names it touches (for the audit line). Service calls that change the
table run with the table lock held, one at a time.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import quote

from aiohttp import web

from qusd import feed, stream, views
from qusd.binfmt import printable
from qusd.config import Config
from qusd.errors import (
    ClientGoneError,
    ForbiddenError,
    MalformedRequestError,
    RequestTimeoutError,
    RequestValidationError,
    UnsupportedMediaTypeError,
)
from qusd.memo import PerObject
from qusd.metrics import CONTENT_TYPE, METRICS, Metrics, measure
from qusd.middleware import (
    BUCKETS,
    CALLER_OF,
    CONFIG,
    NAMES,
    READ_BUCKETS,
    SERVICE,
    CallerOf,
    audit,
    caller,
    errors,
    limits,
    peer,
)
from qusd.policy import RateLimiter, Role
from qusd.repair import Reconciler, in_thread
from qusd.service import Overrides, RegisterResult, Registration, Service, Snapshot

if TYPE_CHECKING:
    from pydantic import BaseModel

    from qusd.models import (
        EnableRequest,
        ImportRequest,
        InstallRequest,
        RegisterRequest,
        ResetRequest,
        VerifyRequest,
    )

MAX_BODY = 64 * 1024

P = ParamSpec("P")
T = TypeVar("T")

#: one table change at a time: the service is synchronous, the lock is ours
LOCK: web.AppKey[asyncio.Lock] = web.AppKey("lock", asyncio.Lock)
#: runs reconciles: on demand, on SIGHUP, when the watcher sees a change
RECONCILER: web.AppKey[Reconciler] = web.AppKey("reconciler", Reconciler)
#: the open event streams, ended when the daemon stops
STREAMS: web.AppKey[set[stream.Listener]] = web.AppKey("streams")
#: one verify at a time: each runs a process per target
VERIFYING: web.AppKey[asyncio.Semaphore] = web.AppKey("verifying", asyncio.Semaphore)


async def locked(request: web.Request, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
    """Call the service with the table lock held, in a worker thread: the
    event loop goes on serving reads meanwhile (qusd.repair.in_thread)."""
    async with request.app[LOCK]:
        return await in_thread(request.app[SERVICE], fn, *args, **kw)


class Listing:
    """The body of GET /v1/registrations, made again only when the table
    as qusd sees it changed (Service.snapshot), and then only for the
    entries that changed."""

    def __init__(self) -> None:
        self._of: tuple[Registration, ...] | None = None
        self._body = b"[]"
        #: each registration's JSON (Service.snapshot keeps the same object
        #: for an entry that did not change)
        self._parts = PerObject(views.registration)

    def body(self, snap: Snapshot) -> bytes:
        if snap.registrations is not self._of:
            self._body = b"[" + b",".join(self._parts(snap.registrations)) + b"]"
            self._of = snap.registrations
        return self._body


#: the registrations' listing, kept
LISTING: web.AppKey[Listing] = web.AppKey("listing", Listing)


async def read_body(request: web.Request, model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body; an empty body counts as {}. Bodies
    come as they are: no Content-Encoding (the server decodes none)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaTypeError(
            f"the body comes with Content-Encoding {printable(encoding)!r}: send the body "
            "without Content-Encoding (plain JSON)",
            accept_encoding="identity",
        )
    timeout = request.app[CONFIG].body_timeout
    try:
        # aiohttp refuses more than client_max_size with 413
        raw = await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise RequestTimeoutError(f"the body did not arrive within {timeout:g} s") from None
    except ConnectionError:
        raise ClientGoneError("the client went away before its body arrived") from None
    if not raw.strip():
        raw = b"{}"
    elif request.content_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"the body is {request.content_type or 'untyped'}; send it as application/json"
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedRequestError(f"the body is not JSON: {e}") from None
    except RecursionError:
        raise MalformedRequestError("the body is nested too deeply") from None
    return model.model_validate(data, context={"catalog": request.app[SERVICE].catalog})


def models() -> Any:
    """qusd.models: pydantic and the API's models, loaded on first use (the
    answers clients poll are written without them: qusd.views)."""
    from qusd import models  # noqa: PLC0415

    return models


def reply(model: BaseModel | list[Any], status: int = 200) -> web.Response:
    if isinstance(model, list):
        text = "[" + ",".join(m.model_dump_json() for m in model) + "]"
    else:
        text = model.model_dump_json()
    return web.Response(status=status, text=text, content_type="application/json")


def created(result: RegisterResult) -> web.Response:
    """201 with what was registered, and Location: the entry made, or (none
    or several) the collection."""
    made = [printable(r.entry.name) for r in result.registered]
    one = f"/{quote(made[0], safe='')}" if len(made) == 1 else ""
    m = models()
    response = reply(
        m.RegisterResponse(
            registered=[m.RegistrationOut.of(r) for r in result.registered],
            unchanged=[m.RegistrationOut.of(r) for r in result.unchanged],
        ),
        status=201,
    )
    response.headers["Location"] = f"/v1/registrations{one}"
    return response


# -- handlers: (request, validated body or None) -> response ---------------------


def json_response(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json", charset="utf-8")


async def health(request: web.Request, _: None) -> web.Response:
    return json_response(views.HEALTH)


async def status(request: web.Request, _: None) -> web.Response:
    return json_response(views.status(request.app[SERVICE].status()))


async def targets(request: web.Request, _: None) -> web.Response:
    # the first call finds what the host runs natively: probes, off the loop
    infos = await asyncio.to_thread(request.app[SERVICE].targets)
    return reply([models().TargetOut.of(t) for t in infos])


async def list_registrations(request: web.Request, _: None) -> web.Response:
    return json_response(request.app[LISTING].body(request.app[SERVICE].snapshot(settled=True)))


async def get_registration(request: web.Request, _: None) -> web.Response:
    reg = request.app[SERVICE].registration(request.match_info["name"])
    return json_response(views.registration(reg))


async def register(request: web.Request, req: RegisterRequest) -> web.Response:
    svc, who = request.app[SERVICE], caller(request)
    overrides = Overrides(req.force, req.allow_untrusted_interpreter)
    await asyncio.to_thread(svc.native)  # probes, once, off the loop: the checks follow them
    if req.entry is not None:
        result = await locked(request, svc.register_entry, who, req.entry.rule(),
                              persistent=req.persistent, replace_existing=req.replace,
                              overrides=overrides)  # fmt: skip
    else:
        flags = req.flags if req.flags is not None else "F"
        result = await locked(request, svc.register_targets, who, req.targets, flags,
                              persistent=req.persistent, replace_existing=req.replace,
                              overrides=overrides)  # fmt: skip
    return created(result)


async def patch_registration(request: web.Request, req: EnableRequest) -> web.Response:
    svc, name = request.app[SERVICE], request.match_info["name"]
    reg = await locked(request, svc.set_enabled, caller(request), name, req.enabled)
    return json_response(views.registration(reg))


async def delete_registration(request: web.Request, _: None) -> web.Response:
    svc, name = request.app[SERVICE], request.match_info["name"]
    await locked(request, svc.unregister, caller(request), name)
    return web.Response(status=204)


async def reset(request: web.Request, req: ResetRequest) -> web.Response:
    removed = await locked(request, request.app[SERVICE].reset, caller(request), req.scope)
    return reply(models().ResetResponse(removed=[printable(n) for n in removed]))


async def import_entries(request: web.Request, req: ImportRequest) -> web.Response:
    svc = request.app[SERVICE]
    overrides = Overrides(req.force, req.allow_untrusted_interpreter)
    result = await locked(request, svc.register_entries, caller(request),
                          [e.rule() for e in req.entries], persistent=req.persistent,
                          replace_existing=req.replace, overrides=overrides)  # fmt: skip
    return created(result)


async def reconcile(request: web.Request, _: None) -> web.Response:
    svc, who = request.app[SERVICE], caller(request)
    if svc.policy.role(who) is not Role.ADMIN:
        raise ForbiddenError("reconcile is admin-only (qusd reconciles by itself on changes)")
    report = await request.app[RECONCILER].once(["request"], actor=who.uid)
    return reply(
        models().ReconcileResponse(
            restored=report.restored, adopted=report.adopted, conflicts=report.conflicts,
            failed=report.failed, dropped=report.dropped, updated=report.updated,
            repaired=report.repaired, summary=report.summary(),
        )
    )  # fmt: skip


def _query_number(request: web.Request, name: str, lo: float, hi: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:
        raise RequestValidationError(f"must be a number from {lo:g} to {hi:g}", field=name)
    return value


async def events(request: web.Request, _: None) -> web.StreamResponse:
    """Newline-delimited JSON, one event a line, until the client leaves."""
    svc = request.app[SERVICE]
    since = _query_number(request, "since", 0, 2**63)
    keepalive = _query_number(request, "keepalive", *stream.KEEPALIVE_RANGE) or stream.KEEPALIVE
    ring = feed.ring(svc.events)
    listener = stream.Listener(svc.events, request.transport)  # before the replay: no gap
    streams = request.app[STREAMS]
    streams.add(listener)
    resp = web.StreamResponse(headers={"Content-Type": stream.NDJSON, "Cache-Control": "no-store"})
    try:
        await resp.prepare(request)
        if since is not None:
            backlog = ring.since(int(since))
            now = time.time()
            if backlog.restarted:
                await resp.write(stream.line(stream.meta_doc(
                    "lost", f"the daemon restarted since event {int(since)}; its events now "
                    f"start again at 1", now, lost=None)))  # fmt: skip
            if backlog.lost:
                await resp.write(stream.line(stream.meta_doc(
                    "lost", f"{backlog.lost} event(s) after {int(since)} are no longer held "
                    f"(the daemon keeps the last {feed.RING_SIZE})", now,
                    lost=backlog.lost)))  # fmt: skip
            for old in backlog.events:
                await resp.write(stream.line(stream.event_doc(old)))
        while not listener.done:
            ev = await listener.next(keepalive)
            if ev is not None:
                await resp.write(stream.line(stream.event_doc(ev)))
            elif not listener.done:
                await resp.write(stream.line(stream.meta_doc("keep-alive", "", time.time())))
    except (ConnectionError, asyncio.CancelledError):
        pass  # the client left, or was cut off
    finally:
        listener.close()
        streams.discard(listener)
    return resp


async def _end_streams(app: web.Application) -> None:
    """The daemon stops: every stream ends (clients see the end of the body)."""
    streams: set[stream.Listener] = app[STREAMS]
    for listener in list(streams):
        listener.end()


async def verify(request: web.Request, req: VerifyRequest) -> web.Response:
    svc = request.app[SERVICE]
    async with request.app[VERIFYING]:
        checks = await asyncio.to_thread(svc.verify, req.targets)
    m = models()
    results = [m.VerifyResult.of(c) for c in checks]
    return reply(m.VerifyResponse(ok=all(r.ok for r in results), results=results))


async def list_interpreters(request: web.Request, _: None) -> web.Response:
    svc = request.app[SERVICE]
    provisioned, fixed = svc.interpreters()
    m = models()
    return reply(
        m.InterpretersOut(
            store=svc.config.interpreter_store or None,
            provisioned=[m.ProvisionedOut.of(i) for i in provisioned],
            fixed=[m.FixedOut.of(n, f) for n, f in sorted(fixed.items())],
        )
    )


async def install_interpreters(request: web.Request, req: InstallRequest) -> web.Response:
    svc = request.app[SERVICE]
    done = await asyncio.to_thread(svc.install_interpreters, caller(request), req.targets, req.deb)
    m = models()
    response = reply(m.InstallResponse(installed=[m.ProvisionedOut.of(i) for i in done]),
                     status=201)  # fmt: skip
    response.headers["Location"] = "/v1/interpreters"
    return response


async def metrics(request: web.Request, _: None) -> web.Response:
    svc = request.app[SERVICE]
    if "prometheus_client" not in sys.modules:  # the first scrape: loaded off the loop
        await asyncio.to_thread(importlib.import_module, "prometheus_client")
    mounted = svc.kernel.is_mounted()
    regs = svc.snapshot(settled=True).registrations if mounted else None
    text = request.app[METRICS].render(regs)
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request, _: None) -> web.Response:
    from qusd import openapi as doc  # noqa: PLC0415 - built on first request, not at start

    text = doc.document_json(request.app[SERVICE].catalog)
    return web.Response(text=text, content_type="application/json")


# -- what each route audits ----------------------------------------------------------


def _path_name(request: web.Request, _: Any) -> list[str]:
    return [request.match_info["name"]]


def _register_names(request: web.Request, req: RegisterRequest | None) -> list[str]:
    if req is None:
        return []
    if req.entry is not None:
        return [req.entry.name]
    return req.targets or ["(all foreign)"]


def _targets(request: web.Request, req: VerifyRequest | InstallRequest | None) -> list[str]:
    return list(req.targets or ["(registered)"]) if req is not None else []


def _reset_scope(request: web.Request, req: ResetRequest | None) -> list[str]:
    return [f"scope={req.scope}"] if req is not None else []


def _import_names(request: web.Request, req: ImportRequest | None) -> list[str]:
    return [e.name for e in req.entries] if req is not None else []


def _nothing(request: web.Request, _: Any) -> list[str]:
    return []


# -- the route table: the one source of routes and of the OpenAPI document ----------


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[web.Request, Any], Awaitable[web.StreamResponse]]
    summary: str
    #: the request body's model and the response's, by their names in
    #: qusd.models (loaded when first used: see request and response)
    request_model: str | None = None
    response_model: str | None = None
    many: bool = False
    status: int = 200
    errors: tuple[int, ...] = ()
    #: the entry names a request touches, for the audit line (the body is
    #: None when it was refused)
    audit: Callable[[web.Request, Any], Sequence[str]] | None = None
    #: the response's media type
    media: str = "application/json"
    #: query parameters: (name, JSON schema type or whole schema, description)
    query: tuple[tuple[str, str | dict[str, Any], str], ...] = ()

    @property
    def request(self) -> type[BaseModel] | None:
        """The request body's model (this loads pydantic and the models)."""
        return getattr(models(), self.request_model) if self.request_model else None

    @property
    def response(self) -> type[BaseModel] | None:
        """The response's model (this loads pydantic and the models)."""
        return getattr(models(), self.response_model) if self.response_model else None

    def bind(self) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The aiohttp handler: the path's names noted for the audit, the
        body validated into the route's model, then the handler."""

        async def handle(request: web.Request) -> web.StreamResponse:
            body = None
            try:
                model = self.request
                if model is not None:
                    body = await read_body(request, model)
            finally:  # a refused body is audited too, with what is known
                if self.audit is not None:
                    request[NAMES] = list(self.audit(request, body))
            return await self.handler(request, body)

        handle.__name__ = self.handler.__name__
        return handle


_CHANGE = (400, 403, 408, 413, 415, 422, 429, 503)
_READ = (429,)  # reads are rate limited per uid too

ROUTES = (
    Route("GET", "/v1/health", health, "Liveness", response_model="Health", errors=_READ),
    Route("GET", "/v1/status", status, "Daemon, kernel and table status",
          response_model="Status", errors=_READ),
    Route("GET", "/v1/targets", targets, "The target catalog", response_model="TargetOut",
          many=True, errors=_READ),
    Route("GET", "/v1/registrations", list_registrations, "Every entry in the kernel",
          response_model="RegistrationOut", many=True, errors=(*_READ, 503)),
    Route("GET", "/v1/registrations/{name}", get_registration, "One entry",
          response_model="RegistrationOut", errors=(404, *_READ, 503)),
    Route("POST", "/v1/registrations", register, "Register targets or a custom entry",
          request_model="RegisterRequest", response_model="RegisterResponse", status=201,
          errors=(*_CHANGE, 409), audit=_register_names),
    Route("PATCH", "/v1/registrations/{name}", patch_registration, "Enable or disable an entry",
          request_model="EnableRequest", response_model="RegistrationOut", errors=(*_CHANGE, 404),
          audit=_path_name),
    Route("DELETE", "/v1/registrations/{name}", delete_registration,
          "Remove an entry from the kernel and the state", status=204,
          errors=(403, 404, 429, 503), audit=_path_name),
    Route("POST", "/v1/reset", reset, "Remove managed, qemu-* or all entries",
          request_model="ResetRequest", response_model="ResetResponse", errors=_CHANGE,
          audit=_reset_scope),
    Route("POST", "/v1/import", import_entries,
          "Register custom rules (from binfmt.d or update-binfmts files), all or none",
          request_model="ImportRequest", response_model="RegisterResponse", status=201,
          errors=(*_CHANGE, 409), audit=_import_names),
    Route("POST", "/v1/reconcile", reconcile,
          "Reconcile now: restore, repair status and mount, follow upgraded interpreters",
          response_model="ReconcileResponse", errors=(403, 429), audit=_nothing),
    Route("GET", "/v1/events", events,
          "Every change, streamed as newline-delimited JSON while connected",
          response_model="EventOut", media=stream.NDJSON, errors=(422, *_READ),
          query=(("since", {"type": "integer", "minimum": 0, "maximum": 2**63},
                  "replay the events after this sequence number that the "
                  "daemon still holds (a 'lost' line says how many it does not)"),
                 ("keepalive", {"type": "number", "minimum": stream.KEEPALIVE_RANGE[0],
                                "maximum": stream.KEEPALIVE_RANGE[1]},
                  "seconds between keep-alive lines on an idle stream "
                  f"(default {stream.KEEPALIVE:g})"))),
    Route("POST", "/v1/verify", verify,
          "Run each registered target's built-in program through the kernel (readers may)",
          request_model="VerifyRequest", response_model="VerifyResponse",
          errors=(400, 408, 413, 415, 422, 429, 503), audit=_targets),
    Route("GET", "/v1/interpreters", list_interpreters,
          "Provisioned interpreters, and the files F entries hold",
          response_model="InterpretersOut", errors=_READ),
    Route("POST", "/v1/interpreters", install_interpreters,
          "Extract interpreters from a qemu-user-static package (admins)",
          request_model="InstallRequest", response_model="InstallResponse", status=201,
          errors=_CHANGE, audit=_targets),
    Route("GET", "/metrics", metrics, "Prometheus metrics (text format); anyone may scrape",
          media=CONTENT_TYPE, errors=_READ),
    Route("GET", "/openapi.json", openapi, "This document (OpenAPI 3.1)", errors=_READ),
)  # fmt: skip


async def _unsubscribe(metrics: Metrics) -> None:
    metrics.unsubscribe()


async def _bind_events(app: web.Application) -> None:
    """Changes run in worker threads (repair.in_thread): their events reach
    the subscribers (streams, metrics) through this loop, in order."""
    app[SERVICE].events.bind(asyncio.get_running_loop())


def make_app(
    service: Service, config: Config | None = None, caller_of: CallerOf = peer
) -> web.Application:
    """The application; caller_of says who is asking (the kernel's peer
    credentials; the in-process tests give their own)."""
    config = config or service.config
    app = web.Application(middlewares=[measure, audit, errors, limits], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[CONFIG] = config
    app[BUCKETS] = RateLimiter(config.rate_limit, config.rate_burst)
    app[READ_BUCKETS] = RateLimiter(config.read_rate_limit, config.read_rate_burst)
    app[CALLER_OF] = caller_of
    app[LOCK] = asyncio.Lock()
    app[METRICS] = Metrics(service)
    app.on_startup.append(_bind_events)
    app.on_cleanup.append(lambda app: _unsubscribe(app[METRICS]))
    app[RECONCILER] = Reconciler(service, app[LOCK], config.reconcile_interval)
    app[STREAMS] = set[stream.Listener]()
    app[LISTING] = Listing()
    feed.ring(service.events)  # from now on (the daemon attached it before the restore)
    app.on_shutdown.append(_end_streams)
    app[VERIFYING] = asyncio.Semaphore(1)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.bind())
    return app
