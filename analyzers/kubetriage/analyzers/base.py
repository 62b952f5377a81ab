"""The analyzer contract: an AnalysisRequest in, a Verdict (or no opinion) out.

Analyzers are pure with respect to infrastructure: no Kubernetes, no Redis.
What they may consult beyond the request (past results, human verdicts) comes
through the ``AnalysisContext`` the worker hands them, so tests run them on
plain data.
"""

from __future__ import annotations

from typing import Protocol

from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.models import Verdict


class Analyzer(Protocol):
    """One engine in the chain. ``None`` means "no opinion": the chain moves on."""

    name: str

    async def analyze(self, request: AnalysisRequest, context: AnalysisContext) -> Verdict | None: ...
