"""GET /metrics in-process: the plain counters the middleware keeps come
out through prometheus_client's own text format, as the library's own
metric objects wrote them (names, types, labels, buckets, _created)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from qusd.metrics import BUCKETS, CONTENT_TYPE
from tests.unit.conftest import World
from tests.unit.test_api import MakeClient, client_for


def test_the_media_type_is_the_librarys() -> None:
    assert CONTENT_TYPE == CONTENT_TYPE_LATEST


async def test_metrics_in_the_text_format(aiohttp_client: MakeClient, world: World) -> None:
    c = await client_for(aiohttp_client, world.service())
    assert (await c.post("/v1/registrations", json={"targets": ["arm64"]},
                         headers={"X-Test-As": "root"})).status == 201  # fmt: skip
    for _ in range(3):
        assert (await c.get("/v1/health")).status == 200
    assert (await c.get("/v1/nowhere")).status == 404
    assert (await c.post("/v1/reset", json={}, headers={"X-Test-As": "reader"})).status == 403
    resp = await c.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    types = {name: f.type for name, f in families.items()}
    assert types == {
        "qusd_registrations": "gauge",
        "qusd_binfmt_misc_mounted": "gauge",
        "qusd_events": "counter",
        "qusd_repairs": "counter",
        "qusd_conflicts": "counter",
        "qusd_http_requests": "counter",
        "qusd_http_request_duration_seconds": "histogram",
        "qusd_refusals": "counter",
        "qusd_restore_duration_seconds": "gauge",
        # what prometheus_client's own objects add: when each series began
        "qusd_events_created": "gauge",
        "qusd_http_requests_created": "gauge",
        "qusd_http_request_duration_seconds_created": "gauge",
        "qusd_refusals_created": "gauge",
    }
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("qusd_registrations", state="enabled", qusd="persistent") == 1
    assert value("qusd_registrations", state="disabled", qusd="other") == 0
    assert value("qusd_binfmt_misc_mounted") == 1
    assert value("qusd_events_total", kind="registered") == 1
    assert value("qusd_http_requests_total", method="GET", route="/v1/health", status="200") == 3
    assert value("qusd_http_requests_total", method="-", route="unmatched", status="404") == 1
    assert value("qusd_refusals_total", code="forbidden") == 1
    health = {"method": "GET", "route": "/v1/health"}
    assert value("qusd_http_request_duration_seconds_count", **health) == 3
    assert value("qusd_http_request_duration_seconds_bucket", le="+Inf", **health) == 3
    buckets = [value("qusd_http_request_duration_seconds_bucket", le=repr(float(b)), **health)
               for b in BUCKETS]  # fmt: skip
    assert buckets == sorted(buckets) and buckets[-1] == 3  # cumulative
    assert value("qusd_http_request_duration_seconds_sum", **health) > 0
    assert value("qusd_http_request_duration_seconds_created", **health) > 1e9
