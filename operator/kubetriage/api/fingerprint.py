"""Dedup keys: a fingerprint for TriageJobs that do not bring their own, and the scope it dedups in.

Two alerts are "the same" when their name and identifying labels match; two
script failures when the script, test case and the error text *with numbers,
ids, hex and URLs stripped* match, so a retried run with a new request id is
still recognised.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

# Labels that change between otherwise identical notifications.
_VOLATILE_LABELS = frozenset({"flaps_last_hour", "flap_count", "value", "timestamp", "pod_template_hash"})

_NORMALISERS = [
    (re.compile(r"https?://\S+"), "<url>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I), "<uuid>"),
    (re.compile(r"\b0x[0-9a-f]+\b|\b[0-9a-f]{12,}\b", re.I), "<hex>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
]


def normalise_text(text: str, limit: int = 4096) -> str:
    """Text with its run-specific parts replaced by placeholders (bounded: untrusted input)."""
    out = text[:limit].lower()
    for pattern, repl in _NORMALISERS:
        out = pattern.sub(repl, out)
    return out.strip()


def derive(spec: dict[str, Any]) -> str:
    """A stable fingerprint for a TriageJob spec (wire form)."""
    source = spec.get("source") or {}
    if source.get("fingerprint"):
        return str(source["fingerprint"])
    h = hashlib.sha256()
    if source.get("type") == "alert":
        alert = spec.get("alert") or {}
        labels = {k: v for k, v in (alert.get("labels") or {}).items() if k not in _VOLATILE_LABELS}
        h.update(b"alert\0" + str(alert.get("name", "")).encode())
        for key in sorted(labels):
            h.update(f"\0{key}={labels[key]}".encode())
        h.update(f"\0{alert.get('host', '')}\0{alert.get('device', '')}\0{alert.get('status', 'firing')}".encode())
    else:
        sr = spec.get("scriptResult") or {}
        h.update(b"script\0" + str(sr.get("scriptName", "")).encode())
        h.update(b"\0" + str(sr.get("testCase", "")).encode())
        h.update(b"\0" + normalise_text(str(sr.get("errorMessage", ""))).encode())
    return "sha256:" + h.hexdigest()[:40]


def dedup_scope(namespace: str, spec: dict[str, Any], identity_labels: Iterable[str]) -> str:
    """Where a fingerprint counts: the namespace, the source type and the target's identity.

    A fingerprint is only a caller's claim (``source.fingerprint`` is free to set), so two jobs are
    duplicates only when they also share the namespace, the kind of source (an alert never inherits a
    script result's verdict) and the identity of the target: the values of the identity labels for an
    alert, the script and test case for a script result.
    """
    source = spec.get("source") or {}
    kind = str(source.get("type") or "")
    h = hashlib.sha256()
    if kind == "alert":
        alert = spec.get("alert") or {}
        labels = alert.get("labels") or {}
        h.update(str(alert.get("name", "")).encode())
        for key in sorted(set(identity_labels)):
            if key in labels:
                h.update(f"\0{key}={labels[key]}".encode())
        h.update(f"\0host={alert.get('host') or ''}".encode())
    else:
        sr = spec.get("scriptResult") or {}
        h.update(f"{sr.get('scriptName', '')}\0{sr.get('testCase', '')}".encode())
    return f"{namespace}:{kind}:{h.hexdigest()[:16]}"
