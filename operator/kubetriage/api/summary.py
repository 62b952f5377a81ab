"""The job's one-line summary (what memory matches and the audit table stores), and text hygiene for storage."""

from __future__ import annotations

from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.models import TriageJobSpec

MAX_SUMMARY_BYTES = 4096


def clean_text(value: str | None, max_chars: int | None = None, max_bytes: int | None = None) -> str | None:
    """Make untrusted text storable in both engines and bounded in size."""
    if value is None:
        return None
    # Lone surrogates cannot be encoded as UTF-8 and would make the driver raise.
    text = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    if max_chars is not None:
        text = text[:max_chars]
    if max_bytes is not None:
        encoded = text.encode("utf-8")
        if len(encoded) > max_bytes:
            text = encoded[:max_bytes].decode("utf-8", "ignore")  # never split a character
    return text


def job_summary(spec: TriageJobSpec | AnalysisRequest) -> str | None:
    """The job's text that the memory analyzer matches human verdicts against, capped like the audit column.

    The one definition: the audit table, the Redis memory list and the eval set all use it.
    """
    if spec.alert is not None:
        labels = " ".join(f"{k}={v}" for k, v in sorted((spec.alert.labels or {}).items()))
        return clean_text(f"{spec.alert.name} {labels}".strip(), max_bytes=MAX_SUMMARY_BYTES)
    if spec.script_result is not None:
        sr = spec.script_result
        parts = [sr.script_name, sr.test_case or "", sr.error_message or ""]
        return clean_text(": ".join(p for p in parts if p), max_bytes=MAX_SUMMARY_BYTES)
    return None
