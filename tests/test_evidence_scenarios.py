"""Evidence before the verdict, end to end, with every part real.

A small exporter on loopback serves metrics whose values the test sets; a real Prometheus scrapes it every
second and evaluates a real rule file every second; its alerts go to a real Alertmanager (group_wait 0),
whose webhook reaches the operator's ingest endpoint (``/v1/alertmanager``); the TriageJobs it creates are
analysed by the pools' workers, which ask that Prometheus (the pool's, never the generatorURL's host) and
that Alertmanager before the rules decide. One timeline runs every scenario side by side (the blip's 30
seconds are spent waiting for the others), in one fixture; each test then checks one scenario:

- a 30-second blip that recovered by itself: noise, citing the recovery (analysed after it resolved: its
  pool appears only then, as a pool with a backlog would reach it late);
- a condition that has held for 45 minutes (written into Prometheus's TSDB with promtool before the start,
  then scraped live): valid;
- three other services alerting in the same namespace: valid;
- a silence a human set on the alert: cited (kubetriage's own silence never is);
- the pool's Prometheus down, or slow (a delaying proxy in front of the real one): the job still gets a
  verdict, which says what it could not check, bounded by the pool's evidence timeout;
- a generatorURL naming another host: that host sees no request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devharness import devenv
from kubetriage.api.evidence import AlertmanagerSummary, PrometheusSummary
from kubetriage.infra.kube import ApiError
from tests.localhttp import LocalHTTPServer, Route
from tests.pipeline import Pipeline, alert_spec
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

BLIP_SECONDS = 30
TOKEN = "scenario-ingest-token"
RULES = """
groups:
- name: scenarios
  interval: 1s
  rules:
  - alert: CheckoutErrorBlip
    expr: blip_errors > 0
    labels: {severity: warning, scenario: blip}
  - alert: PaymentsDown
    expr: stable_down > 0
    labels: {severity: warning, scenario: stable}
  - alert: ServiceErrors
    expr: svc_errors > 0
    labels: {severity: warning, scenario: cofiring}
  - alert: ApiLatencyHigh
    expr: api_latency_high > 0
    labels: {severity: warning, scenario: cofiring}
  - alert: ReportsQueueStuck
    expr: queue_stuck > 0
    labels: {severity: warning, scenario: silence}
"""


def metrics_text(blip: int) -> bytes:
    return f"""# TYPE blip_errors gauge
blip_errors{{namespace="blip",service="checkout"}} {blip}
# TYPE stable_down gauge
stable_down{{namespace="stable",service="payments"}} 1
# TYPE svc_errors gauge
svc_errors{{namespace="shop",service="cart"}} 1
svc_errors{{namespace="shop",service="search"}} 1
svc_errors{{namespace="shop",service="orders"}} 1
# TYPE api_latency_high gauge
api_latency_high{{namespace="shop",service="api"}} 1
# TYPE queue_stuck gauge
queue_stuck{{namespace="batch",service="reports"}} 1
""".encode()


def backfill(instance: str, now: float) -> str:
    """stable_down = 1 every 15 s for the last 45 minutes: the same series the live scrape continues."""
    lines = ["# TYPE stable_down gauge"]
    labels = f'instance="{instance}",job="exporter",namespace="stable",service="payments"'
    lines += [f"stable_down{{{labels}}} 1 {t}" for t in range(int(now) - 45 * 60, int(now) - 5, 15)]
    return "\n".join([*lines, "# EOF"]) + "\n"


def am_config(hook: str, token_file: Path) -> str:
    auth = f"http_config: {{authorization: {{type: Bearer, credentials_file: {token_file}}}}}"
    return f"""
route:
  receiver: live
  group_by: ['alertname', 'namespace']
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
  routes:
  - matchers: ['scenario=~"blip|silence"']
    receiver: late
receivers:
- name: live
  webhook_configs:
  - {{url: '{hook}&pool=live', send_resolved: true, {auth}}}
