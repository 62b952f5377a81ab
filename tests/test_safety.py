"""The asymmetric safety policy (analyzers/safety.py), on synthetic verdicts from every kind of analyzer.

A false_positive stands only when something explains the job away and nothing strong speaks against it;
a critical or sustained alert needs a signal from outside its own payload; a neverDiscard TriageRule
beats every false_positive. Each test also shows the case where the verdict does stand, so it can fail.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from kubetriage.analyzers import safety
from kubetriage.analyzers.chain import run_offline_chain
from kubetriage.analyzers.rules import RulesAnalyzer
from kubetriage.api.contract import AnalysisContext, AnalysisRequest, TeamRule
from kubetriage.api.evidence import Evidence
from kubetriage.api.models import (
    Alert,
    Classification,
    ScriptResult,
    Source,
    TriageRuleSpec,
    Verdict,
    verdict_from_classification,
)

NOW = dt.datetime(2026, 11, 23, 3, 0, 0, tzinfo=dt.UTC)
STARTS = dt.datetime(2026, 11, 23, 2, 30, 0, tzinfo=dt.UTC)
FP = Classification.FALSE_POSITIVE
VALID = Classification.VALID
INCONCLUSIVE = Classification.INCONCLUSIVE
LLM_REASON = "the model thinks this is noise"


class FixedAnalyzer:
    """An analyzer with a fixed answer, standing in for the LLM, memory, vision or rules."""

    def __init__(self, name: str, verdict: Verdict | None) -> None:
        self.name = name
        self.verdict = verdict
        self.calls = 0

    async def analyze(self, request: AnalysisRequest, context: AnalysisContext) -> Verdict | None:
        self.calls += 1
        return self.verdict


def says(name: str, classification: Classification, confidence: float, reason: str = LLM_REASON) -> FixedAnalyzer:
    return FixedAnalyzer(name, verdict_from_classification(classification, reason, confidence, name, title="t"))


def rule(name: str, match: dict[str, Any] | None = None, **action: Any) -> TeamRule:
    return TeamRule(name=name, spec=TriageRuleSpec.model_validate({"match": match or {}, "action": action}))


def alert_request(rules: list[TeamRule] | None = None, **alert: Any) -> AnalysisRequest:
    alert.setdefault("name", "KubePodCrashLooping")
    alert.setdefault("starts_at", STARTS)
    return AnalysisRequest(uid="u-a", name="alert-job", namespace="prod", source=Source(type="alert"),
                           alert=Alert(**alert), rules=rules or [])


def script_request(rules: list[TeamRule] | None = None, **fields: Any) -> AnalysisRequest:
    fields.setdefault("script_name", "checkout-e2e")
    fields.setdefault("success", False)
    return AnalysisRequest(uid="u-s", name="script-job", namespace="prod", source=Source(type="scriptResult"),
                           script_result=ScriptResult(**fields), rules=rules or [])


def ctx(*evidence: Evidence, **kw: Any) -> AnalysisContext:
    kw.setdefault("now", NOW)
    return AnalysisContext(evidence=list(evidence), **kw)


async def run(request: AnalysisRequest, *analyzers: Any, context: AnalysisContext | None = None) -> Verdict:
    return await run_offline_chain(request, context or ctx(), analyzers=list(analyzers))


def prom(**value: Any) -> Evidence:
    return Evidence(source="prometheus", value=value)


def am(**value: Any) -> Evidence:
    return Evidence(source="alertmanager", value=value)


def alert_history(**value: Any) -> Evidence:
    return Evidence(source="history", value=value)


HUMAN_SILENCE = {"created_by": "alice@example.com", "comment": "planned failover of db-0, CHG-4411"}
OWN_SILENCE = {"created_by": "kubetriage", "comment": "auto: false_positive", "by_kubetriage": True}
RECOVERED = {"firing_now": False, "recovered_after_s": 120, "true_share": 0.1}
FIRING = {"firing_now": True, "true_share": 0.9, "since_change_s": 1800}
MAINTENANCE_RULE = rule(
    "db-maintenance",
    {"labels": {"service": "db"}, "window": {"start": "2026-11-23T02:00:00Z", "end": "2026-11-23T04:00:00Z"}},
    classification="false_positive", confidence=0.9, reason="planned failover",
)
PROD_CRITICAL = rule(
    "prod-critical", {"labels": {"severity": "critical", "namespace": "prod"}}, neverDiscard=True,
    reason="pages in prod need a human",
)
# Below the threshold, so the analyzer after it gets its say (a confident valid rule decides first).
VALID_RULE = rule("db-always-real", {"labels": {"service": "db"}}, classification="valid", confidence=0.5)


def assert_held(v: Verdict, *names: str) -> None:
    """Inconclusive, no discard, no confidence, and the reason names each of ``names``."""
    assert v.classification == INCONCLUSIVE, v.reason
    assert v.discard is False and v.confidence == 0.0
    for name in names:
        assert name in v.reason, (name, v.reason)


# --------------------------------------------------------------------------- something must explain it away


async def test_an_unexplained_llm_false_positive_is_inconclusive() -> None:
    for request in (script_request(error_message="KeyError: 'total'"), alert_request(severity="warning")):
        llm = says("llm", FP, 0.95)
        v = await run(request, llm)
        assert_held(v, "nothing found explains", f"the llm analyzer said false_positive: {LLM_REASON}")
        assert v.analyzer == "llm" and llm.calls == 1


async def test_an_explained_llm_false_positive_stands() -> None:
    # The same LLM verdict with the test's own tooling failing: something explains it away.
    v = await run(script_request(error_message="npm ERR! code ENOSPC"), says("llm", FP, 0.95))
    assert v.classification == FP and v.confidence == 0.95 and v.reason == LLM_REASON


async def test_valid_and_inconclusive_verdicts_pass_untouched() -> None:
    request = alert_request(severity="critical", labels={"flaps_last_hour": "9"})
    for c in (VALID, INCONCLUSIVE):
        verdict = verdict_from_classification(c, "r", 0.9, "llm")
        assert safety.guard(verdict, safety.assess(request, ctx(prom(**FIRING))), []) is verdict


# --------------------------------------------------------------------------- critical or sustained alerts

ONE_PAYLOAD_SIGNAL = {
    "critical flapping label": {"severity": "critical", "labels": {"flaps_last_hour": "12"}},
    "critical flapping annotation": {"severity": "critical", "annotations": {"flapping": "true"}},
    "critical maintenance label": {"severity": "critical", "labels": {"maintenance": "true", "node": "worker-12"}},
    "critical maintenance annotation": {
        "labels": {"severity": "critical"},
        "annotations": {"maintenance_window": "2026-11-23T02:00:00Z/2026-11-23T04:00:00Z"},
    },
    "sustained warning with maintenance label": {
        "severity": "warning", "consecutive_count": 10, "labels": {"maintenance": "true"},
    },
    "sustained warning with flapping label": {
        "severity": "warning", "consecutive_count": 5, "labels": {"flaps_last_hour": "20"},
    },
    "critical single blip": {"severity": "critical", "consecutive_count": 1},
    "critical resolved quickly": {
        "severity": "page", "status": "resolved", "ends_at": STARTS + dt.timedelta(seconds=60),
    },
}


@pytest.mark.parametrize("alert", ONE_PAYLOAD_SIGNAL.values(), ids=ONE_PAYLOAD_SIGNAL.keys())
@pytest.mark.parametrize("analyzer", ["llm", "vision", "rules"])
async def test_a_critical_or_sustained_alert_is_never_discarded_on_one_payload_signal(
    alert: dict[str, Any], analyzer: str
) -> None:
    v = await run(alert_request(**alert), says(analyzer, FP, 0.99))
    assert_held(v, "is not discarded on payload signals alone", f"the {analyzer} analyzer said false_positive")


@pytest.mark.parametrize("alert", ONE_PAYLOAD_SIGNAL.values(), ids=ONE_PAYLOAD_SIGNAL.keys())
async def test_the_real_rules_then_an_llm_never_discard_them_either(alert: dict[str, Any]) -> None:
    v = await run(alert_request(**alert), RulesAnalyzer(), says("llm", FP, 0.99))
    assert v.classification != FP and v.discard is False


async def test_the_reason_says_what_made_it_critical_or_sustained() -> None:
    both = await run(alert_request(severity="critical", consecutive_count=7), says("llm", FP, 0.99))
    assert_held(both, "a critical, sustained alert (consecutiveCount=7)")
    sustained = await run(alert_request(severity="warning", consecutive_count=5), says("llm", FP, 0.99))
    assert_held(sustained, "a sustained alert (consecutiveCount=5)")
    by_prometheus = await run(alert_request(severity="warning"), says("llm", FP, 0.99),
                              context=ctx(prom(firing_now=True, true_share=0.6, since_change_s=900)))
    assert_held(by_prometheus, "Prometheus: firing now")


async def test_the_same_payload_signal_on_a_warning_alert_may_stand() -> None:
    # The guard is about critical and sustained alerts: a flapping warning alert may be discarded.
    v = await run(alert_request(severity="warning", labels={"flaps_last_hour": "12"}), says("llm", FP, 0.99))
    assert v.classification == FP and v.reason == LLM_REASON
    short = await run(alert_request(severity="warning", consecutive_count=4, labels={"flaps_last_hour": "12"}),
                      says("llm", FP, 0.99))
    assert short.classification == FP  # 4 is below the sustained count for a warning


# --------------------------------------------------------------------------- signals from outside the payload

OUTSIDE = {
    "human silence": (ctx(am(silences=[HUMAN_SILENCE])), [], "silenced by alice@example.com"),
    "Prometheus recovered": (ctx(prom(**RECOVERED)), [], None),
    "FP TriageRule": (ctx(), [MAINTENANCE_RULE], None),
    "human FP history": (ctx(alert_history(fired_7d=9, human_false_positive=3)), [], None),
}
CRITICAL_FLAPPING = {"severity": "critical", "labels": {"flaps_last_hour": "12", "service": "db"}}


@pytest.mark.parametrize(("context", "rules", "cited"), OUTSIDE.values(), ids=OUTSIDE.keys())
async def test_an_outside_signal_lets_a_critical_false_positive_stand(
    context: AnalysisContext, rules: list[TeamRule], cited: str | None
) -> None:
    request = alert_request(rules, **CRITICAL_FLAPPING)
    v = await run(request, says("llm", FP, 0.95), context=context)
    assert v.classification == FP and v.discard is True
    # The team's rule decides first (at its own 0.90); otherwise the LLM's verdict stands unchanged.
    assert (v.analyzer, v.confidence) in (("llm", 0.95), ("team-rule", 0.9))
    signals = safety.assess(request, context)
    assert signals.critical and signals.outside
    if cited:
        assert any(cited in s for s in signals.outside)


async def test_without_the_outside_signal_the_same_verdict_is_held() -> None:
    v = await run(alert_request(**CRITICAL_FLAPPING), says("llm", FP, 0.95))
    assert_held(v, "a critical alert is not discarded on payload signals alone")


@pytest.mark.parametrize(
    "context",
    [
        ctx(prom(firing_now=False, recovered_after_s=3600)),  # recovered, but only after an hour
        ctx(prom(firing_now=None, recovered_after_s=60)),  # unknown now
        ctx(alert_history(fired_7d=9, human_false_positive=1)),  # one human verdict is not a history
        ctx(am(silences=[{**HUMAN_SILENCE, "by_kubetriage": True}])),
    ],
    ids=["recovered-late", "state-unknown", "one-human-fp", "own-silence"],
)
async def test_weak_outside_signals_do_not_count(context: AnalysisContext) -> None:
    v = await run(alert_request(**CRITICAL_FLAPPING), says("llm", FP, 0.95), context=context)
    assert_held(v, "not discarded on payload signals alone")


async def test_a_memory_false_positive_is_a_human_verdict_on_the_same_target() -> None:
    v = await run(alert_request(**CRITICAL_FLAPPING), says("memory", FP, 0.95))
    assert v.classification == FP and v.analyzer == "memory"


# --------------------------------------------------------------------------- strong evidence against

# Each with a human silence too: the alert is explained away, and still held by the evidence against it.
SILENCED = am(silences=[HUMAN_SILENCE])
AGAINST = {
    "Prometheus firing now": ([prom(**FIRING), SILENCED], [], "Prometheus: firing now, true 90% of the window"),
    "3 services co-firing": (
        [am(co_firing=6, co_firing_services=3, co_firing_alerts=["PaymentsDown", "CartErrors"],
            silences=[HUMAN_SILENCE])], [],
        "Alertmanager: 6 other alert(s) firing across 3 service(s) (PaymentsDown, CartErrors)",
    ),
    "humans called it valid": (
        [alert_history(fired_7d=4, human_false_positive=1, human_valid=2), SILENCED], [],
        "humans called it false_positive 1, valid 2 time(s)",
    ),
    "valid TriageRule": ([SILENCED], [VALID_RULE], "TriageRule db-always-real: valid at 0.50"),
}


@pytest.mark.parametrize(("evidence", "rules", "against"), AGAINST.values(), ids=AGAINST.keys())
@pytest.mark.parametrize("analyzer", ["llm", "memory", "rules", "vision"])
async def test_strong_evidence_against_makes_any_false_positive_inconclusive_naming_both_sides(
    evidence: list[Evidence], rules: list[TeamRule], against: str, analyzer: str
) -> None:
    request = alert_request(rules, severity="warning", labels={"flaps_last_hour": "12", "service": "db"})
    context = ctx(*evidence)
    assert "silenced by alice@example.com" in " ".join(safety.assess(request, context).explains)
    v = await run(request, says(analyzer, FP, 0.99), context=context)
    assert_held(v, "conflicting signals", against, f"the {analyzer} analyzer said false_positive: {LLM_REASON}")


async def test_below_the_strong_thresholds_nothing_speaks_against() -> None:
    request = alert_request(severity="warning", labels={"flaps_last_hour": "12"})
    for evidence in (prom(firing_now=True, true_share=0.4), am(co_firing=4, co_firing_services=2),
                     alert_history(fired_7d=4, human_false_positive=2, human_valid=1)):
        v = await run(request, says("llm", FP, 0.99), context=ctx(evidence))
        assert v.classification == FP, (evidence, v.reason)


async def test_a_regression_in_the_test_history_holds_a_script_false_positive() -> None:
    regression = Evidence(source="history", value={"same_commit_runs": 3, "same_commit_passes": 0,
                                                   "default_branch_runs": 20, "default_branch_failures": 1})
    request = script_request(error_message="npm ERR! code ENOSPC")
    assert (await run(request, RulesAnalyzer())).classification == FP
    rules_alone = await run(request, RulesAnalyzer(), context=ctx(regression))
    assert_held(rules_alone, "conflicting evidence", "infrastructure error", "default branch: 1 of 20 run(s) failed")
    then_llm = await run(request, RulesAnalyzer(), says("llm", FP, 0.99), context=ctx(regression))
    assert_held(then_llm, "fails every run at this commit, healthy on the default branch",
                f"the llm analyzer said false_positive: {LLM_REASON}")


# --------------------------------------------------------------------------- neverDiscard


@pytest.mark.parametrize("analyzer", ["llm", "memory", "rules", "vision", "team-rule"])
async def test_never_discard_beats_a_confident_false_positive_from_every_analyzer(analyzer: str) -> None:
    request = alert_request([PROD_CRITICAL], severity="critical", labels={"severity": "critical", "namespace": "prod"})
    # Even with every outside signal there is: only a human may discard it.
    context = ctx(am(silences=[HUMAN_SILENCE]), prom(**RECOVERED), alert_history(human_false_positive=5))
    v = await run(request, says(analyzer, FP, 0.99), context=context)
    assert_held(v, "a human must decide", "TriageRule prod-critical: never discard without a human",
                "pages in prod need a human", f"the {analyzer} analyzer said false_positive")


async def test_never_discard_beats_a_false_positive_team_rule() -> None:
    fp_rule = rule("ignore-crashloop", {"alertNames": ["KubePodCrashLooping"]},
                   classification="false_positive", confidence=0.99)
    labels = {"severity": "critical", "namespace": "prod"}
    v = await run(alert_request([PROD_CRITICAL, fp_rule], labels=labels), says("llm", FP, 0.99))
    assert_held(v, "TriageRule prod-critical", "the team-rule analyzer said false_positive",
                "TriageRule ignore-crashloop")
    # Without the guard the team's false_positive rule decides.
    alone = await run(alert_request([fp_rule], labels=labels), says("llm", VALID, 0.99))
    assert alone.classification == FP and alone.analyzer == "team-rule"


async def test_never_discard_does_not_touch_valid_or_unmatched_jobs() -> None:
    labels = {"severity": "critical", "namespace": "prod"}
    v = await run(alert_request([PROD_CRITICAL], labels=labels), says("llm", VALID, 0.95))
    assert v.classification == VALID
    staging = {"severity": "warning", "namespace": "staging", "flaps_last_hour": "12"}
    v = await run(alert_request([PROD_CRITICAL], labels=staging), says("llm", FP, 0.95))
    assert v.classification == FP


# --------------------------------------------------------------------------- kubetriage's own silence


async def test_kubetriages_own_silence_never_counts() -> None:
    request = alert_request(**CRITICAL_FLAPPING)
    own = ctx(am(silences=[OWN_SILENCE]))
    v = await run(request, says("llm", FP, 0.95), context=own)
    assert_held(v, "not discarded on payload signals alone")
    assert "auto: false_positive" not in v.reason
    signals = safety.assess(request, own)
    assert signals.outside == [] and signals.explains == []
    # A human's silence next to it does count, and is the one cited.
    mixed = ctx(am(silences=[OWN_SILENCE, HUMAN_SILENCE]))
    assert (await run(request, says("llm", FP, 0.95), context=mixed)).classification == FP
    cited = "silenced by alice@example.com: planned failover of db-0, CHG-4411"
    assert safety.assess(request, mixed).outside == [cited]


# --------------------------------------------------------------------------- failed gatherers

PROM_DOWN = Evidence(source="prometheus", error="Get http://prometheus:9090: connection refused")


async def test_a_failed_gatherer_is_named_and_adds_no_confidence() -> None:
    request = script_request(error_message="npm ERR! code ENOSPC")
    plain = await run(request, RulesAnalyzer())
    failed = await run(request, RulesAnalyzer(), context=ctx(PROM_DOWN))
    assert plain.classification == failed.classification == FP
    assert failed.confidence == plain.confidence
    assert "evidence unavailable: prometheus" in failed.reason and "evidence unavailable" not in plain.reason
    assert safety.assess(request, ctx(PROM_DOWN)).unavailable == ["prometheus"]


async def test_a_failed_gatherer_is_no_outside_signal() -> None:
    v = await run(alert_request(**CRITICAL_FLAPPING), says("llm", FP, 0.95), context=ctx(PROM_DOWN))
    assert_held(v, "not discarded on payload signals alone")
    signals = safety.assess(alert_request(**CRITICAL_FLAPPING), ctx(PROM_DOWN))
    assert signals.outside == [] and signals.against == [] and signals.explains == []


async def test_a_failed_gatherer_never_lifts_a_false_positive_below_the_threshold() -> None:
    # A reachability failure (0.6) is never enough alone; a gatherer failing must not change that.
    request = script_request(error_message="Error: connect ECONNREFUSED 10.0.0.5:443")
    for context in (ctx(), ctx(PROM_DOWN), ctx(PROM_DOWN, Evidence(source="alertmanager", error="timeout"))):
        v = await run(request, RulesAnalyzer(), context=context)
        assert v.classification == INCONCLUSIVE and v.discard is False and v.confidence == 0.0, v.reason


# --------------------------------------------------------------------------- valid against a false_positive rule


@pytest.mark.parametrize("analyzer", ["llm", "memory", "rules"])
async def test_a_valid_verdict_against_a_false_positive_rule_is_inconclusive(analyzer: str) -> None:
    # The rule's own confidence (0.5) is below the threshold, so the analyzer after it gets its say.
    weak_rule = rule("db-maintenance", MAINTENANCE_RULE.spec.match.wire(), classification="false_positive",
                     confidence=0.5)
    request = alert_request([weak_rule], severity="warning", labels={"service": "db"})
    v = await run(request, says(analyzer, VALID, 0.99, "checkout is down"))
    assert_held(v, "conflicting signals", "TriageRule db-maintenance: false_positive at 0.50",
                f"the {analyzer} analyzer said valid: checkout is down")
    # Outside the rule's window, the same valid verdict stands.
    moved = request.model_copy(update={"alert": request.alert.model_copy(  # type: ignore[union-attr]
        update={"starts_at": STARTS + dt.timedelta(hours=3)})})
    assert (await run(moved, says(analyzer, VALID, 0.99))).classification == VALID


async def test_the_guard_is_pure_and_keeps_the_verdicts_cost() -> None:
    tokens = {"prompt": 10, "completion": 2, "total": 12}
    verdict = verdict_from_classification(FP, "noise", 0.9, "llm", model="m", tokens=tokens, cost_usd=0.01)
    request = alert_request(severity="critical")
    signals = safety.assess(request, ctx())
    held = safety.guard(verdict, signals, [])
    assert held.classification == INCONCLUSIVE and held.model == "m" and held.cost_usd == 0.01
    assert held.tokens == verdict.tokens
    assert verdict.classification == FP and safety.guard(verdict, signals, []) == held
