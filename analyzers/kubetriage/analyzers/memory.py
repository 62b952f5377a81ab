"""The memory analyzer: reuse what a human already decided about the same failure on the same target.

Teams see the same noisy alert and the same flaky test again and again, and a
human has usually said what it is the first time. This analyzer indexes those
human verdicts (``check_type = 'user'`` rows of the audit table, as
``Sink.human_verdicts()`` returns them, or the operator's Redis list) and, for
a new job, copies the verdict of the most similar past case, naming it, the
way ReportPortal's auto-analysis does (REFERENCES.md, "Learning from human
verdicts"). The chain's safety policy trusts a memory verdict as "a human
judged this same target", so a case must first *apply* to the job, and only
then is its text compared:

* **the same subject, exactly**: a case applies only to a job of the same kind
  with the same alert name, or the same script name and, when either side has
  one, the same test case. Names are never normalised (``Payments503Errors``
  is not ``Ingress502BadGateway``), and the index is keyed by (kind, exact
  subject), so a query only ever walks its own group;
* **the same target** (alerts): every identity label
  (``AnalysisContext.identity_labels``: namespace, job, service, instance,
  target, host, node, pod by default; per pool ``spec.analyzer.identityLabels``)
  that either side carries must be carried by both, with the same value,
  compared exactly. A label neither side has does not constrain. Every other
  label must agree too, once ids are replaced in its value (a CronJob's
  ``job_name=backup-29012460`` is ``backup-29034180``; ``deployment=catalog-api``
  is not ``checkout-api``), except the volatile ones (``flaps_last_hour`` ...).
  Text similarity alone cannot keep targets apart: kube-state-metrics alerts
  carry a dozen constant labels, and two Deployments of one namespace scored
  0.84 on them;
* **a human scope**: a human may give a case a ``scope``, the label keys that
  must match (narrower or wider than the identity labels). It replaces the
  identity labels *and* the other-labels check: where the scoped labels match,
  the case applies whatever else the alert carries (scripts have no labels;
  a scope on a script case changes nothing);
* ``severity`` is compared whatever the scope says: a verdict on the warning
  firing of an alert says nothing about its critical firing, and the
  kube-prometheus mixins ship many alerts under one name at both severities;
* **the same URL hosts** (scripts): the hosts the URLs in the error name are
  the run's target, so a case about ``staging.shop.example`` does not apply
  to the same test failing against ``www.shop.example``, however similar the
  rest of the text;
* **still valid**: a case whose ``expires_at`` is at or before ``context.now``
  never applies.

Old cases (the Redis list and the database rows carry only the summary text)
still load: their labels are parsed from the summary,
``"AlertName k1=v1 k2=v2"`` as ``kubetriage.api.summary.job_summary`` writes
it, or the older ``"AlertName {k1=v1,k2=v2}"``; a label that parses twice with
two values matches nothing. Their test case is read from
``"script: test case: error"``, which is ambiguous when a run had none, so a
job without a test case only takes a case whose first segment is its own
error's first segment.

Text comparison:

* message text (error messages, the summary annotation) is normalised:
  numbers, ids, uuids, hex, timestamps, IPs and paths become placeholders, so a
  retried run with a new request id, pod hash or timestamp is still "the same"
  failure; URLs keep their host (``<url:staging.shop.example>``), so a staging
  and a production target of the same test are different texts;
* label values lose only their ids (uuids, hashes, pod suffixes, timestamps,
  numbers of six digits or more: CronJob suffixes); short numbers, IPs, URLs
  and paths stay, since ``code=503`` and ``code=500`` are different problems.
  Each label is one token. As the labels of an applicable alert case agree,
  its text differs only in what the stored summary could not parse;
* similarity is TF-IDF cosine over word n-grams and character n-grams,
  computed in pure Python: no model download, no network, deterministic, and
  fast enough for the 20000 cases a worker holds. The index is built once, in
  ``__init__``, then grows with ``add`` (a worker learns each new human
  verdict in milliseconds): entries keep only term frequencies and IDF is
  applied at query time from the current document frequencies, so an added
  case never re-weighs the others and every similarity is exactly what a
  full rebuild would give;
* human verdicts weigh far above AI ones: AI-labelled cases are ignored unless
  ``ai_weight`` is set, and even then only consulted when no human case
  matches, with their confidence scaled down. Otherwise the analyzer would
  learn from its own output and one wrong verdict would reinforce itself;
* below ``min_similarity`` there is no opinion (``None``); near-identical
  cases (similarity >= ``merge_similarity``) are merged and vote, so ten
  identical confirmations count as one strong case and a human who changed
  their mind shows up as a disagreement instead of a coin toss.

The reason names the matched case, the subject and the labels that matched.
The reason copied from the matched case is text a person typed; it goes only
into the verdict reason (sanitised and capped), never into a prompt.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import heapq
import itertools
import json
import math
import re
import unicodedata
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetriage.api.contract import DEFAULT_IDENTITY_LABELS, AnalysisContext, AnalysisRequest
from kubetriage.api.fingerprint import normalise_text
from kubetriage.api.models import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    CheckType,
    Classification,
    SourceType,
    Verdict,
    verdict_from_classification,
)

DEFAULT_MIN_SIMILARITY = 0.8
DEFAULT_MERGE_SIMILARITY = 0.98
# The stored summary column is capped at 4096 bytes (sinks.MAX_SUMMARY_BYTES);
# the request side is cut the same way so both compare the same span of text.
TEXT_LIMIT = 4096
MAX_CASE_TEXT = 65536
MAX_SCOPE = 32
# Compared on every alert case, whatever the identity labels or a human scope say.
ALWAYS_COMPARED: tuple[str, ...] = ("severity",)
# Labels that change between firings of the same alert on the same target (as ``fingerprint`` ignores them),
# and ``alertname``, which repeats the name (compared exactly) and some sources leave out.
VOLATILE_LABELS = frozenset({"flaps_last_hour", "flap_count", "value", "timestamp", "pod_template_hash", "alertname"})
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
# Identity indexes kept (one per identity-label set queried: pools rarely differ).
IDENTITY_INDEXES = 8
QUOTED_REASON_MAX = 1000
SOURCE_MAX = 200
SUBJECT_MAX = 160
LABEL_VALUE_SHOWN = 80
LABEL_TOKEN_MAX = 256
# The one token of a job with no text besides its subject (an alert without labels, a run without error).
EMPTY_TOKEN = "<empty>"

# --------------------------------------------------------------------------- normalisation

# Alert and log text is untrusted: every repeat is bounded, no two nested
# repeats can match the same characters, and the text is capped first, so the
# worst input costs tens of milliseconds, not seconds.
_URL = re.compile(r"\b[a-z][a-z0-9+.-]{1,15}://[^\s\"'<>()\[\]{}]{1,2048}")
_URL_HOST = re.compile(r"[a-z][a-z0-9+.-]{1,15}://(?:[^@/?#]{0,256}@)?([^:/?#]{0,253})")
_NOT_HOST = re.compile(r"[^\w.-]")
# Where a URL was while the other placeholders run: no letter, digit or space, so no pattern touches it.
_HOLE = "\ue000"
_EMAIL = re.compile(r"\b[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}\b")
_TS = re.compile(
    r"\b\d{4}-\d{2}-\d{2}(?:[t ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?(?:z|[+-]\d{2}:?\d{2})?)?\b"
    r"|\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d{1,9})?\b"
)
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b")
_IPV6 = re.compile(r"\[?\b[0-9a-f]{1,4}(?::[0-9a-f]{0,4}){2,7}\b\]?")
# Two or more segments, so "and/or" or a bare "/" stays text.
_PATH = re.compile(r"(?<![\w<])(?:[a-z]:)?(?:[/\\][\w.@+~-]{1,255}){2,64}[/\\]?")
# Kubernetes pod names: deployment-<replicaset hash>-<pod suffix>; keep the workload name.
# A digit in the hash is required so kebab-case test names ("shows-correct-total") survive.
_POD = re.compile(r"\b([a-z][a-z0-9-]{0,200}?)-(?=[a-z]{0,9}\d)[a-z0-9]{6,10}-[a-z0-9]{5}\b")
_HEX0X = re.compile(r"\b0x[0-9a-f]{1,64}\b")
# Commit SHAs and object ids: 7+ hex characters with both a letter and a digit.
_HEXID = re.compile(r"\b(?=[0-9a-f]{0,63}[a-f])(?=[0-9a-f]{0,63}\d)[0-9a-f]{7,64}\b")
# Generated ids: 8+ letters and digits, at least three of them digits ("8f3k2j9x22", not "e2e_test").
_GENID = re.compile(r"(?<![a-z0-9])(?=[a-z0-9]{0,63}[a-z])(?=(?:[a-z]{0,63}\d){3})[a-z0-9]{8,64}(?![a-z0-9])")
_LONG_NUMBER = re.compile(r"\d{6,}")

# Message text, in order, before ``fingerprint.normalise_text`` (uuids, long hex, numbers).
_MESSAGE_PLACEHOLDERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_EMAIL, " <email> "),
    (_TS, " <ts> "),
    (_UUID, " <uuid> "),
    (_IPV4, " <ip> "),
    (_IPV6, " <ip> "),
    (_PATH, " <path> "),
    (_POD, r"\1-<id>"),
    (_HEX0X, " <hex> "),
    (_HEXID, " <hex> "),
    (_GENID, " <id> "),
)
# Label values (not identity, not names): only what is an id; short numbers, IPs and paths name things.
_LABEL_PLACEHOLDERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_TS, "<ts>"),
    (_UUID, "<uuid>"),
    (_POD, r"\1-<id>"),
    (_HEXID, "<hex>"),
    (_GENID, "<id>"),
    (_LONG_NUMBER, "<n>"),
)
# Any script's letters, so non-English error messages still produce words.
_TOKEN = re.compile(r"<url:[\w.-]{1,253}>|<[a-z]{1,8}>|[^\W\d_]\w{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ALERT_NAME = re.compile(r"[^\s{]{1,1024}")
# A label in a stored summary: Prometheus names, plus the dots, slashes and dashes of Kubernetes label keys.
_LABEL_START = re.compile(r"[A-Za-z_][\w./-]{0,252}=")
_BRACED_SPLIT = re.compile(r",\s*(?=[A-Za-z_][\w./-]{0,252}=)")


def _url_placeholder(url: str) -> str:
    found = _URL_HOST.match(url)
    host = _NOT_HOST.sub("", found.group(1) if found else "").strip(".")[:253]
    return f"<url:{host}>" if host else "<url>"


def _without_urls(text: str) -> tuple[str, list[str]]:
    """The text with each URL replaced by a hole, and the ``<url:host>`` placeholders to put back."""
    hosts: list[str] = []

    def hole(found: re.Match[str]) -> str:
        hosts.append(_url_placeholder(found.group(0)))
        return f" {_HOLE} "

    return _URL.sub(hole, text.replace(_HOLE, " ")), hosts


def _refill(text: str, hosts: list[str]) -> str:
    if not hosts:
        return text
    left = iter(hosts)
    return re.sub(_HOLE, lambda _m: next(left, "<url>"), text)


def normalise(text: str, limit: int = TEXT_LIMIT) -> str:
    """Message text, lower-cased, with run-specific parts replaced by ``<ts>``, ``<id>``, ``<n>`` ... placeholders.

    URLs become ``<url:host>``: the path and query are run-specific, the host is the target.
    Builds on ``fingerprint.normalise_text`` (its dedup keys must not change,
    so the extra patterns live here and run first).
    """
    out, hosts = _without_urls(unicodedata.normalize("NFKC", text[:limit]).lower())
    for pattern, placeholder in _MESSAGE_PLACEHOLDERS:
        out = pattern.sub(placeholder, out)
    return _refill(normalise_text(out, limit=len(out) + 1), hosts)


def normalise_label_value(value: str) -> str:
    """A label value with its ids replaced (URLs, paths, IPs and short numbers stay), as one space-free token part."""
    return _label_value(value[:MAX_LABEL_VALUE])


@functools.lru_cache(maxsize=16384)  # label values repeat across cases ("warning", namespaces, jobs)
def _label_value(value: str) -> str:
    out = unicodedata.normalize("NFKC", value).lower()
    for pattern, placeholder in _LABEL_PLACEHOLDERS:
        out = pattern.sub(placeholder, out)
    return "_".join(out.split())


def tokens(normalised: str) -> list[str]:
    return _TOKEN.findall(normalised)


def label_tokens(labels: Mapping[str, str]) -> list[str]:
    """One token per label, ``key=value`` with the value's ids replaced, in key order."""
    return [f"{key.lower()}={normalise_label_value(value)}"[:LABEL_TOKEN_MAX] for key, value in sorted(labels.items())]


