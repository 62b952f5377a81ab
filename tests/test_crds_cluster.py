"""CRDs against the real kube-apiserver: established, validating, not pruning, printing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from devharness import devenv
from kubetriage.api import models
from tests.conftest import EXAMPLES
from tests.modelfill import full

pytestmark = pytest.mark.cluster


@pytest.fixture
def ns(cluster: devenv.ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def _job(spec: dict[str, Any], name: str = "j") -> dict[str, Any]:
    return {"apiVersion": models.API_VERSION, "kind": "TriageJob", "metadata": {"name": name}, "spec": spec}


def _alert(**alert: Any) -> dict[str, Any]:
    return {"source": {"type": "alert"}, "alert": {"name": "A", **alert}}


def _script(**sr: Any) -> dict[str, Any]:
    return {"source": {"type": "scriptResult"}, "scriptResult": {"scriptName": "s", "success": False, **sr}}


def _pool(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": models.API_VERSION, "kind": "TriagePool", "metadata": {"name": "p"}, "spec": spec}


def test_crds_are_established(cluster: devenv.ControlPlane) -> None:
    out = cluster.kubectl("get", "crd", "-o", "json").stdout
    crds = {i["metadata"]["name"]: i for i in json.loads(out)["items"]}
    for name in ("triagejobs.kubetriage.io", "triagepools.kubetriage.io"):
        conds = {c["type"]: c["status"] for c in crds[name]["status"]["conditions"]}
        assert conds["Established"] == "True"
        assert conds["NamesAccepted"] == "True"


def test_every_example_applies(cluster: devenv.ControlPlane, ns: str) -> None:
    out = cluster.kubectl("apply", "-n", ns, "-f", str(EXAMPLES)).stdout
    docs = [d for f in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert len(docs) >= 11
    for doc in docs:
        assert doc["metadata"]["name"] in out
    jobs = json.loads(cluster.kubectl("get", "tj", "-n", ns, "-o", "json").stdout)["items"]
    pools = json.loads(cluster.kubectl("get", "tpool", "-n", ns, "-o", "json").stdout)["items"]
    assert len(jobs) >= 6 and len(pools) >= 2
    classes = {j["spec"].get("priorityClassName") for j in jobs}
    assert {"kubetriage-p1", "kubetriage-p2", "kubetriage-p3"} <= classes
    assert any(j["spec"].get("scriptResult", {}).get("screenshots") for j in jobs)
    for job in jobs:  # what the API server stored still parses as our model
        models.TriageJobSpec.model_validate(job["spec"])


INVALID = [
    ("bad source enum", _job({"source": {"type": "metric"}, "alert": {"name": "A"}}),
     ["spec.source.type", "Unsupported value"]),
    ("missing source", _job({"alert": {"name": "A"}}), ["spec.source", "Required"]),
    ("alert type without alert body", _job({"source": {"type": "alert"}}),
     ["source.type alert needs spec.alert"]),
    ("scriptResult type with alert body", _job({**_script(), "alert": {"name": "A"}}),
     ["source.type scriptResult needs spec.scriptResult and no spec.alert"]),
    ("oversize alert name", _job(_alert(name="x" * 300)), ["spec.alert.name", "Too long"]),
    ("too many labels", _job(_alert(labels={f"l{i}": "v" for i in range(65)})),
     ["spec.alert.labels", "Too many"]),
    ("oversize label value", _job(_alert(labels={"a": "v" * 1025})), ["spec.alert.labels.a", "Too long"]),
    ("wrong type consecutiveCount", _job(_alert(consecutiveCount="many")),
     ["spec.alert.consecutiveCount", "integer"]),
    ("maxAttempts below minimum", _job({**_alert(), "analysis": {"maxAttempts": 0}}),
     ["spec.analysis.maxAttempts", "greater than or equal to 1"]),
    ("bad analyzer enum", _job({**_alert(), "analysis": {"analyzer": "gpt"}}),
     ["spec.analysis.analyzer", "Unsupported value"]),
    ("priorityClassName not a DNS name", _job({**_alert(), "priorityClassName": "P1_High"}),
     ["spec.priorityClassName", "should match"]),
    ("generatorURL not http", _job(_alert(generatorURL="javascript:alert(1)")),
     ["spec.alert.generatorURL", "should match"]),
    ("oversize errorMessage", _job(_script(errorMessage="e" * (models.MAX_ERROR + 1))),
     ["spec.scriptResult.errorMessage", "Too long"]),
    ("missing success", _job({"source": {"type": "scriptResult"}, "scriptResult": {"scriptName": "s"}}),
     ["spec.scriptResult.success", "Required"]),
    ("screenshot with url and data", _job(_script(screenshots=[{"url": "https://e.com/a.png", "data": "aGk="}])),
     ["spec.scriptResult.screenshots[0]", "set exactly one of url or data"]),
    ("too many screenshots", _job(_script(screenshots=[{"url": "https://e.com/a.png"}] * 11)),
     ["spec.scriptResult.screenshots", "Too many"]),
    ("pool min above max", _pool({"replicas": {"min": 5, "max": 2}}), ["spec.replicas", "min must be <= max"]),
    ("pool zero concurrency", _pool({"concurrency": 0}), ["spec.concurrency", "greater than or equal to 1"]),
    ("pool without spec", {"apiVersion": models.API_VERSION, "kind": "TriagePool", "metadata": {"name": "p"}},
     ["spec", "Required"]),
    ("pool bad confidence", _pool({"analyzer": {"confidenceThreshold": 1.5}}),
     ["spec.analyzer.confidenceThreshold", "less than or equal to 1"]),
    ("evidence url not http", _pool({"evidence": {"prometheus": {"url": "file:///etc/passwd"}}}),
     ["spec.evidence.prometheus.url", "should match"]),
    ("evidence bearer and basic auth", _pool({"evidence": {"alertmanager": {
        "url": "https://am:9093", "bearerTokenSecretRef": {"name": "s", "key": "t"},
        "basicAuth": {"username": {"name": "s", "key": "u"}, "password": {"name": "s", "key": "p"}}}}}),
     ["spec.evidence.alertmanager", "set at most one of bearerTokenSecretRef or basicAuth"]),
    ("evidence two CAs", _pool({"evidence": {"prometheus": {"url": "https://p", "tls": {
        "caSecretRef": {"name": "s", "key": "ca"}, "caConfigMapRef": {"name": "c", "key": "ca"}}}}}),
     ["spec.evidence.prometheus.tls", "set at most one of caSecretRef or caConfigMapRef"]),
    ("evidence budget too long", _pool({"evidence": {"budgetSeconds": 600}}),
     ["spec.evidence.budgetSeconds", "less than or equal to 120"]),
    ("alert expr too long", _job(_alert(expr="up" * 600)), ["spec.alert.expr", "Too long"]),
]


@pytest.mark.parametrize(("case", "obj", "needles"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_objects_are_rejected_naming_the_field(
    cluster: devenv.ControlPlane, ns: str, case: str, obj: dict[str, Any], needles: list[str]
) -> None:
    result = cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0, f"{case}: accepted"
    for needle in needles:
        assert needle in result.stderr, f"{case}: {needle!r} not in {result.stderr!r}"
    kind = "tj" if obj["kind"] == "TriageJob" else "tpool"
    listed = json.loads(cluster.kubectl("get", kind, "-n", ns, "-o", "json").stdout)["items"]
    assert listed == []


def _status_round_trip(cluster: devenv.ControlPlane, ns: str, kind: str, name: str, status: Any) -> dict[str, Any]:
    patch = json.dumps({"status": status.wire()})
    cluster.kubectl("patch", kind, name, "-n", ns, "--subresource=status", "--type=merge", "-p", patch)
    return json.loads(cluster.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)["status"]


def test_every_triagejob_status_field_survives(cluster: devenv.ControlPlane, ns: str) -> None:
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_job(_alert(), name="full")))
    status = full(models.TriageJobStatus)
    stored = _status_round_trip(cluster, ns, "tj", "full", status)
    assert stored == status.wire()
    assert models.TriageJobStatus.model_validate(stored) == status


def test_every_triagepool_status_field_survives(cluster: devenv.ControlPlane, ns: str) -> None:
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_pool({})))
    status = full(models.TriagePoolStatus)
    stored = _status_round_trip(cluster, ns, "tpool", "p", status)
    assert stored == status.wire()
    pool = json.loads(cluster.kubectl("get", "tpool", "p", "-n", ns, "-o", "json").stdout)
    assert pool["spec"]["replicas"] == {"min": 1, "max": 4}  # defaults filled in by the API server
    assert pool["spec"]["analyzer"]["chain"] == "auto"


def test_status_is_a_subresource(cluster: devenv.ControlPlane, ns: str) -> None:
    """A status in a plain update is ignored: only the operator's /status writes change it."""
    obj = _job(_alert(), name="sub")
    obj["status"] = {"phase": "Succeeded"}
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(obj))
    stored = json.loads(cluster.kubectl("get", "tj", "sub", "-n", ns, "-o", "json").stdout)
    assert "status" not in stored or stored["status"].get("phase") is None


def test_kubectl_get_prints_columns(cluster: devenv.ControlPlane, ns: str) -> None:
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_job(_alert(), name="shown")))
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_pool({})))
    verdict = models.verdict_from_classification("false_positive", "flapping 9x in 1h", 0.85, "rules")
    status = models.TriageJobStatus(phase=models.Phase.SUCCEEDED, verdict=verdict, priority_class_name="kubetriage-p1")
    _status_round_trip(cluster, ns, "tj", "shown", status)
    out = cluster.kubectl("get", "tj", "-n", ns).stdout.splitlines()
    assert out[0].split() == ["NAME", "SOURCE", "PRIORITY", "PHASE", "VERDICT", "CONFIDENCE", "AGE"]
    assert out[1].split()[:6] == ["shown", "alert", "kubetriage-p1", "Succeeded", "false_positive", "0.85"]
    wide = cluster.kubectl("get", "tj", "-n", ns, "-o", "wide").stdout
    assert "flapping 9x in 1h" in wide
    both = cluster.kubectl("get", "kubetriage", "-n", ns).stdout
    assert "triagejob.kubetriage.io/shown" in both
    assert "triagepool.kubetriage.io/p" in both
