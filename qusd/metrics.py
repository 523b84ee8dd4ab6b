"""GET /metrics: the daemon in Prometheus' text format, with the official
prometheus_client library, one registry per application.

What is counted: the registrations in the kernel by state (at scrape time),
every event the service emits by kind, repairs (a removed entry restored,
a name taken back) and conflicts (found at restore, or answered 409) by
kind, requests by route and status with their latency, refusals (403, 429)
by the rule's code, and how long the restore at start took.

Counting is plain dictionaries, a few hundred nanoseconds a request;
prometheus_client (and the TLS stack its push client pulls in: 60 ms and
6 MiB) is loaded at the first scrape, and reads the counts through a
custom collector. It stays off the boot path, and off a daemon nobody
scrapes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from qusd.events import Event
from qusd.service import Registration, Service

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: answers that are refusals: the access policy (403) and the rate limit (429)
REFUSALS = (403, 429)
#: the latency histogram's buckets, seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
#: the text format's media type, as prometheus_client writes it (a unit
#: test holds it to prometheus_client.CONTENT_TYPE_LATEST)
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

#: (name, help, label names) of each counter
COUNTERS = {
    "events": ("qusd_events", "events the service emitted, by kind", ("kind",)),
    "repairs": (
        "qusd_repairs",
        "what qusd put back on its own, by kind: restored (an entry was gone), taken_back "
        "(another definition had replaced it), interpreter_updated (its file was upgraded), "
        "binfmt_misc (unmounted or disabled)",
        ("kind",),
    ),
    "conflicts": (
        "qusd_conflicts",
        "names held by another definition, by where they were met: restore (left alone) or "
        "request (409)",
        ("kind",),
    ),
    "requests": (
        "qusd_http_requests",
        "API requests, by route and status",
        ("method", "route", "status"),
    ),
    "refusals": ("qusd_refusals", "requests refused, by the rule's code", ("code",)),
}
LATENCY = ("qusd_http_request_duration_seconds", "API request latency, by route")


class _Count:
    """One labelled counter: its value and when it was first counted."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()


class _Latency:
    """One labelled histogram: per-bucket counts (not cumulative), sum."""

    __slots__ = ("buckets", "count", "created", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)
        self.count = 0
        self.sum = 0.0
        self.created = time.time()


class Metrics:
    """The application's metrics; fed by the service's events and by the
    request middleware, read by GET /metrics."""

    def __init__(self, service: Service) -> None:
        self.counts: dict[str, dict[tuple[str, ...], _Count]] = {k: {} for k in COUNTERS}
        self.latency: dict[tuple[str, str], _Latency] = {}
        #: (method, route, status) of an answered request, by its route
        self._labels: dict[tuple[object, str, int], tuple[str, str, str]] = {}
        self.restore_seconds: float | None = getattr(service, "restore_seconds", None)
        self._registrations: Sequence[Registration] | None = None
        self._registry: CollectorRegistry | None = None
        self.unsubscribe: Callable[[], None] = service.events.subscribe(self.event)

    def inc(self, counter: str, *labels: str, by: float = 1.0) -> None:
        series = self.counts[counter]
        found = series.get(labels)
        if found is None:
            found = series[labels] = _Count()
        found.value += by

    def event(self, ev: Event) -> None:
        self.inc("events", ev.kind)
        if ev.kind == "restored":
            if ev.message.startswith("took back"):
                self.inc("repairs", "taken_back")
            else:  # an entry; or, naming none, binfmt_misc itself (mounted, enabled)
                self.inc("repairs", "restored" if ev.names else "binfmt_misc")
        elif ev.kind == "interpreter-updated":
            self.inc("repairs", "interpreter_updated", by=max(1, len(ev.names)))
        elif ev.kind == "conflict":
            self.inc("conflicts", "restore")

    def observe(self, request: web.Request, response: web.StreamResponse, seconds: float) -> None:
        """One answered request."""
        route = request.match_info.route
        status = response.status
        labels = self._labels.get((route, request.method, status))
        if labels is None:
            resource = route.resource
            labels = (request.method, resource.canonical, str(status)) if resource else (
                "-", "unmatched", str(status))  # fmt: skip
            if len(self._labels) < 4096:
                self._labels[(route, request.method, status)] = labels
        self.inc("requests", *labels)
        key = (labels[0], labels[1])
        hist = self.latency.get(key)
        if hist is None:
            hist = self.latency[key] = _Latency()
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                hist.buckets[i] += 1
                break
        hist.count += 1
        hist.sum += seconds
        if status == 409:
            self.inc("conflicts", "request")
        if status in REFUSALS:
            self.inc("refusals", _code(response))

    def render(self, registrations: Sequence[Registration] | None) -> bytes:
        """The text format; registrations None: binfmt_misc is not mounted.
        The first call loads prometheus_client (call it off the loop)."""
        from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=True)
            self._registry.register(self)  # a custom collector
        self._registrations = registrations
        return generate_latest(self._registry)

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's custom collector: every series as it stands."""
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.samples import Sample  # noqa: PLC0415

        regs = self._registrations
        gauge = GaugeMetricFamily("qusd_registrations", "binfmt_misc entries in the kernel, by "
                                  "state", labels=["state", "qusd"])  # fmt: skip
        counted = {(s, o): 0 for s in ("enabled", "disabled")
                   for o in ("persistent", "managed", "other")}  # fmt: skip
        for reg in regs or ():
            owner = "persistent" if reg.persistent else "managed" if reg.managed else "other"
            counted["enabled" if reg.entry.enabled else "disabled", owner] += 1
        for labels, n in counted.items():
            gauge.add_metric(labels, n)
        yield gauge
        yield GaugeMetricFamily("qusd_binfmt_misc_mounted", "1 when binfmt_misc is mounted",
                                value=float(regs is not None))  # fmt: skip
        for key in ("events", "repairs", "conflicts", "requests"):
            yield self._counter(CounterMetricFamily, key)
        latency = HistogramMetricFamily(*LATENCY, labels=["method", "route"])
        for (method, route), hist in self.latency.items():
            cumulative, buckets = 0, []
            for bound, n in zip(BUCKETS, hist.buckets, strict=True):
                cumulative += n
                buckets.append((repr(float(bound)), float(cumulative)))  # as Go prints it
            buckets.append(("+Inf", float(hist.count)))
            latency.add_metric([method, route], buckets, hist.sum)
            created = Sample(f"{LATENCY[0]}_created", {"method": method, "route": route},
                             hist.created)  # fmt: skip
            latency.samples.append(created)
        yield latency
        yield self._counter(CounterMetricFamily, "refusals")
        yield GaugeMetricFamily("qusd_restore_duration_seconds",
                                "how long the restore at start took",
                                value=self.restore_seconds or 0.0)  # fmt: skip

    def _counter(self, family: Any, key: str) -> Any:
        name, doc, labels = COUNTERS[key]
        metric = family(name, doc, labels=list(labels))
        for values, count in self.counts[key].items():
            metric.add_metric(list(values), count.value, created=count.created)
        return metric


def _code(response: web.StreamResponse) -> str:
    """The problem's stable code, from its body."""
    body = getattr(response, "body", None)
    try:
        code = json.loads(body)["code"] if isinstance(body, bytes) else None
    except (ValueError, KeyError, TypeError):
        code = None
    return str(code) if code else str(response.status)


#: the application's metrics
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


@web.middleware
async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer counted, by route and status, with its latency."""
    start = time.perf_counter()
    response = await handler(request)
    request.app[METRICS].observe(request, response, time.perf_counter() - start)
    return response
