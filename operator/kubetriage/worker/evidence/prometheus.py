"""Prometheus evidence: the alert's own expression, now and over [startsAt - 30m, now], as a summary.

The expression comes from ``spec.alert.expr`` or the ``g0.expr`` parameter of the alert's
``generatorURL``. Only the host of the URL is ever ignored: the query goes to the pool's configured
Prometheus and nowhere else, whatever host the alert names. The expression is untrusted (whoever can
create a TriageJob chooses it), so:

* it is bounded in length and may not carry control characters;
* unless the pool sets ``anyExpression``, it must be the expression of an alerting rule this Prometheus
  has loaded under the alert's name (``/api/v1/rules``): nobody can run a query of their own with the
  pool's credentials. A job without an expression gets its rule's, when exactly one rule has that name;
* the window is at most ``MAX_WINDOW`` long and the range query at most ``MAX_POINTS`` points per series;
  Prometheus is told the timeout too (``timeout=``), and answers are read under a byte cap.

Only a ``PrometheusSummary`` leaves this module: whether it is firing now, the share of the window the
expression was true, the number of series, min/max/last, the seconds since it last changed, and after
how long it recovered on its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.evidence import PROMETHEUS, Evidence, PrometheusSummary
from kubetriage.api.models import MAX_EXPR
from kubetriage.worker.evidence.base import EndpointClient, GatherFailed

LOOKBACK = 30 * 60  # the window starts this long before the alert did
MAX_WINDOW = 24 * 3600 + LOOKBACK  # an alert that started days ago is looked at over its last day
MAX_POINTS = 500
MAX_SERIES = 1000
INSTANT_BYTES = 1 << 20
RANGE_BYTES = 4 << 20
RULES_BYTES = 4 << 20
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def expression_of(request: AnalysisRequest) -> str | None:
    """The job's expression: ``spec.alert.expr``, else ``g0.expr`` of ``generatorURL`` (its host is unused)."""
    alert = request.alert
    if alert is None:
        return None
    if alert.expr and alert.expr.strip():
        return alert.expr.strip()
    if not alert.generator_url:
        return None
    try:
        query = urllib.parse.urlsplit(alert.generator_url).query
    except ValueError:
        return None
    found = urllib.parse.parse_qs(query, max_num_fields=64).get("g0.expr")
    return found[0].strip() if found and found[0].strip() else None


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def check_expression(expr: str) -> None:
    if len(expr) > MAX_EXPR:
        raise GatherFailed(f"the alert's expression is {len(expr)} characters, over the {MAX_EXPR}-character "
                           "limit; not queried", "invalid")
    if _CONTROL.search(expr):
        raise GatherFailed("the alert's expression contains control characters; not queried", "invalid")


class PrometheusGatherer:
    source = PROMETHEUS

    def __init__(self, client: EndpointClient, *, any_expression: bool = False, rules_ttl: float = 30) -> None:
        self.client = client
        self.any_expression = any_expression
        self.rules_ttl = rules_ttl
        self._rules: tuple[float, dict[str, list[str]]] | None = None

    def key(self, request: AnalysisRequest) -> str:
        return expression_of(request) or ""

    async def aclose(self) -> None:
        await self.client.aclose()

    async def gather(self, request: AnalysisRequest, now: float) -> Evidence | None:
        if request.alert is None:
            return None
        expr = expression_of(request)
        if expr is not None:
            check_expression(expr)
        if not self.any_expression:
            expr = await self._rule_expression(request.alert.name, expr)
        if expr is None:
            return None  # not an alert of a Prometheus rule: nothing to ask
        start, end, step = window(request.alert.starts_at, now)
        # Prometheus gives up at the same time we do, instead of evaluating for nobody
        timeout = f"{max(1, math.floor(self.client.timeout))}s"
        instant, matrix = await asyncio.gather(
            self._query("/api/v1/query", [("query", expr), ("time", _ts(end)), ("timeout", timeout)],
                        INSTANT_BYTES),
            self._query("/api/v1/query_range", [("query", expr), ("start", _ts(start)), ("end", _ts(end)),
                                                ("step", f"{step}s"), ("timeout", timeout)], RANGE_BYTES))
        summary = summarise(_series(instant), _series(matrix), start, end, step)
        return Evidence(source=PROMETHEUS, value=summary.model_dump(exclude_none=True))

    async def _query(self, path: str, params: list[tuple[str, str]], max_bytes: int) -> dict[str, Any]:
        body = await self.client.get_json(path, params, max_bytes)
        if not isinstance(body, dict) or body.get("status") != "success" or not isinstance(body.get("data"), dict):
            raise GatherFailed("Prometheus answered without a result", "invalid")
        return body["data"]

    async def _rule_expression(self, name: str, expr: str | None) -> str | None:
        """The expression to run when only alerting rules' expressions may run (the default)."""
        rules = (await self._alerting_rules()).get(name, [])
        field = self.client.endpoint.field
        if expr is None:
            if len(rules) > 1:
                raise GatherFailed(f"{len(rules)} alerting rules are named {name!r} and the job carries no "
                                   "expression to pick one (spec.alert.expr or generatorURL)", "invalid")
            return rules[0] if rules else None
        if any(_same(expr, rule) for rule in rules):
            return expr
        if not rules:
            raise GatherFailed(f"Prometheus has no alerting rule named {name!r}, so the job's expression was not "
                               f"queried (only rules' expressions run; {field}.anyExpression: true runs any)",
                               "refused")
        raise GatherFailed(f"the job's expression is not the one of the alerting rule {name!r} in Prometheus; not "
                           f"queried (only rules' expressions run; {field}.anyExpression: true runs any)", "refused")

    async def _alerting_rules(self) -> dict[str, list[str]]:
        """Alert name -> the expressions of the alerting rules with that name, cached ``rules_ttl`` seconds."""
        now = time.monotonic()
        if self._rules is not None and self._rules[0] > now:
            return self._rules[1]
        data = await self._query("/api/v1/rules", [("type", "alert")], RULES_BYTES)
        rules: dict[str, list[str]] = {}
        for group in data.get("groups") or []:
            for rule in (group.get("rules") or []) if isinstance(group, dict) else []:
                if isinstance(rule, dict) and rule.get("type", "alerting") == "alerting" \
                        and isinstance(rule.get("name"), str) and isinstance(rule.get("query"), str):
                    rules.setdefault(rule["name"], []).append(rule["query"])
        self._rules = (now + self.rules_ttl, rules)
        return rules


