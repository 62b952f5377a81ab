"""The memory analyzer on plain data, plus one round trip through the real SQLite sink.

Each test states the property a team relies on: a human's verdict is reused
for the same failure (with new ids, numbers and timestamps) and names where
it came from; something merely similar is not; AI verdicts never outvote
humans; and the index copes with the 5000 rows ``human_verdicts()`` returns.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from pathlib import Path
from typing import Any

import pytest

from kubetriage.analyzers.chain import run_offline_chain
from kubetriage.analyzers.memory import MemoryAnalyzer, MemoryCase, normalise, subject_key
from kubetriage.analyzers.rules import RulesAnalyzer
from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.models import Alert, CheckType, Classification, ScriptResult, Source, TriageJobSpec, Verdict
from kubetriage.api.summary import job_summary
from kubetriage.infra.sinks import SqliteSink, VerdictRecord

FP = Classification.FALSE_POSITIVE
VALID = Classification.VALID
CTX = AnalysisContext()
T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)

CHECKOUT_TIMEOUT = (
    "TimeoutError: page.goto: Timeout 30000ms exceeded.\n"
    'Call log:\n  - navigating to "https://staging.shop.example.com/cart/81734?session=9f8e7d6c5b4a", '
    'waiting until "load"\n  at /home/runner/work/shop/tests/checkout.spec.ts:42:17 '
    "request_id=req8f3k2j9x22 pod checkout-api-7d9f8c6b5-x2x5q 2026-02-11T03:12:09.123Z"
)
# The same failure on another night: every id, number, URL, path, pod and timestamp differs.
CHECKOUT_TIMEOUT_AGAIN = (
    "TimeoutError: page.goto: Timeout 45000ms exceeded.\n"
    'Call log:\n  - navigating to "https://staging.shop.example.com/cart/99120?session=0a1b2c3d4e5f", '
    'waiting until "load"\n  at /home/runner/work/shop2/tests/checkout.spec.ts:57:3 '
    "request_id=req1a2b3c4d55 pod checkout-api-5c6d7e8f9-q8w2e 2026-03-02T23:59:01.004Z"
)
CHECKOUT_ASSERTION = (
    "Error: expect(locator).toHaveText(expected)\n"
    "Locator: getByTestId('cart-total')\nExpected string: \"42.00\"\nReceived string: \"0.00\""
)


def script_request(
    error: str, script: str = "checkout.spec.ts", test_case: str | None = "pays with card", success: bool = False
) -> AnalysisRequest:
    return AnalysisRequest(
        uid="uid-1",
        name="run-1",
        namespace="qa",
        source=Source(type="scriptResult"),
        script_result=ScriptResult(script_name=script, test_case=test_case, success=success, error_message=error),
    )


def alert_request(name: str, labels: dict[str, str], summary: str | None = None) -> AnalysisRequest:
    return AnalysisRequest(
        uid="uid-2",
        name="alert-1",
        namespace="ops",
        source=Source(type="alert"),
        alert=Alert(name=name, labels=labels, annotations={"summary": summary} if summary else None),
    )


def script_case(error: str, classification: Classification = FP, **kw: Any) -> MemoryCase:
    fields: dict[str, Any] = {
        "text": f"checkout.spec.ts: pays with card: {error}",
        "classification": classification,
        "reason": "staging load balancer restarts at 03:00; known noise",
        "source": "qa/run-0311 (row 17)",
        "kind": "scriptResult",
    }
    fields.update(kw)
    return MemoryCase(**fields)


async def analyze(memory: MemoryAnalyzer, request: AnalysisRequest) -> Verdict | None:
    return await memory.analyze(request, CTX)


def similarity_in(reason: str) -> float:
    found = re.search(r"similarity (\d\.\d\d)", reason)
    assert found, reason
    return float(found.group(1))


# --------------------------------------------------------------------------- matching


async def test_match_reuses_the_human_verdict_and_names_the_case() -> None:
    memory = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT)])
    verdict = await analyze(memory, script_request(CHECKOUT_TIMEOUT))
    assert verdict is not None
    assert verdict.classification == FP and verdict.discard is True
    assert verdict.analyzer == "memory"
    assert verdict.check_type == CheckType.AI  # the analyzer decided; a human did not
    assert verdict.reason == (
        "matches human verdict on qa/run-0311 (row 17) (similarity 1.00): "
        "staging load balancer restarts at 03:00; known noise"
    )
    assert verdict.confidence == 0.95


async def test_ids_numbers_urls_paths_pods_and_timestamps_do_not_matter() -> None:
    memory = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT)])
    verdict = await analyze(memory, script_request(CHECKOUT_TIMEOUT_AGAIN))
    assert verdict is not None and verdict.classification == FP
    assert similarity_in(verdict.reason) >= 0.98
    assert normalise(CHECKOUT_TIMEOUT) == normalise(CHECKOUT_TIMEOUT_AGAIN)


def test_normalise_placeholders() -> None:
    text = normalise(
        "GET https://api.example.com/v1/x?id=7 from 10.2.3.4:8080 at 2026-01-02T03:04:05Z (12:30:45) "
        "uuid 123e4567-e89b-12d3-a456-426614174000 commit 3fa9c2e1b commit 0xDEADBEEF "
        "file /var/lib/docker/overlay2/abc/merged pod web-7d9f8c6b5-x2x5q id req8f3k2j9x22 mail a.b@example.org n=42"
    )
    for placeholder in ("<url>", "<ip>", "<ts>", "<uuid>", "<hex>", "<path>", "web-<id>", "<id>", "<email>", "<n>"):
        assert placeholder in text, placeholder
    assert not re.search(r"\d", text.replace("<n>", ""))
    # Ordinary words with digits survive: they name things.
    assert "e<n>e_tests" in normalise("e2e_tests failed")
    assert "should-display-correct-total" in normalise("should-display-correct-total")


async def test_below_threshold_is_no_opinion() -> None:
    memory = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT)])
    assert await analyze(memory, script_request(CHECKOUT_ASSERTION)) is None


async def test_threshold_is_configurable() -> None:
    near = CHECKOUT_TIMEOUT.replace('waiting until "load"', 'waiting until "networkidle" after retrying twice')
    strict = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT)], min_similarity=0.99)
    loose = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT)], min_similarity=0.6)
    assert await analyze(strict, script_request(near)) is None
    verdict = await analyze(loose, script_request(near))
    assert verdict is not None
    sim = similarity_in(verdict.reason)
    assert 0.6 <= sim < 0.99
    # Confidence follows similarity: 0.70 at the threshold rising to 0.95 at identical.
    assert verdict.confidence == pytest.approx(0.7 + 0.25 * (sim - 0.6) / 0.4, abs=0.011)


async def test_subject_must_match() -> None:
    """The same error text in another script is another problem; identical labels on another alert too."""
    memory = MemoryAnalyzer([
        script_case(CHECKOUT_TIMEOUT),
        MemoryCase(text="HighCPU {instance=10.0.0.1:9100,job=node,severity=warning}", classification=FP,
                   reason="batch window", source="ops/a-1", kind="alert"),
    ])
    other_script = script_request(CHECKOUT_TIMEOUT, script="search.spec.ts")
    assert await analyze(memory, other_script) is None
    other_alert = alert_request("DiskFull", {"instance": "10.0.0.1:9100", "job": "node", "severity": "warning"})
    assert await analyze(memory, other_alert) is None
    same_alert = alert_request("HighCPU", {"instance": "10.0.0.9:9100", "job": "node", "severity": "warning"})
    verdict = await analyze(memory, same_alert)
    assert verdict is not None and "ops/a-1" in verdict.reason
    # Opting out of the subject check lets the text alone decide.
    loose = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT)], same_subject=False)
    assert await analyze(loose, other_script) is not None


async def test_alert_summary_annotation_and_label_formats() -> None:
    """Stored alert summaries come as "name {k=v,...}" or "name k=v ..."; the summary annotation is optional."""
    memory = MemoryAnalyzer([
        MemoryCase(text="KubeJobFailed {job_name=backup-28612345,namespace=ops,severity=warning}",
                   classification=FP, reason="backup retries by itself", source="ops/tj-9", kind="alert"),
    ])
    request = alert_request("KubeJobFailed", {"job_name": "backup-28613785", "namespace": "ops",
                                              "severity": "warning"},
                            summary="Job ops/backup-28613785 failed to complete.")
    verdict = await analyze(memory, request)
    assert verdict is not None and verdict.classification == FP
    assert similarity_in(verdict.reason) >= 0.98


async def test_passing_run_and_empty_memory_give_no_opinion() -> None:
    memory = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT)])
    assert await analyze(memory, script_request(CHECKOUT_TIMEOUT, success=True)) is None
    assert await analyze(MemoryAnalyzer([]), script_request(CHECKOUT_TIMEOUT)) is None


# --------------------------------------------------------------------------- human over AI


async def test_ai_cases_are_ignored_by_default() -> None:
    memory = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT, check_type="ai")])
    assert memory.size == 0
    assert await analyze(memory, script_request(CHECKOUT_TIMEOUT)) is None


async def test_ai_cases_do_not_outweigh_a_human_one() -> None:
    near = CHECKOUT_TIMEOUT.replace('waiting until "load"', 'waiting until "domcontentloaded"')
    human = script_case(near, VALID, reason="the cart page really hangs since the 2.3 release", source="qa/run-7")
    ai = [script_case(CHECKOUT_TIMEOUT, FP, check_type="ai", reason=f"model said noise #{i}", source=f"qa/ai-{i}")
          for i in range(25)]
    memory = MemoryAnalyzer([*ai, human], ai_weight=0.5, min_similarity=0.7)
    verdict = await analyze(memory, script_request(CHECKOUT_TIMEOUT))
    assert verdict is not None
    assert verdict.classification == VALID
    assert verdict.reason.startswith("matches human verdict on qa/run-7 (similarity ")
    assert similarity_in(verdict.reason) < 1.0  # the AI cases were closer, and still lost


async def test_ai_only_match_is_weighted_down_and_says_so() -> None:
    memory = MemoryAnalyzer([script_case(CHECKOUT_TIMEOUT, check_type="ai", source="qa/ai-1")], ai_weight=0.5)
    verdict = await analyze(memory, script_request(CHECKOUT_TIMEOUT))
    assert verdict is not None
    assert verdict.confidence == pytest.approx(0.95 * 0.5, abs=0.01)
    assert "matches AI verdict on qa/ai-1" in verdict.reason
    assert "not confirmed by a human" in verdict.reason
    # Below the chain's threshold, so the chain reports it as inconclusive rather than deciding on it.
    chained = await run_offline_chain(script_request(CHECKOUT_TIMEOUT), CTX, [memory])
    assert chained.classification == Classification.INCONCLUSIVE


# --------------------------------------------------------------------------- merging near-identical cases


async def test_identical_cases_merge_and_vote() -> None:
    ids = ["req1111aaaa22", "req2222bbbb33", "req3333cccc44"]
    cases = [script_case(CHECKOUT_TIMEOUT.replace("req8f3k2j9x22", rid), source=f"qa/run-{i}")
             for i, rid in enumerate(ids)]
    memory = MemoryAnalyzer(cases)
    assert memory.size == 1
    verdict = await analyze(memory, script_request(CHECKOUT_TIMEOUT))
    assert verdict is not None and verdict.classification == FP
    assert "3 near-identical human verdicts: 3 false_positive" in verdict.reason
    assert verdict.confidence == 0.95


async def test_near_identical_but_not_equal_cases_merge_at_query_time() -> None:
    trace = " ".join(f"at frame{i} (/srv/app/module{i}.js:{i}:{i})" for i in range(60))
    a = f"{CHECKOUT_TIMEOUT} {trace}"
    b = a.replace("at frame59", "at handler59")  # one word in a long trace
    memory = MemoryAnalyzer([script_case(a, source="qa/run-a"), script_case(b, source="qa/run-b")])
    assert memory.size == 2
    verdict = await analyze(memory, script_request(a))
    assert verdict is not None
    assert "2 near-identical human verdicts: 2 false_positive" in verdict.reason
    # With the merge threshold at 1.0 only the identical one counts.
    strict = MemoryAnalyzer([script_case(a, source="qa/run-a"), script_case(b, source="qa/run-b")],
                            merge_similarity=1.0)
    single = await analyze(strict, script_request(a))
    assert single is not None and "near-identical" not in single.reason


async def test_disagreeing_humans_make_an_inconclusive_verdict_newest_first() -> None:
    older = script_case(CHECKOUT_TIMEOUT, FP, reason="noise", source="qa/old", recorded_at=T0)
    newer = script_case(CHECKOUT_TIMEOUT, VALID, reason="regression in 2.3", source="qa/new",
                        recorded_at=T0 + dt.timedelta(days=3))
    verdict = await analyze(MemoryAnalyzer([older, newer]), script_request(CHECKOUT_TIMEOUT))
    assert verdict is not None
    assert verdict.classification == Classification.INCONCLUSIVE
    assert "past verdicts disagree" in verdict.reason
    assert "newest says valid: regression in 2.3" in verdict.reason
    assert "qa/new" in verdict.reason

    # A clear majority still decides, with confidence scaled by the agreement.
    majority = [script_case(CHECKOUT_TIMEOUT, FP, source=f"qa/fp-{i}") for i in range(3)] + [newer]
    decided = await analyze(MemoryAnalyzer(majority), script_request(CHECKOUT_TIMEOUT))
    assert decided is not None and decided.classification == FP
    assert decided.confidence == pytest.approx(0.95 * 3 / 4, abs=0.01)
    assert "3 false_positive, 1 valid" in decided.reason


# --------------------------------------------------------------------------- rows, safety, scale


def human_row(uid: str, summary: str | None, classification: str = "false_positive", **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "job_uid": uid, "job_name": f"tj-{uid}", "namespace": "qa", "source_type": "scriptResult",
        "source_id": "17", "fingerprint": None, "classification": classification,
        "discard": classification == "false_positive", "reason": "known noise", "confidence": 1.0,
        "summary": summary, "recorded_at": T0,
    }
    row.update(kw)
    return row


async def test_from_rows_skips_unusable_rows() -> None:
    rows = [
        human_row("a", f"checkout.spec.ts pays with card: {CHECKOUT_TIMEOUT}"),
        human_row("b", None),
        human_row("c", "checkout.spec.ts: x: y", classification="inconclusive"),
        human_row("d", "   "),
    ]
    memory = MemoryAnalyzer.from_rows(rows)
    assert memory.size == 1
    assert memory.skipped == 3
    verdict = await analyze(memory, script_request(CHECKOUT_TIMEOUT_AGAIN))
    assert verdict is not None
    assert "matches human verdict on qa/tj-a (row 17)" in verdict.reason


async def test_round_trip_through_the_sqlite_sink(tmp_path: Path) -> None:
    """Verdicts a human recorded through the real sink come back as memory the analyzer matches."""
    sink = SqliteSink(str(tmp_path / "verdicts.db"))
    await sink.setup()
    try:
        spec = TriageJobSpec.model_validate({
            "source": {"type": "scriptResult", "id": "4711"},
            "scriptResult": {"scriptName": "checkout.spec.ts", "testCase": "pays with card", "success": False,
                             "errorMessage": CHECKOUT_TIMEOUT},
        })
        human = Verdict(discard=True, classification=FP, reason="LB restarts nightly", confidence=1.0,
                        analyzer="human", check_type=CheckType.USER)
        ai = Verdict(discard=False, classification=VALID, reason="model guess", confidence=0.9, analyzer="llm")
        for uid, verdict in (("job-h", human), ("job-a", ai)):
            await sink.record(VerdictRecord(
                job_uid=uid, job_name=f"run-{uid}", namespace="qa", source_type="scriptResult", source_id="4711",
                verdict=verdict, summary=job_summary(spec), recorded_at=T0,
            ))
        memory = MemoryAnalyzer.from_rows(await sink.human_verdicts())
    finally:
        await sink.close()
    assert memory.size == 1
    verdict = await analyze(memory, script_request(CHECKOUT_TIMEOUT_AGAIN))
    assert verdict is not None and verdict.classification == FP
    assert "qa/run-job-h (row 4711)" in verdict.reason and "LB restarts nightly" in verdict.reason


async def test_copied_reason_and_source_are_sanitised_and_capped() -> None:
    case = script_case(CHECKOUT_TIMEOUT, reason="line one\n\x1b[31mred\x1b[0m\u202e" + "x" * 5000,
                       source="qa/\x00evil\nname")
    verdict = await analyze(MemoryAnalyzer([case]), script_request(CHECKOUT_TIMEOUT))
    assert verdict is not None
    assert "\n" not in verdict.reason and "\x1b" not in verdict.reason and "\u202e" not in verdict.reason
    assert "qa/ evil name" in verdict.reason
    assert len(verdict.reason) < 1400


def test_invalid_options_are_refused() -> None:
    for bad in ({"min_similarity": 0}, {"min_similarity": 1.5}, {"merge_similarity": 0}, {"ai_weight": 2}):
        with pytest.raises(ValueError):
            MemoryAnalyzer([], **bad)


def test_subject_key_keeps_short_numbers_and_drops_ids() -> None:
    assert subject_key("smoke-1") != subject_key("smoke-2")
    assert subject_key("backup-28612345 {a=b}") == subject_key("backup-28613785")
    assert subject_key("checkout.spec.ts: pays") == "checkout.spec.ts"


async def test_five_thousand_cases_build_and_answer() -> None:
    rnd = random.Random(4)
    words = ("timeout connection refused reset database login checkout payment cart order element locator "
             "click visible network disk memory quota token expired upstream gateway schema migration").split()
    cases = []
    for i in range(5000):
        script = f"suite{i % 120:03d}.spec.ts"
        body = " ".join(rnd.choice(words) for _ in range(rnd.randint(12, 40)))
        cases.append(MemoryCase(text=f"{script}: case {i % 7}: {body} id=req{rnd.randrange(10**9)}x",
                                classification=rnd.choice([FP, VALID]), reason=f"reason {i}",
                                source=f"row {i}", kind="scriptResult"))
    memory = MemoryAnalyzer(cases)
    assert memory.size > 4900
    for probe in (17, 2500, 4999):
        target = cases[probe]
        script, test_case, error = target.text.split(": ", 2)
        verdict = await analyze(memory, script_request(error, script=script, test_case=test_case))
        assert verdict is not None
        assert verdict.classification == target.classification
        assert f"row {probe} (similarity 1.00)" in verdict.reason
    unrelated = script_request("segmentation fault in libfoo while rendering the invoice PDF",
                               script="suite001.spec.ts")
    assert await analyze(memory, unrelated) is None


async def test_memory_decides_before_rules_in_the_chain() -> None:
    """A human said this assertion failure is a known test-data problem: the rules would have called it valid."""
    memory = MemoryAnalyzer([script_case(CHECKOUT_ASSERTION, FP, reason="test data reset by the 02:00 job")])
    request = script_request(CHECKOUT_ASSERTION)
    rules_only = await run_offline_chain(request, CTX, [RulesAnalyzer()])
    assert rules_only.classification != FP
    verdict = await run_offline_chain(request, CTX, [memory, RulesAnalyzer()])
    assert verdict.classification == FP and verdict.analyzer == "memory"
