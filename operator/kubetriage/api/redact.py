"""Redaction of secrets in alert and log text, before it reaches the LLM, status, Events or the database.

Alert annotations, error messages and logs are written by whatever fired the alert or ran the test, and
they carry what was on the screen: a bearer token in a failed ``curl -v``, a connection string in a stack
trace, a private key in a dumped config, a colleague's e-mail address. kubetriage copies that text into
the LLM prompt, the job's status, Events and the audit table, so it is redacted first:

* **built-in patterns** (``BUILTIN_PATTERNS``): private keys (PEM and PGP blocks, also JSON-escaped and
  cut off), JWTs, ``Authorization`` header values, ``Bearer`` tokens, URLs with credentials
  (``postgres://user:pass@db``), AWS access key ids, GCP API keys and OAuth tokens, GitHub, GitLab, Slack,
  Stripe and OpenAI-style keys, ``password=`` / ``token: ...`` / ``"api_key": "..."`` pairs (the key is
  kept, the value replaced), and e-mail addresses;
* **the pool's own patterns** (``spec.analyzer.redactPatterns``): RE2 expressions, linear-time on
  untrusted text like the TriageRules' (``kubetriage.api.regex``). The whole match is replaced, or only
  the first group when the expression has groups (``customer-id=(\\d+)`` keeps ``customer-id=``). An
  expression that does not compile is skipped and reported on the pool (``pattern_problems``).

A secret becomes ``[REDACTED:<kind>]`` (``[REDACTED]`` for pairs and the pool's patterns), so the reader
(the model, a human) still sees that something was there and what it was. Redacting twice changes
nothing. The fingerprint is computed from the job as submitted, before any of this, so redaction never
changes which jobs are duplicates of which.

Redacted: every free-text field of a job (alert labels and annotation values, host, device, value,
generatorURL; error message, logs, attempt history), and every text kubetriage writes from it (a verdict's
reason, title and next steps; failure messages; the one-line summary). Not redacted: names (alert,
script, test case), which identify the job, and the report and screenshot URLs a worker fetches; those
reach the prompt only as scheme, host and path (``kubetriage.analyzers.llm``).

Pure computation, no I/O: the operator (admission, recording, human verdicts) and the worker (the
request it analyses, the verdict it reports) use the same functions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import re2

from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.models import (
    MAX_ANNOTATION_VALUE,
    MAX_ERROR,
    MAX_LABEL_VALUE,
    MAX_LOGS,
    MAX_NAME,
    MAX_REASON,
    MAX_SHORT,
    MAX_URL,
    Alert,
    AttemptRecord,
    EvidenceItem,
    ScriptResult,
    Verdict,
)
from kubetriage.api.regex import compile_re2

REDACTED = "[REDACTED]"
_HISTORY_ERROR = 1024  # AttemptRecord.error_message's limit
_NEXT_STEP = 512  # the limit of one of Verdict.next_steps
_EVIDENCE_SUMMARY, _EVIDENCE_VALUE = 512, 256  # EvidenceItem's limits

# Names a key=value pair's key may end with for its value to be a secret (case-insensitive).
_SECRET_KEYS = (
    r"pass(?:word|wd|phrase)|pwd|secret(?:[_-]?key)?|client[_-]?secret|(?:access|auth|api|bearer|id|refresh|"
    r"session|security|csrf|private)?[_-]?token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
    r"credentials?|session[_-]?(?:id|key)|signature|sig|x-api-key"
)

# An unquoted secret value: up to a space, quote or separator. Text redacted before is matched whole first,
# so redacting twice changes nothing (a value stopping at "]" would leave half a marker behind).
_VALUE = r"(?:\[REDACTED[^\]\s]*\]|[^\s\"'&,;]+)"

# (kind, RE2 expression) in the order applied: the most specific first, so a JWT inside an
# Authorization header is named as a JWT. An expression with groups keeps group 1 (the key, the URL
# scheme) and replaces the rest of the match.
BUILTIN_PATTERNS: tuple[tuple[str, str], ...] = (
    ("private-key",
     r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
     # the headers first: the base64 alternative would otherwise stop inside "Proc-Type"
     r"(?:(?:Proc-Type|DEK-Info|Version|Comment):[^\n\\]*|\\[nr]|[A-Za-z0-9+/=\s])*"
     r"(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----)?"),
    ("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    ("url-credentials", r"(?i)(\b[a-z][a-z0-9+.-]{1,30}://)[^\s/?#@:\"'<>]+:[^\s/?#@\"'<>]*@"),
    ("authorization",
     r"(?i)(\b(?:proxy-)?authorization[\"']?[ \t]*[:=][ \t]*[\"']?"
     r"(?:(?:bearer|basic|token|digest|negotiate|apikey)\s+)?)" + _VALUE),
    ("bearer", r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/-]{16,}=*"),
    ("aws-access-key-id", r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[A-Z0-9]{16}\b"),
    ("gcp-api-key", r"\bAIza[0-9A-Za-z_-]{35}"),
    ("gcp-oauth-token", r"\bya29\.[0-9A-Za-z_-]{20,}"),
    ("github-token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    ("gitlab-token", r"\bglpat-[A-Za-z0-9_-]{20,}"),
    ("slack-token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    ("stripe-key", r"\b[rsp]k_(?:live|test)_[A-Za-z0-9]{16,}"),
    ("api-key", r"\bsk-(?:proj-|or-v1-|ant-[a-z0-9]{2,8}-)?[A-Za-z0-9_-]{20,}"),
    ("secret",
     r"(?i)(\b[A-Za-z0-9_.-]*?(?:" + _SECRET_KEYS + r")[\"']?[ \t]*[:=][ \t]*)"
     r"(?:\"[^\"\n]*\"|'[^'\n]*'|" + _VALUE + ")"),
    ("email", r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b"),
)


@dataclass(frozen=True, slots=True)
class _Rule:
    regex: re2._Regexp
    token: str
    keep_prefix: bool  # replace what follows group 1 (built-ins) rather than group 1 (the pool's patterns)


def _compiled_builtins() -> tuple[_Rule, ...]:
    rules = []
    for kind, pattern in BUILTIN_PATTERNS:
        regex = compile_re2(pattern)
        token = REDACTED if kind == "secret" else f"[REDACTED:{kind}]"
        if kind == "url-credentials":
            token += "@"  # the match ends with the userinfo's "@"; the host after it stays
        rules.append(_Rule(regex, token, regex.groups > 0))
    return tuple(rules)


_BUILTIN_RULES = _compiled_builtins()


def pattern_problems(patterns: Iterable[str]) -> list[str]:
    """Why each unusable expression of a pool cannot be used (it is skipped); empty when all compile."""
    problems = []
    for i, pattern in enumerate(patterns):
        try:
            regex = compile_re2(pattern)
        except re2.error as exc:
            detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            problems.append(f"redactPatterns[{i}] does not compile (RE2 syntax): {detail}")
            continue
        if regex.search("") is not None:
            problems.append(f"redactPatterns[{i}] matches the empty string, so it would redact nothing useful")
    return problems


class Redactor:
    """The built-in patterns plus a pool's own; call it on text, or use the helpers for whole objects."""

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        own = []
        for pattern in patterns:
            try:
                regex = compile_re2(pattern)
            except re2.error:
                continue  # reported on the pool's status (pattern_problems); the built-ins still apply
            if regex.search("") is None:  # an expression matching nothing at all would insert everywhere
                own.append(_Rule(regex, REDACTED, False))
        self.patterns = tuple(patterns)
        self._rules = _BUILTIN_RULES + tuple(own)

    def __call__(self, text: str) -> str:
        for rule in self._rules:
            if rule.regex.search(text) is None:  # the common case: nothing to replace, no copy made
                continue
            text = rule.regex.sub(functools.partial(_replace, rule), text)
        return text

    def optional(self, text: str | None, cap: int | None = None, keep_tail: bool = False) -> str | None:
        """``text`` redacted, and cut back to ``cap`` characters (a marker may be longer than what it replaced,
        and the field's limit still holds); ``keep_tail`` for logs, whose end is where the failure is."""
        if text is None:
            return None
        out = self(text)
        if cap is not None and len(out) > cap:
            out = out[-cap:] if keep_tail else out[:cap]
        return out

    def values(self, mapping: Mapping[str, str] | None, cap: int | None = None) -> dict[str, str] | None:
        """A label or annotation map with its values redacted (keys name things; they stay)."""
        return None if mapping is None else {k: self.optional(v, cap) or "" for k, v in mapping.items()}

    def texts(self, items: Sequence[str] | None, cap: int | None = None) -> list[str] | None:
        return None if items is None else [self.optional(t, cap) or "" for t in items]

    def alert(self, alert: Alert | None) -> Alert | None:
        if alert is None:
            return None
        return alert.model_copy(update={
            "labels": self.values(alert.labels, MAX_LABEL_VALUE),
            "annotations": self.values(alert.annotations, MAX_ANNOTATION_VALUE),
            "host": self.optional(alert.host, MAX_NAME), "device": self.optional(alert.device, MAX_NAME),
            "value": self.optional(alert.value, MAX_SHORT),
            "generator_url": self.optional(alert.generator_url, MAX_URL),
        })

    def script_result(self, result: ScriptResult | None) -> ScriptResult | None:
        if result is None:
            return None
        history = [self._attempt(h) for h in result.history] if result.history is not None else None
        return result.model_copy(update={
            "error_message": self.optional(result.error_message, MAX_ERROR),
            "logs_excerpt": self.optional(result.logs_excerpt, MAX_LOGS, keep_tail=True),
            "history": history,
        })

    def _attempt(self, record: AttemptRecord) -> AttemptRecord:
        return record.model_copy(update={"error_message": self.optional(record.error_message, _HISTORY_ERROR)})

    def request(self, request: AnalysisRequest) -> AnalysisRequest:
        """The job as a worker and its LLM may see it. Fetch URLs (report, screenshots) stay as they are."""
        return request.model_copy(update={
            "alert": self.alert(request.alert), "script_result": self.script_result(request.script_result),
        })

    def evidence(self, items: Sequence[EvidenceItem] | None) -> list[EvidenceItem]:
        """Evidence summaries as users see them (a silence's comment, an alert's labels)."""
        return [item.model_copy(update={"summary": self.optional(item.summary, _EVIDENCE_SUMMARY) or "",
                                        "value": self.optional(item.value, _EVIDENCE_VALUE)})
                for item in items or []]

    def verdict(self, verdict: Verdict) -> Verdict:
        """A verdict's text (an LLM may quote what it saw in a screenshot or a report page)."""
        return verdict.model_copy(update={
            "reason": self.optional(verdict.reason, MAX_REASON), "title": self.optional(verdict.title, MAX_SHORT),
            "next_steps": self.texts(verdict.next_steps, _NEXT_STEP),
        })


def _replace(rule: _Rule, match: re2._Match) -> str:
    whole = match.group(0)
    if not whole:
        return whole
    if rule.keep_prefix:
        prefix = match.group(1) or ""
        # Redacted before (by a more specific rule, or an earlier pass): keep its more telling marker.
        return whole if whole[len(prefix):].startswith("[REDACTED") else prefix + rule.token
    if rule.regex.groups and match.group(1) is not None:
        start, end = match.start(1) - match.start(0), match.end(1) - match.start(0)
        return whole[:start] + rule.token + whole[end:]
    return rule.token


@functools.lru_cache(maxsize=64)
def _cached(patterns: tuple[str, ...]) -> Redactor:
    return Redactor(patterns)


def redactor(patterns: Iterable[str] | None = None) -> Redactor:
    """The redactor for a pool's patterns (compiled once per distinct list); the built-ins alone for none."""
    return _cached(tuple(patterns or ()))


BUILTIN = redactor()
