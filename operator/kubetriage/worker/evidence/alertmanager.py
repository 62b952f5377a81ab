"""Alertmanager evidence (API v2): what else fires now alongside the alert, and who silenced it.

Co-firing alerts are those in the same notification group as this alert, and those in the same
namespace (same ``cluster`` too, when both alerts carry one). An alert without a ``namespace`` label
is compared by ``cluster`` instead. ``cluster`` alone is not used when a namespace is known: it is
often an external label on every alert of an installation, and would make everything co-fire.

Silences count when they are active and their matchers cover this alert's labels (Alertmanager's own
semantics: a matcher on a missing label sees the empty string; regular expressions are RE2, anchored),
or when Alertmanager lists them in the alert's ``silencedBy``. A silence created by kubetriage
(``createdBy`` starting with ``kubetriage``) is marked so: it never counts as a human's judgement.

Only an ``AlertmanagerSummary`` leaves this module: counts, at most ``MAX_NAMES`` alert names, the
severities, the number of distinct services, and at most ``MAX_SILENCES`` silences.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import re2

from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.evidence import ALERTMANAGER, MAX_NAMES, AlertmanagerSummary, Evidence, Silence
from kubetriage.api.regex import compile_re2
from kubetriage.worker.evidence.base import EndpointClient, GatherFailed, label_set

GROUPS_BYTES = 8 << 20
SILENCES_BYTES = 4 << 20
MAX_SILENCES = 5
MAX_ALERTS = 20000
KUBETRIAGE_AUTHOR = "kubetriage"
# The label that names a service, first present wins.
SERVICE_LABELS = ("service", "app", "app_kubernetes_io_name", "job")


def service_of(labels: Mapping[str, str]) -> str | None:
    return next((labels[k] for k in SERVICE_LABELS if labels.get(k)), None)


def matcher_matches(matcher: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One Alertmanager matcher against a label set; an invalid one matches nothing."""
    name, value = matcher.get("name"), matcher.get("value")
    if not isinstance(name, str) or not isinstance(value, str):
        return False
    have = labels.get(name, "")
    if matcher.get("isRegex"):
        try:
            hit = compile_re2(f"^(?:{value})$").fullmatch(have) is not None
        except re2.error:
            return False
    else:
        hit = have == value
    return hit if matcher.get("isEqual", True) else not hit


def covers(silence: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    matchers = silence.get("matchers")
    if not isinstance(matchers, list) or not matchers:
        return False
    return all(isinstance(m, dict) and matcher_matches(m, labels) for m in matchers)


def _labels(alert: Any) -> dict[str, str]:
    raw = alert.get("labels") if isinstance(alert, dict) else None
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


class AlertmanagerGatherer:
    source = ALERTMANAGER

    def __init__(self, client: EndpointClient) -> None:
        self.client = client

    def key(self, request: AnalysisRequest) -> str:
        return ""  # the fingerprint already covers the alert's name and labels

    async def aclose(self) -> None:
        await self.client.aclose()

    async def gather(self, request: AnalysisRequest, now: float) -> Evidence | None:
        if request.alert is None:
            return None
        groups, silences = await asyncio.gather(
            self.client.get_json("/api/v2/alerts/groups", [], GROUPS_BYTES),
            self.client.get_json("/api/v2/silences", [], SILENCES_BYTES))
        if not isinstance(groups, list) or not isinstance(silences, list):
            raise GatherFailed("Alertmanager answered something that is not a list", "invalid")
        summary = summarise(label_set(request), groups, silences)
        return Evidence(source=ALERTMANAGER, value=summary.model_dump())


def summarise(mine: Mapping[str, str], groups: list[Any], silences: list[Any]) -> AlertmanagerSummary:
    """The summary analyzers see, from ``/api/v2/alerts/groups`` and ``/api/v2/silences``. Pure."""
    namespace, cluster = mine.get("namespace"), mine.get("cluster")
    by_fp: dict[str, dict[str, Any]] = {}
    mine_fps: set[str] = set()
    group_fps: set[str] = set()
    silenced_by: set[str] = set()
    seen = 0
    for group in groups:
        alerts = group.get("alerts") if isinstance(group, dict) else None
        if not isinstance(alerts, list):
            continue
        fps = []
        in_group = False
        for alert in alerts:
            seen += 1
            if seen > MAX_ALERTS:
                raise GatherFailed(f"Alertmanager holds more than {MAX_ALERTS} alerts; not summarised", "too_large")
            if not isinstance(alert, dict):
                continue
            labels = _labels(alert)
            fp = str(alert.get("fingerprint") or sorted(labels.items()))
            by_fp[fp] = alert
            fps.append(fp)
            if labels.get("alertname") == mine.get("alertname") and all(labels.get(k) == v for k, v in mine.items()):
                in_group = True
                mine_fps.add(fp)
                status = alert.get("status") if isinstance(alert.get("status"), dict) else {}
                silenced_by.update(str(s) for s in status.get("silencedBy") or [])
        if in_group:
            group_fps.update(fps)
    co: list[dict[str, str]] = []
    for fp, alert in by_fp.items():
        if fp in mine_fps:
            continue
        labels = _labels(alert)
        same_ns = bool(namespace) and labels.get("namespace") == namespace and (
            not cluster or not labels.get("cluster") or labels.get("cluster") == cluster)
        same_cluster = not namespace and bool(cluster) and labels.get("cluster") == cluster
        if fp in group_fps or same_ns or same_cluster:
            co.append(labels)
    names = sorted({labels.get("alertname", "?") for labels in co})
    severities: dict[str, int] = {}
    for labels in co:
        sev = labels.get("severity") or "none"
        severities[sev[:32]] = severities.get(sev[:32], 0) + 1
    services = {s for labels in co if (s := service_of(labels))}
    found: list[Silence] = []
    for silence in silences:
        if not isinstance(silence, dict) or (silence.get("status") or {}).get("state") != "active":
            continue
        if str(silence.get("id")) not in silenced_by and not covers(silence, mine):
            continue
        author = str(silence.get("createdBy") or "")
        found.append(Silence(created_by=author[:256], comment=str(silence.get("comment") or "")[:1024],
                             by_kubetriage=author.strip().lower().startswith(KUBETRIAGE_AUTHOR)))
    # a person's silence first: it is the one that counts, and the one the summary names
    found.sort(key=lambda s: s.by_kubetriage)
    return AlertmanagerSummary(
        co_firing=len(co), co_firing_alerts=names[:MAX_NAMES], co_firing_services=len(services),
        co_firing_severities=dict(sorted(severities.items(), key=lambda kv: -kv[1])[:MAX_NAMES]),
        silences=found[:MAX_SILENCES])
