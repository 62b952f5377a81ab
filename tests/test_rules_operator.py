"""TriageRules in the operator: the per-namespace cache admission reads, the request a worker gets, and the
rule's ``Accepted`` condition; end to end against the real API server, Redis, operator and worker processes.

How a rule is evaluated is tests/test_team_rules.py; what the safety policy makes of it, tests/test_safety.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import yaml

from kubetriage.api.contract import MAX_RULES, AnalysisRequest, TeamRule
from kubetriage.api.models import API_VERSION, TriageJobSpec
from kubetriage.api.regex import regex_problem
from kubetriage.controller.admission import request_payload
from kubetriage.controller.runtime import RuleCache
from kubetriage.infra.kube import triagerule_path
from tests.conftest import EXAMPLES
from tests.pipeline import Pipeline, alert_spec, audit_events, flush_audit_log

INVALID_REGEX = r"(?<=pull )rate limit"  # a lookbehind: the API server takes it, RE2 cannot compile it
GUARD = {"match": {"sourceType": "alert", "alertNames": ["DiskSpaceLow"]}, "action": {"neverDiscard": True}}


def rule_body(name: str, namespace: str = "team-a", generation: int = 1, **spec: Any) -> dict[str, Any]:
    spec.setdefault("action", {"classification": "false_positive", "confidence": 0.9})
    return {"apiVersion": API_VERSION, "kind": "TriageRule",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                         "generation": generation},
            "spec": spec}


# --------------------------------------------------------------------------- the cache (no I/O)


def test_a_rule_is_kept_for_its_own_namespace_only() -> None:
    cache = RuleCache()
    assert cache.observe(rule_body("maintenance", "team-a")).ok
    assert [r.name for r in cache.for_namespace("team-a")] == ["maintenance"]
    assert cache.for_namespace("team-b") == []
    cache.forget("team-a", "maintenance", "uid-team-a-maintenance")
    assert cache.for_namespace("team-a") == []


def test_an_invalid_regex_is_reported_and_the_rule_leaves_the_cache() -> None:
    cache = RuleCache()
    assert cache.observe(rule_body("registry", match={"errorRegex": "rate limit"})).ok
    check = cache.observe(rule_body("registry", generation=2, match={"errorRegex": INVALID_REGEX}))
    problem = regex_problem(INVALID_REGEX)
    assert problem is not None
    assert (check.ok, check.reason) == (False, "InvalidRegex")
    assert check.message.startswith(problem) and "Fix spec.match.errorRegex" in check.message
    assert cache.for_namespace("team-a") == [], "a rule that matches nothing is not handed to workers"


def test_over_the_cap_guards_are_kept_first_then_names_in_order() -> None:
    cache = RuleCache()
    for i in range(MAX_RULES + 5):
        cache.observe(rule_body(f"r{i:03d}"))
    cache.observe(rule_body("zz-critical-needs-a-human", match={"labels": {"severity": "critical"}},
                            action={"neverDiscard": True}))
    got = [r.name for r in cache.for_namespace("team-a")]
    assert len(got) == MAX_RULES
    assert got[0] == "zz-critical-needs-a-human"  # a guard is never the rule left out
    assert got[1:] == [f"r{i:03d}" for i in range(MAX_RULES - 1)]
    assert got == [r.name for r in cache.for_namespace("team-a")]  # the same for every job


def test_the_request_carries_the_rules_as_the_worker_reads_them() -> None:
    """Admission's payload goes through Redis as JSON; the worker validates it back into the contract."""
    cache = RuleCache()
    cache.observe(rule_body("maintenance", match={"labels": {"node": "worker-12"},
                                                  "window": {"start": "2026-11-23T02:00:00Z",
                                                             "end": "2026-11-23T04:00:00Z"}}))
    [rule] = cache.for_namespace("team-a")
    spec = alert_spec("NodeNotReady", labels={"node": "worker-12"})
    body = {"metadata": {"uid": "u1", "name": "job", "namespace": "team-a"}, "spec": spec}
    request = AnalysisRequest.model_validate(request_payload(body, TriageJobSpec.model_validate(spec), [], [rule]))
    assert request.rules == [rule]
    assert request.rules[0] == TeamRule(name="maintenance", spec=rule.spec)


# --------------------------------------------------------------------------- end to end


def disk_flapping_spec() -> dict[str, Any]:
    """examples/20: a flapping warning the offline analyzers call false_positive."""
    [doc] = [d for d in yaml.safe_load_all((EXAMPLES / "20-alert-disk-flapping.yaml").read_text()) if d]
    return doc["spec"]


