"""A real Alertmanager delivers its webhooks to ingest; TriageJobs appear on the real API server.

Alertmanager is configured to be noisy on purpose (group_wait 0s, group_interval
1s, repeat_interval 2s): it re-sends every group again and again, which is the
traffic the deterministic job names must absorb.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from devharness import devenv
from kubetriage.api.keys import ALERT_FINGERPRINT_LABEL, ALERT_STATUS_LABEL, RESOLVED_AT
from tests.ingestenv import IngestEnv
from tests.waiting import eventually

pytestmark = pytest.mark.cluster


def _config(env: IngestEnv, token_file: Path, wrong_token_file: Path) -> str:
    hook = f"{env.url}/v1/alertmanager"
    return f"""
route:
  receiver: kubetriage
  group_by: ['alertname', 'instance']
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 2s
  routes:
  - matchers: ['team="payments"']
    receiver: kubetriage-payments
  - matchers: ['team="intruder"']
    receiver: wrong-token
receivers:
- name: kubetriage
  webhook_configs:
  - url: {hook}
    send_resolved: true
    http_config:
      authorization: {{type: Bearer, credentials_file: {token_file}}}
- name: kubetriage-payments
  webhook_configs:
  - url: {hook}?namespace={env.ns2}
    send_resolved: true
    http_config:
      authorization: {{type: Bearer, credentials_file: {token_file}}}
- name: wrong-token
  webhook_configs:
  - url: {hook}
    http_config:
      authorization: {{type: Bearer, credentials_file: {wrong_token_file}}}
