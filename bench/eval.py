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

Splits: the tuning split (``tests/data/eval_cases.yaml`` and ``eval_tuning_extra.yaml``) is what rules
and confidences may be tuned on; the frozen split (``tests/data/eval_frozen.yaml``) was written before any
rule change and is never tuned on: it only reports. A file's top-level ``split:`` names its split (a case's
own ``split:`` overrides it); a file without split markers is reported as one split named after the file.

Each case may carry recorded ``evidence`` (what the Prometheus/Alertmanager/history gatherers would have
returned); chains run with it, and ``memory+rules`` also runs without it, to show what evidence adds.

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
from kubetriage.api.evidence import Evidence
from kubetriage.api.models import Classification, TriageJobSpec, Verdict
from kubetriage.api.summary import job_summary

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.fakellm import FakeLLM  # noqa: E402 - the fake LLM lives with the tests

DATA = REPO / "tests" / "data"
DEFAULT_CASES = (DATA / "eval_cases.yaml", DATA / "eval_tuning_extra.yaml", DATA / "eval_frozen.yaml")
RELIABILITY_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)
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
    split: str = "default"
    evidence: tuple[Evidence, ...] = ()


@dataclass(frozen=True, slots=True)
class CaseFile:
    """One YAML file: its clock, cases and memory seeds (each file is its own small world)."""

    path: Path
    now: dt.datetime
    cases: list[Case]
    seeds: list[MemoryCase]


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
    f = load_file(path)
    return f.now, f.cases, f.seeds


def load_file(path: Path) -> CaseFile:
    data = yaml.safe_load(path.read_text())
    now = _time(data.get("now") or dt.datetime.now(dt.UTC))
    file_split = str(data.get("split") or path.stem)
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
        evidence = tuple(Evidence.model_validate(e) for e in raw.get("evidence") or ())
        request = request_from_spec(case_id, raw["spec"])
        cases.append(Case(case_id, label, outage, tags, request, str(raw.get("split") or file_split), evidence))
    seeds: list[MemoryCase] = []
    for raw in data.get("memory_seeds") or []:
        spec = TriageJobSpec.model_validate(raw["spec"])
        # What the operator publishes to the memory for this job: the same function, the same text.
        # The text the audit table would hold for this job, and its labels: what the memory really sees.
        seeds.append(MemoryCase(
            text=job_summary(spec) or "",
            classification=raw["classification"],
            reason=raw.get("reason", ""),
            source=raw.get("source", ""),
            check_type=raw.get("check_type", "user"),
            kind=spec.source.type,
            labels=dict(spec.alert.labels or {}) if spec.alert else None,
        ))
    return CaseFile(path, now, cases, seeds)


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
        "by_rule": by_rule(decided),
        "reliability": reliability(decided),
        "mistakes": mistakes,
    }


def rule_of(verdict: Verdict) -> str:
    """Which analyzer, and which of its rules, made a verdict (the rules analyzer titles its lead finding)."""
    return f"{verdict.analyzer}: {verdict.title}" if verdict.title else verdict.analyzer


def by_rule(decided: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """Precision of each analyzer/rule over the verdicts it decided, false_positive calls counted apart."""
    out: dict[str, dict[str, Any]] = {}
    for o in decided:
        row = out.setdefault(rule_of(o.verdict), {"decided": 0, "correct": 0, "fp_called": 0, "fp_correct": 0})
        row["decided"] += 1
        row["correct"] += o.verdict.classification == o.case.label
        if o.verdict.classification == FP:
            row["fp_called"] += 1
            row["fp_correct"] += o.case.label == FP
    for row in out.values():
        row["precision"] = _ratio(row["correct"], row["decided"])
        row["fp_precision"] = _ratio(row["fp_correct"], row["fp_called"])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["decided"]))


def reliability(decided: Sequence[Outcome]) -> dict[str, Any]:
    """Stated confidence against observed precision, in bins, and the expected calibration error (ECE)."""
    bins = []
    ece = 0.0
    lower = 0.0
    for upper in RELIABILITY_BINS:
        members = [o for o in decided if lower <= o.verdict.confidence < upper]
        if members:
            stated = sum(o.verdict.confidence for o in members) / len(members)
            observed = sum(o.verdict.classification == o.case.label for o in members) / len(members)
            ece += len(members) / len(decided) * abs(stated - observed)
            bins.append({"bin": f"[{lower:.1f}, {min(upper, 1.0):.1f}{']' if upper > 1 else ')'}",
                         "count": len(members), "stated": round(stated, 3), "observed": round(observed, 3)})
        lower = upper
    return {"bins": bins, "ece": round(ece, 4) if decided else None}


def always_valid(cases: Sequence[Case]) -> list[Outcome]:
    verdict = Verdict(discard=False, classification=Classification.VALID, reason="baseline: always valid",
                      confidence=1.0, analyzer="baseline")
    return [Outcome(c, verdict) for c in cases]


