"""The worker contract: what the operator hands a worker for one TriageJob, and what analyzers may consult.

The operator builds an ``AnalysisRequest`` at admission and queues it as JSON; the worker
validates it back and gives it, with an ``AnalysisContext``, to the analyzers.
"""

from __future__ import annotations

import datetime as dt
import json

from pydantic import BaseModel, ConfigDict, Field

from kubetriage.api.evidence import Evidence
from kubetriage.api.models import (
    MAX_EVIDENCE,
    MAX_NAME,
    Alert,
    AnalyzerName,
    EvidenceItem,
    ScriptResult,
    Source,
    TriageRuleSpec,
    Verdict,
)

# Who a target is: the labels a remembered verdict or a duplicate's verdict must share with a job before
# they apply to it. Per pool: ``spec.analyzer.identityLabels``. Not ``pod``: a Deployment's next pod is the
# same target under a new name (the memory compares it with its generated suffix replaced).
DEFAULT_IDENTITY_LABELS: tuple[str, ...] = ("namespace", "job", "service", "instance", "target", "host", "node")
MAX_RULES = 64


class PastResult(BaseModel):
    """One earlier run of the same script, from the team's database."""

    success: bool
    finished_at: dt.datetime | None = None
    commit: str | None = None


class TeamRule(BaseModel):
    """A TriageRule as the worker gets it: its name (cited in reasons) and its spec."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=MAX_NAME)
    spec: TriageRuleSpec


class AnalysisRequest(BaseModel):
    """Everything a worker knows about one TriageJob: its spec plus identity.

    ``script_history`` is filled by the operator at admission from the team's
    ``script_results`` table (workers have no database access).
    """

    model_config = ConfigDict(extra="forbid")

    uid: str
    name: str
    namespace: str
    source: Source
    alert: Alert | None = None
    script_result: ScriptResult | None = None
    analyzer: AnalyzerName = AnalyzerName.AUTO
    deadline_seconds: float = 300
    attempt: int = 1
    created_at: dt.datetime | None = None
    script_history: list[PastResult] = []
    # The TriageRules of the job's namespace at admission, and the history the operator looked up.
    rules: list[TeamRule] = Field(default_factory=list, max_length=MAX_RULES)
    evidence: list[Evidence] = Field(default_factory=list, max_length=16)
    # The target's identity (``fingerprint.dedup_scope`` with the pool's identity labels): the key the
    # operator reads this target's history by, and writes the verdict's audit row under.
    identity: str | None = Field(None, max_length=256)


class WorkerResult(BaseModel):
    """What a worker reports for one job: the verdict and the evidence it rests on (as users see it)."""

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    evidence: list[EvidenceItem] = Field(default_factory=list, max_length=MAX_EVIDENCE)

    @classmethod
    def parse(cls, raw: str | bytes) -> WorkerResult:
        """A worker's report; a bare verdict is what workers before evidence sent (a rolling upgrade)."""
        data = json.loads(raw)
        if isinstance(data, dict) and "verdict" in data:
            return cls.model_validate(data)
        return cls(verdict=Verdict.model_validate(data))


class AnalysisContext(BaseModel):
    """Side information for analyzers, gathered by the worker before the chain runs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    now: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    script_history: list[PastResult] = Field(default_factory=list)
    confidence_threshold: float = 0.7
    # The request's evidence plus what the worker's gatherers found; only summaries, never raw data.
    evidence: list[Evidence] = Field(default_factory=list)
    identity_labels: tuple[str, ...] = DEFAULT_IDENTITY_LABELS
    # What earlier analyzers in the chain found without deciding; the LLM sees them as evidence.
    findings: list[str] = Field(default_factory=list)
