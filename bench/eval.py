"""``python -m bench.eval``: how well the analyzer chains triage a labelled set of realistic cases.

The cases (tests/data/eval_cases.yaml) are alerts and failed runs a human
labelled ``false_positive`` or ``valid``; some valid ones are tagged
``outage: true``. The figures that matter:

* precision for ``false_positive``: of what we would discard, how much really
  was noise. A discarded real problem is the expensive mistake;
* recall for ``false_positive``: how much of the noise we take off people's plates;
* the inconclusive share: how often a human still has to look;
* real outages called ``false_positive``: the costliest error, counted apart.

Chains measured, each against the same cases:

* ``always valid``: the baseline (no triage at all: every alert is worth a look);
* ``rules``: the offline rules analyzer alone;
* ``memory+rules``: the offline chain with the human-verdict memory seeded
  from the file's ``memory_seeds`` (what a cluster without an LLM runs);
* ``memory+rules+fake-llm``: the same plus the LLM analyzer talking to
  FakeLLM, a local fake whose answers come from keyword rules. It measures
  the pipeline (chain order, prompt building, reply parsing, which analyzer
  decides), NOT a model: its figures say nothing about any real LLM.

Results: a table on stdout and bench/results/eval.json (``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetriage.analyzers.base import Analyzer
from kubetriage.analyzers.chain import run_offline_chain
from kubetriage.analyzers.llm import LLMAnalyzer, LLMConfig
from kubetriage.analyzers.memory import MemoryAnalyzer, MemoryCase
from kubetriage.analyzers.rules import RulesAnalyzer
from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.models import Classification, TriageJobSpec, Verdict
from kubetriage.api.summary import job_summary

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.fakellm import FakeLLM  # noqa: E402 - the fake LLM lives with the tests

DEFAULT_CASES = REPO / "tests" / "data" / "eval_cases.yaml"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "eval.json"
FP = Classification.FALSE_POSITIVE.value
VALID = Classification.VALID.value
INCONCLUSIVE = Classification.INCONCLUSIVE.value
FAKE_NOTE = (
    "memory+rules+fake-llm uses FakeLLM, a local fake answering from keyword rules: "
    "it measures the pipeline, not a model"
)

# The fake model's "judgement": the first keyword found in the prompt decides. Generic triage
# words, in a fixed order, not tuned to the cases; anything else gets the fallback.
FAKE_KEYWORDS: dict[str, str] = {
    "maintenance": FP,
    "flapping": FP,
    "flaps_last_hour": FP,
    "no space left": FP,
    "oomkilled": FP,
    "enotfound": FP,
    "could not resolve host": FP,
    "econnreset": FP,
    "rate limit": FP,
    "timed out": FP,
    "timeout": FP,
    "outage": VALID,
    "assert": VALID,
    "expected": VALID,
    "exception": VALID,
    "panic": VALID,
}
FAKE_FALLBACK = VALID
FAKE_CONFIDENCE = 0.8


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    label: str
    outage: bool
    tags: tuple[str, ...]
    request: AnalysisRequest


@dataclass(frozen=True, slots=True)
class Outcome:
    case: Case
    verdict: Verdict


def _time(value: Any) -> dt.datetime:
    parsed = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def request_from_spec(case_id: str, spec: dict[str, Any], namespace: str = "eval") -> AnalysisRequest:
    """The AnalysisRequest the operator would hand a worker for a TriageJob with this spec."""
    parsed = TriageJobSpec.model_validate(spec)
    return AnalysisRequest(
        uid=f"eval-{case_id}",
        name=case_id,
        namespace=namespace,
        source=parsed.source,
        alert=parsed.alert,
        script_result=parsed.script_result,
        analyzer=parsed.analysis.analyzer if parsed.analysis else "auto",
    )


def load(path: Path) -> tuple[dt.datetime, list[Case], list[MemoryCase]]:
    """Cases and memory seeds from the YAML file; raises on anything malformed (labels, specs, duplicates)."""
    data = yaml.safe_load(path.read_text())
    now = _time(data.get("now") or dt.datetime.now(dt.UTC))
    cases: list[Case] = []
    seen: set[str] = set()
    for raw in data["cases"]:
        case_id = str(raw["id"])
        if case_id in seen:
            raise ValueError(f"duplicate case id {case_id}")
        seen.add(case_id)
        label = str(raw["label"])
        if label not in (FP, VALID):
            raise ValueError(f"case {case_id}: label must be {FP} or {VALID}, not {label!r}")
        outage = bool(raw.get("outage", False))
        if outage and label != VALID:
            raise ValueError(f"case {case_id}: an outage is labelled valid")
        tags = tuple(raw.get("tags") or ())
        cases.append(Case(case_id, label, outage, tags, request_from_spec(case_id, raw["spec"])))
    seeds: list[MemoryCase] = []
    for raw in data.get("memory_seeds") or []:
        spec = TriageJobSpec.model_validate(raw["spec"])
        # The text the audit table would hold for this job: what the memory analyzer really sees.
        seeds.append(MemoryCase(
            text=job_summary(spec) or "",
            classification=raw["classification"],
            reason=raw.get("reason", ""),
            source=raw.get("source", ""),
            check_type=raw.get("check_type", "user"),
            kind=spec.source.type,
        ))
    return now, cases, seeds


def subset(cases: Sequence[Case], n: int) -> list[Case]:
    """``n`` cases alternating between the labels (file order within each), so a small run still has both."""
    by_label = [[c for c in cases if c.label == label] for label in (FP, VALID)]
    picked: list[Case] = []
    for pair in itertools.zip_longest(*by_label):
        picked.extend(c for c in pair if c is not None)
    return picked[: max(0, n)]


# --------------------------------------------------------------------------- scoring


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def score(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Precision/recall for false_positive, the inconclusive share and the costly errors, naming the cases."""
    n = len(outcomes)
    predicted = Counter(o.verdict.classification for o in outcomes)
    tp = sum(1 for o in outcomes if o.case.label == FP and o.verdict.classification == FP)
    valid_called_fp = [o for o in outcomes if o.case.label == VALID and o.verdict.classification == FP]
    outages_called_fp = [o for o in valid_called_fp if o.case.outage]
    labelled_fp = sum(1 for o in outcomes if o.case.label == FP)
    decided = [o for o in outcomes if o.verdict.classification != INCONCLUSIVE]
    correct = sum(1 for o in decided if o.verdict.classification == o.case.label)
    mistakes = [
        {
            "id": o.case.id,
            "label": o.case.label,
            "outage": o.case.outage,
            "predicted": o.verdict.classification,
            "analyzer": o.verdict.analyzer,
            "confidence": o.verdict.confidence,
            "reason": o.verdict.reason[:300],
        }
        for o in outcomes
        if o.verdict.classification != o.case.label
    ]
    return {
        "cases": n,
        "predicted": {c: predicted.get(c, 0) for c in (FP, VALID, INCONCLUSIVE)},
        "fp_precision": _ratio(tp, tp + len(valid_called_fp)),
        "fp_recall": _ratio(tp, labelled_fp),
        "inconclusive_share": _ratio(predicted.get(INCONCLUSIVE, 0), n),
        "decided_accuracy": _ratio(correct, len(decided)),
        "valid_called_fp": len(valid_called_fp),
        "outages_called_fp": len(outages_called_fp),
        "outages_called_fp_ids": [o.case.id for o in outages_called_fp],
        "decided_by": dict(Counter(o.verdict.analyzer for o in decided)),
        "mistakes": mistakes,
    }


