"""TriagePolicy decisions as pure functions: which policies select a job, what they plan for a verdict,
which silence a false_positive alert gets, and when a silence must be lifted.

Pure (no I/O) so that the operator (``kubetriage.controller.actions``) and a future ``kubetriage policy
test`` decide the same way, and so that every decision is tested without a cluster. What is planned here
is recorded in the job's ``status.actions`` in the same write as the verdict; the operator then carries
out the ``Pending`` entries and writes their results.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import re2

from kubetriage.api.contract import DEFAULT_IDENTITY_LABELS, AnalysisRequest, TeamRule
from kubetriage.api.models import (
    MAX_ACTIONS,
    ActionResult,
    Alert,
    Classification,
    JobAction,
    PolicyMode,
    RuleMatch,
    SourceType,
    TriagePolicySpec,
    Verdict,
)
from kubetriage.api.regex import compile_re2

CREATED_BY = "kubetriage"

# Alert severities in rising order. A severity not listed ranks above all of them: an unknown severity
# replacing a known one is treated as a rise, which lifts a silence (the safe direction).
_SEVERITY_RANK = {
    "": 0, "none": 0, "info": 1, "informational": 1, "low": 1, "notice": 1,
    "warning": 2, "warn": 2, "minor": 2, "medium": 2,
    "error": 3, "major": 3, "high": 3,
    "critical": 4, "page": 4, "emergency": 5, "disaster": 5,
}
_UNKNOWN_RANK = 6


@dataclass(frozen=True, slots=True)
class Policy:
    """A TriagePolicy as the operator caches it: namespace, name and validated spec."""

    namespace: str
    name: str
    spec: TriagePolicySpec


def action_key(uid: str, classification: str) -> str:
    """One verdict of one job: notifications and silences are done once per key (the webhook's
    Idempotency-Key); a new verdict (a human's) is a new key."""
    return f"{uid}:{classification}"


def severity_rank(severity: str | None) -> int:
    return _SEVERITY_RANK.get((severity or "").strip().lower(), _UNKNOWN_RANK)


def severity_of(alert: Alert) -> str:
    """The alert's severity label, else its severity field; '' when it has none."""
    return str((alert.labels or {}).get("severity") or alert.severity or "")


# --------------------------------------------------------------------------- selection


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re2._Regexp | None:
    try:
        return compile_re2(pattern)
    except re2.error:
        return None


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def selects(m: RuleMatch, request: AnalysisRequest, now: dt.datetime) -> bool:
    """Whether a match (a TriagePolicy's, or a TriageRule's) selects this job: every field set must hold.

    The same semantics as a TriageRule's match in the analyzers (``analyzers.team_rules.match``), which
    the operator may not import; an expression that does not compile selects nothing.
    """
    alert, result = request.alert, request.script_result
    if m.source_type is not None and m.source_type != request.source.type:
        return False
    if m.alert_names is not None and (alert is None or alert.name not in m.alert_names):
        return False
    if m.labels:
        labels = (alert.labels or {}) if alert is not None else {}
        if any(labels.get(k) != v for k, v in m.labels.items()):
            return False
    if m.script_names is not None and (result is None or result.script_name not in m.script_names):
        return False
    if m.error_regex is not None:
        regex = _regex(m.error_regex)
        if regex is None:
            return False
        texts = [result.error_message, result.logs_excerpt] if result is not None else []
        if alert is not None:
            texts += [*(alert.annotations or {}).values()]
        if not any(t and regex.search(t) for t in texts):
            return False
    if m.window is not None:
        at = _utc(alert.starts_at) if alert is not None and alert.starts_at else _utc(now)
        if not (_utc(m.window.start) <= at < _utc(m.window.end)):
            return False
    return True


def guarded_by(rules: Iterable[TeamRule], request: AnalysisRequest, now: dt.datetime) -> str | None:
    """The name of a neverDiscard TriageRule that guards this job (no silence, ever), or None."""
    for rule in sorted(rules, key=lambda r: r.name):
        if rule.spec.action.never_discard and selects(rule.spec.match, request, now):
            return rule.name
    return None


# --------------------------------------------------------------------------- silences


@dataclass(frozen=True, slots=True)
class SilenceSpec:
    """What one silence matches: exact equality matchers only, never a regular expression."""

    matchers: tuple[tuple[str, str], ...]  # (label, value), alertname first, then severity, then sorted

    @property
    def alertname(self) -> str:
        return self.matchers[0][1]

    @property
    def severity(self) -> str:
        return self.matchers[1][1]

    def target(self) -> tuple[tuple[str, str], ...]:
        """The matchers without severity: the same target at another severity (a rise lifts the silence)."""
        return tuple(m for m in self.matchers if m[0] != "severity")

    def wire(self) -> list[dict[str, object]]:
        """Alertmanager API v2 matchers."""
        return [{"name": k, "value": v, "isRegex": False, "isEqual": True} for k, v in self.matchers]

    def describe(self) -> str:
        return ", ".join(f'{k}="{v}"' for k, v in self.matchers)


def silence_for(alert: Alert, identity_labels: Sequence[str] | None = None) -> SilenceSpec | str:
    """The silence of a false_positive alert, or why it gets none (a str).

    Matchers: alertname, severity (``severity=""`` when the alert has none: it then matches only alerts
    without a severity, never a critical one) and every identity label the alert carries. An alert with no
    identity label would need a silence on the alert name alone, which hides every target: refused.
    """
    labels = alert.labels or {}
    identity = [k for k in sorted(set(identity_labels or DEFAULT_IDENTITY_LABELS))
                if k not in ("alertname", "severity") and labels.get(k)]
    if not identity:
        names = ", ".join(identity_labels or DEFAULT_IDENTITY_LABELS)
        return f"the alert carries none of the identity labels ({names}): a silence would hide every target of it"
    return SilenceSpec((("alertname", alert.name), ("severity", severity_of(alert)),
                        *((k, labels[k]) for k in identity)))


def silence_from_wire(matchers: Iterable[dict[str, object]]) -> SilenceSpec | None:
    """An Alertmanager silence's matchers as a ``SilenceSpec``; None when it is not one kubetriage could
    have made (a regex or negative matcher, or no alertname/severity)."""
    pairs: dict[str, str] = {}
    for m in matchers:
        if m.get("isRegex") or m.get("isEqual") is False:
            return None
        pairs[str(m.get("name"))] = str(m.get("value", ""))
    if "alertname" not in pairs or "severity" not in pairs:
        return None
    rest = sorted((k, v) for k, v in pairs.items() if k not in ("alertname", "severity"))
    return SilenceSpec((("alertname", pairs["alertname"]), ("severity", pairs["severity"]), *rest))


# --------------------------------------------------------------------------- planning


def _entry(policy: Policy, action: str, key: str, now: dt.datetime, message: str, *,
           target: str | None = None, result: ActionResult | None = None) -> JobAction:
    if result is None:
        result = ActionResult.SHADOW if policy.spec.mode == PolicyMode.SHADOW.value else ActionResult.PENDING
    return JobAction(policy=policy.name, action=action, target=target, key=key, result=result, at=now,
                     message=message[:1024])


def same(a: JobAction, b: JobAction) -> bool:
    """The same action of the same policy for the same verdict (its result may differ)."""
    return (a.policy, a.action, a.target, a.key) == (b.policy, b.action, b.target, b.key)


def plan(policies: Iterable[Policy], request: AnalysisRequest, verdict: Verdict, *, uid: str, now: dt.datetime,
         rules: Iterable[TeamRule] = (), identity_labels: Sequence[str] | None = None,
         existing: Sequence[JobAction] = ()) -> list[JobAction]:
    """What the policies of the job's namespace do about this verdict, as new ``status.actions`` entries.

    ``Pending`` for an enforcing policy (the operator carries it out), ``Shadow`` for one in shadow mode
    (recorded, nothing sent), ``Skipped`` when a silence must not be made (a neverDiscard rule guards the
    job, or the alert names no target). Entries already in ``existing`` (a replayed event) are not repeated.
    """
    key = action_key(uid, verdict.classification)
    rules = list(rules)
    out: list[JobAction] = []
    for policy in sorted(policies, key=lambda p: p.name):
        spec = policy.spec
        if policy.namespace != request.namespace or not selects(spec.match, request, now):
            continue  # a policy acts only in its own namespace
        policy_ok = verdict.classification in spec.classifications and verdict.confidence >= spec.min_confidence
        if (spec.silence is not None and policy_ok and verdict.classification == Classification.FALSE_POSITIVE.value
                and request.source.type == SourceType.ALERT.value and request.alert is not None):
            out.append(_plan_silence(policy, request, key, now, rules, identity_labels))
        for n in spec.notify or []:
            classes = n.classifications or spec.classifications
            floor = spec.min_confidence if n.min_confidence is None else n.min_confidence
            if verdict.classification not in classes or verdict.confidence < floor:
                continue
            kind = "webhook" if n.webhook is not None else "slack"
            what = (f"{verdict.classification} ({verdict.confidence:.2f}) to {kind} {n.name}")
            out.append(_entry(policy, kind, key, now, ("would notify " if spec.mode == PolicyMode.SHADOW.value
                                                       else "notify ") + what, target=n.name))
    return [e for e in out if not any(same(e, x) for x in existing)]


def _plan_silence(policy: Policy, request: AnalysisRequest, key: str, now: dt.datetime, rules: list[TeamRule],
                  identity_labels: Sequence[str] | None) -> JobAction:
    assert request.alert is not None and policy.spec.silence is not None
    guard = guarded_by([*rules, *request.rules], request, now)
    if guard is not None:
        return _entry(policy, "silence", key, now, f"no silence: TriageRule {guard} guards this job (neverDiscard)",
                      result=ActionResult.SKIPPED)
    silence = silence_for(request.alert, identity_labels)
    if isinstance(silence, str):
        return _entry(policy, "silence", key, now, f"no silence: {silence}", result=ActionResult.SKIPPED)
    hours = policy.spec.silence.duration_seconds / 3600
    verb = "would silence" if policy.spec.mode == PolicyMode.SHADOW.value else "silence"
    return _entry(policy, "silence", key, now, f"{verb} {silence.describe()} for {hours:g}h")


def merge(existing: Sequence[JobAction], new: Sequence[JobAction]) -> list[JobAction]:
    """``existing`` with ``new`` applied (an entry replaces the same action's), capped at MAX_ACTIONS.

    Over the cap the oldest finished entries go first; a Pending one is never dropped (it is work to do).
    """
    out = list(existing)
    for entry in new:
        for i, old in enumerate(out):
            if same(old, entry):
                out[i] = entry
                break
        else:
            out.append(entry)
    while len(out) > MAX_ACTIONS:
        drop = next((i for i, e in enumerate(out) if e.result != ActionResult.PENDING.value), 0)
        out.pop(drop)
    return out


def pending(actions: Sequence[JobAction]) -> list[JobAction]:
    return [a for a in actions if a.result == ActionResult.PENDING.value]


def active_silence(actions: Sequence[JobAction], now: dt.datetime) -> JobAction | None:
    """The silence this job holds in Alertmanager now: the newest one made, not lifted, not yet ended."""
    lifted = {a.silence_id for a in actions if a.action == "unsilence" and a.result == ActionResult.SUCCEEDED.value}
    for a in reversed(actions):
        if (a.action == "silence" and a.result == ActionResult.SUCCEEDED.value and a.silence_id
                and a.silence_id not in lifted and a.silence_until is not None and _utc(a.silence_until) > now):
            return a
    return None


def parse_actions(raw: object) -> list[JobAction]:
    """``status.actions`` as stored; an entry this version cannot read is left out (never fatal)."""
    out = []
    for item in raw if isinstance(raw, list) else []:
        try:
            out.append(JobAction.model_validate(item))
        except ValueError:
            continue
    return out
