"""A real Prometheus scrapes the operator and a worker during a pipeline run; PromQL sees what happened."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from typing import Any

import pytest

from devharness import devenv
from tests.pipeline import Pipeline, alert_spec, script_spec

pytestmark = pytest.mark.cluster


def promql(prom: devenv.Prometheus, query: str) -> list[dict[str, Any]]:
    url = f"{prom.url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(prom: devenv.Prometheus, query: str) -> float | None:
    result = promql(prom, query)
    return float(result[0]["value"][1]) if result else None


def promtool_check_metrics(port: int) -> tuple[bool, str]:
    """``promtool check metrics`` on the live exposition: naming, types, help text."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install the Debian package 'prometheus'")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        exposition = resp.read()
    check = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True)
    return check.returncode == 0, check.stdout.decode() + check.stderr.decode()


async def test_prometheus_scrapes_operator_and_worker(pipeline: Pipeline, tmp_path: Any) -> None:
    p = pipeline
    op_port, worker_port = devenv.free_port(), devenv.free_port()
    p.pods.extra_env["KUBETRIAGE_METRICS_PORT"] = str(worker_port)
    prom = devenv.Prometheus(tmp_path / "prometheus", {
        "kubetriage-operator": [f"127.0.0.1:{op_port}"], "kubetriage-worker": [f"127.0.0.1:{worker_port}"],
    }).start()
    try:
        await p.pool("default", concurrency=4, replicas={"min": 1, "max": 1})
        p.start_operator(metrics_port=op_port)
        names = [f"a{i}" for i in range(4)] + [f"s{i}" for i in range(3)]
        for n in names[:4]:
            await p.job(n, alert_spec(f"Alert{n}", severity="warning", consecutiveCount=1,
                                      labels={"flaps_last_hour": "9"}))
        for n in names[4:]:
            await p.job(n, script_spec(f"suite-{n}", "getaddrinfo ENOTFOUND db.internal"))
        jobs = await p.wait_terminal(names)
        expected = {}
        for j in jobs.values():
            key = (j["status"]["verdict"]["classification"], j["status"]["verdict"]["analyzer"])
            expected[key] = expected.get(key, 0) + 1

        async def scraped() -> bool:
            await asyncio.sleep(0)
            total = value(prom, 'sum(kubetriage_verdicts_total{job="kubetriage-operator"})')
            done = value(prom, 'sum(kubetriage_worker_jobs_total{job="kubetriage-worker",outcome="verdict"})')
            # a gauge the leader loop refreshes about once a second: it may trail the counters by a scrape
            succeeded = value(prom, 'sum(kubetriage_jobs{phase="Succeeded"})')
            return total == len(names) and done == len(names) and succeeded == len(names)

        await p.wait(scraped, "Prometheus to see every verdict", timeout=60, interval=1)
        for (classification, analyzer), n in expected.items():
            q = f'sum(kubetriage_verdicts_total{{classification="{classification}",analyzer="{analyzer}"}})'
            assert value(prom, q) == n, q
        assert value(prom, 'sum(kubetriage_jobs_admitted_total{source="alert"})') == 4
        assert value(prom, 'sum(kubetriage_jobs_admitted_total{source="scriptResult"})') == 3
        assert value(prom, 'sum(kubetriage_jobs{phase="Succeeded"})') == len(names)
        assert value(prom, "sum(kubetriage_analysis_duration_seconds_count)") == len(names)
        assert value(prom, "sum(kubetriage_queue_wait_seconds_count)") == len(names)
        assert value(prom, "sum(kubetriage_queue_depth)") == 0
        assert value(prom, "kubetriage_database_backlog") == 0
        builds = promql(prom, "kubetriage_build_info")
        assert {r["metric"]["job"] for r in builds} == {"kubetriage-operator", "kubetriage-worker"}
        assert value(prom, 'up{job="kubetriage-worker"}') == 1

        for port in (op_port, worker_port):
            ok, output = await asyncio.to_thread(promtool_check_metrics, port)
            assert ok, output
    finally:
        prom.stop()
