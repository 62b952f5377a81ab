"""Time helpers shared by every layer: one clock, one RFC 3339 format."""

from __future__ import annotations

import datetime as dt


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def rfc3339(t: dt.datetime, *, compact: bool = False) -> str:
    """Microsecond RFC 3339 in UTC (naive times are taken as UTC).

    Queue order after a rebuild comes from these timestamps, so the operator keeps the microseconds;
    ``compact`` drops a zero fraction, for names and labels people read.
    """
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    text = t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return text.replace(".000000Z", "Z") if compact else text


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
