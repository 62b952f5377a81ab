"""Calibrated confidence: a stated confidence should match the precision observed on labelled cases.

The offline analyzers score evidence on their own scale; ``calibrate`` maps that score to the precision
their verdicts had in that score band on the *tuning* split of the evaluation set, smoothed towards the
band's own score (``python -m bench.eval --write-calibration`` writes ``calibration.json``; the frozen
split is never used for it and only reports the calibration error). Only the reported confidence changes:
the chain's threshold still applies to the analyzers' own scores, so calibration never turns an
undecided case into a decided one. Team rules (the team's own number) and the LLM are not recalibrated.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetriage.api.models import Classification, Verdict

TABLE = Path(__file__).with_name("calibration.json")
CALIBRATED = frozenset({"rules", "memory"})
_raw = False


@contextlib.contextmanager
def raw_scores() -> Iterator[None]:
    """The analyzers' own scores, uncalibrated (to fit a new table from them)."""
    global _raw
    _raw = True
    try:
        yield
    finally:
        _raw = False


@functools.cache
def table() -> list[dict[str, Any]]:
    try:
        data = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return []
    return list(data.get("bins") or [])


def calibrate(verdict: Verdict) -> Verdict:
    if _raw or verdict.analyzer not in CALIBRATED or verdict.classification == Classification.INCONCLUSIVE:
        return verdict
    for band in table():
        if band["low"] <= verdict.confidence < band["high"]:
            return verdict.model_copy(update={"confidence": round(float(band["calibrated"]), 2)})
    return verdict
