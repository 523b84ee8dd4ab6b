"""GET /metrics on a running daemon: Prometheus' text format (parsed back
with prometheus_client's own parser), what it counts, scraped by a user
who may only read; and prometheus_client stays off the boot path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NOBODY, Daemon, interpreter, run_as

CURL = shutil.which("curl") or "curl"


def scrape(
    d: Daemon, uid: int = 0
) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The content type and every sample, as (name, labels) -> value."""
    argv = [CURL, "-sS", "--unix-socket", d.socket, "-D", "-", "http://localhost/metrics"]
    res = run_as(uid, uid, argv) if uid else subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    head, _, body = res.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), head
    ctype = next(line.split(":", 1)[1].strip() for line in head.splitlines()
                 if line.lower().startswith("content-type:"))  # fmt: skip
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    return ctype, samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_happens(workdir: Path) -> None:
    interpreter("aarch64")
    tmp_path = workdir
    (tmp_path / "qusd.toml").write_text('[qusd]\nsocket_mode = "666"\n')  # others may connect
    d = Daemon(tmp_path, "--reconcile-interval", "0.2")
    try:
        ctype, before = scrape(d)
        assert ctype == CONTENT_TYPE_LATEST and ctype.startswith("text/plain; version=")
        assert value(before, "qusd_binfmt_misc_mounted") == 1
        assert value(before, "qusd_restore_duration_seconds") > 0
        assert value(before, "qusd_registrations", state="enabled", qusd="persistent") == 0

        d.client.request("POST", "/v1/registrations", {"targets": ["arm64", "s390x"]})
        d.client.request("PATCH", "/v1/registrations/qemu-s390x", {"enabled": False})
        conflict = subprocess.run(
            [CURL, "-sS", "--unix-socket", d.socket, "-H", "Content-Type: application/json",
             "-d", json.dumps({"targets": ["arm64"], "flags": "FP"}),
             "http://localhost/v1/registrations"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert json.loads(conflict.stdout)["status"] == 409
        # a reader (nobody) is refused a change, and may scrape
        refused = run_as(
            NOBODY,
            NOBODY,
            [
                CURL,
                "-sS",
                "--unix-socket",
                d.socket,
                "-X",
                "DELETE",
                "http://localhost/v1/registrations/qemu-s390x",
            ],
        )
        assert json.loads(refused.stdout)["code"] == "forbidden", refused.stdout
        # another tool removes an entry: qusd puts it back
        d.inside.kernel.remove("qemu-aarch64")
        deadline = time.monotonic() + 20
        while "qemu-aarch64" not in d.inside.kernel.names() and time.monotonic() < deadline:
            time.sleep(0.05)

        _, after = scrape(d, uid=NOBODY)
        assert value(after, "qusd_registrations", state="enabled", qusd="persistent") == 1
        assert value(after, "qusd_registrations", state="disabled", qusd="persistent") == 1
        assert value(after, "qusd_events_total", kind="registered") == 2
        assert value(after, "qusd_events_total", kind="disabled") == 1
        assert value(after, "qusd_repairs_total", kind="restored") >= 1
        assert value(after, "qusd_conflicts_total", kind="request") == 1
        assert value(after, "qusd_refusals_total", code="forbidden") == 1
        route = "/v1/registrations/{name}"
        assert value(after, "qusd_http_requests_total", method="PATCH", route=route,
                     status="200") == 1  # fmt: skip
        assert value(after, "qusd_http_requests_total", method="POST",
                     route="/v1/registrations", status="201") == 1  # fmt: skip
        assert value(after, "qusd_http_request_duration_seconds_count", method="POST",
                     route="/v1/registrations") == 2  # fmt: skip
        assert value(after, "qusd_http_requests_total", method="GET", route="/metrics",
                     status="200") == 1  # fmt: skip
    finally:
        d.stop()


def test_prometheus_client_stays_off_the_boot_path(tmp_path: Path) -> None:
    """`qusd restore` (at boot) never loads prometheus_client."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['qusd', 'restore', '--sandbox', '--state-dir', sys.argv[1], '--config', "
        "sys.argv[2]]\n"
        "from qusd import daemon\n"
        "rc = daemon.main(sys.argv[1:])\n"
        "print(rc, 'prometheus_client' in sys.modules)\n"
    )
    (tmp_path / "qusd.toml").write_text("")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"),
                          str(tmp_path / "qusd.toml")],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert res.stdout.split() == ["0", "False"], res.stderr
