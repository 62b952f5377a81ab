"""The offline analyzer chain: ask each analyzer in turn, stop at the first confident verdict.

The analyzer list is injected so the memory and LLM analyzers can join the
chain later without changing it; the default is what works with no network
and no API key.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubetriage.analyzers.base import Analyzer
from kubetriage.analyzers.rules import RulesAnalyzer
from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.models import MAX_REASON, AnalyzerName, Classification, Verdict, verdict_from_classification

NO_VERDICT_REASON = "no offline analyzer was confident; no LLM configured"


def select_analyzers(requested: AnalyzerName | str, analyzers: Sequence[Analyzer]) -> tuple[list[Analyzer], str]:
    """The analyzers to run for ``request.analyzer``, and a note when the request could not be honoured.

    ``auto`` runs them all. A named analyzer runs alone when it is in the
    chain; when it is not (``llm``/``vision`` without an LLM configured) the
    job still gets the offline verdict rather than failing, and says so.
    """
    wanted = AnalyzerName(requested)
    if wanted is AnalyzerName.AUTO:
        return list(analyzers), ""
    chosen = [a for a in analyzers if a.name == wanted.value]
    if chosen:
        return chosen, ""
    names = ", ".join(a.name for a in analyzers) or "none"
    return list(analyzers), f"{wanted.value} analyzer not available; fell back to offline analyzers: {names}"


def _with_note(verdict: Verdict, note: str) -> Verdict:
    if not note:
        return verdict
    data = verdict.model_dump()
    data["reason"] = f"{verdict.reason} [{note}]"[:MAX_REASON]
    return Verdict.model_validate(data)


async def run_offline_chain(
    request: AnalysisRequest,
    context: AnalysisContext,
    analyzers: Sequence[Analyzer] | None = None,
) -> Verdict:
    """Always a verdict: the first confident one, else the best one downgraded to ``inconclusive``.

    An ``inconclusive`` verdict never stops the chain, however confident,
    because a later analyzer may still decide. Below-threshold verdicts are
    kept as ``inconclusive`` with their lean and confidence in the reason, so
    a human sees what the offline evidence pointed at. Analyzer exceptions
    propagate: the worker's attempt/retry accounting owns failures.
    """
    chain = list(analyzers) if analyzers is not None else [RulesAnalyzer()]
    selected, note = select_analyzers(request.analyzer, chain)
    best: Verdict | None = None
    for analyzer in selected:
        verdict = await analyzer.analyze(request, context)
        if verdict is None:
            continue
        decided = verdict.classification != Classification.INCONCLUSIVE
        if decided and verdict.confidence >= context.confidence_threshold:
            return _with_note(verdict, note)
        # Prefer a verdict that leans one way over an equally confident shrug.
        if best is None or (verdict.confidence, decided) > (
            best.confidence,
            best.classification != Classification.INCONCLUSIVE,
        ):
            best = verdict

    if best is None:
        reason = NO_VERDICT_REASON + (f" [{note}]" if note else "")
        return verdict_from_classification(Classification.INCONCLUSIVE, reason, 0.0, "chain")
    if best.classification == Classification.INCONCLUSIVE:
        return _with_note(best, note)
    reason = (
        f"below confidence threshold {context.confidence_threshold:.2f}: leaned {best.classification} "
        f"at {best.confidence:.2f}: {best.reason}"
    )
    downgraded = verdict_from_classification(
        Classification.INCONCLUSIVE,
        reason,
        best.confidence,
        best.analyzer,
        model=best.model,
        title=best.title,
        tokens=best.tokens,
        cost_usd=best.cost_usd,
    )
    return _with_note(downgraded, note)
