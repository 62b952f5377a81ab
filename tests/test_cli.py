"""``kubetriage submit|get|verdict set|queue`` as a user runs them: real processes, the real API server.

The last test runs the whole thing: an operator process with ingest enabled,
worker pods, and the CLI submitting through the operator's own ingest port.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml

from devharness import devenv
from kubetriage.api.keys import ALERT_STATUS_LABEL, VERDICT, VERDICT_AT, VERDICT_BY, VERDICT_REASON
from tests.ingestenv import IngestEnv
from tests.pipeline import Pipeline
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

JUNIT = b"""<testsuite name="pytest"><testcase classname="tests.test_cart" name="test_total">
<failure message="AssertionError: total was 0">assert 0 == 30</failure></testcase>
<testcase classname="tests.test_cart" name="test_ok"/></testsuite>"""


async def cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> tuple[int, str, str]:
    """``kubetriage ...`` in its own process (without blocking the loop that may serve ingest)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetriage", *args, env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def env(cluster: devenv.ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IngestEnv]:
    async with IngestEnv(cluster, tmp_path_factory.mktemp("cli")) as e:
        yield e


async def test_help_lists_the_commands_and_exit_codes() -> None:
    code, out, _ = await cli("--help")
    assert code == 0
    for command in ("submit", "get", "verdict", "queue"):
        assert command in out
    for args in (("submit", "alert"), ("submit", "script"), ("submit", "junit"), ("get",), ("verdict", "set"),
                 ("queue",)):
        code, out, _ = await cli(*args, "--help")
        assert code == 0 and "exit codes: 0 success" in out and "-o" in out, args


async def test_usage_errors_exit_2_with_a_message(env: IngestEnv, tmp_path: Path) -> None:
    cases: list[tuple[tuple[str, ...], str]] = [
        (("verdict", "set", "x", "maybe", "--reason", "r"), "invalid choice"),
        (("verdict", "set", "x", "valid"), "--reason"),
        (("verdict", "set", "x", "valid", "--reason", "  ", "-n", env.ns), "--reason must say why"),
        (("submit", "alert", "-n", env.ns), "needs an alert NAME"),
        (("submit", "alert", "X", "--status", "resolved", "-n", env.ns), "--starts-at"),
        (("submit", "alert", "X", "--label", "novalue", "-n", env.ns), "key=value"),
        (("submit", "script", "s", "--report-url", "ftp://x", "-n", env.ns), "html_report_r2_url"),
        (("submit", "junit", str(tmp_path / "missing.xml"), "-n", env.ns), "cannot read"),
        (("submit", "script", "s", "--url", env.url, "-n", env.ns), "KUBETRIAGE_INGEST_TOKEN"),
        (("get", "-o", "xml"), "invalid choice"),
    ]
    for args, message in cases:
        code, out, err = await cli(*args, env={"KUBETRIAGE_INGEST_TOKEN": ""})
        assert code == 2, (args, out, err)
        assert message in err, (args, err)
    assert await env.jobs() == []