"""


@pytest.fixture
async def stack(cluster: devenv.ControlPlane, tmp_path: Path) -> AsyncIterator[tuple[IngestEnv, devenv.Alertmanager]]:
    async with IngestEnv(cluster, tmp_path / "ingest") as env:
        token_file, wrong = tmp_path / "token", tmp_path / "wrong-token"
        token_file.write_text(env.token)
        wrong.write_text("definitely-not-the-token")
        am = devenv.Alertmanager(tmp_path / "alertmanager", _config(env, token_file, wrong))
        # Alertmanager's start blocks on a readiness poll: run it off the loop that serves ingest
        await asyncio.to_thread(am.start)
        try:
            yield env, am
        finally:
            await asyncio.to_thread(am.stop)


def _now(offset: float = 0) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _post_alerts(am: devenv.Alertmanager, alerts: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{am.url}/api/v2/alerts", json=alerts)
        assert resp.status_code == 200, resp.text


def _alert(name: str, starts: str, ends: str | None = None, **labels: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": f"{name} on {labels.get('instance', '?')}", "runbook": "https://runbooks/x"},
        "startsAt": starts,
        "generatorURL": "http://prometheus.example:9090/graph?g0.expr=up%3D%3D0",
    }
    if ends:
        out["endsAt"] = ends
    return out


def _deliveries() -> float:
    """Webhook requests ingest answered with 2xx (this process's counter)."""
    return sum(REGISTRY.get_sample_value("kubetriage_ingest_requests_total",
                                         {"route": "alertmanager", "code": code}) or 0 for code in ("200", "201"))


def _am_metric(am: devenv.Alertmanager, name: str, integration: str = "webhook") -> float:
    text = urllib.request.urlopen(f"{am.url}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'integration="{integration}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _by_fingerprint(env: IngestEnv, ns: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for job in await env.jobs(ns):
        out.setdefault(job["metadata"]["labels"][ALERT_FINGERPRINT_LABEL], []).append(job)
    return out


async def test_alertmanager_webhooks_become_triagejobs_once_and_resolve(
        stack: tuple[IngestEnv, devenv.Alertmanager]) -> None:
    env, am = stack
    started = _now(-30)
    api_down = _alert("ApiDown", started, instance="api-1:443", severity="critical", job="blackbox")
    payments = _alert("QueueBacklog", started, instance="mq-1", severity="warning", team="payments",
                      region="zürich-öst")
    await _post_alerts(am, [api_down, payments])

    jobs = await eventually(lambda: _jobs_in(env, {env.ns: 1, env.ns2: 1}), "one job per alert, routed by namespace")
    (job,) = jobs[env.ns]
    assert job["metadata"]["name"].startswith("am-apidown-")
    spec = job["spec"]
    assert spec["source"]["type"] == "alert" and spec["priorityClassName"] == "kubetriage-p1"
    assert spec["alert"]["labels"] == api_down["labels"]
    assert spec["alert"]["annotations"] == api_down["annotations"]
    assert spec["alert"]["generatorURL"] == api_down["generatorURL"] and spec["alert"]["host"] == "api-1:443"
    assert spec["alert"]["status"] == "firing"
    assert job["metadata"]["labels"][ALERT_STATUS_LABEL] == "firing"
    assert job["metadata"]["annotations"]["kubetriage.io/alert-group-key"].startswith("{}")
    (pjob,) = jobs[env.ns2]
    assert pjob["spec"]["priorityClassName"] == "kubetriage-p2" and pjob["metadata"]["name"].startswith("am-queueb")
    # ingest computes the fingerprint from the labels (it does not trust the sender's) and gets Alertmanager's own,
    # so the names of real alerts are what they were
    async with httpx.AsyncClient() as client:
        held = (await client.get(f"{am.url}/api/v2/alerts")).json()
    sent = {a["labels"]["alertname"]: a["fingerprint"] for a in held}
    for j, alertname in ((job, "ApiDown"), (pjob, "QueueBacklog")):
        assert j["metadata"]["labels"][ALERT_FINGERPRINT_LABEL] == sent[alertname], (alertname, sent)
        assert f"-{sent[alertname]}-" in j["metadata"]["name"]

    # Alertmanager re-sends (repeat_interval) and Prometheus re-posts the same alerts: nothing new
    seen = _deliveries()
    for _ in range(3):
        await _post_alerts(am, [api_down, payments])
    await eventually(lambda: _deliveries() >= seen + 4, "at least four more webhook deliveries")
    jobs = await _jobs_in(env, {env.ns: 1, env.ns2: 1})
    assert jobs, "a re-send created another job"
    assert _am_metric(am, "alertmanager_notifications_failed_total") == 0

    # resolution reaches the TriageJob (metadata; the spec stays as created)
    await _post_alerts(am, [_alert("ApiDown", started, _now(), instance="api-1:443", severity="critical",
                                   job="blackbox")])

    async def resolved() -> dict[str, Any] | None:
        current = await env.job(job["metadata"]["name"])
        return current if current["metadata"]["labels"][ALERT_STATUS_LABEL] == "resolved" else None

    current = await eventually(resolved, "the resolved notification")
    assert current["metadata"]["annotations"][RESOLVED_AT] > started
    assert current["spec"] == job["spec"]

    # the same alert firing again is a new episode: a second job, firing
    await _post_alerts(am, [_alert("ApiDown", _now(), instance="api-1:443", severity="critical", job="blackbox")])
    fp = job["metadata"]["labels"][ALERT_FINGERPRINT_LABEL]

    async def second_episode() -> list[dict[str, Any]] | None:
        episodes = (await _by_fingerprint(env, env.ns)).get(fp, [])
        return episodes if len(episodes) == 2 else None

    episodes = await eventually(second_episode, "a job for the second firing episode")
    new = next(j for j in episodes if j["metadata"]["name"] != job["metadata"]["name"])
    assert new["metadata"]["labels"][ALERT_STATUS_LABEL] == "firing" and new["spec"]["alert"]["status"] == "firing"


async def _jobs_in(env: IngestEnv, expected: dict[str, int]) -> dict[str, list[dict[str, Any]]] | None:
    found = {ns: await env.jobs(ns) for ns in expected}
    return found if all(len(found[ns]) == n for ns, n in expected.items()) else None


async def test_alertmanager_with_a_wrong_token_creates_nothing(stack: tuple[IngestEnv, devenv.Alertmanager]) -> None:
    env, am = stack
    await _post_alerts(am, [_alert("Sneaky", _now(-5), instance="x", team="intruder")])
    await eventually(lambda: _am_metric(am, "alertmanager_notifications_failed_total") >= 1,
                     "Alertmanager to report the refused delivery")
    for ns in (env.ns, env.ns2, env.team_ns):
        assert await env.jobs(ns) == []
    assert await env.healthy()