def always_valid(cases: Sequence[Case]) -> list[Outcome]:
    verdict = Verdict(discard=False, classification=Classification.VALID, reason="baseline: always valid",
                      confidence=1.0, analyzer="baseline")
    return [Outcome(c, verdict) for c in cases]


async def run_chain(cases: Sequence[Case], analyzers: Sequence[Analyzer], now: dt.datetime) -> list[Outcome]:
    outcomes = []
    for case in cases:
        context = AnalysisContext(now=now)
        outcomes.append(Outcome(case, await run_offline_chain(case.request, context, analyzers)))
    return outcomes


async def evaluate(cases_path: Path, limit: int | None = None, with_llm: bool = True) -> dict[str, Any]:
    now, cases, seeds = load(cases_path)
    if limit is not None:
        cases = subset(cases, limit)
    memory = MemoryAnalyzer(seeds)
    rules = RulesAnalyzer()
    chains: dict[str, list[Outcome]] = {
        "always valid": always_valid(cases),
        "rules": await run_chain(cases, [rules], now),
        "memory+rules": await run_chain(cases, [memory, rules], now),
    }
    llm_calls = 0
    if with_llm:
        async with FakeLLM() as fake:
            fake.set_rule(FAKE_KEYWORDS, fallback=FAKE_FALLBACK, confidence=FAKE_CONFIDENCE)
            config = LLMConfig(base_url=fake.url, model="fake/keyword-rules", timeout_seconds=30, max_retries=1,
                               backoff_initial_seconds=0.01, backoff_max_seconds=0.05)
            async with LLMAnalyzer(config) as llm:
                chains["memory+rules+fake-llm"] = await run_chain(cases, [memory, rules, llm], now)
            llm_calls = len(fake.requests)
    labels = Counter(c.label for c in cases)
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cases_file": str(cases_path),
        "cases": len(cases),
        "labels": {FP: labels.get(FP, 0), VALID: labels.get(VALID, 0)},
        "outages": sum(1 for c in cases if c.outage),
        "memory_seeds": {"total": len(seeds), "indexed": memory.size},
        "fake_llm": {"note": FAKE_NOTE, "keywords": FAKE_KEYWORDS, "fallback": FAKE_FALLBACK, "calls": llm_calls}
        if with_llm
        else None,
        "chains": {name: score(outcomes) for name, outcomes in chains.items()},
    }


