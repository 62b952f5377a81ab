"""The memory analyzer: reuse what a human already decided about the same failure.

Teams see the same noisy alert and the same flaky test again and again, and a
human has usually said what it is the first time. This analyzer indexes those
human verdicts (``check_type = 'user'`` rows of the audit table, as
``Sink.human_verdicts()`` returns them) and, for a new job, copies the verdict
of the most similar past case, naming it, the way ReportPortal's auto-analysis
does (REFERENCES.md, "Learning from human verdicts"):

* text is normalised first: numbers, ids, uuids, hex, timestamps, IPs, URLs
  and paths become placeholders, so a retried run with a new request id, a new
  pod hash or a new timestamp is still "the same" failure;
* similarity is TF-IDF cosine over word n-grams and character n-grams,
  computed in pure Python: no model download, no network, deterministic, and
  fast enough for the 5000 cases ``human_verdicts()`` returns (the index is
  built once, in ``__init__``);
* a case only matches a job of the same kind whose subject (alert name, script
  name) is the same: two alerts with identical labels but different names are
  different problems, and the labels alone would otherwise look very similar;
* human verdicts weigh far above AI ones: AI-labelled cases are ignored unless
  ``ai_weight`` is set, and even then only consulted when no human case
  matches, with their confidence scaled down. Otherwise the analyzer would
  learn from its own output and one wrong verdict would reinforce itself;
* below ``min_similarity`` there is no opinion (``None``); near-identical
  cases (similarity >= ``merge_similarity``) are merged and vote, so ten
  identical confirmations count as one strong case and a human who changed
  their mind shows up as a disagreement instead of a coin toss.

The reason copied from the matched case is text a person typed; it goes only
into the verdict reason (sanitised and capped), never into a prompt.
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
import itertools
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.fingerprint import normalise_text
from kubetriage.api.models import CheckType, Classification, SourceType, Verdict, verdict_from_classification

DEFAULT_MIN_SIMILARITY = 0.8
DEFAULT_MERGE_SIMILARITY = 0.98
# The stored summary column is capped at 4096 bytes (sinks.MAX_SUMMARY_BYTES);
# the request side is cut the same way so both compare the same span of text.
TEXT_LIMIT = 4096
MAX_CASE_TEXT = 65536
# Confidence at the similarity threshold and at an identical match. The floor
# equals the chain's default confidence threshold: a case the operator said is
# similar enough decides, barely; an identical one decides firmly.
CONFIDENCE_AT_THRESHOLD = 0.7
CONFIDENCE_AT_IDENTICAL = 0.95
# Among near-identical human verdicts, the majority must be this clear, else
# the humans disagree and the analyzer says so instead of picking one.
MIN_AGREEMENT = 2 / 3
# Word and character views count equally: words catch reordered messages,
# character n-grams catch inflections and ids that slipped through the placeholders.
WORD_WEIGHT = 0.5
CHAR_NGRAM = 3
# Exact cosine is computed for at most this many candidates per query; more
# are first ranked by their shared-word score from the inverted index.
EXACT_CANDIDATES = 200
QUOTED_REASON_MAX = 1000
SOURCE_MAX = 200

# --------------------------------------------------------------------------- normalisation

# Applied in order, before ``fingerprint.normalise_text`` (uuids, long hex,
# numbers). Alert and log text is untrusted: every repeat is bounded, no two
# nested repeats can match the same characters, and the text is capped first,
# so the worst input costs tens of milliseconds, not seconds.
_PLACEHOLDERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b[a-z][a-z0-9+.-]{1,15}://[^\s\"'<>()\[\]{}]{1,2048}"), " <url> "),
    (re.compile(r"\b[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}\b"), " <email> "),
    (
        re.compile(
            r"\b\d{4}-\d{2}-\d{2}(?:[t ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?(?:z|[+-]\d{2}:?\d{2})?)?\b"
            r"|\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d{1,9})?\b"
        ),
        " <ts> ",
    ),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), " <uuid> "),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b"), " <ip> "),
    (re.compile(r"\[?\b[0-9a-f]{1,4}(?::[0-9a-f]{0,4}){2,7}\b\]?"), " <ip> "),
    # Two or more segments, so "and/or" or a bare "/" stays text.
    (re.compile(r"(?<![\w<])(?:[a-z]:)?(?:[/\\][\w.@+~-]{1,255}){2,64}[/\\]?"), " <path> "),
    # Kubernetes pod names: deployment-<replicaset hash>-<pod suffix>; keep the workload name.
    # A digit in the hash is required so kebab-case test names ("shows-correct-total") survive.
    (re.compile(r"\b([a-z][a-z0-9-]{0,200}?)-(?=[a-z]{0,9}\d)[a-z0-9]{6,10}-[a-z0-9]{5}\b"), r"\1-<id>"),
    (re.compile(r"\b0x[0-9a-f]{1,64}\b"), " <hex> "),
    # Commit SHAs and object ids: 7+ hex characters with both a letter and a digit.
    (re.compile(r"\b(?=[0-9a-f]{0,63}[a-f])(?=[0-9a-f]{0,63}\d)[0-9a-f]{7,64}\b"), " <hex> "),
    # Generated ids: 8+ letters and digits, at least three of them digits ("8f3k2j9x22", not "e2e_test").
    (re.compile(r"(?<![a-z0-9])(?=[a-z0-9]{0,63}[a-z])(?=(?:[a-z]{0,63}\d){3})[a-z0-9]{8,64}(?![a-z0-9])"), " <id> "),
)
# Any script's letters, so non-English error messages still produce words.
_TOKEN = re.compile(r"<[a-z]{1,8}>|[^\W\d_]\w{0,63}")
_SUBJECT = re.compile(r"[^\s:{]{1,256}")
_LONG_NUMBER = re.compile(r"\d{6,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalise(text: str, limit: int = TEXT_LIMIT) -> str:
    """Lower-cased text with run-specific parts replaced by ``<url>``, ``<ts>``, ``<id>``, ``<n>`` ... placeholders.

    Builds on ``fingerprint.normalise_text`` (its dedup keys must not change,
    so the extra patterns live here and run first).
    """
    out = unicodedata.normalize("NFKC", text[:limit]).lower()
    for pattern, placeholder in _PLACEHOLDERS:
        out = pattern.sub(placeholder, out)
    return normalise_text(out, limit=len(out) + 1)


def tokens(normalised: str) -> list[str]:
    return _TOKEN.findall(normalised)


def subject_key(name: str) -> str:
    """The identity a case must share with a job: the alert or script name, normalised.

    Only the leading run up to a space, colon or brace is used, because the
    stored summaries come in several shapes ("name {labels}", "name k=v",
    "script test: error", "script: test: error") and that prefix is the name
    in all of them.
    """
    found = _SUBJECT.match(name.strip())
    if not found:
        return ""
    # Ids and long numbers go (CronJob suffixes, dates), short numbers stay: "smoke-1" and "smoke-2" differ.
    out = unicodedata.normalize("NFKC", found.group(0)).lower()
    for pattern, placeholder in _PLACEHOLDERS:
        out = pattern.sub(placeholder, out)
    return _LONG_NUMBER.sub("<n>", "".join(out.split()))


def alert_text(name: str, labels: Mapping[str, str] | None, summary: str | None = None) -> str:
    """The alert as the audit table stores it (name plus sorted labels), optionally with its summary annotation."""
    parts = [name, *(f"{k}={v}" for k, v in sorted((labels or {}).items()))]
    if summary:
        parts.append(summary)
    return " ".join(parts)[:TEXT_LIMIT]


def script_text(script_name: str, test_case: str | None, error_message: str | None) -> str:
    """The failed run as the audit table stores it: script, test case, error message."""
    return ": ".join(p for p in (script_name, test_case or "", error_message or "") if p)[:TEXT_LIMIT]


def request_texts(request: AnalysisRequest) -> list[str]:
    """The texts a request is matched by, most specific first.

    Stored summaries omit the alert's summary annotation, but a case a human
    typed in (or a future summary format) may include it; matching both
    variants and keeping the better score makes either work.
    """
    if request.alert is not None:
        alert = request.alert
        summary = (alert.annotations or {}).get("summary")
        plain = alert_text(alert.name, alert.labels)
        return [alert_text(alert.name, alert.labels, summary), plain] if summary else [plain]
    if request.script_result is not None:
        r = request.script_result
        return [script_text(r.script_name, r.test_case, r.error_message)]
    return []


def request_subject(request: AnalysisRequest) -> tuple[SourceType, str] | None:
    if request.alert is not None:
        return SourceType.ALERT, subject_key(request.alert.name)
    if request.script_result is not None:
        return SourceType.SCRIPT_RESULT, subject_key(request.script_result.script_name)
    return None


def _printable(text: str, limit: int) -> str:
    """Human-typed text made safe for a one-line reason: no control characters, collapsed whitespace, capped."""
    cleaned = "".join(ch for ch in _CONTROL.sub(" ", text[: limit * 4]) if unicodedata.category(ch)[0] != "C")
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


# --------------------------------------------------------------------------- vectors

Vector = dict[str, float]


@functools.lru_cache(maxsize=65536)
def _char_grams(tok: str) -> tuple[str, ...]:
    """Character trigrams of one word, padded (scikit-learn's ``char_wb``); a placeholder is one gram."""
    if tok.startswith("<"):
        return (tok,)
    padded = f" {tok} "
    return tuple(padded[i : i + CHAR_NGRAM] for i in range(max(1, len(padded) - CHAR_NGRAM + 1)))


def _features(normalised: str) -> tuple[Counter[str], Counter[str]]:
    """Word unigrams + bigrams, and within-word character trigrams."""
    toks = tokens(normalised)
    unigrams: Counter[str] = Counter(toks)
    words = Counter(unigrams)
    words.update(f"{a} {b}" for a, b in itertools.pairwise(toks))
    chars: Counter[str] = Counter()
    for tok, count in unigrams.items():
        for gram in _char_grams(tok):
            chars[gram] += count
    return words, chars


def _weigh(counts: Counter[str], idf: Mapping[str, float], unseen: float) -> Vector:
    """Sublinear TF times IDF, L2-normalised; features the index never saw get the highest IDF."""
    vec = {f: (1.0 + math.log(c)) * idf.get(f, unseen) for f, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in vec.values()))
    return {f: v / norm for f, v in vec.items()} if norm else {}


