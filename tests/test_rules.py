"""The offline rules analyzer and chain, on plain data: every rule firing and not firing, and their combinations."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from kubetriage.analyzers.chain import NO_VERDICT_REASON, run_offline_chain
from kubetriage.analyzers.rules import RulesAnalyzer, parse_maintenance_window
from kubetriage.api.contract import AnalysisContext, AnalysisRequest, PastResult
from kubetriage.api.models import (
    MAX_REASON,
    Alert,
    AnalyzerName,
    AttemptRecord,
    Classification,
    ScriptResult,
    Source,
    Verdict,
    verdict_from_classification,
)

NOW = dt.datetime(2026, 11, 23, 3, 0, 0, tzinfo=dt.UTC)
STARTS = dt.datetime(2026, 11, 23, 2, 30, 0, tzinfo=dt.UTC)
FP = Classification.FALSE_POSITIVE
VALID = Classification.VALID
INCONCLUSIVE = Classification.INCONCLUSIVE

PLAYWRIGHT_TIMEOUT = (
    "TimeoutError: page.goto: Timeout 30000ms exceeded.\n"
    'Call log:\n  - navigating to "https://shop.example.com/login", waiting until "load"'
)
PLAYWRIGHT_ASSERTION = (
    "Error: expect(locator).toHaveText(expected)\n\n"
    'Locator: getByTestId(\'cart-total\')\nExpected string: "42.00"\nReceived string: "0.00"'
)


def alert_request(**alert: Any) -> AnalysisRequest:
    alert.setdefault("name", "DiskSpaceLow")
    return AnalysisRequest(
        uid="uid-alert", name="alert-job", namespace="default", source=Source(type="alert"), alert=Alert(**alert)
    )


def script_request(script: ScriptResult | None = None, **fields: Any) -> AnalysisRequest:
    if script is None:
        fields.setdefault("script_name", "checkout-e2e")
        fields.setdefault("success", False)
        script = ScriptResult(**fields)
    return AnalysisRequest(
        uid="uid-script",
        name="script-job",
        namespace="default",
        source=Source(type="scriptResult"),
        script_result=script,
    )


def ctx(**kw: Any) -> AnalysisContext:
    kw.setdefault("now", NOW)
    return AnalysisContext(**kw)


async def rules(request: AnalysisRequest, context: AnalysisContext | None = None) -> Verdict | None:
    return await RulesAnalyzer().analyze(request, context or ctx())


def history(*outcomes: bool, commit: str | None = None) -> list[AttemptRecord]:
    return [AttemptRecord(success=o, commit=commit) for o in outcomes]


# --------------------------------------------------------------------------- flapping


async def test_flapping_label_is_false_positive_with_count_in_reason() -> None:
    v = await rules(alert_request(severity="warning", labels={"flaps_last_hour": "9"}))
    assert v is not None
    assert v.classification == FP and v.discard is True and v.analyzer == "rules"
    assert "fired/resolved 9 times in the last hour (label flaps_last_hour=9)" in v.reason
    assert v.confidence == pytest.approx(0.86)


async def test_flapping_confidence_grows_with_count_and_is_capped() -> None:
    confidences = []
    for count in ("3", "9", "500"):
        v = await rules(alert_request(labels={"flap_count": count}))
        assert v is not None and v.classification == FP
        confidences.append(v.confidence)
    assert confidences[0] < confidences[1] <= confidences[2] <= 0.9


async def test_flapping_from_annotation() -> None:
    v = await rules(alert_request(annotations={"flap_count": "4", "summary": "Disk /dev/sdb1 is 91% full"}))
    assert v is not None and v.classification == FP
    assert "annotation flap_count=4" in v.reason


@pytest.mark.parametrize("value", ["0", "2", "nine", "9; DROP TABLE alerts", "\uff19", "-5", ""])
async def test_flapping_does_not_fire_below_minimum_or_unparseable(value: str) -> None:
    assert await rules(alert_request(severity="warning", labels={"flaps_last_hour": value})) is None


# --------------------------------------------------------------------------- consecutive count


async def test_single_blip_non_critical_is_moderate_false_positive() -> None:
    v = await rules(alert_request(severity="warning", consecutive_count=1))
    assert v is not None and v.classification == FP
    assert v.confidence == pytest.approx(0.6)
    assert "consecutiveCount=1" in v.reason and "warning" in v.reason


@pytest.mark.parametrize(
    "alert",
    [
        {"severity": "critical", "consecutive_count": 1},
        {"labels": {"severity": "critical"}, "consecutive_count": 1},
        {"severity": "warning", "consecutive_count": 2},
        {"severity": "warning", "consecutive_count": 4},
        {"severity": "warning", "consecutive_count": 0},
        {"severity": "warning"},
    ],
)
async def test_count_rules_do_not_fire_in_the_middle(alert: dict[str, Any]) -> None:
    assert await rules(alert_request(**alert)) is None


async def test_sustained_count_is_valid() -> None:
    v = await rules(alert_request(severity="warning", consecutive_count=5))
    assert v is not None and v.classification == VALID and v.discard is False
    assert v.confidence == pytest.approx(0.7)
    assert "consecutiveCount=5 (threshold 5)" in v.reason


async def test_sustained_critical_is_more_confident_than_warning() -> None:
    warning = await rules(alert_request(severity="warning", consecutive_count=20))
    critical = await rules(alert_request(name="EndpointDown", severity="critical", consecutive_count=20))
    assert warning is not None and critical is not None
    assert critical.classification == VALID and critical.confidence > warning.confidence


async def test_critical_with_shorter_sustained_count_is_valid() -> None:
    v = await rules(alert_request(severity="critical", consecutive_count=3))
    assert v is not None and v.classification == VALID and v.confidence == pytest.approx(0.75)
    assert await rules(alert_request(severity="warning", consecutive_count=3)) is None


# --------------------------------------------------------------------------- maintenance


async def test_maintenance_label_beats_a_sustained_critical_alert() -> None:
    v = await rules(
        alert_request(
            name="NodeNotReady",
            severity="critical",
            consecutive_count=20,
            labels={"node": "worker-12", "maintenance": "true"},
        )
    )
    assert v is not None and v.classification == FP
    assert v.confidence == pytest.approx(0.95)
    assert "maintenance=true" in v.reason and "outweighed" in v.reason and "consecutiveCount=20" in v.reason


@pytest.mark.parametrize("value", ["false", "no", "0", "", "maybe"])
async def test_maintenance_label_not_true_does_not_fire(value: str) -> None:
    assert await rules(alert_request(labels={"maintenance": value})) is None


async def test_maintenance_window_containing_starts_at() -> None:
    v = await rules(
        alert_request(starts_at=STARTS, annotations={"maintenance_window": "2026-11-23T02:00:00Z/2026-11-23T04:00:00Z"})
    )
    assert v is not None and v.classification == FP and v.confidence == pytest.approx(0.95)
    assert "startsAt 2026-11-23T02:30:00+00:00" in v.reason
    assert "2026-11-23T02:00:00+00:00/2026-11-23T04:00:00+00:00" in v.reason


@pytest.mark.parametrize(
    "window",
    [
        "2026-11-23T00:00:00Z/2026-11-23T02:00:00Z",  # ended before the alert
        "2026-11-23T02:31:00Z/2026-11-23T04:00:00Z",  # starts after the alert
        "2026-11-23T01:30:00Z/2026-11-23T02:30:00Z",  # the end is exclusive
    ],
)
async def test_maintenance_window_not_containing_starts_at(window: str) -> None:
    assert await rules(alert_request(starts_at=STARTS, annotations={"maintenance_window": window})) is None


async def test_maintenance_window_uses_now_when_starts_at_missing() -> None:
    window = {"maintenance_window": "2026-11-23T02:00:00Z/2026-11-23T04:00:00Z"}
    inside = await rules(alert_request(annotations=window), ctx(now=NOW))
    assert inside is not None and inside.classification == FP and "now 2026-11-23T03:00:00+00:00" in inside.reason
    later = NOW + dt.timedelta(hours=2)
    assert await rules(alert_request(annotations=window), ctx(now=later)) is None


async def test_maintenance_window_with_duration_naive_times_and_several_intervals() -> None:
    assert parse_maintenance_window("2026-11-23T02:00:00Z/PT2H") == [
        (STARTS - dt.timedelta(minutes=30), NOW + dt.timedelta(hours=1))
    ]
    v = await rules(
        alert_request(
            starts_at=STARTS,
            labels={"maintenance_window": "2026-11-22T02:00:00Z/PT1H, 2026-11-23T02:00:00/2026-11-23T03:00:00"},
        )
    )
    assert v is not None and v.classification == FP and "label maintenance_window" in v.reason


@pytest.mark.parametrize(
    "window",
    [
        "",
        "tonight",
        "2026-11-23T02:00:00Z",
        "2026-11-23T04:00:00Z/2026-11-23T02:00:00Z",
        "2026-11-23T02:00:00Z/2026-11-23T02:00:00Z",
        "2026-11-23T02:00:00Z/2026-11-23T03:00:00Z/2026-11-23T04:00:00Z",
        "2026-13-45T99:00:00Z/2026-11-23T04:00:00Z",
        "\uff12\uff10\uff12\uff16-11-23T02:00:00Z/2026-11-23T04:00:00Z",
        "9999-12-31T23:00:00Z/P9999W",
        "2026-11-23T02:00:00Z/P",
        "/",
        "\x00/\x00",
        "2026-11-23T02:00:00Z/" + "9" * 5000,
        "x" * 8000,
    ],
)
async def test_malformed_maintenance_windows_are_ignored(window: str) -> None:
    assert parse_maintenance_window(window) == []
    assert await rules(alert_request(starts_at=STARTS, annotations={"maintenance_window": window})) is None


# --------------------------------------------------------------------------- resolved alerts


async def test_quickly_resolved_alert_leans_false_positive() -> None:
    v = await rules(alert_request(status="resolved", starts_at=STARTS, ends_at=STARTS + dt.timedelta(seconds=90)))
    assert v is not None and v.classification == FP and v.confidence == pytest.approx(0.65)
    assert "resolved after 1m30s" in v.reason


async def test_quickly_resolved_critical_alert_leans_less() -> None:
    warning = await rules(alert_request(status="resolved", starts_at=STARTS, ends_at=STARTS + dt.timedelta(seconds=90)))
    critical = await rules(
        alert_request(
            status="resolved", severity="critical", starts_at=STARTS, ends_at=STARTS + dt.timedelta(seconds=90)
        )
    )
    assert warning is not None and critical is not None
    assert critical.classification == FP and critical.confidence < warning.confidence


@pytest.mark.parametrize(
    "alert",
    [
        {"status": "resolved", "starts_at": STARTS, "ends_at": STARTS + dt.timedelta(hours=2)},
        {"status": "firing", "starts_at": STARTS, "ends_at": STARTS + dt.timedelta(seconds=30)},
        {"status": "resolved", "starts_at": STARTS},
        {"status": "resolved", "starts_at": STARTS, "ends_at": STARTS - dt.timedelta(seconds=30)},
    ],
)
async def test_resolved_rule_does_not_fire_without_a_short_duration(alert: dict[str, Any]) -> None:
    assert await rules(alert_request(**alert)) is None


# --------------------------------------------------------------------------- infrastructure patterns


@pytest.mark.parametrize(
    ("text", "category"),
    [
        (PLAYWRIGHT_TIMEOUT, "timeout"),
        ("Test timeout of 30000ms exceeded.", "timeout"),
        ("httpx.ConnectTimeout: timed out", "timeout"),
        ("Error: connect ETIMEDOUT 10.0.3.17:443", "timeout"),
        ("Error: getaddrinfo ENOTFOUND storage.internal.example.com", "DNS"),
        ("socket.gaierror: [Errno -2] Name or service not known", "DNS"),
        ("dig: status: NXDOMAIN for api.staging.example.com", "DNS"),
        ("requests.exceptions.HTTPError: 502 Server Error: Bad Gateway for url: https://api.example.com/v1", "502"),
        ("Response status: 503 Service Unavailable", "503"),
        ("<html><head><title>504 Gateway Time-out</title></head></html>", "504"),
        ("OSError: [Errno 28] No space left on device: '/tmp/playwright-artifacts'", "disk"),
        ("npm ERR! code ENOSPC", "disk"),
        ("Error: read ECONNRESET", "connection"),
        ("ConnectionRefusedError: [Errno 111] Connection refused", "connection"),
        ("The runner pod was terminated: OOMKilled", "memory"),
        ("##[error]Process completed with exit code 137.", "memory"),
    ],
)
async def test_infrastructure_patterns_are_false_positive_and_named(text: str, category: str) -> None:
    v = await rules(script_request(error_message=text))
    assert v is not None and v.classification == FP and v.discard is True
    assert 0.6 <= v.confidence <= 0.8
    assert "infrastructure error" in v.reason and category in v.reason


@pytest.mark.parametrize(
    "text",
    [
        "TypeError: Cannot read properties of undefined (reading 'price')",
        "HTTP 500 Internal Server Error from /api/cart",
        "KeyError: 'total'",
        "Process completed with exit code 1.",
    ],
)
async def test_product_errors_without_any_pattern_give_no_verdict(text: str) -> None:
    assert await rules(script_request(error_message=text)) is None


async def test_infra_pattern_in_logs_only_is_weaker_than_in_error_message() -> None:
    in_error = await rules(script_request(error_message="Error: read ECONNRESET"))
    in_logs = await rules(
        script_request(error_message="Process completed with exit code 1.", logs_excerpt="[02:41:07] read ECONNRESET")
    )
    assert in_error is not None and in_logs is not None
    assert in_logs.classification == FP and "logsExcerpt" in in_logs.reason
    assert in_logs.confidence < in_error.confidence


async def test_assertion_in_error_message_is_not_overruled_by_infra_noise_in_logs() -> None:
    v = await rules(
        script_request(
            error_message=PLAYWRIGHT_ASSERTION,
            logs_excerpt="[02:41:01] request to /api/recommendations failed: ECONNRESET (retried, ok)",
        )
    )
    assert v is not None and v.classification == VALID


async def test_assertion_that_received_a_503_is_the_environment() -> None:
    v = await rules(
        script_request(error_message="Error: expect(received).toBe(expected)\n\nExpected: 200\nReceived: 503")
    )
    assert v is not None and v.classification == FP
    assert "alongside an assertion failure" in v.reason
    assert v.confidence == pytest.approx(0.55)


async def test_several_infra_categories_reinforce() -> None:
    dns = await rules(script_request(error_message="getaddrinfo EAI_AGAIN registry.npmjs.org"))
    both = await rules(
        script_request(
            error_message="getaddrinfo EAI_AGAIN registry.npmjs.org\nError: connect ECONNREFUSED 10.0.0.5:5432"
        )
    )
    assert dns is not None and both is not None
    assert both.confidence > dns.confidence and "connection" in both.reason and "DNS" in both.reason


# --------------------------------------------------------------------------- assertions


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        (PLAYWRIGHT_ASSERTION, "expect(...) matcher"),
        ("Timed out 5000ms waiting for expect(locator).toBeVisible()", "expect"),
        ("E       assert 200 == 201\nE        +  where 200 = <Response [200]>.status_code", "pytest assert"),
        ("AssertionError: promo banner not visible", "AssertionError"),
        ("org.opentest4j.AssertionFailedError: expected: <200> but was: <404>", "AssertionError"),
        ("expected:<200> but was:<404>", "JUnit"),
        ("Expected: 42.00\nReceived: 0.00", "Expected ... Received"),
    ],
)
async def test_assertion_failures_are_valid(text: str, shape: str) -> None:
    v = await rules(script_request(error_message=text))
    assert v is not None and v.classification == VALID and v.discard is False
    assert v.confidence == pytest.approx(0.65)
    assert shape in v.reason and "no infrastructure error pattern" in v.reason


async def test_assertion_on_stable_history_stays_valid_and_gains_confidence() -> None:
    alone = await rules(script_request(error_message=PLAYWRIGHT_ASSERTION))
    stable = await rules(
        script_request(
            error_message=PLAYWRIGHT_ASSERTION, commit="b41d9e0", history=history(*[True] * 7, commit="a0c3f11")
        )
    )
    assert alone is not None and stable is not None
    assert stable.classification == VALID and stable.confidence > alone.confidence
    assert stable.confidence >= 0.7
    assert "stable history: 1 flip over the last 8 runs (7 passed, 1 failed)" in stable.reason


# --------------------------------------------------------------------------- flakiness


async def test_passed_and_failed_on_the_same_commit_is_flaky() -> None:
    v = await rules(
        script_request(error_message="Error: page crashed", commit="3f9c2ab", history=history(True, commit="3f9c2ab"))
    )
    assert v is not None and v.classification == FP and v.confidence == pytest.approx(0.85)
    assert "passed and failed on the same commit 3f9c2ab (passed 1, failed 1 times on that commit)" in v.reason


async def test_different_commits_are_not_same_commit_flakiness() -> None:
    assert await rules(script_request(commit="b41d9e0", history=history(True, commit="a0c3f11"))) is None


async def test_high_flip_rate_is_flaky_with_rate_and_counts() -> None:
    past = [AttemptRecord(success=i % 2 == 0, commit=f"c{i}") for i in range(7)]
    v = await rules(script_request(commit="c7", history=past))
    assert v is not None and v.classification == FP
    assert "flip rate 1.00 (7 pass/fail flips over the last 8 runs: 4 passed, 4 failed)" in v.reason


async def test_flip_rate_needs_enough_runs() -> None:
    assert await rules(script_request(history=[AttemptRecord(success=True), AttemptRecord(success=False)])) is None


async def test_stable_history_alone_gives_no_verdict() -> None:
    assert await rules(script_request(history=history(*[True] * 9))) is None
    assert await rules(script_request(history=history(*[False] * 9))) is None


async def test_database_history_from_context_counts() -> None:
    context = ctx(script_history=[PastResult(success=True, commit="3f9c2ab"), PastResult(success=False)])
    v = await rules(script_request(commit="3f9c2ab"), context)
    assert v is not None and v.classification == FP and "same commit 3f9c2ab" in v.reason


async def test_history_is_ordered_by_finish_time() -> None:
    # Listed interleaved, but by time it is four passes then failures: one flip, not five.
    def at(hour: int) -> dt.datetime:
        return NOW - dt.timedelta(hours=10 - hour)

    past = [
        AttemptRecord(success=True, finished_at=at(1)),
        AttemptRecord(success=False, finished_at=at(5)),
        AttemptRecord(success=True, finished_at=at(2)),
        AttemptRecord(success=False, finished_at=at(6)),
        AttemptRecord(success=True, finished_at=at(3)),
        AttemptRecord(success=True, finished_at=at(4)),
    ]
    assert await rules(script_request(history=past)) is None


async def test_assertion_on_flaky_history_is_false_positive() -> None:
    v = await rules(
        script_request(
            test_case="tests/cart.spec.ts::updates total",
            error_message="expect(received).toBe(expected): Expected 42.00, Received 0.00",
            commit="3f9c2ab",
            history=history(True, False, True, False, True, commit="3f9c2ab"),
        )
    )
    assert v is not None and v.classification == FP and v.confidence >= 0.7
    assert "against" in v.reason and "assertion failure" in v.reason


async def test_infra_pattern_and_flaky_history_reinforce() -> None:
    infra = await rules(script_request(error_message=PLAYWRIGHT_TIMEOUT))
    flaky = await rules(script_request(commit="3f9c2ab", history=history(True, commit="3f9c2ab")))
    both = await rules(
        script_request(error_message=PLAYWRIGHT_TIMEOUT, commit="3f9c2ab", history=history(True, commit="3f9c2ab"))
    )
    assert infra is not None and flaky is not None and both is not None
    assert both.classification == FP and both.confidence > max(infra.confidence, flaky.confidence)


async def test_infra_pattern_on_consistently_failing_history_leans_less() -> None:
    plain = await rules(script_request(error_message=PLAYWRIGHT_TIMEOUT))
    failing = await rules(script_request(error_message=PLAYWRIGHT_TIMEOUT, history=history(*[False] * 6)))
    assert plain is not None and failing is not None
    assert failing.classification == FP and failing.confidence < plain.confidence
    assert "failed all 7 of the last 7 runs" in failing.reason


async def test_passing_run_has_nothing_to_triage() -> None:
    v = await rules(script_request(success=True, error_message=PLAYWRIGHT_TIMEOUT, history=history(False, True)))
    assert v is None


# --------------------------------------------------------------------------- conflicts and robustness


async def test_flapping_against_sustained_count_discounts_or_draws() -> None:
    flapping = await rules(alert_request(labels={"flaps_last_hour": "9"}))
    mixed = await rules(alert_request(labels={"flaps_last_hour": "9"}, consecutive_count=5))
    assert flapping is not None and mixed is not None
    assert mixed.classification == FP and mixed.confidence < flapping.confidence
    assert "against" in mixed.reason and "consecutiveCount=5" in mixed.reason
    draw = await rules(alert_request(labels={"flaps_last_hour": "3"}, consecutive_count=5))
    assert draw is not None and draw.classification == INCONCLUSIVE and draw.discard is False
    assert "conflicting evidence" in draw.reason


async def test_huge_error_text_is_scanned_only_at_its_head() -> None:
    # Bypassing validation on purpose: the analyzer must survive text bigger than the CRD allows.
    head = ScriptResult.model_construct(
        script_name="nightly-export", success=False, error_message="Error: read ECONNRESET\n" + "x" * 1_000_000
    )
    v = await rules(script_request(head))
    assert v is not None and v.classification == FP
    tail = ScriptResult.model_construct(
        script_name="nightly-export", success=False, error_message="x" * 1_000_000 + "Error: read ECONNRESET"
    )
    assert await rules(script_request(tail)) is None


@pytest.mark.parametrize(
    "text",
    [
        "a" * 100_000 + "!",
        "expect(" * 20_000,
        "Expected " * 20_000,
        "timed out " * 10_000 + "1",
        "E" + " " * 100_000 + "assert",
        "expected:<" + "<" * 100_000,
        "Timeout " + "9" * 100_000,
        "\u202eTimeoutError\u202c \U0001f525\u0000\ud800" * 1000,
        "\u0301" * 200_000,
    ],
)
async def test_hostile_texts_run_without_error(text: str) -> None:
    script = ScriptResult.model_construct(script_name="fuzz", success=False, error_message=text, logs_excerpt=text)
    v = await rules(script_request(script))
    assert v is None or isinstance(v, Verdict)
    if v is not None:
        assert len(v.reason) <= MAX_REASON and "\u202e" not in v.reason


async def test_hostile_label_and_annotation_values_run_without_error() -> None:
    alert = Alert.model_construct(
        name="Fuzz",
        status="firing",
        labels={"flaps_last_hour": "9" * 100_000, "maintenance": "\u0000true"},
        annotations={"maintenance_window": "/" * 100_000, "flap_count": "\ufeff12"},
        starts_at=None,
        ends_at=None,
        consecutive_count=None,
        severity=None,
    )
    request = AnalysisRequest(uid="u", name="n", namespace="default", source=Source(type="alert"), alert=alert)
    assert await rules(request) is None


# --------------------------------------------------------------------------- chain


class FixedAnalyzer:
    """A real analyzer with a fixed answer, standing in for the memory/LLM analyzers a later issue adds."""

    def __init__(self, name: str, verdict: Verdict | None) -> None:
        self.name = name
        self.verdict = verdict
        self.calls = 0

    async def analyze(self, request: AnalysisRequest, context: AnalysisContext) -> Verdict | None:
        self.calls += 1
        return self.verdict


def fixed(name: str, classification: Classification, confidence: float) -> FixedAnalyzer:
    return FixedAnalyzer(name, verdict_from_classification(classification, f"{name} says so", confidence, name))


async def test_chain_returns_a_confident_rules_verdict_unchanged() -> None:
    request = alert_request(labels={"maintenance": "true"})
    direct = await rules(request)
    assert await run_offline_chain(request, ctx()) == direct


async def test_chain_downgrades_a_verdict_below_threshold_keeping_its_evidence() -> None:
    v = await run_offline_chain(script_request(error_message=PLAYWRIGHT_TIMEOUT), ctx())
    assert v.classification == INCONCLUSIVE and v.discard is False
    assert v.confidence == pytest.approx(0.65) and v.analyzer == "rules"
    assert "below confidence threshold 0.70: leaned false_positive at 0.65" in v.reason and "TimeoutError" in v.reason


async def test_chain_honours_a_lower_threshold() -> None:
    v = await run_offline_chain(script_request(error_message=PLAYWRIGHT_TIMEOUT), ctx(confidence_threshold=0.6))
    assert v.classification == FP and v.discard is True


async def test_chain_with_nothing_to_say_is_inconclusive_zero() -> None:
    v = await run_offline_chain(script_request(error_message="KeyError: 'total'"), ctx())
    assert (v.classification, v.confidence, v.reason, v.analyzer) == (INCONCLUSIVE, 0.0, NO_VERDICT_REASON, "chain")
    empty = await run_offline_chain(script_request(error_message=PLAYWRIGHT_TIMEOUT), ctx(), analyzers=[])
    assert empty.classification == INCONCLUSIVE and empty.confidence == 0.0


async def test_chain_stops_at_the_first_confident_verdict() -> None:
    first, second = fixed("memory", VALID, 0.9), fixed("rules", FP, 0.95)
    v = await run_offline_chain(script_request(), ctx(), analyzers=[first, second])
    assert v.analyzer == "memory" and v.classification == VALID
    assert (first.calls, second.calls) == (1, 0)


async def test_chain_skips_confident_inconclusive_and_downgrades_the_best_lean() -> None:
    shrug = fixed("memory", INCONCLUSIVE, 0.9)
    weak, better = fixed("rules", VALID, 0.5), fixed("other", FP, 0.6)
    v = await run_offline_chain(script_request(), ctx(), analyzers=[shrug, weak, better])
    assert v.classification == INCONCLUSIVE and v.analyzer == "memory"
    decided = await run_offline_chain(script_request(), ctx(), analyzers=[shrug, fixed("rules", VALID, 0.8)])
    assert decided.classification == VALID and decided.analyzer == "rules"
    leaning = await run_offline_chain(script_request(), ctx(), analyzers=[weak, better])
    assert leaning.classification == INCONCLUSIVE and leaning.analyzer == "other"
    assert leaning.confidence == pytest.approx(0.6) and "leaned false_positive" in leaning.reason


async def test_chain_runs_only_the_requested_analyzer() -> None:
    memory = fixed("memory", VALID, 0.99)
    request = alert_request(labels={"maintenance": "true"}).model_copy(update={"analyzer": AnalyzerName.RULES})
    v = await run_offline_chain(request, ctx(), analyzers=[memory, RulesAnalyzer()])
    assert v.analyzer == "rules" and v.classification == FP and memory.calls == 0


async def test_chain_falls_back_to_offline_when_llm_is_not_configured() -> None:
    request = alert_request(labels={"maintenance": "true"}).model_copy(update={"analyzer": AnalyzerName.LLM})
    v = await run_offline_chain(request, ctx())
    assert v.classification == FP and v.analyzer == "rules"
    assert "llm analyzer not available; fell back to offline analyzers: rules" in v.reason
