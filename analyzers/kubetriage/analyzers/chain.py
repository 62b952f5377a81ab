"""The analyzer chain: ask each analyzer in turn, stop at the first confident verdict the safety policy lets stand.

Order: the team's TriageRules, the memory of human verdicts, the offline rules, then vision and the LLM
when configured. Every verdict passes ``safety.guard`` before it may stop the chain, whichever analyzer
made it. When an LLM follows, the offline rules decide alone only through their high-precision rules
(``rules.HIGH_PRECISION``); otherwise their findings reach the LLM as evidence. With no LLM, anything
below the confidence threshold is inconclusive, and says what was found, without a lean.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubetriage.analyzers import rules as rules_module
from kubetriage.analyzers import safety
from kubetriage.analyzers.base import Analyzer
from kubetriage.analyzers.calibration import calibrate
from kubetriage.analyzers.rules import RulesAnalyzer
from kubetriage.analyzers.team_rules import TeamRulesAnalyzer
from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.models import MAX_REASON, AnalyzerName, Classification, Verdict, verdict_from_classification

NO_VERDICT_REASON = "no analyzer was confident; no LLM configured"
LLM_NAMES = frozenset({"llm"})
FINDING_CHARS = 600


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
    return verdict.model_copy(update={"reason": f"{verdict.reason} [{note}]"[:MAX_REASON]})


def _may_decide_alone(verdict: Verdict, llm_follows: bool) -> bool:
    """With an LLM after it, the rules analyzer decides alone only through a high-precision rule."""
    if not llm_follows or verdict.analyzer != RulesAnalyzer.name:
        return True
    return verdict.title in rules_module.HIGH_PRECISION


async def run_offline_chain(
    request: AnalysisRequest,
    context: AnalysisContext,
    analyzers: Sequence[Analyzer] | None = None,
) -> Verdict:
    """Always a verdict: the first confident one that the safety policy accepts, else ``inconclusive``.

    Analyzer exceptions propagate: the worker's attempt/retry accounting owns failures.
    """
    chain = list(analyzers) if analyzers is not None else [RulesAnalyzer()]
    selected, note = select_analyzers(request.analyzer, chain)
    if request.rules and not any(a.name == TeamRulesAnalyzer.name for a in selected):
        selected.insert(0, TeamRulesAnalyzer())  # the team's rules come first, whatever analyzer was asked for
    signals = safety.assess(request, context)
    # Hints (a maintenance label, a weak supporting finding) never explain anything away on their own.
    payload = [f.reason for f in rules_module.findings(request, context)
               if f.classification is Classification.FALSE_POSITIVE and f.standalone and f.explains]
    guarded: Verdict | None = None
    found: list[Verdict] = []
    for i, analyzer in enumerate(selected):
        verdict = await analyzer.analyze(request, context)
        if verdict is None:
            continue
        checked = safety.guard(verdict, signals, payload)
        if checked.classification != verdict.classification and guarded is None:  # held, not just annotated
            guarded = checked
        decided = checked.classification != Classification.INCONCLUSIVE
        llm_follows = any(a.name in LLM_NAMES for a in selected[i + 1:])
        if decided and checked.confidence >= context.confidence_threshold and _may_decide_alone(checked,
                                                                                                 llm_follows):
            return _with_note(calibrate(checked), note)
        found.append(checked)
        context.findings.append(f"{checked.analyzer}: {checked.reason}"[:FINDING_CHARS])
    if guarded is not None:
        others = [v.reason for v in found if v is not guarded and v.reason not in guarded.reason]
        if others:
            also = "; also found: " + "; ".join(dict.fromkeys(others))
            guarded = guarded.model_copy(update={"reason": (guarded.reason + also)[:MAX_REASON]})
        return _with_note(guarded, note)
    if not found:
        return _with_note(verdict_from_classification(Classification.INCONCLUSIVE, NO_VERDICT_REASON, 0.0,
                                                      "chain"), note)
    # No lean: below the threshold a direction is not calibrated, so only the facts are shown.
    best = max(found, key=lambda v: v.confidence)
    spent = next((v for v in found if v.tokens), best)  # an LLM that answered still cost its tokens
    facts = "; ".join(dict.fromkeys(v.reason for v in found))
    reason = f"no analyzer was confident enough (threshold {context.confidence_threshold:.2f}); found: {facts}"
    return _with_note(verdict_from_classification(
        Classification.INCONCLUSIVE, reason, 0.0, best.analyzer, model=spent.model, title=best.title,
        tokens=spent.tokens, cost_usd=spent.cost_usd), note)