def _dot(a: Vector, b: Vector) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(f, 0.0) for f, v in a.items())


# --------------------------------------------------------------------------- cases


class MemoryCase(BaseModel):
    """One past verdict the analyzer can reuse.

    ``text`` is the job's summary as the audit table stores it (for an alert
    its name and labels, for a script run ``script: test case: error``);
    ``source`` names the case in reasons (job name, row id). ``subject``
    defaults to the leading name in ``text`` when ``kind`` is set; a case
    without ``kind`` matches jobs of any kind and subject.
    ``recorded_at`` breaks ties between disagreeing near-identical cases (the
    newest wins); without it the earlier case in the list counts as newer,
    which is the order ``Sink.human_verdicts()`` returns.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1, max_length=MAX_CASE_TEXT)
    classification: Classification
    reason: str = Field("", max_length=MAX_CASE_TEXT)
    source: str = Field("", max_length=1024)
    check_type: CheckType = CheckType.USER
    kind: SourceType | None = None
    subject: str | None = Field(None, max_length=1024)
    recorded_at: dt.datetime | None = None


_GroupKey = tuple[SourceType | None, str | None]


@dataclass(slots=True)
class _Entry:
    """Cases whose normalised text, kind and subject are identical: indexed once, voting together."""

    kind: SourceType | None
    subject: str | None
    human: bool
    cases: list[tuple[int, MemoryCase]] = field(default_factory=list)
    words: Vector = field(default_factory=dict)
    chars: Vector = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemoryMatch:
    """The outcome of a search: the voting cases, the best one, and how they split."""

    similarity: float
    best: MemoryCase
    classification: Classification
    votes: dict[Classification, int]
    cases: int
    human: bool

    @property
    def agreement(self) -> float:
        total = sum(self.votes.values())
        return self.votes.get(self.classification, 0) / total if total else 0.0


def _recency(item: tuple[int, MemoryCase]) -> tuple[float, int]:
    index, case = item
    when = case.recorded_at
    stamp = (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp() if when else -math.inf
    return stamp, -index


# --------------------------------------------------------------------------- the analyzer


class MemoryAnalyzer:
    """Copies the verdict of the most similar past human verdict, or has no opinion.

    ``min_similarity``: below this no verdict (default 0.8).
    ``merge_similarity``: cases at least this similar to the job are treated as
    one and vote (default 0.98).
    ``ai_weight``: 0 (default) ignores ``check_type='ai'`` cases altogether;
    above 0 they are consulted only when no human case matches, and the
    verdict's confidence is multiplied by it.
    ``same_subject``: require the alert / script name to match (default on).
    """

    name = "memory"

    def __init__(
        self,
        cases: Iterable[MemoryCase],
        *,
        min_similarity: float = DEFAULT_MIN_SIMILARITY,
        merge_similarity: float = DEFAULT_MERGE_SIMILARITY,
        ai_weight: float = 0.0,
        same_subject: bool = True,
    ) -> None:
        if not 0 < min_similarity <= 1:
            raise ValueError("min_similarity must be in (0, 1]")
        if not 0 < merge_similarity <= 1:
            raise ValueError("merge_similarity must be in (0, 1]")
        if not 0 <= ai_weight <= 1:
            raise ValueError("ai_weight must be in [0, 1]")
        self.min_similarity = min_similarity
        self.merge_similarity = merge_similarity
        self.ai_weight = ai_weight
        self.same_subject = same_subject
        self.skipped = 0
        self._entries: list[_Entry] = []
        self._build(cases)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], **options: Any) -> MemoryAnalyzer:
        """An analyzer over ``Sink.human_verdicts()`` rows (newest first), skipping rows it cannot use.

        Rows without a summary (written before summaries were stored) or with
        an ``inconclusive`` verdict carry nothing to copy.
        """
        cases: list[MemoryCase] = []
        skipped = 0
        for row in rows:
            case = case_from_row(row)
            if case is None:
                skipped += 1
            else:
                cases.append(case)
        analyzer = cls(cases, **options)
        analyzer.skipped += skipped
        return analyzer

    @property
    def size(self) -> int:
        """Indexed entries after merging identical cases (AI cases only when ``ai_weight`` > 0)."""
        return len(self._entries)

    # ----------------------------------------------------------------------- index

    def _build(self, cases: Iterable[MemoryCase]) -> None:
        by_key: dict[tuple[SourceType | None, str | None, bool, str], _Entry] = {}
        counts: dict[int, tuple[Counter[str], Counter[str]]] = {}
        for index, case in enumerate(cases):
            human = case.check_type == CheckType.USER
            if case.classification == Classification.INCONCLUSIVE or (not human and self.ai_weight <= 0):
                self.skipped += 1
                continue
            text = normalise(case.text)
            if not tokens(text):
                self.skipped += 1
                continue
            subject = None
            if case.kind is not None:
                subject = subject_key(case.subject if case.subject is not None else case.text)
            key = (case.kind, subject, human, text)
            entry = by_key.get(key)
            if entry is None:
                entry = by_key[key] = _Entry(kind=case.kind, subject=subject, human=human)
                counts[len(self._entries)] = _features(text)
                self._entries.append(entry)
            entry.cases.append((index, case))

        n = len(self._entries)
        word_df: Counter[str] = Counter()
        char_df: Counter[str] = Counter()
        for words, chars in counts.values():
            word_df.update(words.keys())
            char_df.update(chars.keys())
        # Smoothed IDF (as scikit-learn's): a feature in every entry still weighs 1.
        self._unseen = math.log(n + 1) + 1.0
        self._word_idf = {f: math.log((n + 1) / (df + 1)) + 1.0 for f, df in word_df.items()}
        self._char_idf = {f: math.log((n + 1) / (df + 1)) + 1.0 for f, df in char_df.items()}

        # Postings per group, so a query only ever walks the cases it may match.
        self._groups: dict[_GroupKey, list[int]] = defaultdict(list)
        self._postings: dict[_GroupKey, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for i, entry in enumerate(self._entries):
            words, chars = counts.pop(i)
            entry.words = _weigh(words, self._word_idf, self._unseen)
            entry.chars = _weigh(chars, self._char_idf, self._unseen)
            group = (entry.kind, entry.subject if self.same_subject else None)
            self._groups[group].append(i)
            postings = self._postings[group]
            for feature, weight in entry.words.items():
                if " " not in feature:  # unigrams are enough to find candidates
                    postings[feature].append((i, weight))

    # ----------------------------------------------------------------------- search

    def _candidates(self, kind: SourceType, subject: str, words: Vector) -> list[int]:
        """The entries worth an exact cosine: all of a small group, else the best by shared words."""
        # Cases without a kind are not tied to a subject and stay eligible.
        groups = [(kind, subject if self.same_subject else None), (None, None)]
        found: list[int] = []
        for group in groups:
            pool = self._groups.get(group, [])
            if len(pool) <= EXACT_CANDIDATES:
                found.extend(pool)
                continue
            postings = self._postings[group]
            partial: dict[int, float] = defaultdict(float)
            for feature, weight in words.items():
                for i, w in postings.get(feature, ()):
                    partial[i] += weight * w
            found.extend(heapq.nlargest(EXACT_CANDIDATES, partial, key=partial.__getitem__))
        return found

    def _score(self, texts: Sequence[str], kind: SourceType, subject: str) -> dict[int, float]:
        """Best similarity per candidate entry over the request's text variants."""
        best: dict[int, float] = {}
        for text in texts:
            normalised = normalise(text)
            if not tokens(normalised):
                continue
            words_c, chars_c = _features(normalised)
            words = _weigh(words_c, self._word_idf, self._unseen)
            chars = _weigh(chars_c, self._char_idf, self._unseen)
            for i in self._candidates(kind, subject, words):
                entry = self._entries[i]
                sim = WORD_WEIGHT * _dot(words, entry.words) + (1 - WORD_WEIGHT) * _dot(chars, entry.chars)
                sim = min(1.0, max(0.0, sim))
                if sim > best.get(i, -1.0):
                    best[i] = sim
        return best

    def _decide(self, scored: Mapping[int, float], human: bool) -> MemoryMatch | None:
        eligible = {i: s for i, s in scored.items() if self._entries[i].human is human and s >= self.min_similarity}
        if not eligible:
            return None
        top = max(eligible, key=lambda i: (eligible[i], _recency(max(self._entries[i].cases, key=_recency))))
        top_sim = eligible[top]
        if top_sim >= self.merge_similarity:
            group = [i for i, s in eligible.items() if s >= self.merge_similarity]
        else:
            group = [top]
        voters = [item for i in group for item in self._entries[i].cases]
        votes = Counter(case.classification for _, case in voters)
        most = max(votes.values())
        tied = {c for c, v in votes.items() if v == most}
        # On a tie the newest human verdict stands: people correct themselves over time.
        newest_tied = max((item for item in voters if item[1].classification in tied), key=_recency)
        winner = newest_tied[1].classification
        in_top = [item for item in self._entries[top].cases if item[1].classification == winner]
        named = max(in_top or [item for item in voters if item[1].classification == winner], key=_recency)[1]
        return MemoryMatch(
            similarity=top_sim,
            best=named,
            classification=Classification(winner),
            votes={Classification(c): v for c, v in votes.items()},
            cases=len(voters),
            human=human,
        )

    def match(self, request: AnalysisRequest) -> MemoryMatch | None:
        """The best match for the request: human cases first, AI cases only when allowed and no human one matches."""
        if not self._entries:
            return None
        identity = request_subject(request)
        if identity is None:
            return None
        scored = self._score(request_texts(request), *identity)
        found = self._decide(scored, human=True)
        if found is None and self.ai_weight > 0:
            found = self._decide(scored, human=False)
        return found

    def confidence(self, similarity: float) -> float:
        """Linear from 0.7 at ``min_similarity`` to 0.95 at an identical match."""
        span = 1.0 - self.min_similarity
        share = 1.0 if span <= 0 else (similarity - self.min_similarity) / span
        share = min(1.0, max(0.0, share))
        return CONFIDENCE_AT_THRESHOLD + (CONFIDENCE_AT_IDENTICAL - CONFIDENCE_AT_THRESHOLD) * share

    async def analyze(self, request: AnalysisRequest, context: AnalysisContext) -> Verdict | None:
        # A passing run has no failure to classify (the rules analyzer makes the same call).
        if request.script_result is not None and request.script_result.success and request.alert is None:
            return None
        found = self.match(request)
        if found is None:
            return None
        return self._verdict(found)

    def _verdict(self, found: MemoryMatch) -> Verdict:
        who = "human" if found.human else "AI"
        source = _printable(found.best.source, SOURCE_MAX) or "an unnamed case"
        quoted = _printable(found.best.reason, QUOTED_REASON_MAX) or "no reason given"
        confidence = self.confidence(found.similarity)
        if not found.human:
            confidence *= self.ai_weight
        head = f"matches {who} verdict on {source} (similarity {found.similarity:.2f}"
        if found.cases > 1:
            split = ", ".join(f"{v} {c.value}" for c, v in sorted(found.votes.items(), key=lambda kv: -kv[1]))
            head += f"; {found.cases} near-identical {who} verdicts: {split}"
        head += ")"
        if not found.human:
            head += ", not confirmed by a human"
        if found.agreement < MIN_AGREEMENT:
            return verdict_from_classification(
                Classification.INCONCLUSIVE,
                f"past verdicts disagree: {head}; newest says {found.classification.value}: {quoted}",
                round(confidence * found.agreement, 2),
                self.name,
                title="conflicting past verdicts",
            )
        return verdict_from_classification(
            found.classification,
            f"{head}: {quoted}",
            round(confidence * found.agreement, 2),
            self.name,
            title=f"same as past {who} verdict",
        )