async def test_submit_directly_to_the_cluster_then_get_and_verdict(env: IngestEnv, tmp_path: Path) -> None:
    ns = env.ns
    code, out, err = await cli("submit", "alert", "DiskFull", "--severity", "warning", "-l", "instance=db-1:9100",
                               "-a", "summary=disk 95% full", "--starts-at", "2026-01-05T10:00:00Z", "-n", ns,
                               "-o", "json")
    assert code == 0, err
    body = json.loads(out)
    assert body["created"] == 1
    alert_name = body["jobs"][0]["name"]
    assert alert_name.startswith("am-diskfull-")
    # the same alert again: nothing new, still success
    code, out, err = await cli("submit", "alert", "DiskFull", "--severity", "warning", "-l", "instance=db-1:9100",
                               "-a", "summary=disk 95% full", "--starts-at", "2026-01-05T10:00:00Z", "-n", ns)
    assert code == 0 and "exists" in out, (out, err)
    code, out, err = await cli("submit", "alert", "DiskFull", "--severity", "warning", "-l", "instance=db-1:9100",
                               "--starts-at", "2026-01-05T10:00:00Z", "--status", "resolved",
                               "--ends-at", "2026-01-05T10:03:00Z", "-n", ns)
    assert code == 0 and "resolved" in out, (out, err)

    logs = tmp_path / "run.log"
    logs.write_text("step 1 ok\nstep 2: TimeoutError\n")
    code, out, err = await cli("submit", "script", "checkout-e2e", "--id", "88412", "--error", "TimeoutError: x",
                               "--report-url", "https://r2.example.com/88412.html", "--screenshot",
                               "https://r2.example.com/88412.png", "--logs-file", str(logs), "--duration", "12.5",
                               "--attempt", "2", "-n", ns, "-o", "name")
    assert code == 0, err
    assert out.strip() == "triagejob.kubetriage.io/sr-checkout-e2e-88412"
    code, out, err = await cli("submit", "script", "-f", "-", "-n", ns, "-o", "yaml",
                               stdin=json.dumps({"id": 5, "script_name": "nightly", "success": True}).encode())
    assert code == 0 and yaml.safe_load(out)["jobs"][0]["result"] == "skipped", (out, err)

    report = tmp_path / "report.xml"
    report.write_bytes(JUNIT)
    code, out, err = await cli("submit", "junit", str(report), "--run", "ci-7", "-n", ns)
    assert code == 0 and "tests.test_cart::test_total" in out, (out, err)
    assert "failed 1" in err and "passed 1" in err  # the test summary goes to stderr, the table to stdout

    code, out, err = await cli("get", "-n", ns)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "PRIORITY", "PHASE", "VERDICT", "CONFIDENCE", "BY", "AGE",
                                "REASON"]
    assert len(lines) == 4
    row = next(line for line in lines if line.startswith(alert_name))
    assert "alert (resolved)" in row and "kubetriage-p2" in row

    code, out, err = await cli("verdict", "set", "sr-checkout-e2e-88412", "false_positive", "--reason",
                               "staging CDN outage, not the checkout code", "--by", "alice", "-n", ns)
    assert code == 0 and "verdict set: false_positive (by alice)" in out, (out, err)
    job = await env.job("sr-checkout-e2e-88412")
    ann = job["metadata"]["annotations"]
    assert ann[VERDICT] == "false_positive" and ann[VERDICT_BY] == "alice"
    assert ann[VERDICT_REASON] == "staging CDN outage, not the checkout code" and ann[VERDICT_AT].endswith("Z")
    sr = job["spec"]["scriptResult"]
    assert sr["logsExcerpt"] == "step 1 ok\nstep 2: TimeoutError\n" and sr["attempt"] == 2
    code, out, err = await cli("get", "sr-checkout-e2e-88412", "-n", ns)
    assert code == 0
    assert "false_positive" in out and "user:alice (pending)" in out and "staging CDN outage" in out

    code, out, _ = await cli("get", "sr-checkout-e2e-88412", "-n", ns, "-o", "json")
    assert code == 0 and json.loads(out)["metadata"]["name"] == "sr-checkout-e2e-88412"
    code, out, _ = await cli("get", "-n", ns, "-o", "yaml", "-l", f"{ALERT_STATUS_LABEL}=resolved")
    items = yaml.safe_load(out)["items"]
    assert code == 0 and [i["metadata"]["name"] for i in items] == [alert_name]
    code, out, _ = await cli("get", "-A", "-o", "name")
    assert code == 0 and f"triagejob.kubetriage.io/{alert_name}" in out.splitlines()

    code, _, err = await cli("get", "no-such-job", "-n", ns)
    assert code == 1 and "triagejob 'no-such-job' not found" in err
    code, _, err = await cli("verdict", "set", "no-such-job", "valid", "--reason", "x", "-n", ns)
    assert code == 1 and "not found" in err