async def run_chain(cases: Sequence[Case], analyzers: Sequence[Analyzer], now: dt.datetime,
                    evidence: bool = True) -> list[Outcome]:
    outcomes = []
    for case in cases:
        context = AnalysisContext(now=now, evidence=list(case.evidence) if evidence else [])
        outcomes.append(Outcome(case, await run_offline_chain(case.request, context, analyzers)))
    return outcomes


async def _run_file(f: CaseFile, cases: Sequence[Case], llm: LLMAnalyzer | None) -> dict[str, list[Outcome]]:
    memory = MemoryAnalyzer(f.seeds)
    rules = RulesAnalyzer()
    chains: dict[str, list[Outcome]] = {
        "always valid": always_valid(cases),
        "rules": await run_chain(cases, [rules], f.now),
        "memory+rules": await run_chain(cases, [memory, rules], f.now),
        "memory+rules (no evidence)": await run_chain(cases, [memory, rules], f.now, evidence=False),
    }
    if llm is not None:
        chains["memory+rules+fake-llm"] = await run_chain(cases, [memory, rules, llm], f.now)
    return chains


async def evaluate(cases_paths: Path | Sequence[Path], limit: int | None = None,
                   with_llm: bool = True) -> dict[str, Any]:
    paths = [cases_paths] if isinstance(cases_paths, Path) else list(cases_paths)
    files = [load_file(p) for p in paths]
    seen: set[str] = set()
    for f in files:
        clash = seen & {c.id for c in f.cases}
        if clash:
            raise ValueError(f"{f.path}: case ids already used by another file: {sorted(clash)[:5]}")
        seen |= {c.id for c in f.cases}
    picked = {f.path: f.cases for f in files}
    if limit is not None:  # one subset of ``limit`` cases over all files, alternating labels
        keep = {c.id for c in subset([c for f in files for c in f.cases], limit)}
        picked = {p: [c for c in cs if c.id in keep] for p, cs in picked.items()}
    chains: dict[str, list[Outcome]] = {}
    llm_calls = 0

    async def run_all(llm: LLMAnalyzer | None) -> None:
        for f in files:
            for name, outcomes in (await _run_file(f, picked[f.path], llm)).items():
                chains.setdefault(name, []).extend(outcomes)

    if with_llm:
        async with FakeLLM() as fake:
            fake.set_rule(FAKE_KEYWORDS, fallback=FAKE_FALLBACK, confidence=FAKE_CONFIDENCE)
            config = LLMConfig(base_url=fake.url, model="fake/keyword-rules", timeout_seconds=30, max_retries=1,
                               backoff_initial_seconds=0.01, backoff_max_seconds=0.05,
                               allow_http=True, allow_private_endpoints=True)  # FakeLLM: http on loopback
            async with LLMAnalyzer(config) as llm:
                await run_all(llm)
            llm_calls = len(fake.requests)
    else:
        await run_all(None)
    cases = [c for f in files for c in picked[f.path]]
    splits = sorted({c.split for c in cases}, key=lambda s: (s != "tuning", s))
    labels = Counter(c.label for c in cases)
    seeds = [s for f in files for s in f.seeds]
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cases_file": ", ".join(str(p) for p in paths),
        "cases": len(cases),
        "labels": {FP: labels.get(FP, 0), VALID: labels.get(VALID, 0)},
        "outages": sum(1 for c in cases if c.outage),
        "with_evidence": sum(1 for c in cases if c.evidence),
        "memory_seeds": {"total": len(seeds), "indexed": sum(MemoryAnalyzer(f.seeds).size for f in files)},
        "fake_llm": {"note": FAKE_NOTE, "keywords": FAKE_KEYWORDS, "fallback": FAKE_FALLBACK, "calls": llm_calls}
        if with_llm
        else None,
        "chains": {name: score(outcomes) for name, outcomes in chains.items()},
        "splits": {
            split: {
                "cases": sum(1 for c in cases if c.split == split),
                "outages": sum(1 for c in cases if c.split == split and c.outage),
                "chains": {name: score([o for o in outcomes if o.case.split == split])
                           for name, outcomes in chains.items()},
            }
            for split in splits
        },
    }


