"""The team's own rules (TriageRule resources): evaluated before any other analyzer, cited by name.

A TriageRule either classifies the jobs it matches (with the team's confidence) or guards them:
``neverDiscard`` means a human must decide, whatever any analyzer says. The operator hands a worker the
rules of the job's own namespace only, so a rule never reaches across namespaces.

Regular expressions come from a resource and are searched in untrusted text, so they run on RE2
(linear time, the same syntax family as Kubernetes' own CEL ``matches``) over texts the CRD caps; a rule
whose expression does not compile never matches (the operator reports it on the rule's status).
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

import re2

from kubetriage.api.contract import AnalysisContext, AnalysisRequest, TeamRule
from kubetriage.api.models import Classification, Verdict, verdict_from_classification

# One judgement of an expression for the operator (the rule's status) and the analyzers: defined in api,
# re-exported here for the callers that read rules through this module (``kubetriage rule test``).
from kubetriage.api.regex import compile_re2
from kubetriage.api.regex import regex_problem as regex_problem

RULE_REASON_MAX = 300


@dataclass(frozen=True, slots=True)
class RuleHit:
    """A rule that matched a job, with the facts that made it match (for the reason)."""

    name: str
    rule: TeamRule
    matched: tuple[str, ...]

    @property
    def never_discard(self) -> bool:
        return bool(self.rule.spec.action.never_discard)

    @property
    def classification(self) -> str | None:
        return self.rule.spec.action.classification

    def cite(self) -> str:
        action = self.rule.spec.action
        what = "never discard without a human" if self.never_discard else (
            f"{action.classification} at {action.confidence or 0.0:.2f}")
        because = f": {action.reason[:RULE_REASON_MAX]}" if action.reason else ""
        on = f" (matched {', '.join(self.matched)})" if self.matched else ""
        return f"TriageRule {self.name}: {what}{because}{on}"


@functools.lru_cache(maxsize=256)
def compile_regex(pattern: str) -> re2._Regexp | None:
    """The compiled expression, or None when it does not compile (the rule then never matches)."""
    try:
        return compile_re2(pattern)
    except re2.error:
        return None


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def match(rule: TeamRule, request: AnalysisRequest, now: dt.datetime) -> RuleHit | None:
    """The rule's hit on this job, or None; every field of ``match`` that is set must hold."""
    m = rule.spec.match
    facts: list[str] = []
    kind = request.source.type
    if m.source_type is not None:
        if m.source_type != kind:
            return None
        facts.append(f"sourceType={kind}")
    alert, result = request.alert, request.script_result
    if m.alert_names is not None:
        if alert is None or alert.name not in m.alert_names:
            return None
        facts.append(f"alertname={alert.name}")
    if m.labels:
        labels = (alert.labels or {}) if alert is not None else {}
        if any(labels.get(k) != v for k, v in m.labels.items()):
            return None
        facts.extend(f"{k}={v}" for k, v in sorted(m.labels.items()))
    if m.script_names is not None:
        if result is None or result.script_name not in m.script_names:
            return None
        facts.append(f"script={result.script_name}")
    if m.error_regex is not None:
        regex = compile_regex(m.error_regex)
        if regex is None:
            return None
        texts = [result.error_message, result.logs_excerpt] if result is not None else []
        if alert is not None:
            texts += [*(alert.annotations or {}).values()]
        if not any(t and regex.search(t) for t in texts):  # whole texts: RE2 is linear, the CRD caps sizes
            return None
        facts.append("errorRegex")
    if m.window is not None:
        at = _utc(alert.starts_at) if alert is not None and alert.starts_at else _utc(now)
        if not (_utc(m.window.start) <= at < _utc(m.window.end)):
            return None
        facts.append(f"window {m.window.start.isoformat()}/{m.window.end.isoformat()}")
    return RuleHit(rule.name, rule, tuple(facts))


def hits(request: AnalysisRequest, now: dt.datetime) -> list[RuleHit]:
    """Every rule of the job's namespace that matches it, in name order (stable reasons)."""
    found = [h for r in sorted(request.rules, key=lambda r: r.name) if (h := match(r, request, now))]
    return found


class TeamRulesAnalyzer:
    """The TriageRules' classification, when one applies; guards are enforced by the safety policy."""

    name = "team-rule"

    async def analyze(self, request: AnalysisRequest, context: AnalysisContext) -> Verdict | None:
        found = [h for h in hits(request, context.now) if h.classification is not None]
        if not found:
            return None
        classes = {h.classification for h in found}
        cited = "; ".join(h.cite() for h in found)
        if len(classes) > 1:
            return verdict_from_classification(
                Classification.INCONCLUSIVE, f"conflicting team rules: {cited}", 0.5, self.name,
                title="conflicting team rules")
        best = max(found, key=lambda h: h.rule.spec.action.confidence or 0.0)
        confidence = best.rule.spec.action.confidence or 0.0
        return verdict_from_classification(
            Classification(best.classification or Classification.INCONCLUSIVE), cited, confidence, self.name,
            title=f"TriageRule {best.name}")


# --------------------------------------------------------------------------- replay (kubetriage rule test)


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a rule would have done to one recorded verdict."""

    job: str
    recorded: str
    with_rule: str
    note: str

    @property
    def changed(self) -> bool:
        return self.recorded != self.with_rule


def replay(rule: TeamRule, request: AnalysisRequest, recorded: Verdict, now: dt.datetime) -> Replayed | None:
    """The rule's effect on one finished job, or None when it does not match it.

    A human verdict never changes; a classification passes through the same safety policy the
    chain applies, so the replay shows what the operator would really have recorded.
    """
    from kubetriage.analyzers import safety  # safety imports this module

    with_rule = request.model_copy(update={"rules": [rule]})
    hit = match(rule, with_rule, now)
    if hit is None:
        return None
    was = str(recorded.classification)
    if recorded.check_type == "user":
        return Replayed(request.name, was, was, "human verdict: rules never change it")
    if hit.never_discard:
        if was == Classification.FALSE_POSITIVE.value:
            return Replayed(request.name, was, Classification.INCONCLUSIVE.value, "never discard: a human decides")
        return Replayed(request.name, was, was, "never discard: no false_positive to block")
    proposed = verdict_from_classification(
        Classification(hit.classification or Classification.INCONCLUSIVE), hit.cite(),
        hit.rule.spec.action.confidence or 0.0, TeamRulesAnalyzer.name)
    checked = safety.guard(proposed, safety.assess(with_rule, AnalysisContext(now=now)), [])
    note = "" if checked is proposed else "the safety policy keeps it from standing: " + checked.reason[:160]
    return Replayed(request.name, was, str(checked.classification), note)
