"""The offline rules analyzer: cheap, explainable verdicts from evidence already in the job.

It runs with no network, no model and no API key, so a cluster without an LLM
still gets verdicts, and with one the rules answer the easy cases before any
tokens are spent. Every rule states its evidence with concrete numbers in the
verdict reason, because a human reading ``kubectl get tj`` must be able to
check the verdict without rerunning anything.

Confidence levels are deliberately modest for evidence that can also mean a
real failure (a timeout may be the product hanging): with the default
threshold of 0.7 such verdicts come out of the chain as ``inconclusive``
leaning one way, which is what the design asks of offline analysis.

All text here (labels, annotations, error messages, logs) is untrusted input:
it is only matched with bounded regular expressions on a capped prefix, never
evaluated, and only short sanitised snippets of it are echoed into reasons.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.evidence import AlertHistory, AlertmanagerSummary, Evidence, PrometheusSummary, ScriptHistory, find
from kubetriage.api.models import Alert, Classification, ScriptResult, Verdict, verdict_from_classification

FP = Classification.FALSE_POSITIVE
VALID = Classification.VALID

# Only this much of any one text is scanned: failure signatures sit at the
# start of an error message, and the cap bounds the work a hostile 1 MB log can cause.
SCAN_LIMIT = 64 * 1024

FLAP_KEYS = ("flaps_last_hour", "flap_count", "flaps", "flapping_count")
FLAP_MIN = 3
SUSTAINED_COUNT = 5
CRITICAL_SUSTAINED_COUNT = 3
CRITICAL_SEVERITIES = frozenset({"critical", "page", "p1", "emergency", "fatal", "sev1", "disaster"})
SHORT_RESOLVED_SECONDS = 300
HISTORY_WINDOW = 50
FLAKY_MIN_RUNS = 5
FLAKY_FLIP_RATE = 0.3
TRUE_WORDS = frozenset({"true", "yes", "1", "on"})

# A maintenance label or annotation on the alert itself is only a hint: it may be inherited from a node
# or belong to another service. Team-controlled maintenance windows are TriageRules.
MAINTENANCE_HINT = 0.3
BLIP_CONFIDENCE = 0.6
# Flapping of a critical alert may be a service going up and down: never enough on its own.
CRITICAL_FLAP_CAP = 0.6
CRITICAL_SUPPORT = 0.3
# A condition true for days without anyone fixing it is more often expected or unobservable than an outage.
PERMANENT_COUNT = 1000
PERMANENT_CONFIDENCE = 0.5
LOW_SEVERITIES = frozenset({"info", "informational", "none", "low", "debug"})
LOW_SEVERITY_CONFIDENCE = 0.55
EVIDENCE_RECOVERED_SECONDS = 300
CO_FIRING_SERVICES = 3
# A streak of failures at the end of the history: the test is broken now, whatever it did before.
BROKEN_STREAK = 3
ASSERTION_CONFIDENCE = 0.65
SAME_COMMIT_CONFIDENCE = 0.85
SAME_COMMIT_UNRECOVERED = 0.6
STABLE_HISTORY_SUPPORT = 0.4
# What an assertion weighs against a flaky history: intermittent assertion
# failures are exactly what flaky tests produce, so they barely contradict it.
ASSERTION_VS_FLAKY = 0.3
MAX_COMBINED = 0.95
# Below this margin between the two sides the evidence is a draw.
DRAW_MARGIN = 0.1

# The rules (by verdict title) precise enough to decide alone even when an LLM is configured; every
# other finding goes to the LLM as evidence. Each with its precision on the tuning split (make eval,
# memory+rules, 2026-12-02): the flakiness rules and the CI tooling failures, nothing about alerts.
HIGH_PRECISION: frozenset[str | None] = frozenset({
    "flaky test",  # 4 of 4 (a recovery on the same commit is now required)
    "infrastructure: test tooling unavailable",  # 5 of 5
    "infrastructure: registry or package mirror limit",  # 2 of 2
    "infrastructure: runner out of disk",  # 1 of 1
    "infrastructure: dependency download failed",  # 7 of 7
})


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule's conclusion. ``standalone=False`` findings only strengthen or weaken others."""

    classification: Classification
    confidence: float
    reason: str
    title: str
    standalone: bool = True
    # False for a finding that is evidence but cannot explain a failure away (the system under test
    # being unreachable may be the outage itself): the safety policy never counts it as an explanation.
    explains: bool = True


