"""TriagePolicy decisions (api/policy.py), the webhook signature, the Slack message and the TTL pacer, without a
cluster: pure functions of their inputs (the pacer runs on the real event loop and clock)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import time
from typing import Any

import pytest

from kubetriage.api import policy as pol
from kubetriage.api.contract import AnalysisRequest, TeamRule
from kubetriage.api.models import (
    MAX_ACTIONS,
    ActionResult,
    Alert,
    JobAction,
    ScriptResult,
    Source,
    TriagePolicySpec,
    TriageRuleSpec,
    verdict_from_classification,
)
from kubetriage.controller.actions.slack import message
from kubetriage.controller.actions.webhook import sign
from kubetriage.controller.ttl import Pacer

NOW = dt.datetime(2026, 11, 23, 3, 0, 0, tzinfo=dt.UTC)
NS = "shop"


def policy(name: str = "p", namespace: str = NS, **spec: Any) -> pol.Policy:
    spec.setdefault("mode", "enforce")
    return pol.Policy(namespace, name, TriagePolicySpec.model_validate(spec))


def alert(labels: dict[str, str] | None = None, **fields: Any) -> AnalysisRequest:
    fields.setdefault("name", "DiskPressure")
    labels = {"instance": "db-1", "severity": "warning", "job": "node"} if labels is None else labels
    return AnalysisRequest(uid="u1", name="j1", namespace=NS, source=Source(type="alert"),
                           alert=Alert(labels=labels, **fields))


def script(**fields: Any) -> AnalysisRequest:
    fields.setdefault("script_name", "checkout-e2e")
    fields.setdefault("success", False)
    return AnalysisRequest(uid="u2", name="j2", namespace=NS, source=Source(type="scriptResult"),
                           script_result=ScriptResult(**fields))


def fp(confidence: float = 0.95) -> Any:
    return verdict_from_classification("false_positive", "flapping", confidence, "team-rule")


def valid(confidence: float = 0.95) -> Any:
    return verdict_from_classification("valid", "down", confidence, "rules")


SILENCE = {"silence": {"alertmanager": {"url": "https://am.example"}}}
HOOK = {"name": "oncall", "webhook": {"url": "https://hooks.example/k", "signingSecretRef": {"name": "s", "key": "k"}}}
SLACK = {"name": "chat", "slack": {"urlSecretRef": {"name": "s", "key": "slack"}}}


def plan(policies: list[pol.Policy], request: AnalysisRequest, verdict: Any, **kw: Any) -> list[JobAction]:
    return pol.plan(policies, request, verdict, uid=request.uid, now=NOW, **kw)


def test_an_enforcing_policy_plans_a_pending_silence_with_exact_matchers() -> None:
    [entry] = plan([policy(**SILENCE)], alert(), fp())
    assert (entry.action, entry.result, entry.key, entry.policy) == ("silence", "Pending", "u1:false_positive", "p")
    assert entry.message == 'silence alertname="DiskPressure", severity="warning", instance="db-1", job="node" for 2h'


def test_shadow_mode_plans_what_would_be_done_and_nothing_to_do() -> None:
    entries = plan([policy(mode="shadow", notify=[HOOK], **SILENCE)], alert(), fp())
    assert [(e.action, e.result) for e in entries] == [("silence", "Shadow"), ("webhook", "Shadow")]
    assert entries[0].message.startswith("would silence ") and entries[1].message.startswith("would notify ")
    assert pol.pending(entries) == []
    # the CRD's default is shadow: a policy nobody set a mode on sends nothing
    assert TriagePolicySpec.model_validate({}).mode == "shadow"


def test_class_and_confidence_filters_of_policy_and_notification() -> None:
    p = policy(minConfidence=0.9, classifications=["false_positive", "valid"],
               notify=[HOOK, {**SLACK, "classifications": ["valid"], "minConfidence": 0.5}], **SILENCE)
    assert plan([p], alert(), fp(0.89)) == []  # below the policy's floor: nothing at all
    assert [e.action for e in plan([p], alert(), fp(0.95))] == ["silence", "webhook"]  # slack: valid only
    assert [e.action for e in plan([p], alert(), valid(0.6))] == ["slack"]  # webhook floor 0.9, slack's 0.5
    assert [e.action for e in plan([p], alert(), valid(0.95))] == ["webhook", "slack"]  # a silence: never valid
    inconclusive = verdict_from_classification("inconclusive", "?", 0.0, "rules")
    assert plan([p], alert(), inconclusive) == []


def test_silences_only_for_false_positive_alerts_never_scripts() -> None:
    p = policy(classifications=["false_positive", "valid"], **SILENCE)
    assert plan([p], script(), fp()) == []
    assert plan([p], alert(), valid()) == []


def test_a_never_discard_rule_means_no_silence_ever() -> None:
    guard = TeamRule(name="db-needs-a-human", spec=TriageRuleSpec.model_validate(
        {"match": {"labels": {"instance": "db-1"}}, "action": {"neverDiscard": True}}))
    [entry] = plan([policy(**SILENCE)], alert(), fp(), rules=[guard])
    assert entry.result == "Skipped" and "TriageRule db-needs-a-human" in (entry.message or "")
    # a rule the job was admitted with counts as well as one the operator knows now
    guarded = alert().model_copy(update={"rules": [guard]})
    assert plan([policy(**SILENCE)], guarded, fp())[0].result == "Skipped"
    # a guard for another target does not block this one
    other = TeamRule(name="g", spec=TriageRuleSpec.model_validate(
        {"match": {"labels": {"instance": "db-2"}}, "action": {"neverDiscard": True}}))
    assert plan([policy(**SILENCE)], alert(), fp(), rules=[other])[0].result == "Pending"


def test_no_silence_for_an_alert_that_names_no_target() -> None:
    [entry] = plan([policy(**SILENCE)], alert({"severity": "warning", "region": "eu"}), fp())
    assert entry.result == "Skipped" and "would hide every target" in (entry.message or "")


def test_a_policy_acts_only_in_its_own_namespace_and_on_what_it_selects() -> None:
    assert plan([policy(namespace="other", **SILENCE)], alert(), fp()) == []
    assert plan([policy(match={"alertNames": ["Other"]}, **SILENCE)], alert(), fp()) == []
    assert plan([policy(match={"labels": {"job": "node"}, "sourceType": "alert"}, **SILENCE)], alert(), fp())
    assert plan([policy(match={"errorRegex": "Timeout"}, notify=[HOOK])], script(error_message="TimeoutError"),
                fp())
    assert plan([policy(match={"errorRegex": "(?=bad"}, notify=[HOOK])], script(error_message="x"), fp()) == []


def test_a_replayed_verdict_plans_nothing_twice() -> None:
    p = policy(notify=[HOOK], **SILENCE)
    first = plan([p], alert(), fp())
    assert plan([p], alert(), fp(), existing=first) == []
    done = [e.model_copy(update={"result": ActionResult.SUCCEEDED}) for e in first]
    assert plan([p], alert(), fp(), existing=done) == []
    # a new verdict is a new key: a human's valid verdict notifies again
    p2 = policy(notify=[HOOK], classifications=["false_positive", "valid"])
    assert [e.key for e in plan([p2], alert(), valid(), existing=done)] == ["u1:valid"]


def test_silence_matchers_are_exact_and_name_severity_even_when_absent() -> None:
    s = pol.silence_for(Alert(name="A", labels={"instance": "i", "pod": "x", "service": "api"}))
    assert isinstance(s, pol.SilenceSpec)
    assert s.matchers == (("alertname", "A"), ("severity", ""), ("instance", "i"), ("service", "api"))
    assert all(m["isRegex"] is False and m["isEqual"] is True for m in s.wire())
    assert pol.silence_from_wire(s.wire()) == s
    assert pol.silence_from_wire([{**s.wire()[0], "isRegex": True}, *s.wire()[1:]]) is None
    assert pol.silence_from_wire([m for m in s.wire() if m["name"] != "severity"]) is None
    # the pool's identity labels decide what names a target
    s2 = pol.silence_for(Alert(name="A", severity="critical", labels={"pod": "x", "instance": "i"}), ["pod"])
    assert isinstance(s2, pol.SilenceSpec) and s2.matchers == (("alertname", "A"), ("severity", "critical"),
                                                               ("pod", "x"))
    assert s2.target() == (("alertname", "A"), ("pod", "x"))


def test_severity_ranks_rise_and_unknown_counts_as_a_rise() -> None:
    assert pol.severity_rank("info") < pol.severity_rank("warning") < pol.severity_rank("critical")
    assert pol.severity_rank("Critical") == pol.severity_rank("critical")
    assert pol.severity_rank("sev-0") > pol.severity_rank("critical")
    assert pol.severity_rank("") < pol.severity_rank("info")


def entry(action: str, result: str, sid: str | None = None, until: dt.datetime | None = None, key: str = "k",
          policy_name: str = "p") -> JobAction:
    return JobAction(policy=policy_name, action=action, key=key, result=result, at=NOW, silence_id=sid,
                     silence_until=until)


def test_active_silence_is_the_newest_made_not_lifted_not_ended() -> None:
    later = NOW + dt.timedelta(hours=1)
    made = entry("silence", "Succeeded", "s1", later)
    assert pol.active_silence([made], NOW) == made
    assert pol.active_silence([made], later) is None  # ended on its own
    assert pol.active_silence([made, entry("unsilence", "Succeeded", "s1")], NOW) is None
    assert pol.active_silence([made, entry("unsilence", "Failed", "s1")], NOW) == made
    assert pol.active_silence([entry("silence", "Shadow")], NOW) is None


def test_merge_replaces_the_same_action_and_caps_without_dropping_pending_work() -> None:
    pending = entry("webhook", "Pending", key="a")
    merged = pol.merge([pending], [pending.model_copy(update={"result": ActionResult.SUCCEEDED})])
    assert [e.result for e in merged] == ["Succeeded"]
    many = [entry("webhook", "Succeeded", key=f"k{i}") for i in range(MAX_ACTIONS)]
    capped = pol.merge([pending, *many], [entry("slack", "Pending", key="z")])
    assert len(capped) == MAX_ACTIONS
    assert pending in capped and capped[-1].action == "slack" and many[0] not in capped


def test_unreadable_entries_are_left_out_not_fatal() -> None:
    good = entry("webhook", "Succeeded").wire()
    assert [e.action for e in pol.parse_actions([good, {"policy": "p"}, "junk"])] == ["webhook"]
    assert pol.parse_actions(None) == []


def test_the_webhook_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    body = b'{"a":1}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("s3cret", "1700000000", body) == f"sha256={expected}"
    assert sign("s3cret", "1700000001", body) != sign("s3cret", "1700000000", body)


def test_slack_message_is_incoming_webhook_format() -> None:
    payload = {"verdict": {"classification": "valid", "confidence": 0.9, "reason": "down for 20 min",
                           "analyzer": "rules"},
               "job": {"namespace": NS, "name": "j1"}, "alert": {"name": "ApiDown", "severity": "critical"}}
    msg = message(payload)
    assert msg["text"].startswith("*valid* (0.90) for alert ApiDown (critical) by rules")
    assert msg["blocks"] == [{"type": "section", "text": {"type": "mrkdwn", "text": msg["text"]}}]


@pytest.mark.parametrize("rate", [1, 5, 40])
async def test_the_ttl_pacer_never_lets_more_than_rate_arrive_in_a_second(rate: int) -> None:
    """A stand-in for the API server's receive times: each 'request' is received at a random moment between
    its start and its answer; no one-second window may hold more than ``rate`` of them."""
    import random

    pacer = Pacer(rate)
    received: list[float] = []

    async def delete(answered: asyncio.Future[float]) -> None:
        await asyncio.sleep(random.uniform(0, 0.02))
        received.append(time.monotonic())
        await asyncio.sleep(random.uniform(0, 0.02))
        answered.set_result(time.monotonic())

    tasks = [asyncio.create_task(delete(await pacer.slot())) for _ in range(rate * 2 + 3)]
    await asyncio.gather(*tasks)
    received.sort()
    worst = max(sum(1 for t in received if start <= t < start + 1.0) for start in received)
    assert worst <= rate
    assert worst == rate or rate == 1  # and it does use the rate
