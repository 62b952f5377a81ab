"""The worker contract: what the operator hands a worker for one TriageJob, and what analyzers may consult.

The operator builds an ``AnalysisRequest`` at admission and queues it as JSON; the worker
validates it back and gives it, with an ``AnalysisContext``, to the analyzers.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field

from kubetriage.api.models import Alert, AnalyzerName, ScriptResult, Source


class PastResult(BaseModel):
    """One earlier run of the same script, from the team's database."""

    success: bool
    finished_at: dt.datetime | None = None
    commit: str | None = None


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


class AnalysisContext(BaseModel):
    """Side information for analyzers, gathered by the worker before the chain runs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    now: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    script_history: list[PastResult] = Field(default_factory=list)
    confidence_threshold: float = 0.7