# --------------------------------------------------------------------------- output


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    lines = [
        f"kubetriage eval: {results['cases']} cases ({results['labels'][FP]} {FP}, {results['labels'][VALID]} "
        f"{VALID}, of which {results['outages']} real outages); memory seeded with "
        f"{results['memory_seeds']['indexed']} of {results['memory_seeds']['total']} seeds (AI-labelled ones ignored)",
    ]
    if results.get("fake_llm"):
        lines.append(f"NOTE: {FAKE_NOTE}.")
    header = (
        f"{'chain':<24} {'FP precision':>12} {'FP recall':>10} {'inconclusive':>12} {'accuracy*':>10} "
        f"{'valid->FP':>10} {'OUTAGES->FP':>12}  decided by"
    )
    lines += ["", header, "-" * len(header)]
    for name, s in results["chains"].items():
        decided = ", ".join(f"{k} {v}" for k, v in sorted(s["decided_by"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"{name:<24} {_fmt(s['fp_precision']):>12} {_fmt(s['fp_recall']):>10} "
            f"{_fmt(s['inconclusive_share']):>12} {_fmt(s['decided_accuracy']):>10} {s['valid_called_fp']:>10} "
            f"{s['outages_called_fp']:>12}  {decided}"
        )
    lines.append("")
    lines.append("* accuracy over the cases the chain decided (inconclusive ones left out).")
    for name, s in results["chains"].items():
        if s["outages_called_fp_ids"]:
            lines.append(f"costly errors ({name}): real outages called {FP}: {', '.join(s['outages_called_fp_ids'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="labelled cases (YAML)")
    parser.add_argument("--limit", type=int, default=None, help="only N cases, alternating labels")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results")
    parser.add_argument("--no-llm", action="store_true", help="skip the fake-LLM chain")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    results = asyncio.run(evaluate(args.cases, args.limit, with_llm=not args.no_llm))
    results["seconds"] = round(time.monotonic() - t0, 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    print(table(results))
    print(f"\nwrote {args.output} in {results['seconds']}s")
    return results


if __name__ == "__main__":
    main()