- name: late
  webhook_configs:
  - {{url: '{hook}&pool=late', send_resolved: true, {auth}}}
"""


class SlowProxy:
    """A TCP proxy on loopback that waits ``delay`` seconds before it forwards a connection: a slow network
    in front of the real Prometheus."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port, self.delay = upstream_port, delay
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> SlowProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        try:
            await asyncio.sleep(self.delay)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def evidence_spec(prom_url: str, am_url: str, **extra: Any) -> dict[str, Any]:
    local = {"allowHTTP": True, "allowPrivateEndpoints": True}
    return {"prometheus": {"url": prom_url, **local}, "alertmanager": {"url": am_url, **local}, **extra}


@dataclasses.dataclass
class Outcome:
    jobs: dict[str, dict[str, Any]]  # by scenario
    pipeline: Pipeline
    decoy_paths: list[str]
    slow_connections: int
    wide: str
    describe: str


def scenario_of(job: dict[str, Any]) -> str:
    alert = (job.get("spec") or {}).get("alert") or {}
    labels = alert.get("labels") or {}
    if labels.get("scenario") == "cofiring":
        return f"cofiring-{labels.get('service')}"
    return labels.get("scenario") or job["metadata"]["name"]


def kubetriage_cli(pipeline: Pipeline, *args: str) -> str:
    env = {**os.environ, "KUBECONFIG": str(pipeline.cluster.kubeconfig)}
    out = subprocess.run([sys.executable, "-m", "kubetriage", *args, "-n", pipeline.ns], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
async def outcome(cluster: devenv.ControlPlane, redis_server: devenv.Redis,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Outcome]:
    root = tmp_path_factory.mktemp("evidence")
    exporter = LocalHTTPServer().start()
    decoy = LocalHTTPServer().start()
    exporter.route("/metrics", Route(metrics_text(blip=1), headers={"Content-Type": "text/plain"}))
    token_file = root / "token"
    token_file.write_text(TOKEN)
    ingest_port = devenv.free_port()
    stack: list[Any] = []
    async with Pipeline(cluster, redis_server, root, f"sqlite:///{root / 'verdicts.db'}") as p:
        try:
            am = devenv.Alertmanager(root / "alertmanager", am_config(
                f"http://127.0.0.1:{ingest_port}/v1/alertmanager?namespace={p.ns}", token_file))
            await asyncio.to_thread(am.start)
            stack.append(am)
            instance = f"127.0.0.1:{exporter.port}"
            prom = devenv.Prometheus(root / "prometheus", {"exporter": [instance]}, rules=RULES,
                                     alertmanagers=[am.url.removeprefix("http://")],
                                     backfill=backfill(instance, time.time()))
            await asyncio.to_thread(prom.start)
            stack.append(prom)
            blip_started = time.monotonic()
            slow = await SlowProxy(prom.port, delay=60).start()
            stack.append(slow)
            down = f"http://127.0.0.1:{devenv.free_port()}"  # nothing listens there
            p.start_operator(ingest_port=ingest_port, ingest_token=TOKEN, ingest_namespace=p.ns)
            live = evidence_spec(prom.url, am.url)
            await p.pool("live", evidence=live)
            await p.pool("down", evidence=evidence_spec(down, am.url))
            await p.pool("slow", evidence=evidence_spec(slow.url, am.url, timeoutSeconds=1, budgetSeconds=3))

            # every alert becomes a job through Alertmanager and ingest
            seen: set[str] = set()

            async def ingested() -> dict[str, dict[str, Any]] | None:
                try:
                    found = {scenario_of(j): j for j in await p.jobs()}
                except ApiError as exc:  # 429 "storage is (re)initializing" right after the CRDs were applied
                    if exc.status not in (429, 503):
                        raise
                    return None
                seen.update(found)
                want = {"blip", "stable", "silence", "cofiring-api", "cofiring-cart", "cofiring-search",
                        "cofiring-orders"}
                return found if want <= set(found) else None

            jobs = await eventually(ingested, "a job for every alert Prometheus fired", timeout=60,
                                    context=lambda: f"jobs seen: {sorted(seen)}")
            assert jobs["blip"]["spec"]["alert"]["generatorURL"].startswith(prom.url)

            # a person silences the stuck queue (and kubetriage's own silence matches it too)
            async with httpx.AsyncClient() as client:
                for author, comment in (("alice", "failover drill OPS-4711, queue drained by hand"),
                                        ("kubetriage", "auto-silenced by kubetriage")):
                    resp = await client.post(f"{am.url}/api/v2/silences", json={
                        "matchers": [{"name": "service", "value": "reports", "isRegex": False, "isEqual": True}],
                        "startsAt": dt.datetime.now(dt.UTC).isoformat(),
                        "endsAt": (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat(),
                        "createdBy": author, "comment": comment})
                    assert resp.status_code == 200, resp.text

            # jobs created directly: the same rule, for pools whose Prometheus is down or slow, and one whose
            # generatorURL names another host
            expr = urllib.parse.urlencode({"g0.expr": "stable_down > 0"})
            for name, pool in (("down", "down"), ("slow", "slow"), ("decoy", "live")):
                await p.job(name, alert_spec("PaymentsDown", severity="warning", labels={
                    "namespace": "stable", "service": "payments", "scenario": name},
                    generatorURL=f"{decoy.url('/graph')}?{expr}", spec={"pool": pool}))

            names = [jobs[s]["metadata"]["name"] for s in ("stable", "cofiring-api", "cofiring-cart",
                                                          "cofiring-search", "cofiring-orders")]
            await p.wait_terminal([*names, "down", "slow", "decoy"], timeout=60)

            # the blip ends after BLIP_SECONDS; its job is analysed once Alertmanager said it resolved
            await asyncio.sleep(max(0.0, blip_started + BLIP_SECONDS - time.monotonic()))
            exporter.route("/metrics", Route(metrics_text(blip=0), headers={"Content-Type": "text/plain"}))

            async def resolved() -> bool:
                job = await p.get(jobs["blip"]["metadata"]["name"])
                return job["metadata"]["labels"].get("kubetriage.io/alert-status") == "resolved"

            await p.wait(resolved, "Alertmanager's resolved notification for the blip", timeout=30)
            await p.pool("late", evidence=live)
            late = [jobs[s]["metadata"]["name"] for s in ("blip", "silence")]
            await p.wait_terminal(late, timeout=60)
            final = {scenario_of(j): j for j in await p.jobs()}
            yield Outcome(final, p, decoy.paths(), slow.connections,
                          await asyncio.to_thread(kubetriage_cli, p, "get", "-o", "wide"),
                          await asyncio.to_thread(kubetriage_cli, p, "describe", jobs["blip"]["metadata"]["name"]))
        finally:
            for part in reversed(stack):
                if isinstance(part, SlowProxy):
                    await part.stop()
                else:
                    await asyncio.to_thread(part.stop)
            exporter.stop()
            decoy.stop()


def verdict(job: dict[str, Any]) -> dict[str, Any]:
    assert job["status"]["phase"] == "Succeeded", job["status"]
    return job["status"]["verdict"]


def evidence(job: dict[str, Any], source: str) -> dict[str, Any]:
    found = [e for e in job["status"].get("evidence") or [] if e["source"] == source]
    assert len(found) == 1, job["status"].get("evidence")
    return found[0]


def test_a_blip_that_recovered_is_noise_and_the_recovery_is_cited(outcome: Outcome) -> None:
    job = outcome.jobs["blip"]
    v = verdict(job)
    assert v["classification"] == "false_positive", v
    assert "recovered on its own after" in v["reason"]
    prom = evidence(job, "prometheus")
    assert prom["value"] == "recovered" and "not firing now" in prom["summary"]
    # the audit row carries the same evidence
    (row,) = [r for r in outcome.pipeline.audit_rows() if r["job_uid"] == job["metadata"]["uid"]]
    assert {e["source"] for e in json.loads(row["evidence"])} >= {"prometheus", "alertmanager", "history"}
    assert row["identity"] and row["identity"].startswith(f"{outcome.pipeline.ns}:alert:")


def test_the_recovery_figures_come_from_the_range_query(outcome: Outcome) -> None:
    prom = evidence(outcome.jobs["blip"], "prometheus")
    found = re.search(r"recovered on its own after (\d+)s", prom["summary"])
    assert found, prom
    after = float(found.group(1))
    assert 10 <= after <= 120, prom  # about BLIP_SECONDS, at the range query's step
    summary = PrometheusSummary(firing_now=False, recovered_after_s=after)
    assert summary.headline() == prom["value"]


def test_a_sustained_condition_is_valid(outcome: Outcome) -> None:
    job = outcome.jobs["stable"]
    v = verdict(job)
    assert v["classification"] == "valid", v
    prom = evidence(job, "prometheus")
    assert prom["value"] == "firing" and "true 100% of the window" in prom["summary"]


def test_three_services_alerting_together_are_valid(outcome: Outcome) -> None:
    for service in ("api", "cart", "search", "orders"):
        job = outcome.jobs[f"cofiring-{service}"]
        v = verdict(job)
        assert v["classification"] == "valid", (service, v)
        assert "services failing together" in v["reason"] or "service(s)" in v["reason"], v
        am = evidence(job, "alertmanager")
        assert am["value"] == "3 co-firing" and "across 3 service(s)" in am["summary"], am


def test_a_human_silence_is_cited_and_kubetriages_own_is_not(outcome: Outcome) -> None:
    job = outcome.jobs["silence"]
    v = verdict(job)
    assert "silenced by alice: failover drill OPS-4711" in v["reason"], v
    am = evidence(job, "alertmanager")
    assert "silenced by alice" in am["summary"]
    assert "auto-silenced by kubetriage" not in v["reason"]
    assert AlertmanagerSummary(silences=[]).human_silences() == []


def test_prometheus_down_gives_a_verdict_that_says_so(outcome: Outcome) -> None:
    job = outcome.jobs["down"]
    v = verdict(job)
    assert "evidence unavailable" in v["reason"] and "prometheus" in v["reason"], v
    prom = evidence(job, "prometheus")
    assert prom["value"] == "error" and "Prometheus unreachable" in prom["summary"]
    assert evidence(job, "alertmanager")["value"] != "error"  # the other source still spoke


def test_a_slow_prometheus_is_bounded_by_the_pools_timeout_and_the_job_finishes(outcome: Outcome) -> None:
    job = outcome.jobs["slow"]
    v = verdict(job)
    assert "evidence unavailable" in v["reason"], v
    prom = evidence(job, "prometheus")
    assert prom["summary"] == "unavailable: Prometheus did not answer within 1s"
    assert outcome.slow_connections >= 1  # it was asked, through the slow path


def test_the_generator_url_host_is_never_queried(outcome: Outcome) -> None:
    job = outcome.jobs["decoy"]
    assert outcome.decoy_paths == []
    prom = evidence(job, "prometheus")
    assert prom["value"] == "firing"  # asked the pool's Prometheus instead, with the same expression


def test_kubetriage_get_wide_and_describe_show_the_evidence(outcome: Outcome) -> None:
    header = outcome.wide.splitlines()[0].split()
    assert "EVIDENCE" in header
    assert "prometheus=recovered" in outcome.wide and "alertmanager=3 co-firing" in outcome.wide
    assert "Evidence:" in outcome.describe and "prometheus: not firing now" in outcome.describe