async def test_submit_through_the_ingest_endpoint(env: IngestEnv, tmp_path: Path) -> None:
    token = {"KUBETRIAGE_INGEST_TOKEN": env.token}
    code, out, err = await cli("submit", "script", "login", "--id", "7", "--error", "boom", "--url", env.url,
                               "-n", env.ns2, "-o", "json", env=token)
    assert code == 0, err
    body = json.loads(out)
    assert body["namespace"] == env.ns2 and body["jobs"] == [{"name": "sr-login-7", "result": "created"}]
    report = tmp_path / "r.xml"
    report.write_bytes(JUNIT)
    code, out, err = await cli("submit", "junit", str(report), "--url", env.url, "--token", env.team_token)
    assert code == 0 and "created" in out, (out, err)
    assert len(await env.jobs(env.team_ns)) == 1  # the team token's own namespace
    code, out, err = await cli("submit", "alert", "Ping", "--url", env.url, "-n", env.ns2, "--starts-at",
                               "2026-01-05T10:00:00Z", env=token)
    assert code == 0 and "created" in out, (out, err)
    # refused by the server: exit 1 with its message
    code, _, err = await cli("submit", "script", "x", "--url", env.url, "-n", "kube-system", env=token)
    assert code == 1 and "403" in err and "not allowed" in err
    code, _, err = await cli("submit", "script", "x", "--url", env.url, "--token", "wrong-token-wrong-token")
    assert code == 1 and "401" in err
    code, _, err = await cli("submit", "script", "x", "--url", f"http://127.0.0.1:{devenv.free_port()}", env=token)
    assert code == 1 and "cannot reach" in err


async def test_operator_serves_ingest_and_cli_shows_verdicts_and_queue(pipeline: Pipeline) -> None:
    p = pipeline
    port, token = devenv.free_port(), "operator-ingest-token-0123456789"
    await p.pool("default", concurrency=2, replicas={"min": 1, "max": 1})
    p.start_operator(ingest_port=port, ingest_token=token, ingest_namespace=p.ns)
    url = f"http://127.0.0.1:{port}"

    async def serving() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"{url}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(serving, "the operator's ingest port", timeout=90, interval=0.3)
    env = {"KUBETRIAGE_INGEST_TOKEN": token}
    code, out, err = await cli("submit", "script", "cart-e2e", "--id", "1", "--error",
                               "AssertionError: total was 0", "--url", url, "-o", "json", env=env)
    assert code == 0, err
    name = json.loads(out)["jobs"][0]["name"]
    code, out, err = await cli("submit", "alert", "EndpointDown", "--severity", "critical", "-l",
                               "instance=https://api.example.com/health", "--url", url, "-o", "name", env=env)
    assert code == 0, err
    alert = out.strip().split("/")[-1]
    jobs = await p.wait_terminal([name, alert])
    verdict = jobs[name]["status"]["verdict"]

    code, out, err = await cli("get", "-n", p.ns)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith(name))
    assert verdict["classification"] in row and "Succeeded" in row and verdict["analyzer"] in row
    assert " ".join(verdict["reason"].split())[:40] in row

    code, out, err = await cli("queue", "-n", p.ns)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["POOL", "PRIORITY", "REPLICAS", "RUNNING", "BACKLOG", "OLDEST", "WAIT"]
    assert out.splitlines()[1].split()[0] == "default"
    code, out, err = await cli("queue", "-n", p.ns, "-o", "json")
    pools = json.loads(out)["pools"]
    assert code == 0 and pools[0]["pool"] == "default" and pools[0]["backlog"] == 0
    assert pools[0]["oldestWaitSeconds"] is None and pools[0]["maxReplicas"] == 1

    code, out, err = await cli("verdict", "set", name, "valid", "--reason", "reproduced by hand", "-n", p.ns)
    assert code == 0, err
    code, out, _ = await cli("get", name, "-n", p.ns, "-o", "wide")
    assert "valid" in out and "reproduced by hand" in out