@dataclass(frozen=True, slots=True)
class InfraPattern:
    category: str
    confidence: float
    regex: re.Pattern[str]
    # The system under test could not be reached: evidence, never an explanation (it may be the outage).
    reachability: bool = False


def _rx(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


# Literal alternations and bounded repeats only: no nested quantifiers, so
# matching is linear in the (capped) text length whatever the input.
# Two families, on purpose. The test's own tooling failing (runner disk/memory, registry limits, a
# missing browser or Docker, a build daemon dying) says nothing about the product: strong. The system
# under test being unreachable (refused, reset, 50x, DNS, timeouts) may be the product being down: weak,
# never enough alone.
TOOLING = 0.8
REACHABILITY = 0.6
INFRA_PATTERNS: tuple[InfraPattern, ...] = (
    InfraPattern(
        "runner out of disk",
        TOOLING,
        _rx(r"No space left on device|\bENOSPC\b|\bdisk quota exceeded\b", re.IGNORECASE),
    ),
    InfraPattern(
        "runner out of memory",
        0.75,
        _rx(
            r"\bOOMKilled\b|\boom-kill(?:ed|er)?\b|Out of memory: Killed process|\bexit code:? 137\b"
            r"|JavaScript heap out of memory|\bCannot allocate memory\b",
            re.IGNORECASE,
        ),
    ),
    InfraPattern(
        "registry or package mirror limit",
        TOOLING,
        _rx(
            r"\btoomanyrequests\b|You have reached your (?:unauthenticated )?pull rate limit"
            r"|\bpull rate limit\b|\bmanifest unknown\b|\bnet/http: TLS handshake timeout\b",
            re.IGNORECASE,
        ),
    ),
    InfraPattern(
        # Fetching the build's own dependencies (package registries, git, module proxies, chart repos)
        # failed: the network was the CI's problem, not the system under test's.
        "dependency download failed",
        TOOLING,
        _rx(
            r"\bnpm ERR! (?:network|code E(?:NOTFOUND|TIMEDOUT|CONNRESET|AI_AGAIN|CONNREFUSED))\b"
            r"|There appears to be trouble with your network connection"
            r"|\bfatal: unable to access '[a-z]{2,8}://"
            r"|\bCould not (?:resolve dependencies for project|transfer artifact)\b"
            r"|\bCould not resolve all (?:files|dependencies|artifacts) for configuration\b"
            r"|\bgo: [\w./-]{1,200}@v[\w.+-]{1,60}: Get\b"
            r"|is not a valid chart repository or cannot be reached"
            r"|\bCould not fetch URL https?://|\bpip\._vendor\.urllib3\.exceptions\.\w{1,40}Error\b",
            re.IGNORECASE,
        ),
    ),
    InfraPattern(
        "test tooling unavailable",
        TOOLING,
        _rx(
            r"Could not find a valid Docker environment|Cannot connect to the Docker daemon"
            r"|\bbrowserType\.launch\b|Executable doesn't exist at|Host system is missing dependencies"
            r"|Gradle build daemon disappeared|\bThe forked VM terminated without\b"
            r"|\bEADDRINUSE\b|\bAddress already in use\b|\bport is already allocated\b"
            r"|\bworker '?gw\d{1,4}'? crashed\b|\bnode \w{0,10} ?crashed while running test\b",
            re.IGNORECASE,
        ),
    ),
    InfraPattern(
        "DNS resolution failure",
        REACHABILITY,
        _rx(
            r"\bENOTFOUND\b|\bEAI_AGAIN\b|\bgetaddrinfo\b|Name or service not known|\bNXDOMAIN\b"
            r"|Temporary failure in name resolution|Could not resolve host|net::ERR_NAME_NOT_RESOLVED",
            re.IGNORECASE,
        ),
        reachability=True,
    ),
    InfraPattern(
        "gateway / service unavailable (HTTP 502/503/504)",
        REACHABILITY,
        _rx(
            r"\bBad Gateway\b|\bService Unavailable\b|\bGateway Time-?out\b"
            r"|\b(?:HTTP(?:/\d(?:\.\d)?)?|status(?: code)?:?)[ \t]{0,3}50[234]\b"
            r"|\bReceived:?[ \t]{0,10}50[234]\b",
            re.IGNORECASE,
        ),
        reachability=True,
    ),
    InfraPattern(
        "connection reset / refused",
        REACHABILITY,
        _rx(
            r"\bECONNRESET\b|\bECONNREFUSED\b|Connection reset by peer|\bConnection refused\b"
            r"|\bconnection reset\b|\bConnection(?:Reset|Refused)Error\b|net::ERR_CONNECTION_(?:REFUSED|RESET|CLOSED)"
            r"|\bsocket hang up\b",
            re.IGNORECASE,
        ),
        reachability=True,
    ),
    InfraPattern(
        "timeout",
        REACHABILITY,
        _rx(
            r"\bTimeoutError\b|\bE(?:SOCKET)?TIMEDOUT\b|\b(?:Read|Connect|Pool|Write)Timeout\b"
            r"|\bTimeout (?:of )?\d{1,9}[ ]?ms exceeded|\bFailed: Timeout >\d"
            r"|\bdeadline exceeded\b|\bi/o timeout\b"
            # Playwright's "Timed out 5000ms waiting for expect(...)" is an assertion, not the network.
            r"|\btimed out\b(?![ ]\d{1,9}[ ]?ms waiting for expect)",
            re.IGNORECASE,
        ),
        reachability=True,
    ),
)

ASSERTION_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("AssertionError", _rx(r"\bAssertion(?:Failed)?Error\b")),
    ("expect(...) matcher", _rx(r"\bexpect\([^)\n]{0,200}\)\.(?:not\.)?to[A-Z]\w{0,40}")),
    ("Playwright expect timeout", _rx(r"\bTimed out \d{1,9}[ ]?ms waiting for expect\(")),
    ("pytest assert", _rx(r"^E[ ]{1,12}assert\b", re.MULTILINE)),
    ("JUnit expected/but was", _rx(r"expected:[ ]?<[^>\n]{0,200}> but was:[ ]?<")),
)
_EXPECTED = _rx(r"\bExpected\b")
_RECEIVED = _rx(r"\bReceived\b")
# "Expected ... Received" must sit close together to be one assertion message.
_EXPECTED_WINDOW = 2000
_MAX_EXPECTED_TRIES = 50