def case_from_row(row: Mapping[str, Any]) -> MemoryCase | None:
    """A ``MemoryCase`` from one ``Sink.human_verdicts()`` row, or None when the row carries nothing usable."""
    summary = row.get("summary")
    try:
        classification = Classification(str(row.get("classification") or ""))
    except ValueError:
        return None
    if not isinstance(summary, str) or not summary.strip() or classification == Classification.INCONCLUSIVE:
        return None
    try:
        kind: SourceType | None = SourceType(str(row.get("source_type") or ""))
    except ValueError:
        kind = None
    name = str(row.get("job_name") or "").strip()
    namespace = str(row.get("namespace") or "").strip()
    source = f"{namespace}/{name}" if namespace and name else name or str(row.get("job_uid") or "")
    if row.get("source_id"):
        source = f"{source} (row {row['source_id']})" if source else f"row {row['source_id']}"
    recorded = row.get("recorded_at")
    return MemoryCase(
        text=summary[:MAX_CASE_TEXT],
        classification=classification,
        reason=str(row.get("reason") or "")[:MAX_CASE_TEXT],
        source=source[:1024],
        # human_verdicts() only returns user rows; a missing column must not demote them to AI.
        check_type=CheckType(row["check_type"]) if row.get("check_type") in ("ai", "user") else CheckType.USER,
        kind=kind,
        recorded_at=recorded if isinstance(recorded, dt.datetime) else None,
    )