def _printable(text: str, limit: int) -> str:
    """Human-typed text made safe for a one-line reason: no control characters, collapsed whitespace, capped."""
    cleaned = "".join(ch for ch in _CONTROL.sub(" ", text[: limit * 4]) if unicodedata.category(ch)[0] != "C")
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


# --------------------------------------------------------------------------- reading stored summaries


@dataclass(frozen=True, slots=True)
class ParsedAlert:
    """An alert summary taken apart: its name, its labels, keys that parsed twice with two values, other words."""

    name: str
    labels: dict[str, str]
    ambiguous: frozenset[str]
    free_text: str


def _unquote(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def parse_alert_summary(text: str, name: str | None = None) -> ParsedAlert:
    """Name and labels from ``"Name k1=v1 k2=v2"`` (``job_summary``) or the older ``"Name {k1=v1,k2=v2}"``.

    ``name``: the known alert name; the text then need not start with it.
    Values are space-free in practice; a word that does not start a new
    ``key=`` is taken as part of the previous value, and words before the first
    label are free text.
    """
    stripped = text.strip()
    if name is None:
        found = _ALERT_NAME.match(stripped)
        name = found.group(0) if found else ""
        rest = stripped[len(name):].strip()
    elif stripped == name or stripped.startswith((f"{name} ", f"{name}{{", f"{name}\t", f"{name}\n")):
        rest = stripped[len(name):].strip()
    else:
        rest = stripped
    parts: list[str] = []
    free: list[str] = []
    if rest.startswith("{"):
        close = rest.rfind("}")
        body, after = (rest[1:close], rest[close + 1 :]) if close > 0 else (rest[1:], "")
        for part in _BRACED_SPLIT.split(body):
            (parts if _LABEL_START.match(part) else free).append(part)
        free.append(after)
    else:
        for word in rest.split():
            if _LABEL_START.match(word):
                parts.append(word)
            elif parts:
                parts[-1] = f"{parts[-1]} {word}"
            else:
                free.append(word)
    labels: dict[str, str] = {}
    ambiguous: set[str] = set()
    for part in parts:
        key, _, value = part.partition("=")
        value = _unquote(value)
        if key in labels and labels[key] != value:
            ambiguous.add(key)
        labels[key] = value
    return ParsedAlert(name, labels, frozenset(ambiguous), " ".join(w for w in free if w.strip()))


def split_script_summary(text: str, name: str | None = None) -> tuple[str, str]:
    """``(script name, the rest)`` from ``"script: test case: error"`` (``job_summary``; test case and error optional).

    ``name``: the known script name; the text then need not start with it.
    """
    if name is None:
        script, _, rest = text.partition(": ")
        return script, rest
    if text == name:
        return name, ""
    if text.startswith(f"{name}: "):
        return name, text[len(name) + 2 :]
    return name, text


def script_text(script_name: str, test_case: str | None, error_message: str | None) -> str:
    """The failed run as the audit table stores it: script, test case, error message."""
    return ": ".join(p for p in (script_name, test_case or "", error_message or "") if p)[:TEXT_LIMIT]


def _first_segment(text: str) -> str:
    return normalise(text.partition(": ")[0])


def _hosts(toks: Iterable[str]) -> frozenset[str]:
    return frozenset(t for t in toks if t.startswith("<url:"))


# --------------------------------------------------------------------------- vectors

# A query's weights by feature id (features no indexed case has only count in its norm).
Vector = dict[int, float]


@functools.lru_cache(maxsize=65536)
def _char_grams(tok: str) -> tuple[str, ...]:
    """Character trigrams of one word, padded (scikit-learn's ``char_wb``); a placeholder is one gram."""
    if tok.startswith("<"):
        return (tok,)
    padded = f" {tok} "
    return tuple(padded[i : i + CHAR_NGRAM] for i in range(max(1, len(padded) - CHAR_NGRAM + 1)))


def _features(toks: Sequence[str]) -> tuple[Counter[str], Counter[str]]:
    """Word unigrams + bigrams, and within-word character trigrams."""
    unigrams: Counter[str] = Counter(toks)
    words = Counter(unigrams)
    words.update(f"{a} {b}" for a, b in itertools.pairwise(toks))
    chars: Counter[str] = Counter()
    for tok, count in unigrams.items():
        for gram in _char_grams(tok):
            chars[gram] += count
    return words, chars


_TF = tuple(1.0 + math.log(count) if count else 0.0 for count in range(64))


def _tf(count: int) -> float:
    """Sublinear term frequency; most counts are small, so they come from a table."""
    return _TF[count] if count < len(_TF) else 1.0 + math.log(count)


def _idf(n: int, df: int) -> float:
    """Smoothed IDF (as scikit-learn's): a feature in every entry still weighs 1; one no entry has weighs most."""
    return math.log((n + 1) / (df + 1)) + 1.0


class _Space:
    """One feature space (word n-grams, or character n-grams): feature ids and their document frequencies.

    An entry stores only its sublinear term frequencies (1 + log count) by
    feature id, in two flat arrays; IDF is applied when a query is scored,
    from the document frequencies as they are then. So indexing a new case
    only counts its own features (nothing indexed before is re-weighed), and
    the similarity is exactly the TF-IDF cosine a full rebuild would compute.
    The flat arrays also keep 20000 cases in tens of MB instead of hundreds.
    """

    __slots__ = ("_dirty", "_idf", "_idf_n", "df", "ids")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.df: list[int] = []
        self._idf: list[float] = []
        self._idf_n = -1
        self._dirty = False

    def index(self, counts: Counter[str]) -> tuple[array[int], array[float]]:
        """A new entry's feature ids and term frequencies; each of its features counts once more in the df."""
        known, df = self.ids, self.df
        fids: list[int] = []
        for feature in counts:
            fid = known.get(feature)
            if fid is None:
                fid = known[feature] = len(df)
                df.append(0)
            df[fid] += 1
            fids.append(fid)
        self._dirty = True
        return array("I", fids), array("d", [_tf(count) for count in counts.values()])

    def idf(self, n: int) -> list[float]:
        """IDF by feature id for ``n`` entries; recomputed (one pass over the vocabulary) only after a change."""
        if self._dirty or self._idf_n != n:
            self._idf = [_idf(n, df) for df in self.df]
            self._idf_n, self._dirty = n, False
        return self._idf

    def query(self, counts: Counter[str], n: int) -> Vector:
        """The job's TF-IDF weights, L2-normalised, by feature id; features the index never saw weigh the most."""
        idf = self.idf(n)
        unseen = _idf(n, 0)
        known: Vector = {}
        total = 0.0
        for feature, count in counts.items():
            fid = self.ids.get(feature)
            weight = _tf(count) * (unseen if fid is None else idf[fid])
            total += weight * weight
            if fid is not None:
                known[fid] = weight
        norm = math.sqrt(total)
        return {fid: w / norm for fid, w in known.items()} if norm else {}


def _cosine(query: Vector, ids: array[int], tfs: array[float], idf: Sequence[float]) -> float:
    """The query's cosine with one entry, weighing the entry with today's IDF."""
    dot = total = 0.0
    for fid, tf in zip(ids, tfs, strict=True):
        weight = tf * idf[fid]
        total += weight * weight
        mine = query.get(fid)
        if mine is not None:
            dot += mine * weight
    return dot / math.sqrt(total) if total else 0.0


# --------------------------------------------------------------------------- cases

LabelKey = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


class MemoryCase(BaseModel):
    """One past verdict the analyzer can reuse.

    ``text`` is the job's summary as the audit table stores it (for an alert
    its name and labels, for a script run ``script: test case: error``);
    ``source`` names the case in reasons (job name, row id). ``kind`` is
    required for a case to be used. ``subject`` is the exact alert or script
    name; it defaults to the leading name in ``text``.
    ``labels``: the alert's labels; without them they are parsed from ``text``.
    ``scope``: the label keys that must match, set by a human; without it the
    pool's identity labels. ``expires_at``: after this the case no longer applies.
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
    labels: dict[LabelKey, Annotated[str, Field(max_length=MAX_LABEL_VALUE)]] | None = Field(
        None, max_length=MAX_LABELS
    )
    scope: list[LabelKey] | None = Field(None, max_length=MAX_SCOPE)
    expires_at: dt.datetime | None = None


class _Ambiguous:
    """A label value that parsed twice with two values: equal to nothing."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<ambiguous>"


_AMBIGUOUS = _Ambiguous()


def _timestamp(when: dt.datetime) -> float:
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


@dataclass(frozen=True, slots=True)
class _View:
    """One case as it is matched: parsed once, checked per query against the job's identity."""

    index: int
    case: MemoryCase
    labels: Mapping[str, object]  # alerts: the labels identity is checked against
    others: Mapping[str, object]  # alerts: every label with its ids replaced
    rest: str  # scripts: what follows the script name ("test case: error")
    head: str  # scripts: the normalised first segment of ``rest``
    hosts: frozenset[str]  # scripts: the ``<url:host>`` placeholders of the text
    expires: float  # a timestamp; inf when the case does not expire


@dataclass(frozen=True, slots=True)
class _Job:
    """The request as it is matched."""

    kind: SourceType
    subject: str
    labels: Mapping[str, str]  # alerts: the labels, plus the severity field when no label has it
    others: Mapping[str, str]  # alerts: the labels with their ids replaced
    test_case: str | None
    head: str
    hosts: frozenset[str]
    variants: list[list[str]]


_GroupKey = tuple[SourceType, str]
_Matched = tuple[tuple[str, str], ...]
_Item = tuple[int, "_View"]


def _compared(identity: Iterable[str]) -> tuple[str, ...]:
    """The label keys compared exactly: the identity labels (or a human scope) and ``severity``."""
    return tuple(dict.fromkeys((*identity, *ALWAYS_COMPARED)))


@dataclass(slots=True)
class _Entry:
    """Cases whose subject and normalised text are identical: indexed once, voting together when they apply."""

    kind: SourceType
    subject: str
    human: bool
    scoped: bool  # alerts with a human scope: the scoped labels decide, not the text
    views: list[_View] = field(default_factory=list)
    # Feature ids and term frequencies in the word and character spaces (see _Space).
    word_ids: array[int] = field(default_factory=lambda: array("I"))
    word_tfs: array[float] = field(default_factory=lambda: array("d"))
    char_ids: array[int] = field(default_factory=lambda: array("I"))
    char_tfs: array[float] = field(default_factory=lambda: array("d"))
    # 1 / the word vector's norm under the IDF of when it was indexed: only ranks candidates (see _candidates).
    word_scale: float = 0.0


@dataclass(frozen=True, slots=True)
class MemoryMatch:
    """The outcome of a search: the voting cases, the best one, how they split, and why it applies."""

    similarity: float
    best: MemoryCase
    classification: Classification
    votes: dict[Classification, int]
    cases: int
    human: bool
    kind: SourceType
    subject: str
    test_case: str | None = None
    matched: _Matched = ()

    @property
    def agreement(self) -> float:
        total = sum(self.votes.values())
        return self.votes.get(self.classification, 0) / total if total else 0.0


def _recency(view: _View) -> tuple[float, int]:
    when = view.case.recorded_at
    return (_timestamp(when) if when else -math.inf), -view.index


def _view(index: int, case: MemoryCase) -> tuple[_View, str, list[str]] | None:
    """The case's view, exact subject and tokens; None when it names no subject."""
    expires = _timestamp(case.expires_at) if case.expires_at is not None else math.inf
    if case.kind == SourceType.ALERT:
        parsed = parse_alert_summary(case.text, case.subject)
        clear = dict(case.labels) if case.labels is not None else {
            k: v for k, v in parsed.labels.items() if k not in parsed.ambiguous
        }
        ambiguous = {} if case.labels is not None else dict.fromkeys(parsed.ambiguous, _AMBIGUOUS)
        labels: dict[str, object] = {**clear, **ambiguous}
        others: dict[str, object] = {**{k: normalise_label_value(v) for k, v in clear.items()}, **ambiguous}
        toks = label_tokens(clear)
        if parsed.free_text:
            toks += tokens(normalise(parsed.free_text))
        return _View(index, case, labels, others, "", "", frozenset(), expires), parsed.name, toks or [EMPTY_TOKEN]
    if case.kind == SourceType.SCRIPT_RESULT:
        script, rest = split_script_summary(case.text, case.subject)
        toks = tokens(normalise(rest))
        view = _View(index, case, {}, {}, rest, _first_segment(rest), _hosts(toks), expires)
        return view, script, toks or [EMPTY_TOKEN]
    return None


@dataclass(frozen=True, slots=True)
class PreparedCase:
    """A case parsed and tokenised for the index (most of what indexing costs), not yet numbered.

    ``key`` is a digest of the tokens: identical texts share an entry (a 128-bit digest, so no two different
    texts share one in practice), without each entry keeping its token list.
    """

    view: _View
    subject: str
    key: bytes
    words: Counter[str]
    chars: Counter[str]


def prepare_case(case: MemoryCase) -> PreparedCase | None:
    """The case ready to index; None when it can never apply (inconclusive, or no kind or subject)."""
    if case.classification == Classification.INCONCLUSIVE or case.kind is None:
        return None
    viewed = _view(0, case)
    if viewed is None or not viewed[1]:
        return None
    view, subject, toks = viewed
    words, chars = _features(toks)
    key = hashlib.blake2b(json.dumps(toks).encode(), digest_size=16).digest()
    return PreparedCase(view, subject, key, words, chars)


def prepare_cases(cases: Iterable[MemoryCase]) -> list[PreparedCase | None]:
    """``prepare_case`` for each case: pure, so it may run in another thread than the analyzer it is added to."""
    return [prepare_case(case) for case in cases]


def _job(request: AnalysisRequest) -> _Job | None:
    if request.alert is not None:
        alert = request.alert
        labels = dict(alert.labels or {})
        identity = dict(labels)
        # Fields outside the labels (the stored summary has only labels) count when no label says the same:
        # a critical alert is critical, and a host given only as a field is still a host.
        if alert.severity and "severity" not in identity:
            identity["severity"] = alert.severity
        if alert.host and not {"host", "instance"} & identity.keys():
            identity["host"] = alert.host
        others = {k: normalise_label_value(v) for k, v in labels.items()}
        base = label_tokens(labels)
        summary = (alert.annotations or {}).get("summary")
        variants = [base + tokens(normalise(summary)), base] if summary else [base]
        return _Job(SourceType.ALERT, alert.name, identity, others, None, "", frozenset(),
                    [v or [EMPTY_TOKEN] for v in variants])
    if request.script_result is not None:
        r = request.script_result
        test_case = r.test_case or None
        _, rest = split_script_summary(script_text(r.script_name, test_case, r.error_message), r.script_name)
        # Cut like the stored summary, so a long first segment compares the same span on both sides.
        head = "" if test_case else _first_segment(rest)
        toks = tokens(normalise(rest))
        return _Job(SourceType.SCRIPT_RESULT, r.script_name, {}, {}, test_case, head, _hosts(toks),
                    [toks or [EMPTY_TOKEN]])
    return None


def _matched_labels(case: Mapping[str, object], job: Mapping[str, str], keys: Iterable[str]) -> _Matched | None:
    """The keys both sides carry with equal values; None when one side lacks a key or the values differ."""
    matched: list[tuple[str, str]] = []
    for key in keys:
        mine, theirs = case.get(key), job.get(key)
        if mine is None and theirs is None:
            continue
        if theirs is None or mine != theirs:
            return None
        matched.append((key, theirs))
    return tuple(matched)


def _others_agree(case: Mapping[str, object], job: Mapping[str, str], skip: Iterable[str]) -> bool:
    """Every other label either side has, the other has too, equal once ids are replaced (volatile ones aside)."""
    ignored = VOLATILE_LABELS.union(skip)
    return all(case.get(k) == job.get(k) for k in case.keys() | job.keys() if k not in ignored)


def _same_test_case(view: _View, job: _Job) -> bool:
    """The same test case when either side has one (the stored text does not say whether a run had one)."""
    if job.test_case:
        return view.rest == job.test_case or view.rest.startswith(f"{job.test_case}: ")
    # "script: X: error": X is a test case unless it is where the job's own error starts.
    return view.head == job.head


# --------------------------------------------------------------------------- the analyzer


class MemoryAnalyzer:
    """Copies the verdict of the most similar past human verdict on the same target, or has no opinion.

    ``min_similarity``: below this no verdict (default 0.8).
    ``merge_similarity``: cases at least this similar to the job are treated as
    one and vote (default 0.98).
    ``ai_weight``: 0 (default) ignores ``check_type='ai'`` cases altogether;
    above 0 they are consulted only when no human case matches, and the
    verdict's confidence is multiplied by it.
    """

    name = "memory"

    def __init__(
        self,
        cases: Iterable[MemoryCase],
        *,
        min_similarity: float = DEFAULT_MIN_SIMILARITY,
        merge_similarity: float = DEFAULT_MERGE_SIMILARITY,
        ai_weight: float = 0.0,
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
        self.skipped = 0
        self._entries: list[_Entry] = []
        # (kind, subject, human, scoped, digest of the tokens) -> entry: identical texts share one entry
        self._by_key: dict[tuple[SourceType, str, bool, bool, bytes], int] = {}
        self._words = _Space()
        self._chars = _Space()
        self._cases = 0
        # Indices fall as cases get newer (see _recency); the constructor's first case is index 0.
        self._newest = 0
        # Groups by (kind, exact subject), so a query only ever walks the cases it may match. Within a group,
        # cases are bucketed so that a query walks only those that can apply: alert cases by their identity
        # values (one index per identity-label set, the default one built here), script cases by how their
        # text after the script name starts; unigram postings rank candidates when too many apply.
        self._postings: dict[_GroupKey, dict[int, tuple[array[int], array[float]]]] = {}
        self._views: dict[_GroupKey, list[_Item]] = {}
        self._scoped: dict[_GroupKey, list[_Item]] = {}
        self._unscoped: dict[_GroupKey, list[_Item]] = {}
        self._by_first: dict[_GroupKey, dict[str, list[_Item]]] = {}
        self._by_head: dict[_GroupKey, dict[str, list[_Item]]] = {}
        self._by_identity: dict[tuple[str, ...], dict[_GroupKey, dict[tuple[object, ...], list[_Item]]]] = {}
        # One case prepared at a time: a list of all prepared cases would double the build's peak memory.
        cases = list(cases)
        ignored = self.ai_weight <= 0  # AI cases are skipped anyway: not worth parsing
        ready = (None if ignored and c.check_type != CheckType.USER else prepare_case(c) for c in cases)
        self._insert(cases, ready, first=0, scale=False)
        self._rescale()
        self._identity_index(_compared(DEFAULT_IDENTITY_LABELS))

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

    @property
    def cases(self) -> int:
        """Cases indexed (before merging), from the constructor and every ``add``."""
        return self._cases

    def add(self, cases: Sequence[MemoryCase], prepared: Sequence[PreparedCase | None] | None = None) -> int:
        """Index more cases without rebuilding; returns how many were indexed (the others count in ``skipped``).

        ``cases`` are newer than every case indexed so far, newest first (the
        constructor's order). ``prepared``: ``prepare_cases(cases)`` when the
        caller ran it elsewhere, e.g. in a thread: it is the costly part and
        touches nothing shared. ``add`` itself mutates the index: call it from
        the thread that calls ``match``, never concurrently with it.
        """
        if prepared is None:
            prepared = prepare_cases(cases)
        if len(prepared) != len(cases):
            raise ValueError("prepared must be prepare_cases(cases)")
        before = self._cases
        self._insert(cases, prepared, first=self._newest - len(cases), scale=True)
        return self._cases - before

    # ----------------------------------------------------------------------- index

    def _insert(self, cases: Sequence[MemoryCase], prepared: Iterable[PreparedCase | None], first: int,
                scale: bool) -> None:
        """Index ``cases`` (newest first) as ``first``, ``first + 1`` ...; only their own features are counted.

        ``scale``: set each new entry's candidate-ranking scale now (else ``_rescale`` must follow).
        """
        for offset, (case, ready) in enumerate(zip(cases, prepared, strict=True)):
            human = case.check_type == CheckType.USER
            if ready is None or (not human and self.ai_weight <= 0):
                self.skipped += 1  # inconclusive, ignored AI, or no kind or subject: it cannot be tied to a job
                continue
            view = dataclasses.replace(ready.view, index=first + offset)
            group = (SourceType(case.kind), ready.subject)  # prepare_case refused any case without a kind
            scoped = group[0] == SourceType.ALERT and case.scope is not None
            key = (group[0], ready.subject, human, scoped, ready.key)
            i = self._by_key.get(key)
            if i is None:
                i = self._by_key[key] = len(self._entries)
                self._entries.append(self._entry(group, human, scoped, ready, i, scale))
            self._entries[i].views.append(view)
            item = (i, view)
            self._views.setdefault(group, []).append(item)
            if group[0] == SourceType.ALERT and case.scope is not None:
                self._scoped.setdefault(group, []).append(item)
            elif group[0] == SourceType.ALERT:
                self._unscoped.setdefault(group, []).append(item)
                for keys, index in self._by_identity.items():
                    bucket = tuple(view.labels.get(k) for k in keys)
                    index.setdefault(group, {}).setdefault(bucket, []).append(item)
            else:
                self._by_first.setdefault(group, {}).setdefault(view.rest.partition(": ")[0], []).append(item)
                self._by_head.setdefault(group, {}).setdefault(view.head, []).append(item)
            self._cases += 1
        self._newest = min(self._newest, first)

    def _entry(self, group: _GroupKey, human: bool, scoped: bool, ready: PreparedCase, i: int,
               scale: bool) -> _Entry:
        """A new entry: its features counted in the document frequencies, its unigrams in the group's postings."""
        entry = _Entry(kind=group[0], subject=group[1], human=human, scoped=scoped)
        entry.word_ids, entry.word_tfs = self._words.index(ready.words)
        entry.char_ids, entry.char_tfs = self._chars.index(ready.chars)
        if scale:
            # Under the IDF of now: it only ranks candidates (see _candidates).
            n, df = i + 1, self._words.df
            total = sum((tf * _idf(n, df[fid])) ** 2 for fid, tf in zip(entry.word_ids, entry.word_tfs, strict=True))
            entry.word_scale = 1.0 / math.sqrt(total) if total else 0.0
        postings = self._postings.setdefault(group, {})
        for feature, fid, tf in zip(ready.words, entry.word_ids, entry.word_tfs, strict=True):
            if " " not in feature:  # unigrams are enough to find candidates
                posting = postings.get(fid)
                if posting is None:
                    posting = postings[fid] = (array("I"), array("d"))
                posting[0].append(i)
                posting[1].append(tf)
        return entry

    def _rescale(self) -> None:
        """Every entry's candidate-ranking scale under the current IDF (one pass; the similarity never needs it)."""
        idf = self._words.idf(len(self._entries))
        for entry in self._entries:
            total = sum((tf * idf[fid]) ** 2 for fid, tf in zip(entry.word_ids, entry.word_tfs, strict=True))
            entry.word_scale = 1.0 / math.sqrt(total) if total else 0.0

    def _identity_index(self, keys: tuple[str, ...]) -> dict[_GroupKey, dict[tuple[object, ...], list[_Item]]]:
        """Unscoped alert cases per group, bucketed by their values of ``keys`` (None where a case lacks one)."""
        index = self._by_identity.get(keys)
        if index is None:
            if len(self._by_identity) >= IDENTITY_INDEXES:
                self._by_identity.clear()
            index = {}
            for group, items in self._unscoped.items():
                buckets: dict[tuple[object, ...], list[_Item]] = defaultdict(list)
                for i, view in items:
                    buckets[tuple(view.labels.get(k) for k in keys)].append((i, view))
                index[group] = dict(buckets)
            self._by_identity[keys] = index
        return index

    # ----------------------------------------------------------------------- search

    def _applicable(self, job: _Job, context: AnalysisContext) -> dict[int, list[tuple[_View, _Matched]]]:
        """Per entry of the job's group, the cases that apply to it: unexpired, same test case or same target."""
        now = _timestamp(context.now)
        group = (job.kind, job.subject)
        found: dict[int, list[tuple[_View, _Matched]]] = {}
        if job.kind == SourceType.SCRIPT_RESULT:
            if job.test_case and ": " not in job.test_case:
                pool = self._by_first.get(group, {}).get(job.test_case, [])
            elif job.test_case:
                pool = self._views.get(group, [])
            else:
                pool = self._by_head.get(group, {}).get(job.head, [])
            for i, view in pool:
                # The hosts its URLs name are the run's target: staging is not production.
                if view.expires > now and view.hosts == job.hosts and _same_test_case(view, job):
                    found.setdefault(i, []).append((view, ()))
            return found
        keys = _compared(context.identity_labels)
        values = tuple(job.labels.get(k) for k in keys)
        matched = tuple((k, v) for k, v in zip(keys, values, strict=True) if v is not None)
        for i, view in self._identity_index(keys).get(group, {}).get(values, []):
            if view.expires > now and _others_agree(view.others, job.others, keys):
                found.setdefault(i, []).append((view, matched))
        for i, view in self._scoped.get(group, []):
            if view.expires <= now or view.case.scope is None:
                continue
            # A human said which labels must match; the rest may differ.
            scoped = _matched_labels(view.labels, job.labels, _compared(view.case.scope))
            if scoped is not None:
                found.setdefault(i, []).append((view, scoped))
        return found

    def _candidates(self, group: _GroupKey, applicable: Mapping[int, object], words: Vector) -> Iterable[int]:
        """The entries worth an exact cosine: all that apply when few, else the best of them by shared words.

        The ranking scales each entry by its norm under the IDF of when it was
        indexed (``_Entry.word_scale``): after many ``add`` calls it drifts
        slightly, which can only change which entries get the exact cosine
        when more than EXACT_CANDIDATES apply, never a similarity.
        """
        if len(applicable) <= EXACT_CANDIDATES:
            return applicable.keys()
        postings = self._postings.get(group, {})
        idf = self._words.idf(len(self._entries))
        partial: dict[int, float] = defaultdict(float)
        for fid, weight in words.items():
            posting = postings.get(fid)
            if posting is None:
                continue
            scale = weight * idf[fid]
            for i, tf in zip(*posting, strict=True):
                if i in applicable:
                    partial[i] += scale * tf * self._entries[i].word_scale
        return heapq.nlargest(EXACT_CANDIDATES, partial, key=partial.__getitem__)

    def _score(self, job: _Job, applicable: Mapping[int, object]) -> dict[int, float]:
        """Best similarity per applicable entry over the job's text variants."""
        # A human scope is a rule: where its labels match, the case applies, whatever else the alert says.
        best: dict[int, float] = {i: 1.0 for i in applicable if self._entries[i].scoped}
        textual = {i: None for i in applicable if i not in best}
        n = len(self._entries)
        word_idf, char_idf = self._words.idf(n), self._chars.idf(n)
        for toks in job.variants:
            if not textual:
                break
            words_c, chars_c = _features(toks)
            words, chars = self._words.query(words_c, n), self._chars.query(chars_c, n)
            for i in self._candidates((job.kind, job.subject), textual, words):
                entry = self._entries[i]
                sim = (WORD_WEIGHT * _cosine(words, entry.word_ids, entry.word_tfs, word_idf)
                       + (1 - WORD_WEIGHT) * _cosine(chars, entry.char_ids, entry.char_tfs, char_idf))
                sim = min(1.0, max(0.0, sim))
                if sim > best.get(i, -1.0):
                    best[i] = sim
        return best

    def _decide(self, job: _Job, scored: Mapping[int, float], applicable: Mapping[int, list[tuple[_View, _Matched]]],
                human: bool) -> MemoryMatch | None:
        eligible = {i: s for i, s in scored.items() if self._entries[i].human is human and s >= self.min_similarity}
        if not eligible:
            return None

        def newest(items: Iterable[tuple[_View, _Matched]]) -> tuple[_View, _Matched]:
            return max(items, key=lambda item: _recency(item[0]))

        top = max(eligible, key=lambda i: (eligible[i], _recency(newest(applicable[i])[0])))
        top_sim = eligible[top]
        if top_sim >= self.merge_similarity:
            group = [i for i, s in eligible.items() if s >= self.merge_similarity]
        else:
            group = [top]
        voters = [item for i in group for item in applicable[i]]
        votes = Counter(view.case.classification for view, _ in voters)
        most = max(votes.values())
        tied = {c for c, v in votes.items() if v == most}
        # On a tie the newest human verdict stands: people correct themselves over time.
        winner = newest(item for item in voters if item[0].case.classification in tied)[0].case.classification
        in_top = [item for item in applicable[top] if item[0].case.classification == winner]
        named, matched = newest(in_top or [item for item in voters if item[0].case.classification == winner])
        return MemoryMatch(
            similarity=top_sim,
            best=named.case,
            classification=Classification(winner),
            votes={Classification(c): v for c, v in votes.items()},
            cases=len(voters),
            human=human,
            kind=job.kind,
            subject=job.subject,
            test_case=job.test_case,
            matched=matched,
        )

    def match(self, request: AnalysisRequest, context: AnalysisContext | None = None) -> MemoryMatch | None:
        """The best applicable match: human cases first, AI cases only when allowed and no human one matches."""
        if not self._entries:
            return None
        job = _job(request)
        if job is None:
            return None
        applicable = self._applicable(job, context if context is not None else AnalysisContext())
        if not applicable:
            return None
        scored = self._score(job, applicable)
        found = self._decide(job, scored, applicable, human=True)
        if found is None and self.ai_weight > 0:
            found = self._decide(job, scored, applicable, human=False)
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
        found = self.match(request, context)
        if found is None:
            return None
        return self._verdict(found)

    @staticmethod
    def _target(found: MemoryMatch) -> str:
        """What made the case apply: the subject, and the labels that matched (or the test case)."""
        subject = _printable(found.subject, SUBJECT_MAX)
        if found.kind == SourceType.SCRIPT_RESULT:
            test_case = _printable(found.test_case, SUBJECT_MAX) if found.test_case else ""
            return f"script {subject}, " + (f"test case {test_case}" if test_case else "no test case")
        shown = ", ".join(f"{_printable(k, SUBJECT_MAX)}={_printable(v, LABEL_VALUE_SHOWN)}" for k, v in found.matched)
        out = f"alert {subject}, " + (f"matched labels {shown}" if shown else "no identity labels on either side")
        if found.best.scope is None:
            return out + ", other labels equal up to ids"
        keys = ", ".join(_printable(k, SUBJECT_MAX) for k in found.best.scope[:8]) or "none"
        return out + f" (scope set by a human: {keys}{', ...' if len(found.best.scope) > 8 else ''})"

    def _verdict(self, found: MemoryMatch) -> Verdict:
        who = "human" if found.human else "AI"
        source = _printable(found.best.source, SOURCE_MAX) or "an unnamed case"
        quoted = _printable(found.best.reason, QUOTED_REASON_MAX) or "no reason given"
        confidence = self.confidence(found.similarity)
        if not found.human:
            confidence *= self.ai_weight
        head = f"matches {who} verdict on {source} (similarity {found.similarity:.2f}; {self._target(found)}"
        if found.best.expires_at is not None:
            head += f"; until {found.best.expires_at.isoformat(timespec='minutes')}"
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
    """A ``MemoryCase`` from one ``Sink.human_verdicts()`` row, or None when the row carries nothing usable.

    Today's rows carry only the summary (labels are parsed from it); ``labels``,
    ``scope`` and ``expires_at`` are taken when a row has them, and a row whose
    values for them are invalid is skipped rather than read without them.
    """
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
    optional = {key: row[key] for key in ("labels", "scope", "expires_at") if row.get(key) is not None}
    try:
        return MemoryCase(
            text=summary[:MAX_CASE_TEXT],
            classification=classification,
            reason=str(row.get("reason") or "")[:MAX_CASE_TEXT],
            source=source[:1024],
            # human_verdicts() only returns user rows; a missing column must not demote them to AI.
            check_type=CheckType(row["check_type"]) if row.get("check_type") in ("ai", "user") else CheckType.USER,
            kind=kind,
            recorded_at=recorded if isinstance(recorded, dt.datetime) else None,
            **optional,
        )
    except ValidationError:
        return None