# --------------------------------------------------------------------------- helpers


def _snippet(text: str, limit: int = 60) -> str:
    """A short, printable echo of untrusted text: control/format characters dropped, whitespace collapsed."""
    cleaned = "".join(" " if ch.isspace() else ch for ch in text[: limit * 4])
    cleaned = "".join(ch for ch in cleaned if not unicodedata.category(ch).startswith("C"))
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _utc(value: dt.datetime) -> dt.datetime:
    # A naive timestamp in a Kubernetes object is UTC by convention.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _duration_text(seconds: float) -> str:
    total = int(seconds)
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


_INT = _rx(r"^[ \t]{0,8}(\d{1,7})[ \t]{0,8}$", re.ASCII)
_ISO_DATETIME = _rx(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[T ][0-9:.,]{2,20}(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?$", re.ASCII)
_ISO_DURATION = _rx(r"^P(?:(\d{1,4})W)?(?:(\d{1,4})D)?(?:T(?:(\d{1,4})H)?(?:(\d{1,6})M)?(?:(\d{1,8})S)?)?$", re.ASCII)


def _parse_int(value: str) -> int | None:
    m = _INT.match(value[:64])
    return int(m.group(1)) if m else None


def _parse_datetime(value: str) -> dt.datetime | None:
    text = value.strip()
    if not _ISO_DATETIME.match(text):
        return None
    try:
        parsed = dt.datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        return None
    return _utc(parsed)


def _parse_duration(value: str) -> dt.timedelta | None:
    m = _ISO_DURATION.match(value.strip())
    if not m or value.strip() in ("P", "PT") or value.strip().endswith("T"):
        return None
    weeks, days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    try:
        return dt.timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:
        return None


def parse_maintenance_window(value: str) -> list[tuple[dt.datetime, dt.datetime]]:
    """Parse ISO 8601 intervals ``start/end`` or ``start/duration``, comma or semicolon separated.

    Returns only the well-formed intervals (end after start); anything else is
    silently dropped, because a typo in one annotation must not fail the job.
    """
    windows: list[tuple[dt.datetime, dt.datetime]] = []
    for part in re.split(r"[,;]", value[:1024])[:8]:
        pieces = part.strip().split("/")
        if len(pieces) != 2:
            continue
        start = _parse_datetime(pieces[0])
        if start is None:
            continue
        end = _parse_datetime(pieces[1])
        if end is None:
            duration = _parse_duration(pieces[1])
            if duration is None:
                continue
            try:
                end = start + duration
            except OverflowError:
                continue
        if end > start:
            windows.append((start, end))
    return windows


def find_infra_patterns(text: str) -> list[tuple[InfraPattern, str]]:
    """Every infrastructure category whose pattern occurs in the first ``SCAN_LIMIT`` characters."""
    head = text[:SCAN_LIMIT]
    found: list[tuple[InfraPattern, str]] = []
    for pattern in INFRA_PATTERNS:
        m = pattern.regex.search(head)
        if m:
            found.append((pattern, m.group(0)))
    return found


def find_assertion(text: str) -> str | None:
    """The name of the first assertion-failure shape found, or None."""
    head = text[:SCAN_LIMIT]
    for name, regex in ASSERTION_PATTERNS:
        if regex.search(head):
            return name
    for i, m in enumerate(_EXPECTED.finditer(head)):
        if i >= _MAX_EXPECTED_TRIES:
            break
        if _RECEIVED.search(head, m.end(), m.end() + _EXPECTED_WINDOW):
            return "Expected ... Received"
    return None


# --------------------------------------------------------------------------- alert rules


def _merged(alert: Alert) -> list[tuple[str, str, str]]:
    """(kind, key, value) over labels then annotations; rules accept their keys in either place."""
    out: list[tuple[str, str, str]] = []
    for kind, mapping in (("label", alert.labels), ("annotation", alert.annotations)):
        for key, value in (mapping or {}).items():
            out.append((kind, key, value))
    return out


def _severity(alert: Alert) -> str | None:
    raw = alert.severity or (alert.labels or {}).get("severity")
    return raw.strip().lower()[:32] if raw else None


def _maintenance(alert: Alert, now: dt.datetime) -> Finding | None:
    at = _utc(alert.starts_at) if alert.starts_at else _utc(now)
    at_name = "startsAt" if alert.starts_at else "now"
    evidence: list[str] = []
    for kind, key, value in _merged(alert):
        lowered = key.lower()
        if lowered == "maintenance" and value.strip().lower() in TRUE_WORDS:
            evidence.append(f"{kind} maintenance={_snippet(value, 16)} marks the target as under maintenance")
        elif lowered == "maintenance_window":
            for start, end in parse_maintenance_window(value):
                if start <= at < end:
                    evidence.append(
                        f"{at_name} {at.isoformat()} is inside the maintenance window "
                        f"{start.isoformat()}/{end.isoformat()} ({kind} maintenance_window)"
                    )
                    break
    if not evidence:
        return None
    return Finding(
        FP, MAINTENANCE_HINT, "maintenance hint on the alert itself (not a team rule): " + "; ".join(evidence),
        "maintenance hint", standalone=False,
    )


def _flapping(alert: Alert, severity: str | None) -> Finding | None:
    best: tuple[int, str, str] | None = None
    flag: str | None = None
    for kind, key, value in _merged(alert):
        lowered = key.lower()
        if lowered in FLAP_KEYS:
            count = _parse_int(value)
            if count is not None and (best is None or count > best[0]):
                best = (count, kind, key)
        elif lowered == "flapping" and value.strip().lower() in TRUE_WORDS:
            flag = kind
    if best is not None and best[0] >= FLAP_MIN:
        count, kind, key = best
        window = " in the last hour" if key.lower() == "flaps_last_hour" else ""
        # 3 flaps -> 0.62, 5 -> 0.70, 8 -> 0.80 (cap): more cycles, less doubt. A critical service going
        # up and down is still down half the time: never enough alone.
        confidence = min(0.8, 0.5 + 0.04 * count)
        if severity in CRITICAL_SEVERITIES:
            confidence = min(confidence, CRITICAL_FLAP_CAP)
        return Finding(
            FP, confidence, f"flapping: fired/resolved {count} times{window} ({kind} {key}={count})", "flapping alert"
        )
    if flag is not None:
        confidence = CRITICAL_FLAP_CAP if severity in CRITICAL_SEVERITIES else 0.65
        return Finding(FP, confidence, f"flapping: {flag} flapping=true set by the alert source", "flapping alert")
    return None


def _consecutive(alert: Alert, severity: str | None) -> Finding | None:
    count = alert.consecutive_count
    if count is None or count == 0:
        return None
    critical = severity in CRITICAL_SEVERITIES
    shown = severity or "unset"
    if count == 1 and not critical:
        return Finding(
            FP,
            BLIP_CONFIDENCE,
            f"single blip: consecutiveCount=1 with non-critical severity {shown}",
            "single blip",
        )
    if count >= SUSTAINED_COUNT:
        # 5 -> 0.70 rising to 0.80 at 10. A count this large alone is not an outage signal for an
        # informational severity, nor for a condition true for days (expected, or nothing to observe).
        confidence = min(0.8, 0.7 + 0.02 * (count - SUSTAINED_COUNT))
        note = ""
        if severity in LOW_SEVERITIES or severity is None:
            confidence, note = LOW_SEVERITY_CONFIDENCE, f"; severity {shown} is informational"
        if count >= PERMANENT_COUNT:
            confidence, note = PERMANENT_CONFIDENCE, "; true for so long it may be expected or unobservable"
        return Finding(
            VALID,
            confidence,
            f"sustained: consecutiveCount={count} (threshold {SUSTAINED_COUNT}), severity {shown}{note}",
            "sustained alert",
        )
    if critical and count >= CRITICAL_SUSTAINED_COUNT:
        return Finding(
            VALID,
            0.75,
            f"sustained critical: consecutiveCount={count} (critical threshold {CRITICAL_SUSTAINED_COUNT}), "
            f"severity {shown}",
            "sustained critical alert",
        )
    return None


def _short_resolved(alert: Alert, severity: str | None) -> Finding | None:
    if alert.status != "resolved" or alert.starts_at is None or alert.ends_at is None:
        return None
    seconds = (_utc(alert.ends_at) - _utc(alert.starts_at)).total_seconds()
    if seconds < 0 or seconds > SHORT_RESOLVED_SECONDS:
        return None
    confidence = 0.7 if seconds <= 120 else 0.6
    if severity in CRITICAL_SEVERITIES:
        # A short critical outage still happened; lean less.
        confidence -= 0.15
    return Finding(
        FP,
        confidence,
        f"resolved quickly: resolved after {_duration_text(seconds)} (limit {SHORT_RESOLVED_SECONDS}s)",
        "short-lived alert",
    )


def alert_findings(alert: Alert, now: dt.datetime) -> list[Finding]:
    severity = _severity(alert)
    rules = (
        _maintenance(alert, now),
        _flapping(alert, severity),
        _consecutive(alert, severity),
        _short_resolved(alert, severity),
    )
    found = [f for f in rules if f is not None]
    if severity in CRITICAL_SEVERITIES and any(f.classification is FP for f in found):
        # Someone decided this alert pages: that weighs against any payload hint that it is noise.
        found.append(Finding(VALID, CRITICAL_SUPPORT, f"severity {severity}", "critical severity", standalone=False))
    return found


# --------------------------------------------------------------------------- script rules


@dataclass(frozen=True, slots=True)
class Run:
    success: bool
    finished_at: dt.datetime | None
    commit: str | None


@dataclass(frozen=True, slots=True)
class FlipStats:
    """Pass/fail transitions over a window of runs, oldest first, the current run last."""

    runs: int
    passes: int
    failures: int
    flips: int

    @property
    def flip_rate(self) -> float:
        return self.flips / (self.runs - 1) if self.runs > 1 else 0.0


def flip_stats(runs: Sequence[Run]) -> FlipStats:
    flips = sum(1 for a, b in itertools.pairwise(runs) if a.success != b.success)
    passes = sum(1 for r in runs if r.success)
    return FlipStats(runs=len(runs), passes=passes, failures=len(runs) - passes, flips=flips)


def _ordered_runs(result: ScriptResult, past: Iterable[Run]) -> list[Run]:
    """The window of runs, oldest first, ending with the current failure.

    When every earlier run has a timestamp they are sorted by it; otherwise the
    given order (spec history, then the database's) is kept, since guessing
    would invent flips.
    """
    earlier = list(past)
    if earlier and all(r.finished_at is not None for r in earlier):
        earlier.sort(key=lambda r: _utc(r.finished_at or dt.datetime.min))
    current = Run(success=False, finished_at=None, commit=result.commit)
    return [*earlier[-(HISTORY_WINDOW - 1) :], current]


def _trailing_failures(runs: Sequence[Run]) -> int:
    streak = 0
    for r in reversed(runs):
        if r.success:
            break
        streak += 1
    return streak


def _history_findings(runs: Sequence[Run]) -> list[Finding]:
    findings: list[Finding] = []
    streak = _trailing_failures(runs)
    if streak >= BROKEN_STREAK and len(runs) > streak:
        # It passed before and has failed every run since: broken now, whatever its past flakiness.
        return [Finding(VALID, 0.5, f"failing since: the last {streak} runs all failed after earlier passes",
                        "broken since", standalone=False)]
    by_commit: dict[str, list[bool]] = {}
    for r in runs:
        if r.commit and r.commit.strip():
            by_commit.setdefault(r.commit.strip(), []).append(r.success)
    for commit, outcomes in by_commit.items():
        if any(outcomes) and not all(outcomes):
            passes = sum(outcomes)
            # Flaky means it failed and then passed again on the same code. Passes that all came before
            # the failures are something else: a test of a live environment that broke, or a broken
            # dependency; that only hints at flakiness.
            recovered = any(not a and b for a, b in itertools.pairwise(outcomes))
            findings.append(
                Finding(
                    FP,
                    SAME_COMMIT_CONFIDENCE if recovered else SAME_COMMIT_UNRECOVERED,
                    f"flaky: passed and failed on the same commit {_snippet(commit, 16)} "
                    f"(passed {passes}, failed {len(outcomes) - passes} times on that commit"
                    + (", and passed again after failing)" if recovered else "; every pass came before the "
                       "failures, so it may have broken rather than flaked)"),
                    "flaky test" if recovered else "passed before on this commit",
                )
            )
            break
    stats = flip_stats(runs)
    if stats.runs >= FLAKY_MIN_RUNS:
        rate = stats.flip_rate
        if rate >= FLAKY_FLIP_RATE:
            findings.append(
                Finding(
                    FP,
                    min(0.85, 0.5 + 0.5 * rate),
                    f"flaky: flip rate {rate:.2f} ({stats.flips} pass/fail flips over the last {stats.runs} runs: "
                    f"{stats.passes} passed, {stats.failures} failed)",
                    "flaky test",
                )
            )
    if stats.runs >= FLAKY_MIN_RUNS and stats.flips <= 1 and not findings:
        if stats.flips == 0:
            text = f"stable history: failed all {stats.runs} of the last {stats.runs} runs"
        else:
            text = (
                f"stable history: {stats.flips} flip over the last {stats.runs} runs "
                f"({stats.passes} passed, {stats.failures} failed)"
            )
        findings.append(Finding(VALID, STABLE_HISTORY_SUPPORT, text, "stable history", standalone=False))
    return findings


def _text_findings(result: ScriptResult, flaky: bool) -> list[Finding]:
    """Infra and assertion evidence; the error message is decisive, logs only speak when it is silent.

    Logs carry context (a retried ECONNRESET, a warning), so an infra word in
    the logs must not overrule an assertion in the error message itself.
    """
    for source, text in (("errorMessage", result.error_message), ("logsExcerpt", result.logs_excerpt)):
        if not text:
            continue
        infra = find_infra_patterns(text)
        assertion = find_assertion(text)
        if not infra and not assertion:
            continue
        findings: list[Finding] = []
        for pattern, matched in infra:
            confidence = pattern.confidence
            note = ""
            if assertion:
                # The test did assert; the infra word may just be the value it saw.
                confidence -= 0.1
                note = f", alongside an assertion failure ({assertion})"
            if source == "logsExcerpt":
                confidence -= 0.05
            findings.append(
                Finding(
                    FP,
                    confidence,
                    f'infrastructure error ({pattern.category}): {source} matches "{_snippet(matched)}"{note}',
                    f"infrastructure: {pattern.category}",
                    explains=not pattern.reachability,
                )
            )
        if assertion and not infra:
            findings.append(
                Finding(
                    VALID,
                    ASSERTION_VS_FLAKY if flaky else ASSERTION_CONFIDENCE,
                    f"assertion failure: {source} shows {assertion} and no infrastructure error pattern",
                    "assertion failure",
                    standalone=not flaky,
                )
            )
        return findings
    return []


def script_findings(result: ScriptResult, past: Iterable[Run]) -> list[Finding]:
    history = _history_findings(_ordered_runs(result, past))
    flaky = any(f.classification is FP for f in history)
    return [*_text_findings(result, flaky), *history]


# --------------------------------------------------------------------------- combining


def _support(findings: Sequence[Finding]) -> float:
    """Agreeing findings reinforce with diminishing returns: each adds half its weight of the remaining doubt."""
    if not findings:
        return 0.0
    ordered = sorted((f.confidence for f in findings), reverse=True)
    score = ordered[0]
    for c in ordered[1:]:
        score += (1 - score) * c * 0.5
    return min(score, MAX_COMBINED)


def combine(findings: Sequence[Finding], analyzer: str = "rules") -> Verdict | None:
    """One verdict from all findings; None when no standalone rule fired.

    Each side's findings reinforce each other, opposing evidence discounts the
    winner by half its weight, and a near draw is reported as ``inconclusive``.
    """
    if not any(f.standalone for f in findings):
        return None
    sides = {c: [f for f in findings if f.classification is c] for c in (FP, VALID)}
    scores = {c: _support(fs) for c, fs in sides.items()}
    explaining = [f for f in sides[FP] if f.explains]
    if explaining and len(explaining) < len(sides[FP]):
        # An unreachable system under test may be the outage: it never adds to an explanation's weight.
        scores[FP] = max(_support(explaining), max(f.confidence for f in sides[FP]))
    eligible = [c for c in (FP, VALID) if any(f.standalone for f in sides[c])]
    winner = max(eligible, key=lambda c: scores[c])
    loser = VALID if winner is FP else FP
    win_score, lose_score = scores[winner], scores[loser]
    lead = max(sides[winner], key=lambda f: (f.standalone, f.confidence))
    for_text = "; ".join(f.reason for f in sorted(sides[winner], key=lambda f: -f.confidence))
    if not sides[loser]:
        return verdict_from_classification(winner, for_text, round(win_score, 2), analyzer, title=lead.title)

    against = "; ".join(f.reason for f in sides[loser])
    confidence = round(win_score * (1 - lose_score / 2), 2)
    if win_score - lose_score < DRAW_MARGIN:
        reason = (
            f"conflicting evidence ({FP.value} {scores[FP]:.2f} vs {VALID.value} {scores[VALID]:.2f}): "
            f"{for_text}; against: {against}"
        )
        return verdict_from_classification(Classification.INCONCLUSIVE, reason, confidence, analyzer, title=lead.title)
    reason = f"{for_text}; against ({lose_score:.2f}): {against}"
    return verdict_from_classification(winner, reason, confidence, analyzer, title=lead.title)


# --------------------------------------------------------------------------- the analyzer


def _past_runs(result: ScriptResult, context: AnalysisContext) -> list[Run]:
    runs = [Run(h.success, h.finished_at, h.commit) for h in result.history or ()]
    runs.extend(Run(p.success, p.finished_at, p.commit) for p in context.script_history)
    return runs


def evidence_findings(request: AnalysisRequest, evidence: Sequence[Evidence]) -> list[Finding]:
    """What the gathered evidence says; each finding cites the figures it rests on."""
    found: list[Finding] = []
    prom = find(list(evidence), PrometheusSummary)
    if prom is not None:
        if prom.firing_now is False and prom.recovered_after_s is not None \
                and prom.recovered_after_s <= EVIDENCE_RECOVERED_SECONDS:
            found.append(Finding(FP, 0.7, f"Prometheus: {prom.summary()}", "recovered on its own"))
        elif prom.firing_now and (prom.true_share or 0) >= 0.5:
            found.append(Finding(VALID, 0.75, f"Prometheus: {prom.summary()}", "still firing"))
    am = find(list(evidence), AlertmanagerSummary)
    if am is not None:
        if am.co_firing_services >= CO_FIRING_SERVICES:
            found.append(Finding(VALID, 0.8, f"Alertmanager: {am.summary()}", "services failing together"))
        elif am.co_firing == 0 and prom is not None and prom.firing_now is False:
            found.append(Finding(FP, 0.3, "Alertmanager: nothing else firing", "isolated", standalone=False))
        human = am.human_silences()
        if human:
            found.append(Finding(FP, 0.6, f"silenced by {human[0].created_by or 'a human'}: "
                                          f"{_snippet(human[0].comment, 120)}", "silenced by a human"))
    if request.alert is not None:
        hist = find(list(evidence), AlertHistory)
        if hist is not None:
            if hist.human_valid and hist.human_valid >= hist.human_false_positive:
                found.append(Finding(VALID, 0.75, f"history: {hist.summary()}", "humans called it valid"))
            elif hist.human_false_positive >= 2 and not hist.human_valid:
                found.append(Finding(FP, 0.7, f"history: {hist.summary()}", "humans called it noise"))
    if request.script_result is not None:
        runs = find(list(evidence), ScriptHistory)
        if runs is not None:
            if runs.same_commit_passes:
                # Counts without order: the passes may all predate a break, so only a hint of flakiness.
                found.append(Finding(FP, 0.6, f"history: {runs.summary()}", "passed before on this commit"))
            elif runs.same_commit_runs >= 3 and runs.default_branch_runs \
                    and runs.default_branch_failures / runs.default_branch_runs <= 0.1:
                found.append(Finding(VALID, 0.75, f"history: {runs.summary()}", "regression"))
    return found


def findings(request: AnalysisRequest, context: AnalysisContext) -> list[Finding]:
    """Every rule's finding on this job (what the analyzer combines, and what the safety policy reads)."""
    found: list[Finding] = evidence_findings(request, context.evidence)
    if request.alert is not None:
        found.extend(alert_findings(request.alert, context.now))
    result = request.script_result
    if result is not None and not result.success:
        found.extend(script_findings(result, _past_runs(result, context)))
    return found


class RulesAnalyzer:
    """Deterministic rules over alert metadata, error text and run history.

    A passing script run (``success=True``) gets no verdict (``None``): there
    is no failure to call a false positive or valid, and inventing a
    classification would write a misleading ``discard_type`` into the user's
    table. A request that carries an alert is judged on the alert regardless.
    """

    name = "rules"

    async def analyze(self, request: AnalysisRequest, context: AnalysisContext) -> Verdict | None:
        return combine(findings(request, context), analyzer=self.name)
