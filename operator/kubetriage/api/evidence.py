"""Evidence gathered before a verdict: what the monitoring system and history say, as compact summaries.

Gatherers (Prometheus, Alertmanager, the operator's history lookup) produce one ``Evidence`` each. Only
these summaries reach analyzers and prompts, never raw series or raw alert lists. A gatherer that failed
is evidence too (``error`` set): a verdict must not be more confident for evidence it could not get.

The ``value`` of each source has a typed view below; unknown keys are ignored so a newer gatherer's
extra figures never break an older worker.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetriage.api.models import EvidenceItem

PROMETHEUS = "prometheus"
ALERTMANAGER = "alertmanager"
HISTORY = "history"
MAX_NAMES = 10


class Evidence(BaseModel):
    """One gatherer's result: a summary value, or the error that kept it from one."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(max_length=64)
    value: dict[str, Any] = Field(default_factory=dict)
    error: str | None = Field(None, max_length=512)

    def item(self) -> EvidenceItem:
        """The line users see in ``status.evidence`` and ``kubetriage get``."""
        if self.error:
            return EvidenceItem(source=self.source, summary=f"unavailable: {self.error}"[:512], value="error")
        view = typed(self)
        if view is None:
            return EvidenceItem(source=self.source, summary="no usable figures", value=None)
        return EvidenceItem(source=self.source, summary=view.summary()[:512], value=view.headline()[:256])


class _View(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def summary(self) -> str:
        raise NotImplementedError

    def headline(self) -> str:
        raise NotImplementedError


class PrometheusSummary(_View):
    """The alert's own expression over [startsAt - 30m, now]."""

    firing_now: bool | None = None
    true_share: float | None = Field(None, ge=0, le=1)
    series: int | None = Field(None, ge=0)
    min: float | None = None
    max: float | None = None
    last: float | None = None
    since_change_s: float | None = Field(None, ge=0)
    recovered_after_s: float | None = Field(None, ge=0)

    def summary(self) -> str:
        parts = []
        if self.firing_now is not None:
            parts.append("firing now" if self.firing_now else "not firing now")
        if self.true_share is not None:
            parts.append(f"true {self.true_share:.0%} of the window")
        if self.series is not None:
            parts.append(f"{self.series} series")
        if self.recovered_after_s is not None:
            parts.append(f"recovered on its own after {self.recovered_after_s:.0f}s")
        if self.since_change_s is not None:
            parts.append(f"last change {self.since_change_s:.0f}s ago")
        if self.last is not None:
            parts.append(f"last value {self.last:g}")
        return ", ".join(parts) or "no figures"

    def headline(self) -> str:
        return "firing" if self.firing_now else "recovered" if self.firing_now is False else "unknown"


class Silence(BaseModel):
    model_config = ConfigDict(extra="ignore")

    created_by: str = Field("", max_length=256)
    comment: str = Field("", max_length=1024)
    by_kubetriage: bool = False


class AlertmanagerSummary(_View):
    """Other alerts firing now in the same namespace/cluster/group, and silences covering this alert."""

    co_firing: int = Field(0, ge=0)
    co_firing_alerts: list[str] = Field(default_factory=list)
    co_firing_services: int = Field(0, ge=0)
    co_firing_severities: dict[str, int] = Field(default_factory=dict)
    silences: list[Silence] = Field(default_factory=list)

    def human_silences(self) -> list[Silence]:
        """Silences a person created: kubetriage's own never count as evidence for itself."""
        return [s for s in self.silences if not s.by_kubetriage]

    def summary(self) -> str:
        names = ", ".join(self.co_firing_alerts[:MAX_NAMES])
        text = f"{self.co_firing} other alert(s) firing across {self.co_firing_services} service(s)"
        if names:
            text += f" ({names})"
        if self.co_firing_severities:
            text += "; severities: " + ", ".join(f"{n} {s}" for s, n in list(self.co_firing_severities.items())[:5])
        human = self.human_silences()
        if human:
            text += f"; silenced by {human[0].created_by or 'someone'}: {human[0].comment[:120]}"
        return text

    def headline(self) -> str:
        return f"{self.co_firing} co-firing"


class AlertHistory(_View):
    """The same alert identity over the last 7 days, from the verdicts the operator recorded."""

    fired_7d: int = Field(0, ge=0)
    human_false_positive: int = Field(0, ge=0)
    human_valid: int = Field(0, ge=0)

    def summary(self) -> str:
        return (f"fired {self.fired_7d} time(s) in 7 days; humans called it false_positive "
                f"{self.human_false_positive}, valid {self.human_valid} time(s)")

    def headline(self) -> str:
        return f"{self.fired_7d} in 7d"


class ScriptHistory(_View):
    """Runs of the same test: at the same commit, and on the default branch."""

    same_commit_runs: int = Field(0, ge=0)
    same_commit_passes: int = Field(0, ge=0)
    default_branch_runs: int = Field(0, ge=0)
    default_branch_failures: int = Field(0, ge=0)

    def summary(self) -> str:
        return (f"same commit: {self.same_commit_passes} of {self.same_commit_runs} run(s) passed; default "
                f"branch: {self.default_branch_failures} of {self.default_branch_runs} run(s) failed")

    def headline(self) -> str:
        return f"{self.same_commit_passes}/{self.same_commit_runs} passed"


View = PrometheusSummary | AlertmanagerSummary | AlertHistory | ScriptHistory
V = TypeVar("V", bound=_View)


def typed(evidence: Evidence) -> View | None:
    """The typed view of an evidence value, or None when it is an error or does not parse."""
    if evidence.error:
        return None
    try:
        if evidence.source == PROMETHEUS:
            return PrometheusSummary.model_validate(evidence.value)
        if evidence.source == ALERTMANAGER:
            return AlertmanagerSummary.model_validate(evidence.value)
        if evidence.source == HISTORY:
            if "same_commit_runs" in evidence.value or "default_branch_runs" in evidence.value:
                return ScriptHistory.model_validate(evidence.value)
            return AlertHistory.model_validate(evidence.value)
    except ValidationError:
        return None
    return None


def find(evidence: list[Evidence], cls: type[V]) -> V | None:
    """The first evidence of this kind that parsed."""
    for item in evidence:
        view = typed(item)
        if isinstance(view, cls):
            return view
    return None


def failed_sources(evidence: list[Evidence]) -> list[str]:
    return [e.source for e in evidence if e.error]
