"""GET /metrics: the daemon in Prometheus' text format, with the official
prometheus_client library, one registry per application.

What is counted: the registrations in the kernel by state (at scrape time),
every event the service emits by kind, repairs (a removed entry restored,
a name taken back) and conflicts (found at restore, or answered 409) by
kind, requests by route and status with their latency, refusals (403, 429)
by the rule's code, and how long the restore at start took. Imported only
by the API (after the restore): prometheus_client stays off the boot path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from qusd.events import Event
from qusd.service import Registration, Service

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: answers that are refusals: the access policy (403) and the rate limit (429)
REFUSALS = (403, 429)


class Metrics:
    """The application's metrics; fed by the service's events and by the
    request middleware, read by GET /metrics."""

    def __init__(self, service: Service) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.registrations = Gauge(
            "qusd_registrations", "binfmt_misc entries in the kernel, by state",
            ["state", "qusd"], registry=r,
        )  # fmt: skip
        self.mounted = Gauge("qusd_binfmt_misc_mounted", "1 when binfmt_misc is mounted",
                             registry=r)  # fmt: skip
        self.events = Counter("qusd_events", "events the service emitted, by kind", ["kind"],
                              registry=r)  # fmt: skip
        self.repairs = Counter(
            "qusd_repairs", "what qusd put back on its own, by kind: restored (an entry was "
            "gone), taken_back (another definition had replaced it), interpreter_updated (its "
            "file was upgraded), binfmt_misc (unmounted or disabled)", ["kind"], registry=r,
        )  # fmt: skip
        self.conflicts = Counter(
            "qusd_conflicts", "names held by another definition, by where they were met: "
            "restore (left alone) or request (409)", ["kind"], registry=r,
        )  # fmt: skip
        self.requests = Counter("qusd_http_requests", "API requests, by route and status",
                                ["method", "route", "status"], registry=r)  # fmt: skip
        self.latency = Histogram(
            "qusd_http_request_duration_seconds", "API request latency, by route",
            ["method", "route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )  # fmt: skip
        self.refusals = Counter("qusd_refusals", "requests refused, by the rule's code",
                                ["code"], registry=r)  # fmt: skip
        self.restore = Gauge("qusd_restore_duration_seconds",
                             "how long the restore at start took", registry=r)  # fmt: skip
        seconds = getattr(service, "restore_seconds", None)  # set by qusd.daemon
        if seconds is not None:
            self.restore.set(seconds)
        self.unsubscribe: Callable[[], None] = service.events.subscribe(self.event)

    def event(self, ev: Event) -> None:
        self.events.labels(ev.kind).inc()
        if ev.kind == "restored":
            if ev.message.startswith("took back"):
                self.repairs.labels("taken_back").inc()
            else:  # an entry; or, naming none, binfmt_misc itself (mounted, enabled)
                self.repairs.labels("restored" if ev.names else "binfmt_misc").inc()
        elif ev.kind == "interpreter-updated":
            self.repairs.labels("interpreter_updated").inc(max(1, len(ev.names)))
        elif ev.kind == "conflict":
            self.conflicts.labels("restore").inc()

    def observe(self, request: web.Request, response: web.StreamResponse, seconds: float) -> None:
        """One answered request."""
        info = request.match_info
        route = info.route.resource.canonical if info.route.resource else "unmatched"
        method = request.method if info.route.resource else "-"
        self.requests.labels(method, route, str(response.status)).inc()
        self.latency.labels(method, route).observe(seconds)
        if response.status == 409:
            self.conflicts.labels("request").inc()
        if response.status in REFUSALS:
            self.refusals.labels(_code(response)).inc()

    def render(self, registrations: Sequence[Registration] | None) -> bytes:
        """The text format; registrations None: binfmt_misc is not mounted."""
        self.mounted.set(registrations is not None)
        self.registrations.clear()
        for state in ("enabled", "disabled"):
            for owner in ("persistent", "managed", "other"):
                self.registrations.labels(state, owner).set(0)
        for reg in registrations or ():
            owner = "persistent" if reg.persistent else "managed" if reg.managed else "other"
            self.registrations.labels("enabled" if reg.entry.enabled else "disabled",
                                      owner).inc()  # fmt: skip
        return generate_latest(self.registry)


def _code(response: web.StreamResponse) -> str:
    """The problem's stable code, from its body."""
    body = getattr(response, "body", None)
    try:
        code = json.loads(body)["code"] if isinstance(body, bytes) else None
    except (ValueError, KeyError, TypeError):
        code = None
    return str(code) if code else str(response.status)


#: the text format's media type, as prometheus_client writes it
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: the application's metrics
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


@web.middleware
async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer counted, by route and status, with its latency."""
    start = time.perf_counter()
    response = await handler(request)
    request.app[METRICS].observe(request, response, time.perf_counter() - start)
    return response
