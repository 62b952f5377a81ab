"""The labelled evaluation set is well-formed, and ``python -m bench.eval`` runs end to end on a subset."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bench import eval as bench_eval
from kubetriage.analyzers.memory import MemoryAnalyzer
from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.models import CheckType, Classification, SourceType

CASES = Path(__file__).parent / "data" / "eval_cases.yaml"


@pytest.fixture(scope="module")
def loaded() -> tuple[object, list[bench_eval.Case], list[object]]:
    return bench_eval.load(CASES)


def test_file_has_enough_labelled_cases_of_both_kinds_and_labels(loaded: tuple) -> None:
    _, cases, _ = loaded
    assert len(cases) >= 60
    labels = Counter(c.label for c in cases)
    assert labels["false_positive"] >= 20 and labels["valid"] >= 20
    kinds = Counter(c.request.source.type for c in cases)
    assert kinds[SourceType.ALERT] >= 20 and kinds[SourceType.SCRIPT_RESULT] >= 20
    outages = [c for c in cases if c.outage]
    assert len(outages) >= 5 and all(c.label == "valid" for c in outages)
    assert len({c.id for c in cases}) == len(cases)


def test_every_case_is_an_analysis_request_with_its_body(loaded: tuple) -> None:
    _, cases, _ = loaded
    raw = yaml.safe_load(CASES.read_text())["cases"]
    assert len(raw) == len(cases)
    for case in cases:
        assert isinstance(case.request, AnalysisRequest)
        body = case.request.alert if case.request.source.type == SourceType.ALERT else case.request.script_result
        assert body is not None, case.id
        # A round trip through JSON, as the operator hands requests to workers.
        assert AnalysisRequest.model_validate_json(case.request.model_dump_json()) == case.request


def test_memory_seeds_are_matched_by_their_recurring_cases_and_the_ai_seed_is_not(loaded: tuple) -> None:
    now, cases, seeds = loaded
    assert {s.check_type for s in seeds} == {CheckType.USER, CheckType.AI}
    memory = MemoryAnalyzer(seeds)
    context = AnalysisContext(now=now)

    async def verdicts() -> dict[str, object]:
        return {c.id: await memory.analyze(c.request, context) for c in cases}

    found = asyncio.run(verdicts())
    tagged = {c.id: c for c in cases if "memory" in c.tags}
    assert tagged
    for case_id, case in tagged.items():
        verdict = found[case_id]
        assert verdict is not None, case_id
        assert verdict.classification == case.label, case_id
    # The wrong AI verdict seeded for this real outage must not be reused.
    assert found["alert-db-connections-exhausted"] is None
    untagged_matches = [cid for cid, v in found.items() if v is not None and cid not in tagged]
    assert untagged_matches == []


def test_subset_alternates_labels() -> None:
    _, cases, _ = bench_eval.load(CASES)
    picked = bench_eval.subset(cases, 10)
    assert len(picked) == 10
    assert Counter(c.label for c in picked) == {"false_positive": 5, "valid": 5}


def test_bench_eval_runs_on_a_ten_case_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    results = bench_eval.main(["--limit", "10", "--output", str(out)])
    written = json.loads(out.read_text())
    assert written["cases"] == 10
    assert set(written["chains"]) == {"always valid", "rules", "memory+rules", "memory+rules (no evidence)",
                                      "memory+rules+fake-llm"}
    for name, scores in written["chains"].items():
        assert scores["cases"] == 10, name
        assert sum(scores["predicted"].values()) == 10, name
    baseline = written["chains"]["always valid"]
    assert baseline["fp_recall"] == 0 and baseline["fp_precision"] is None and baseline["outages_called_fp"] == 0
    assert written["fake_llm"]["calls"] >= 1  # the fake LLM really was asked
    assert results["chains"]["rules"] == written["chains"]["rules"]
    printed = capsys.readouterr().out
    assert "FakeLLM" in printed and "not a model" in printed
    assert "OUTAGES->FP" in printed


def test_scoring_counts_outages_called_false_positive_separately(loaded: tuple) -> None:
    _, cases, _ = loaded
    outage = next(c for c in cases if c.outage)
    noise = next(c for c in cases if c.label == "false_positive")
    real = next(c for c in cases if c.label == "valid" and not c.outage)
    fp = bench_eval.Verdict(discard=True, classification=Classification.FALSE_POSITIVE, reason="x", confidence=0.9,
                            analyzer="t")
    inconclusive = bench_eval.Verdict(discard=False, classification=Classification.INCONCLUSIVE, reason="x",
                                      confidence=0.1, analyzer="t")
    scores = bench_eval.score([
        bench_eval.Outcome(outage, fp), bench_eval.Outcome(noise, fp), bench_eval.Outcome(real, inconclusive),
    ])
    assert scores["fp_precision"] == 0.5
    assert scores["fp_recall"] == 1.0
    assert scores["inconclusive_share"] == pytest.approx(1 / 3, abs=1e-3)
    assert scores["valid_called_fp"] == 1
    assert scores["outages_called_fp"] == 1 and scores["outages_called_fp_ids"] == [outage.id]


# --------------------------------------------------------------------------- the splits

DATA = Path(__file__).parent / "data"
FROZEN = DATA / "eval_frozen.yaml"
FROZEN_MANIFEST = DATA / "eval_frozen.sha256.json"


def _frozen_hash(case: dict[str, object]) -> str:
    payload = {k: case.get(k) for k in ("spec", "label", "outage", "evidence")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def test_the_frozen_split_is_unchanged_since_it_was_frozen() -> None:
    """A frozen case's payload, label or evidence may never change, and no case may leave: tuning on it would."""
    data = yaml.safe_load(FROZEN.read_text())
    manifest = json.loads(FROZEN_MANIFEST.read_text())
    assert data["split"] == "frozen" and data["frozen_at"] == manifest["frozen_at"]
    assert data["now"] == manifest["now"]
    current = {c["id"]: _frozen_hash(c) for c in data["cases"]}
    changed = sorted(i for i, h in manifest["cases"].items() if current.get(i) != h)
    assert not changed, f"frozen cases changed or removed: {changed}"
    seeds = hashlib.sha256(json.dumps(data.get("memory_seeds"), sort_keys=True, default=str).encode()).hexdigest()
    assert seeds == manifest["memory_seeds"], "the frozen split's memory seeds changed"


