"""packaging/kubernetes/qusd.yaml: valid against a current Kubernetes schema
(kubernetes-validate, strict, with the schemas it bundles: no network), the
pod spec minimal for what it must do, its image a target of the
Containerfile, and its liveness probe answering as the kubelet would read
it from a daemon started as the pod starts it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT, SANDBOX_REASON, Daemon

MANIFEST = ROOT / "packaging/kubernetes/qusd.yaml"
CONTAINERFILE = ROOT / "packaging/container/Containerfile"
BIN = Path(sys.executable).parent


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def daemonset() -> dict[str, Any]:
    (ds,) = [d for d in documents() if d["kind"] == "DaemonSet"]
    return ds


def test_valid_against_the_current_schema_offline() -> None:
    """Strict validation (no unknown field) against the newest schema the
    package bundles, run with no network at all (a new network namespace)."""
    version = kubernetes_validate.latest_version()
    assert tuple(int(p) for p in version.split(".")[:2]) >= (1, 33), version
    argv = [str(BIN / "kubernetes-validate"), "--strict", "-k", version, str(MANIFEST)]
    if os.getuid() == 0 and shutil.which("unshare"):
        argv = ["unshare", "--net", "--", *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed for resource daemonset/qusd" in res.stdout
    for doc in documents():  # and in process, each resource
        kubernetes_validate.validate(doc, version, strict=True)


def test_an_invalid_manifest_is_refused() -> None:
    """The validation is real: a misspelt field fails it."""
    ds = daemonset()
    ds["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def test_the_pod_is_privileged_but_minimal() -> None:
    pod = daemonset()["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod and "serviceAccount" not in pod
    assert not pod["hostNetwork"] and not pod["hostPID"] and not pod["hostIPC"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is True and sc["readOnlyRootFilesystem"] is True
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {"state": "/var/lib/qusd", "run": "/run/qusd"}
    assert all(mounts[n] == p for n, p in host.items())
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["QUSD_STATE_DIR"] == "/var/lib/qusd"
    assert os.path.dirname(env["QUSD_SOCKET"]) == "/run/qusd"
    assert c["livenessProbe"]["exec"]["command"] == ["qusctl", "status"]
    # never beside a host qusd: such nodes are labelled, and left out
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"]: e["operator"] for t in terms["nodeSelectorTerms"]
            for e in t["matchExpressions"]}  # fmt: skip
    assert keys["qusd.io/host-daemon"] == "DoesNotExist"


def test_the_image_is_the_containerfiles_daemon_target() -> None:
    text = CONTAINERFILE.read_text()
    stages = [line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")]
    assert "daemon" in stages
    assert stages[-1] == "full", "a build without --target still makes the one-shot image"
    daemon_stage = text.split(" AS daemon\n", 1)[1].split("\nFROM ", 1)[0]
    assert 'ENTRYPOINT ["qusd"]' in daemon_stage and "qemu-user-static" in daemon_stage
    (c,) = daemonset()["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("qusd-daemon:") and c["args"] == ["serve"]


def test_the_probe_answers_as_the_kubelet_reads_it(tmp_path: Path) -> None:
    """The container's command (qusd serve, the pod's environment; paths
    under tmp and in a sandbox instead of the node's), then the probe's
    command in that environment: 0 while it serves, non-zero once it is gone."""
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    (c,) = daemonset()["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    env["QUSD_SOCKET"] = str(tmp_path / os.path.basename(env["QUSD_SOCKET"]))
    env["QUSD_STATE_DIR"] = str(tmp_path / "state")  # where the Daemon helper keeps them
    d = Daemon(tmp_path, *c["args"], env={**os.environ, **env})
    probe = [str(BIN / c["livenessProbe"]["exec"]["command"][0]),
             *c["livenessProbe"]["exec"]["command"][1:]]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "QUSD_SOCKET"}
    try:
        res = subprocess.run(probe, env={**base, **env}, capture_output=True, text=True,
                             timeout=c["livenessProbe"]["timeoutSeconds"], check=False)  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("qusd ")
    finally:
        d.stop()
    res = subprocess.run(probe, env={**base, **env}, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert res.returncode == 69 and "qusd is not running" in res.stderr