@pytest.mark.cluster
async def test_a_rule_reaches_only_its_own_namespace_and_never_discard_holds(pipeline: Pipeline) -> None:
    """One operator, two namespaces, the same false_positive-looking alert in each; a neverDiscard rule in
    the first only. The second namespace's job is not handed the rule and ends false_positive; the first
    one's ends inconclusive, naming the rule."""
    p = pipeline
    guarded, other = p.ns, f"{p.ns}-b"
    p.cluster.kubectl("create", "namespace", other)
    try:
        await p.pool("default", concurrency=2, replicas={"min": 0, "max": 0})  # jobs wait: payloads readable
        p.start_operator(namespaces=f"{guarded},{other}", pool_namespace=guarded)
        await p.rule("disk-needs-a-human", GUARD)
        await p.wait_rule("disk-needs-a-human")
        a = await p.job("disk", disk_flapping_spec())
        b = await p.job("disk", disk_flapping_spec(), namespace=other)
        await p.wait_phase(["disk"], {"Queued"})

        async def queued_in_other() -> bool:
            return ((await p.kube.get(f"/apis/{API_VERSION}/namespaces/{other}/triagejobs/disk"))
                    .get("status") or {}).get("phase") == "Queued"

        await p.wait(queued_in_other, f"the job in {other} Queued")
        assert [r["name"] for r in (await p.queued_payload(a["metadata"]["uid"]))["rules"]] == ["disk-needs-a-human"]
        assert (await p.queued_payload(b["metadata"]["uid"]))["rules"] == []
        # a resolution rewrites the queued request (ingest's annotation): the rules it was admitted with stay
        p.cluster.kubectl("annotate", "tj", "disk", "-n", guarded, "kubetriage.io/resolved-at=2026-11-23T02:20:00Z")

        async def resolved() -> dict[str, Any] | None:
            payload = await p.queued_payload(a["metadata"]["uid"])
            return payload if payload["alert"].get("status") == "resolved" else None

        payload = await p.wait(resolved, "the queued request to carry the resolution")
        assert [r["name"] for r in payload["rules"]] == ["disk-needs-a-human"]

        await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
        done = await p.wait_terminal(["disk"])
        held = done["disk"]["status"]["verdict"]

        async def finished_in_other() -> dict[str, Any] | None:
            job = await p.kube.get(f"/apis/{API_VERSION}/namespaces/{other}/triagejobs/disk")
            return job if (job.get("status") or {}).get("phase") == "Succeeded" else None

        control = (await p.wait(finished_in_other, f"the job in {other} Succeeded"))["status"]["verdict"]
        assert control["classification"] == "false_positive", control  # what the guard stands against
        assert "disk-needs-a-human" not in control["reason"]
        assert held["classification"] == "inconclusive" and held["discard"] is False, held
        assert "TriageRule disk-needs-a-human: never discard without a human" in held["reason"]
    finally:
        p.cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


@pytest.mark.cluster
async def test_an_invalid_regex_is_not_accepted_and_each_generation_costs_one_status_write(
        pipeline: Pipeline) -> None:
    """Accepted=True, then a spec change to an expression RE2 cannot compile: Accepted=False with the reason
    and a message saying what to fix, and jobs admitted from then on no longer get the rule. A label change
    (no new generation) and the echoes of the operator's own writes cost no write: counted in the API
    server's audit log."""
    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator()
    spec = {"match": {"errorRegex": "rate limit"}, "action": {"classification": "false_positive",
                                                               "confidence": 0.9}}
    await p.rule("registry-limits", spec)
    rule = await p.wait_rule("registry-limits")
    [cond] = rule["status"]["conditions"]
    assert (cond["reason"], cond["observedGeneration"]) == ("Valid", 1)

    path = triagerule_path(p.ns, "registry-limits")
    await p.kube.merge_patch(path, {"spec": {"match": {"errorRegex": INVALID_REGEX}}})
    rule = await p.wait_rule("registry-limits", accepted=False)
    [cond] = rule["status"]["conditions"]
    assert (cond["reason"], cond["observedGeneration"], rule["status"]["observedGeneration"]) == ("InvalidRegex", 2, 2)
    assert regex_problem(INVALID_REGEX) in cond["message"] and "Fix spec.match.errorRegex" in cond["message"]

    job = await p.job("after", alert_spec("RegistryErrors", annotations={"summary": "pull rate limit"}))
    await p.wait_phase(["after"], {"Queued"})
    assert (await p.queued_payload(job["metadata"]["uid"]))["rules"] == []

    # No new generation: no write. Then one more generation, whose status can only come after the label's
    # event (kopf hands one object's events over in order), so every event before it has been handled.
    await p.kube.merge_patch(path, {"metadata": {"labels": {"team": "platform"}}})
    await p.kube.merge_patch(path, {"spec": {"match": {"errorRegex": "(?i)rate limit"}}})
    rule = await p.wait_rule("registry-limits")
    assert rule["status"]["observedGeneration"] == 3

    log = await flush_audit_log(p)
    writes = Counter(
        ev["objectRef"].get("subresource", "") for ev in audit_events(log)
        if ev.get("stage") == "ResponseComplete" and ev["verb"] in ("patch", "update")
        and ev["objectRef"].get("resource") == "triagerules" and ev["objectRef"].get("namespace") == p.ns)
    assert writes["status"] == 3, writes  # one per generation
    assert writes[""] == 3, writes  # the test's own: two spec patches and the label; the operator writes none
