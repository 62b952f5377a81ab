"""The safety policy: when a false_positive verdict may stand. It applies to every analyzer's verdict.

Discarding a real outage is the one error users do not forgive; a human reviewing noise costs minutes.
So the policy is asymmetric:

* A false_positive needs at least one signal that explains the alert or failure away, and no strong
  signal against it. When both exist, the verdict is inconclusive and says which signals conflict.
* A critical or sustained alert is never discarded on payload signals alone (a label, an annotation, a
  count): it needs a signal from outside the payload that the team controls or the monitoring system
  measured: a matching TriageRule, a silence a human created, Prometheus showing it recovered on its
  own, human verdicts on the same identity (memory or history).
* A TriageRule with ``neverDiscard`` beats any false_positive, from any analyzer, the LLM included.
* A maintenance label or annotation on the alert is never enough: it may belong to another service (a
  label inherited from a node). Maintenance windows are TriageRules scoped by labels to the target.

``assess`` collects the signals from the request, the team's rules and the gathered evidence; ``guard``
applies the policy to one verdict. Both are pure.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from kubetriage.analyzers import team_rules
from kubetriage.analyzers.rules import CO_FIRING_SERVICES, CRITICAL_SEVERITIES, EVIDENCE_RECOVERED_SECONDS
from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.evidence import (
    AlertHistory,
    AlertmanagerSummary,
    PrometheusSummary,
    ScriptHistory,
    failed_sources,
    find,
)
from kubetriage.api.models import MAX_REASON, Alert, Classification, Verdict, verdict_from_classification

SUSTAINED_COUNT = 5
CRITICAL_SUSTAINED_COUNT = 3
PROM_SUSTAINED_SHARE = 0.5
PROM_SUSTAINED_SECONDS = 600
HUMAN_FP_HISTORY = 2
REGRESSION_MIN_RUNS = 3
HEALTHY_DEFAULT_BRANCH = 0.1
QUOTE = 300


@dataclass
class Signals:
    """What speaks for discarding (``explains``), what speaks against it, and the guards that forbid it."""

    explains: list[str] = field(default_factory=list)  # every signal that explains the job away
    outside: list[str] = field(default_factory=list)  # those not taken from the payload itself
    against: list[str] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)
    team_fp: list[str] = field(default_factory=list)
    critical: bool = False
    sustained: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)


def severity(alert: Alert) -> str | None:
    raw = alert.severity or (alert.labels or {}).get("severity")
    return raw.strip().lower()[:32] if raw else None


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _alert_signals(alert: Alert, now: dt.datetime, s: Signals) -> None:
    s.critical = severity(alert) in CRITICAL_SEVERITIES
    count = alert.consecutive_count or 0
    if count >= SUSTAINED_COUNT or (s.critical and count >= CRITICAL_SUSTAINED_COUNT):
        s.sustained.append(f"consecutiveCount={count}")


def _evidence_signals(request: AnalysisRequest, context: AnalysisContext, s: Signals) -> None:
    ev = context.evidence
    s.unavailable = failed_sources(ev)
    prom = find(ev, PrometheusSummary)
    if prom is not None:
        if prom.firing_now and (prom.true_share or 0) >= PROM_SUSTAINED_SHARE:
            text = f"Prometheus: {prom.summary()}"
            if (prom.since_change_s or 0) >= PROM_SUSTAINED_SECONDS:
                s.sustained.append(text)
            s.against.append(text)
        elif prom.firing_now is False and prom.recovered_after_s is not None \
                and prom.recovered_after_s <= EVIDENCE_RECOVERED_SECONDS:
            text = f"Prometheus: {prom.summary()}"
            s.explains.append(text)
            s.outside.append(text)
    am = find(ev, AlertmanagerSummary)
    if am is not None:
        if am.co_firing_services >= CO_FIRING_SERVICES:
            s.against.append(f"Alertmanager: {am.summary()}")
        for silence in am.human_silences()[:1]:
            text = f"silenced by {silence.created_by or 'a human'}: {silence.comment[:QUOTE]}"
            s.explains.append(text)
            s.outside.append(text)
    if request.alert is not None:
        hist = find(ev, AlertHistory)
        if hist is not None:
            if hist.human_valid and hist.human_valid >= hist.human_false_positive:
                s.against.append(f"history: {hist.summary()}")
            elif hist.human_false_positive >= HUMAN_FP_HISTORY and not hist.human_valid:
                s.explains.append(f"history: {hist.summary()}")
                s.outside.append(f"history: {hist.summary()}")
    if request.script_result is not None:
        runs = find(ev, ScriptHistory)
        if runs is not None:
            if runs.same_commit_passes:
                s.explains.append(f"history: {runs.summary()}")
                s.outside.append(f"history: {runs.summary()}")
            elif (runs.same_commit_runs >= REGRESSION_MIN_RUNS and runs.default_branch_runs
                  and runs.default_branch_failures / runs.default_branch_runs <= HEALTHY_DEFAULT_BRANCH):
                s.against.append(f"history: fails every run at this commit, healthy on the default branch "
                                 f"({runs.summary()})")


def assess(request: AnalysisRequest, context: AnalysisContext) -> Signals:
    s = Signals()
    if request.alert is not None:
        _alert_signals(request.alert, context.now, s)
    for hit in team_rules.hits(request, context.now):
        if hit.never_discard:
            s.guards.append(hit.cite())
        elif hit.classification == Classification.FALSE_POSITIVE.value:
            s.team_fp.append(hit.cite())
            s.explains.append(hit.cite())
            s.outside.append(hit.cite())
        elif hit.classification == Classification.VALID.value:
            s.against.append(hit.cite())
    _evidence_signals(request, context, s)
    return s


def _inconclusive(verdict: Verdict, why: str, unavailable: list[str] | None = None) -> Verdict:
    reason = f"{why}; the {verdict.analyzer} analyzer said {verdict.classification}: {verdict.reason}"
    if unavailable:
        reason += f" [evidence unavailable: {', '.join(unavailable)}]"
    return verdict_from_classification(
        Classification.INCONCLUSIVE, reason[:MAX_REASON], 0.0, verdict.analyzer, model=verdict.model,
        title="needs a human: " + (verdict.title or "conflicting signals")[:200], tokens=verdict.tokens,
        cost_usd=verdict.cost_usd)


def guard(verdict: Verdict, signals: Signals, payload_explains: list[str]) -> Verdict:
    """The verdict as the policy lets it stand. ``payload_explains``: the deciding analyzer's own
    payload-based explanations (flapping, infrastructure error, ...), which count as explanations
    but never alone for a critical or sustained alert."""
    if verdict.classification == Classification.VALID and signals.team_fp:
        return _inconclusive(verdict, "conflicting signals: " + "; ".join(signals.team_fp), signals.unavailable)
    if verdict.classification != Classification.FALSE_POSITIVE:
        return verdict
    if signals.guards:
        return _inconclusive(verdict, "a human must decide: " + "; ".join(signals.guards), signals.unavailable)
    if signals.against:
        why = "conflicting signals: against discarding: " + "; ".join(signals.against)
        return _inconclusive(verdict, why, signals.unavailable)
    outside = list(signals.outside)
    if verdict.analyzer == "memory":  # a human judged this same identity before
        outside.append("a human verdict on the same target")
    if (signals.critical or signals.sustained) and not outside:
        what = "critical" if signals.critical else "sustained"
        if signals.sustained and signals.critical:
            what = "critical, sustained"
        detail = f" ({'; '.join(signals.sustained)})" if signals.sustained else ""
        why = f"a {what} alert{detail} is not discarded on payload signals alone"
        return _inconclusive(verdict, why, signals.unavailable)
    if not (signals.explains or payload_explains or outside):
        return _inconclusive(verdict, "nothing found explains the alert or failure away", signals.unavailable)
    if signals.unavailable:
        note = f" [evidence unavailable: {', '.join(signals.unavailable)}]"
        return verdict.model_copy(update={"reason": (verdict.reason + note)[:MAX_REASON]})
    return verdict
