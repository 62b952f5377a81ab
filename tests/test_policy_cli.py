"""``kubetriage policy test FILE``: a TriagePolicy replayed on the verdicts recorded in its namespace, on the real
API server; nothing is written or sent."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kubetriage.infra.kube import ApiError, triagejob_path
from tests.pipeline import Pipeline, alert_spec, script_spec
from tests.test_actions import kubetriage_cli
from tests.waiting import eventually

pytestmark = pytest.mark.cluster


def verdict(classification: str, confidence: float) -> dict[str, Any]:
    return {"discard": classification == "false_positive", "classification": classification, "reason": "r",
            "confidence": confidence, "analyzer": "rules", "checkType": "ai"}


async def finished(p: Pipeline, name: str, spec: dict[str, Any], v: dict[str, Any], namespace: str | None = None,
                   phase: str = "Succeeded") -> None:
    ns = namespace or p.ns
    await p.job(name, spec, namespace=ns)
    await p.kube.merge_patch(triagejob_path(ns, name, status=True), {"status": {
        "phase": phase, "verdict": v, "completedAt": "2026-11-23T03:00:00.000000Z"}})


async def test_policy_test_shows_what_a_policy_would_do_and_changes_nothing(pipeline: Pipeline) -> None:
    p = pipeline
    other = f"{p.ns}-other"
    p.cluster.kubectl("create", "namespace", other)
    try:
        labels = {"instance": "db-1", "severity": "warning", "job": "node"}
        await finished(p, "noise", alert_spec("DiskPressure", labels=labels), verdict("false_positive", 0.95))
        await finished(p, "guarded", alert_spec("DiskPressure", labels={**labels, "instance": "db-9"}),
                       verdict("false_positive", 0.95))
        await finished(p, "no-target", alert_spec("DiskPressure", labels={"severity": "warning"}),
                       verdict("false_positive", 0.95))
        await finished(p, "unsure", alert_spec("DiskPressure", labels={**labels, "instance": "db-2"}),
                       verdict("false_positive", 0.6))
        await finished(p, "real", script_spec("checkout-e2e"), verdict("valid", 0.9))
        await finished(p, "elsewhere", alert_spec("DiskPressure", labels=labels), verdict("false_positive", 0.95),
                       namespace=other)
        # (a fresh API server may answer 429 "storage is (re)initializing" for a while: retried)
        await eventually(lambda: _rule(p), "the TriageRule created")
        before = {j["metadata"]["name"]: j["metadata"]["resourceVersion"] for j in await p.jobs()}
        manifest = p.root / "policy.yaml"
        manifest.write_text(yaml.safe_dump({
            "apiVersion": "kubetriage.io/v1alpha1", "kind": "TriagePolicy",
            "metadata": {"name": "quiet", "namespace": p.ns},
            "spec": {"classifications": ["false_positive", "valid"], "minConfidence": 0.8, "silence": {},
                     "notify": [{"name": "chat", "classifications": ["valid"],
                                 "slack": {"urlSecretRef": {"name": "hooks", "key": "slack"}}}]}}))

        code, out, err = await kubetriage_cli("policy", "test", str(manifest), "-o", "json")
        assert code == 0, err
        result = json.loads(out)
        assert (result["policy"], result["namespace"], result["mode"]) == ("quiet", p.ns, "shadow")
        rows = {(r["job"], r["action"]): r for r in result["rows"]}
        assert set(rows) == {("noise", "silence"), ("guarded", "silence"), ("no-target", "silence"),
                             ("real", "slack chat")}, rows
        assert rows[("noise", "silence")]["would"] == "yes"
        assert rows[("noise", "silence")]["detail"].startswith(
            'alertname="DiskPressure", severity="warning", instance="db-1", job="node" for 2h')
        assert rows[("guarded", "silence")]["would"] == "no"
        assert "TriageRule db-9-needs-a-human" in rows[("guarded", "silence")]["detail"]
        assert rows[("no-target", "silence")]["would"] == "no"
        assert rows[("real", "slack chat")]["would"] == "yes"
        assert (result["actions"], result["refused"]) == (2, 2)

        code, out, _ = await kubetriage_cli("policy", "test", str(manifest))
        assert code == 0 and "2 action(s), 2 refused. Nothing was written or sent." in out
        # nothing written: no policy, every job as it was
        assert {j["metadata"]["name"]: j["metadata"]["resourceVersion"] for j in await p.jobs()} == before
        listed = await eventually(lambda: _policies(p), "the TriagePolicies listed", accept=lambda x: x is not None)
        assert listed == []

        manifest.write_text("kind: TriageRule\nmetadata: {name: x}\n")
        code, _, err = await kubetriage_cli("policy", "test", str(manifest))
        assert code == 2 and "expected a TriagePolicy manifest" in err
    finally:
        p.cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


async def _rule(p: Pipeline) -> bool:
    try:
        await p.rule("db-9-needs-a-human", {"match": {"labels": {"instance": "db-9"}},
                                             "action": {"neverDiscard": True}})
    except ApiError as exc:
        if exc.status == 429:
            return False
        raise
    return True


async def _policies(p: Pipeline) -> list[dict[str, Any]] | None:
    try:
        return (await p.kube.get(f"/apis/kubetriage.io/v1alpha1/namespaces/{p.ns}/triagepolicies"))["items"]
    except ApiError as exc:
        if exc.status == 429:  # the API server's cache of a resource nobody asked for yet is being filled
            return None
        raise