# --------------------------------------------------------------------------- output


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _chain_rows(chains: dict[str, Any]) -> list[str]:
    header = (
        f"  {'chain':<28} {'FP precision':>12} {'FP recall':>10} {'inconclusive':>12} {'accuracy*':>10} "
        f"{'valid->FP':>10} {'OUTAGES->FP':>12} {'ECE':>6}  decided by"
    )
    lines = [header, "  " + "-" * (len(header) - 2)]
    for name, s in chains.items():
        decided = ", ".join(f"{k} {v}" for k, v in sorted(s["decided_by"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"  {name:<28} {_fmt(s['fp_precision']):>12} {_fmt(s['fp_recall']):>10} "
            f"{_fmt(s['inconclusive_share']):>12} {_fmt(s['decided_accuracy']):>10} {s['valid_called_fp']:>10} "
            f"{s['outages_called_fp']:>12} {_fmt(s['reliability']['ece']):>6}  {decided}"
        )
    return lines


def table(results: dict[str, Any]) -> str:
    lines = [
        f"kubetriage eval: {results['cases']} cases ({results['labels'][FP]} {FP}, {results['labels'][VALID]} "
        f"{VALID}, of which {results['outages']} real outages; {results['with_evidence']} with recorded evidence); "
        f"memory seeded with {results['memory_seeds']['indexed']} of {results['memory_seeds']['total']} seeds "
        f"(AI-labelled ones ignored)",
    ]
    if results.get("fake_llm"):
        lines.append(f"NOTE: {FAKE_NOTE}.")
    for split, s in results["splits"].items():
        lines += ["", f"split {split}: {s['cases']} cases, {s['outages']} real outages", *_chain_rows(s["chains"])]
    if len(results["splits"]) > 1:
        lines += ["", "all splits together:", *_chain_rows(results["chains"])]
    lines.append("")
    lines.append("* accuracy over the cases the chain decided (inconclusive ones left out).")
    tuning = next(iter(results["splits"].values()))["chains"].get("memory+rules")
    if tuning:
        lines += ["", f"memory+rules on split {next(iter(results['splits']))}: reliability (stated confidence "
                      f"vs observed precision of decided verdicts), ECE {_fmt(tuning['reliability']['ece'])}"]
        lines += [f"  {b['bin']:<12} n={b['count']:<4} stated {b['stated']:.2f}  observed {b['observed']:.2f}"
                  for b in tuning["reliability"]["bins"]]
        lines += ["", "memory+rules, per analyzer/rule (all splits): decided, precision, false_positive calls, "
                      "their precision"]
        lines += [f"  {rule[:60]:<60} {row['decided']:>4} {_fmt(row['precision']):>6} {row['fp_called']:>4} "
                  f"{_fmt(row['fp_precision']):>6}"
                  for rule, row in results["chains"]["memory+rules"]["by_rule"].items()]
    for split, s in results["splits"].items():
        for name, c in s["chains"].items():
            if c["outages_called_fp_ids"]:
                lines.append(f"COSTLY ERRORS ({split}, {name}): real outages called {FP}: "
                             f"{', '.join(c['outages_called_fp_ids'])}")
    return "\n".join(lines)


CALIBRATION_CHAIN = "memory+rules"
CALIBRATION_PRIOR = 4  # pseudo-cases at the band's own score: a band with few cases moves little


def write_calibration(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """Fit ``calibration.json`` on the tuning split only, from the analyzers' raw scores."""
    from kubetriage.analyzers import calibration

    with calibration.raw_scores():
        results = asyncio.run(evaluate(paths, with_llm=False))
    tuning = results["splits"].get("tuning")
    if tuning is None:
        raise SystemExit("no tuning split among the cases: calibration is fitted on the tuning split only")
    bins = []
    for b in tuning["chains"][CALIBRATION_CHAIN]["reliability"]["bins"]:
        low, high = (float(x) for x in b["bin"].strip("[])").split(", "))
        smoothed = (b["observed"] * b["count"] + b["stated"] * CALIBRATION_PRIOR) / (b["count"] + CALIBRATION_PRIOR)
        bins.append({"low": low, "high": high if high < 1 else 1.0001, "count": b["count"],
                     "raw": b["stated"], "observed": b["observed"], "calibrated": round(smoothed, 3)})
    data = {"fitted_on": "tuning split", "chain": CALIBRATION_CHAIN, "prior_cases": CALIBRATION_PRIOR,
            "generated_at": results["generated_at"], "bins": bins}
    out.write_text(json.dumps(data, indent=2) + "\n")
    calibration.table.cache_clear()
    return data


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, action="append", default=None,
                        help="labelled cases (YAML; repeatable). Default: the tuning and frozen splits in tests/data")
    parser.add_argument("--limit", type=int, default=None, help="only N cases, alternating labels")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results")
    parser.add_argument("--no-llm", action="store_true", help="skip the fake-LLM chain")
    parser.add_argument("--write-calibration", action="store_true",
                        help="fit analyzers/.../calibration.json on the tuning split (never the frozen one) and exit")
    args = parser.parse_args(argv)
    if args.write_calibration:
        from kubetriage.analyzers import calibration

        tuning = [p for p in DEFAULT_CASES if p.exists() and p != DATA / "eval_frozen.yaml"]
        data = write_calibration(args.cases or tuning, calibration.TABLE)
        print(json.dumps(data, indent=2))
        return data
    t0 = time.monotonic()
    cases = args.cases or [p for p in DEFAULT_CASES if p.exists()]
    results = asyncio.run(evaluate(cases, args.limit, with_llm=not args.no_llm))
    results["seconds"] = round(time.monotonic() - t0, 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    print(table(results))
    print(f"\nwrote {args.output} in {results['seconds']}s")
    return results


if __name__ == "__main__":
    main()
