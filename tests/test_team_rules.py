"""TriageRule evaluation (analyzers/team_rules.py): each selector field, RE2 expressions, conflicts, and
the chain running the team's rules first and citing them."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from kubetriage.analyzers.chain import run_offline_chain
from kubetriage.analyzers.rules import RulesAnalyzer
from kubetriage.analyzers.team_rules import TeamRulesAnalyzer, compile_regex, hits, match, regex_problem
from kubetriage.api.contract import AnalysisContext, AnalysisRequest, TeamRule
from kubetriage.api.models import (
    Alert,
    AnalyzerName,
    Classification,
    ScriptResult,
    Source,
    TriageRuleSpec,
    Verdict,
    verdict_from_classification,
)

NOW = dt.datetime(2026, 11, 23, 3, 0, 0, tzinfo=dt.UTC)
STARTS = dt.datetime(2026, 11, 23, 2, 30, 0, tzinfo=dt.UTC)
WINDOW = {"start": "2026-11-23T02:00:00Z", "end": "2026-11-23T04:00:00Z"}
FP = Classification.FALSE_POSITIVE
VALID = Classification.VALID
INCONCLUSIVE = Classification.INCONCLUSIVE


def rule(name: str = "r", match: dict[str, Any] | None = None, **action: Any) -> TeamRule:
    """A rule as the CRD stores it (camelCase), classifying false_positive at 0.9 unless told otherwise."""
    if not action:
        action = {"classification": "false_positive", "confidence": 0.9}
    return TeamRule(name=name, spec=TriageRuleSpec.model_validate({"match": match or {}, "action": action}))


def alert_job(rules: list[TeamRule] | None = None, **alert: Any) -> AnalysisRequest:
    alert.setdefault("name", "KubePodCrashLooping")
    return AnalysisRequest(uid="u-a", name="alert-job", namespace="prod", source=Source(type="alert"),
                           alert=Alert(**alert), rules=rules or [])


def script_job(rules: list[TeamRule] | None = None, **fields: Any) -> AnalysisRequest:
    fields.setdefault("script_name", "checkout-e2e")
    fields.setdefault("success", False)
    return AnalysisRequest(uid="u-s", name="script-job", namespace="prod", source=Source(type="scriptResult"),
                           script_result=ScriptResult(**fields), rules=rules or [])


def matches(r: TeamRule, request: AnalysisRequest, now: dt.datetime = NOW) -> bool:
    return match(r, request, now) is not None


class FixedAnalyzer:
    def __init__(self, name: str, verdict: Verdict | None) -> None:
        self.name = name
        self.verdict = verdict
        self.calls = 0

    async def analyze(self, request: AnalysisRequest, context: AnalysisContext) -> Verdict | None:
        self.calls += 1
        return self.verdict


def says(name: str, classification: Classification, confidence: float) -> FixedAnalyzer:
    return FixedAnalyzer(name, verdict_from_classification(classification, f"{name} says so", confidence, name))


def ctx(**kw: Any) -> AnalysisContext:
    kw.setdefault("now", NOW)
    return AnalysisContext(**kw)


# --------------------------------------------------------------------------- selectors


def test_an_empty_match_applies_to_every_job() -> None:
    r = rule()
    assert matches(r, alert_job()) and matches(r, script_job())
    hit = match(r, alert_job(), NOW)
    assert hit is not None and hit.matched == ()


def test_source_type() -> None:
    alerts, scripts = rule(match={"sourceType": "alert"}), rule(match={"sourceType": "scriptResult"})
    assert matches(alerts, alert_job()) and not matches(alerts, script_job())
    assert matches(scripts, script_job()) and not matches(scripts, alert_job())
    hit = match(alerts, alert_job(), NOW)
    assert hit is not None and hit.matched == ("sourceType=alert",)


def test_alert_names_are_exact() -> None:
    r = rule(match={"alertNames": ["KubePodCrashLooping", "KubeJobFailed"]})
    assert matches(r, alert_job(name="KubePodCrashLooping")) and matches(r, alert_job(name="KubeJobFailed"))
    for other in ("kubepodcrashlooping", "KubePodCrashLoopingFast", "KubePodCrash", "KubePodCrashLooping "):
        assert not matches(r, alert_job(name=other)), other
    assert not matches(r, script_job(script_name="KubePodCrashLooping"))  # a script is not an alert


def test_labels_are_an_exact_subset() -> None:
    r = rule(match={"labels": {"namespace": "prod", "severity": "critical"}})
    full = {"namespace": "prod", "severity": "critical", "pod": "api-7d9f", "service": "api"}
    assert matches(r, alert_job(labels=full))
    assert not matches(r, alert_job(labels={**full, "severity": "Critical"}))  # values are exact
    assert not matches(r, alert_job(labels={**full, "namespace": "prod-eu"}))
    assert not matches(r, alert_job(labels={"namespace": "prod"}))  # a key missing
    assert not matches(r, alert_job())  # no labels at all
    assert not matches(r, alert_job(severity="critical", labels={"namespace": "prod"}))  # only label values count
    assert not matches(r, script_job())
    hit = match(r, alert_job(labels=full), NOW)
    assert hit is not None and hit.matched == ("namespace=prod", "severity=critical")


def test_script_names_are_exact() -> None:
    r = rule(match={"scriptNames": ["checkout-e2e"]})
    assert matches(r, script_job(script_name="checkout-e2e"))
    assert not matches(r, script_job(script_name="checkout-e2e-nightly"))
    assert not matches(r, script_job(script_name="Checkout-e2e"))
    assert not matches(r, alert_job(name="checkout-e2e"))


def test_error_regex_searches_the_error_message_logs_and_alert_annotations() -> None:
    r = rule(match={"errorRegex": r"(?i)pull rate limit|toomanyrequests"})
    assert matches(r, script_job(error_message="toomanyrequests: You have reached your pull rate limit"))
    assert matches(r, script_job(error_message="exit code 1", logs_excerpt="... Pull Rate Limit reached ..."))
    assert matches(r, alert_job(annotations={"description": "image pull failed: toomanyrequests"}))
    assert not matches(r, script_job(error_message="AssertionError: total", logs_excerpt="all good"))
    assert not matches(r, script_job())  # nothing to search
    assert not matches(r, alert_job(labels={"reason": "toomanyrequests"}))  # labels are not searched
    assert not matches(r, alert_job(name="toomanyrequests"))
    hit = match(r, script_job(error_message="toomanyrequests"), NOW)
    assert hit is not None and hit.matched == ("errorRegex",)


def test_error_regex_is_a_search_not_a_full_match() -> None:
    r = rule(match={"errorRegex": r"ECONN(RESET|REFUSED)"})
    assert matches(r, script_job(error_message="Error: connect ECONNREFUSED 10.0.0.5:443 after 3 tries"))
    anchored = rule(match={"errorRegex": r"^ECONNREFUSED$"})
    assert not matches(anchored, script_job(error_message="Error: connect ECONNREFUSED 10.0.0.5:443"))


def test_error_regex_reads_the_whole_text_so_an_anchor_never_matches_at_a_cut() -> None:
    """RE2 is linear and the CRD caps the texts, so the whole log is searched: `$` is the real end."""
    r = rule(match={"errorRegex": "ECONNRESET"})
    tail = "x" * 30_000 + " ECONNRESET"
    assert matches(r, script_job(error_message="ok", logs_excerpt=tail))
    anchored = rule(match={"errorRegex": r"(a+)+$"})
    assert not matches(anchored, script_job(error_message="ok", logs_excerpt="a" * 30_000 + "!"))


def test_time_window_on_starts_at() -> None:
    r = rule(match={"window": WINDOW})
    assert matches(r, alert_job(starts_at=STARTS))
    assert matches(r, alert_job(starts_at=dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.UTC)))  # start inclusive
    assert not matches(r, alert_job(starts_at=dt.datetime(2026, 11, 23, 4, 0, tzinfo=dt.UTC)))  # end exclusive
    assert not matches(r, alert_job(starts_at=dt.datetime(2026, 11, 23, 1, 59, tzinfo=dt.UTC)))
    # startsAt decides even when now is outside the window, and a naive time is UTC.
    assert matches(r, alert_job(starts_at=STARTS), now=NOW + dt.timedelta(days=3))
    assert matches(r, alert_job(starts_at=dt.datetime(2026, 11, 23, 2, 30)))
    # Another timezone: 03:30+01:00 is 02:30 UTC, inside; 05:30+01:00 is 04:30 UTC, outside.
    plus_one = dt.timezone(dt.timedelta(hours=1))
    assert matches(r, alert_job(starts_at=dt.datetime(2026, 11, 23, 3, 30, tzinfo=plus_one)))
    assert not matches(r, alert_job(starts_at=dt.datetime(2026, 11, 23, 5, 30, tzinfo=plus_one)))
    hit = match(r, alert_job(starts_at=STARTS), NOW)
    assert hit is not None and hit.matched == ("window 2026-11-23T02:00:00+00:00/2026-11-23T04:00:00+00:00",)


def test_time_window_on_now_without_starts_at() -> None:
    r = rule(match={"window": WINDOW})
    for job in (alert_job(), script_job()):
        assert matches(r, job, now=NOW)
        assert not matches(r, job, now=NOW + dt.timedelta(hours=1))
        assert not matches(r, job, now=NOW - dt.timedelta(hours=2))


def test_every_selector_given_must_hold() -> None:
    m = {
        "sourceType": "alert", "alertNames": ["KubePodCrashLooping"], "labels": {"service": "db"},
        "errorRegex": "failover", "window": WINDOW,
    }
    job = {"name": "KubePodCrashLooping", "labels": {"service": "db"}, "starts_at": STARTS,
           "annotations": {"summary": "db-0 restarting during failover"}}
    r = rule("db-maintenance", m)
    hit = match(r, alert_job(**job), NOW)
    assert hit is not None and len(hit.matched) == 5
    for spoiled in ({"name": "KubeJobFailed"}, {"labels": {"service": "api"}},
                    {"annotations": {"summary": "db-0 restarting"}},
                    {"starts_at": STARTS + dt.timedelta(hours=2)}):
        assert not matches(r, alert_job(**{**job, **spoiled})), spoiled
    assert not matches(rule("s", {**m, "sourceType": "scriptResult"}), alert_job(**job))


async def test_a_rule_that_does_not_match_never_applies() -> None:
    elsewhere = rule("other-alert", {"alertNames": ["KubeJobFailed"]})
    never = rule("staging-only", {"labels": {"namespace": "staging"}}, neverDiscard=True)
    request = script_job([elsewhere, never], error_message="KeyError: 'total'")
    assert hits(request, NOW) == []
    assert await TeamRulesAnalyzer().analyze(request, ctx()) is None
    v = await run_offline_chain(request, ctx())
    assert v.classification == INCONCLUSIVE and "TriageRule" not in v.reason
    # With no rules at all, the verdict is the same.
    assert v == await run_offline_chain(script_job(error_message="KeyError: 'total'"), ctx())
    # And a non-matching neverDiscard does not hold a job it does not select.
    flaky = alert_job([never], severity="warning", labels={"namespace": "prod", "flaps_last_hour": "12"})
    assert (await run_offline_chain(flaky, ctx())).classification == FP


# --------------------------------------------------------------------------- regular expressions (RE2)


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        ("(unclosed", "(unclosed"),
        (r"(?<=pull )rate", "pull rate"),  # lookbehind: not RE2
        (r"(a)\1", "aa"),  # backreference: not RE2
        ("a{2,1}", "aa"),
        ("*oops", "*oops"),
    ],
)
def test_an_invalid_regex_never_matches_and_says_why(pattern: str, text: str) -> None:
    assert compile_regex(pattern) is None
    problem = regex_problem(pattern)
    assert problem is not None and problem.startswith("errorRegex does not compile (RE2 syntax): ")
    assert len(problem) > len("errorRegex does not compile (RE2 syntax): ")
    for r in (rule(match={"errorRegex": pattern}), rule(match={"errorRegex": pattern}, neverDiscard=True)):
        assert not matches(r, script_job(error_message=text, logs_excerpt=text))


@pytest.mark.parametrize("pattern", [r"(?i)timeout", r"ECONN(RESET|REFUSED)", r"\bOOMKilled\b", "x{"])
def test_a_valid_regex_has_no_problem(pattern: str) -> None:
    assert regex_problem(pattern) is None and compile_regex(pattern) is not None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|aa)+$", r"(a|a?)+b$", r"(.*a){12}$", r"^(\w+\s?)*$"])
async def test_catastrophic_backtracking_patterns_finish(pattern: str) -> None:
    # Exponential for a backtracking engine on this input; RE2 is linear. Finishing is the assertion.
    # (Both texts stay under the 16 KiB scan cap, so "$" sees their real end.)
    hostile = "a" * 15_000 + "!"
    assert compile_regex(pattern) is not None
    r = rule("evil", {"errorRegex": pattern})
    request = script_job([r], error_message=hostile, logs_excerpt=hostile)
    assert not matches(r, request)
    assert await TeamRulesAnalyzer().analyze(request, ctx()) is None
    alert = alert_job([r], annotations={"description": hostile[-8000:]})
    assert not matches(r, alert)


# --------------------------------------------------------------------------- the analyzer


async def test_the_analyzer_classifies_with_the_rules_confidence_and_cites_it() -> None:
    r = rule("registry-limits", {"errorRegex": "toomanyrequests"}, classification="false_positive",
             confidence=0.85, reason="Docker Hub limits our shared runners")
    v = await TeamRulesAnalyzer().analyze(script_job([r], error_message="toomanyrequests"), ctx())
    assert v is not None and v.classification == FP and v.confidence == 0.85 and v.analyzer == "team-rule"
    assert v.title == "TriageRule registry-limits"
    assert v.reason == ("TriageRule registry-limits: false_positive at 0.85: Docker Hub limits our shared runners"
                        " (matched errorRegex)")


async def test_agreeing_rules_are_all_cited_in_name_order_and_the_most_confident_decides() -> None:
    low = rule("b-low", {"sourceType": "scriptResult"}, classification="valid", confidence=0.6)
    high = rule("a-high", {"scriptNames": ["checkout-e2e"]}, classification="valid", confidence=0.8)
    v = await TeamRulesAnalyzer().analyze(script_job([low, high]), ctx())
    assert v is not None and v.classification == VALID and v.confidence == 0.8 and v.title == "TriageRule a-high"
    assert v.reason.index("TriageRule a-high") < v.reason.index("TriageRule b-low")


async def test_a_never_discard_rule_gives_no_classification_of_its_own() -> None:
    guard = rule("prod", {"labels": {"namespace": "prod"}}, neverDiscard=True)
    request = alert_job([guard], labels={"namespace": "prod"})
    assert await TeamRulesAnalyzer().analyze(request, ctx()) is None
    (hit,) = hits(request, NOW)
    assert hit.never_discard and hit.classification is None
    assert hit.cite() == "TriageRule prod: never discard without a human (matched namespace=prod)"


async def test_conflicting_rules_give_inconclusive_naming_both() -> None:
    noise = rule("ignore-e2e-timeouts", {"errorRegex": "Timeout"}, classification="false_positive",
                 confidence=0.95)
    real = rule("checkout-is-critical", {"scriptNames": ["checkout-e2e"]}, classification="valid", confidence=0.9)
    request = script_job([noise, real], error_message="TimeoutError: page.goto: Timeout 30000ms exceeded.")
    v = await TeamRulesAnalyzer().analyze(request, ctx())
    assert v is not None and v.classification == INCONCLUSIVE and v.discard is False
    assert "conflicting team rules" in v.reason
    assert "TriageRule ignore-e2e-timeouts: false_positive at 0.95" in v.reason
    assert "TriageRule checkout-is-critical: valid at 0.90" in v.reason
    alone = await run_offline_chain(request, ctx(), analyzers=[])
    assert alone.classification == INCONCLUSIVE and alone.confidence == 0.0
    assert "ignore-e2e-timeouts" in alone.reason and "checkout-is-critical" in alone.reason
    # No analyzer after them breaks the tie either way; each held verdict names the rule it conflicts with.
    for after, cited in ((says("llm", FP, 0.99), "checkout-is-critical"), (says("llm", VALID, 0.99),
                         "ignore-e2e-timeouts"), (RulesAnalyzer(), "checkout-is-critical")):
        chained = await run_offline_chain(request, ctx(), analyzers=[after])
        assert chained.classification == INCONCLUSIVE and chained.discard is False, chained.reason
        assert "conflicting" in chained.reason and cited in chained.reason


# --------------------------------------------------------------------------- the chain


async def test_the_chain_runs_team_rules_first_even_when_rules_was_requested() -> None:
    r = rule("flaky-checkout", {"scriptNames": ["checkout-e2e"]}, classification="false_positive",
             confidence=0.9, reason="known flaky, tracked in JIRA-123")
    request = script_job([r], error_message="AssertionError: total").model_copy(
        update={"analyzer": AnalyzerName.RULES})
    memory = says("memory", VALID, 0.99)
    v = await run_offline_chain(request, ctx(), analyzers=[memory, RulesAnalyzer()])
    assert v.analyzer == "team-rule" and v.classification == FP and memory.calls == 0
    assert "TriageRule flaky-checkout" in v.reason and "JIRA-123" in v.reason
    # Without the rule the requested rules analyzer decides (an assertion: below the threshold).
    without = request.model_copy(update={"rules": []})
    assert (await run_offline_chain(without, ctx(), analyzers=[memory, RulesAnalyzer()])).analyzer == "rules"


async def test_a_team_rule_decides_before_a_confident_analyzer() -> None:
    r = rule("payments-always-real", {"labels": {"service": "payments"}}, classification="valid", confidence=0.9)
    request = alert_job([r], severity="warning", labels={"service": "payments", "flaps_last_hour": "12"})
    llm = says("llm", FP, 0.99)
    v = await run_offline_chain(request, ctx(), analyzers=[RulesAnalyzer(), llm])
    assert v.analyzer == "team-rule" and v.classification == VALID and llm.calls == 0
    assert "TriageRule payments-always-real: valid at 0.90 (matched service=payments)" in v.reason


async def test_a_weak_team_rule_is_cited_in_what_the_chain_found() -> None:
    r = rule("maybe-noise", {"sourceType": "scriptResult"}, classification="false_positive", confidence=0.4)
    context = ctx()
    v = await run_offline_chain(script_job([r], error_message="KeyError: 'total'"), context)
    assert v.classification == INCONCLUSIVE and v.confidence == 0.0
    assert "TriageRule maybe-noise" in v.reason and "leaned" not in v.reason
    assert any(f.startswith("team-rule: TriageRule maybe-noise") for f in context.findings)