def test_the_frozen_hash_notices_a_change() -> None:
    case = yaml.safe_load(FROZEN.read_text())["cases"][0]
    edited = {**case, "label": "valid" if case["label"] == "false_positive" else "false_positive"}
    assert _frozen_hash(edited) != _frozen_hash(case)


def test_the_splits_are_big_enough_and_disjoint() -> None:
    files = [bench_eval.load_file(p) for p in bench_eval.DEFAULT_CASES]
    cases = [c for f in files for c in f.cases]
    assert len(cases) >= 200 and len({c.id for c in cases}) == len(cases)
    frozen = [c for c in cases if c.split == "frozen"]
    assert len(frozen) >= 100
    outages = [c for c in frozen if c.outage]
    assert len(outages) >= 30
    assert {c.request.source.type for c in outages} == {SourceType.ALERT, SourceType.SCRIPT_RESULT}
    assert {c.split for c in cases} == {"tuning", "frozen"}


def test_a_file_without_split_markers_is_one_split(tmp_path: Path) -> None:
    data = yaml.safe_load(CASES.read_text())
    data.pop("split", None)
    plain = tmp_path / "independent.yaml"
    plain.write_text(yaml.safe_dump(data))
    results = asyncio.run(bench_eval.evaluate([plain], limit=6, with_llm=False))
    assert list(results["splits"]) == ["independent"]
    assert set(results["chains"]) >= {"memory+rules", "rules", "always valid"}
    for field in ("fp_precision", "fp_recall", "inconclusive_share", "outages_called_fp", "mistakes"):
        assert field in results["chains"]["memory+rules"]