def _ts(seconds: float) -> str:
    return f"{seconds:.3f}"


Series = list[tuple[float, float]]


def _series(data: dict[str, Any]) -> list[Series]:
    """A query result as lists of (time, value); bounded in series; scalars are one series."""
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list):
        return [_points([result])]
    if not isinstance(result, list):
        raise GatherFailed(f"Prometheus answered a {kind!r} result, not a vector or matrix", "invalid")
    if len(result) > MAX_SERIES:
        raise GatherFailed(f"the expression matches {len(result)} series, over the {MAX_SERIES}-series limit; "
                           "not summarised", "too_large")
    out: list[Series] = []
    for item in result:
        if not isinstance(item, dict):
            continue
        if kind == "matrix":
            out.append(_points(item.get("values") or []))
        elif kind == "vector":
            out.append(_points([item.get("value")]))
    return out


def _points(raw: Sequence[Any]) -> Series:
    points: Series = []
    for p in raw:
        if not isinstance(p, list | tuple) or len(p) != 2:
            continue
        try:
            t, v = float(p[0]), float(p[1])
        except (TypeError, ValueError):
            continue
        points.append((t, v))
    return points


def summarise(instant: Sequence[Series], matrix: Sequence[Series], start: float, end: float,
              step: float) -> PrometheusSummary:
    """The summary analyzers see. Pure: tests feed it series directly.

    A step counts as true when any series has a point there (an alerting expression is a filter: it has a
    value exactly when the condition holds). ``since_change_s`` is the whole window when nothing changed in
    it (a lower bound); ``recovered_after_s`` is the length of the last true stretch, when it ended before now.
    """
    n = int((end - start) // step) + 1
    present = [False] * n
    values: list[float] = []
    for series in matrix:
        for t, v in series:
            i = round((t - start) / step)
            if 0 <= i < n:
                present[i] = True
            if math.isfinite(v):
                values.append(v)
    now_values = [v for series in instant for _, v in series if math.isfinite(v)]
    firing_now = bool(instant) and any(instant)
    if firing_now and not present[-1]:
        present[-1] = True  # the instant query is the authority on now
    values.extend(now_values)
    last: float | None = max(now_values) if now_values else None
    if last is None:
        stamps = [(t, v) for series in matrix for t, v in series if math.isfinite(v)]
        if stamps:
            latest = max(t for t, _ in stamps)
            last = max(v for t, v in stamps if t == latest)
    since = end - start
    for j in range(n - 2, -1, -1):
        if present[j] != present[-1]:
            since = end - (start + (j + 1) * step)
            break
    recovered: float | None = None
    if not firing_now:
        b = max((i for i in range(n) if present[i]), default=None)
        if b is not None:
            a = b
            while a > 0 and present[a - 1]:
                a -= 1
            ended = start + (b + 1) * step if b + 1 < n else end
            recovered = max(0.0, ended - (start + a * step))
    return PrometheusSummary(
        firing_now=firing_now, true_share=round(sum(present) / n, 4), series=max(len(instant), len(matrix)),
        min=min(values) if values else None, max=max(values) if values else None, last=last,
        since_change_s=round(max(0.0, since), 1), recovered_after_s=None if recovered is None else round(recovered, 1))


def window(starts_at: dt.datetime | None, now: float) -> tuple[float, float, int]:
    """(start, end, step) of the range query for an alert that started at ``starts_at``."""
    starts = starts_at.timestamp() if starts_at else now
    start = max(min(starts, now) - LOOKBACK, now - MAX_WINDOW)
    return start, now, max(1, math.ceil((now - start) / (MAX_POINTS - 1)))
