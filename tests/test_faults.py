"""Faults mid-run: every job still ends terminal and every verdict is recorded exactly once.

Analysis goes through the fake OpenAI-compatible server (the only stand-in) so
that jobs take long enough to be interrupted.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from devharness import devenv
from tests.fakellm import FakeLLM, Step, verdict_content
from tests.pipeline import Pipeline, script_spec

pytestmark = pytest.mark.cluster

LLM_ONLY = {"analysis": {"analyzer": "llm", "maxAttempts": 4}}


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    fake = FakeLLM(default=verdict_content("valid", "the product is broken", 0.92)).start()
    try:
        yield fake
    finally:
        fake.stop()


def llm_pool(llm: FakeLLM, **spec: Any) -> dict[str, Any]:
    # FakeLLM serves plain http on loopback: the pool opts in to both (the outbound-URL policy)
    return {"analyzer": {"baseURL": llm.url, "allowHTTP": True, "allowPrivateEndpoints": True,
                         "model": "fake/triage-text", "timeoutSeconds": 5}, **spec}


def llm_job(i: int | str, **analysis: Any) -> dict[str, Any]:
    return script_spec(f"llm-{i}", "Error: widget rendered wrong", spec={"analysis": {**LLM_ONLY["analysis"],
                                                                                       **analysis}})


def _requests_at_least(llm: FakeLLM, n: int) -> bool:
    return len(llm.requests) >= n


async def test_kill_worker_mid_job_lease_expires_and_job_is_retried(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    llm.latency = 2.5
    await p.pool("default", **llm_pool(llm, concurrency=2, replicas={"min": 1, "max": 1}))
    p.start_operator(lease_seconds=1.5)
    names = ["k0", "k1"]
    for i, n in enumerate(names):
        await p.job(n, llm_job(i))
    await p.wait(lambda: _requests_at_least(llm, 2), "both jobs at the LLM")
    p.kill_worker()
    llm.latency = 0.2
    jobs = await p.wait_terminal(names, timeout=60)
    for n in names:
        st = jobs[n]["status"]
        assert st["phase"] == "Succeeded"
        assert st["attempts"] == 2, st  # the first attempt died with the worker
        assert st["verdict"]["analyzer"] == "llm"
    await p.wait(lambda: len(p.audit_rows()) == 2, "audit rows")
    assert sorted(r["job_name"] for r in p.audit_rows()) == names


async def test_llm_500s_timeouts_and_garbage_end_in_verdicts(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    llm.script(
        Step(status=500, body={"error": {"message": "upstream overloaded"}}),
        Step(content="I think this is fine but I will not say in JSON"),
        Step(delay=8),  # past the 5 s timeout
        Step(status=502, body="<html>bad gateway</html>"),
        Step(body=b"\x00\xffnot json at all"),
        Step(status=429, headers={"Retry-After": "1"}, body={"error": {"message": "slow down"}}),
        Step(content='{"classification": "maybe", "reason": "", "confidence": 7}'),
    )
    await p.pool("default", **llm_pool(llm, concurrency=4))
    p.start_operator()
    names = [f"g{i}" for i in range(8)]
    await asyncio.gather(*(p.job(n, llm_job(n)) for n in names))
    jobs = await p.wait_terminal(names, timeout=120)
    phases = Counter(j["status"]["phase"] for j in jobs.values())
    assert phases == {"Succeeded": 8}, {n: j["status"] for n, j in jobs.items()}
    await p.wait(lambda: len(p.audit_rows()) == 8, "audit rows")
    assert Counter(r["job_uid"] for r in p.audit_rows()).most_common(1)[0][1] == 1


async def test_attempts_exhausted_ends_failed_with_the_reason(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    llm.set_default(Step(status=503, body={"error": {"message": "model is down"}}))
    await p.pool("default", **llm_pool(llm, concurrency=2))
    p.start_operator(llm_max_retries=0)
    await p.job("doomed", llm_job("d", maxAttempts=2))
    # auto chain: nothing offline is confident, the LLM is down: the last attempt falls back to offline
    await p.job("fallback", script_spec("fb", "Error: widget rendered wrong", spec={"analysis": {"maxAttempts": 2}}))
    jobs = await p.wait_terminal(["doomed", "fallback"], timeout=90)
    doomed = jobs["doomed"]["status"]
    assert doomed["phase"] == "Failed"
    assert doomed["attempts"] == 2
    assert "gave up after 2 attempt(s)" in doomed["message"] and "503" in doomed["message"]
    assert "verdict" not in doomed
    events = await p.wait(lambda: p.events_for("doomed"), "event")
    assert [(e["reason"], e["type"]) for e in events] == [("TriageFailed", "Warning")]
    fb = jobs["fallback"]["status"]
    assert fb["phase"] == "Succeeded" and fb["attempts"] == 2
    assert fb["verdict"]["classification"] == "inconclusive"
    assert "LLM unavailable after 2 attempt(s)" in fb["verdict"]["reason"]
    rows = p.audit_rows()
    assert [r["job_name"] for r in rows] == ["fallback"]


async def test_long_jobs_show_running(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    llm.latency = 3
    await p.pool("default", **llm_pool(llm, concurrency=1))
    p.start_operator(running_status_delay_seconds=0.2)
    await p.job("slow", llm_job("s"))
    jobs = await p.wait_phase(["slow"], {"Running"}, timeout=30)
    assert jobs["slow"]["status"]["attempts"] == 1 and jobs["slow"]["status"]["startedAt"]
    jobs = await p.wait_terminal(["slow"])
    assert jobs["slow"]["status"]["phase"] == "Succeeded"


async def test_deleting_a_running_job_stops_its_analysis(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    llm.slow(30)  # the deleted job's answer: far later than the worker's next heartbeat (every 0.5 s)
    await p.pool("default", **llm_pool(llm, concurrency=1, replicas={"min": 1, "max": 1}))
    p.start_operator(lease_seconds=1.5)
    doomed = await p.job("doomed", llm_job("x"))
    await p.wait(lambda: _requests_at_least(llm, 1), "job at the LLM")
    await p.delete("doomed")
    await p.job("next", llm_job("y"))
    uid = doomed["metadata"]["uid"]
    await p.wait(lambda: f"lease on {uid} lost" in p.worker_log(), "the worker to abandon the deleted job")
    jobs = await p.wait_terminal(["next"], timeout=60)
    assert jobs["next"]["status"]["attempts"] == 1
    # One slot: "next" started after the deleted job's analysis ended, so anything that analysis sent is in
    # the event stream before next's verdict, whose audit row is written before its status: all is recorded.
    assert [r["job_name"] for r in p.audit_rows()] == ["next"]
    import redis.asyncio as aioredis

    client = aioredis.from_url(p.redis.url)
    keys = [k async for k in client.scan_iter(f"{p.prefix}:job:*")]
    await client.aclose()
    assert keys == []


async def test_worker_sigterm_hands_back_its_lease(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    llm.latency = 4
    await p.pool("default", **llm_pool(llm, concurrency=1, replicas={"min": 1, "max": 1}))
    p.start_operator(shutdown_grace_seconds=0.5, lease_seconds=30)
    await p.job("handed", llm_job("h"))
    await p.wait(lambda: _requests_at_least(llm, 1), "job at the LLM")
    await p.patch_pool("default", {"replicas": {"min": 0, "max": 0}})
    await p.wait(lambda: not p.worker_pids(), "worker stopped")
    st = (await p.get("handed"))["status"]
    assert st["phase"] in ("Queued", "Running")
    llm.latency = 0
    await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
    jobs = await p.wait_terminal(["handed"], timeout=30)  # long before the 30 s lease would have expired
    assert jobs["handed"]["status"]["attempts"] == 1  # a hand-back is not a failed attempt


async def test_pool_scales_with_backlog(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    llm.latency = 1.5
    await p.pool("default", **llm_pool(llm, concurrency=1, replicas={"min": 1, "max": 3}))
    p.start_operator(scale_down_delay_seconds=1)
    names = [f"a{i}" for i in range(9)]
    await asyncio.gather(*(p.job(n, llm_job(n)) for n in names))

    async def replicas() -> int:
        from kubetriage.infra.kube import ApiError

        try:
            dep = await p.kube.get(f"/apis/apps/v1/namespaces/{p.ns}/deployments/kubetriage-worker-default")
        except ApiError as exc:
            if exc.status == 404:
                return 0
            raise
        return int(dep["spec"]["replicas"])

    await p.wait(lambda: _eq(replicas(), 3), "scaled up to max")
    await p.wait_terminal(names, timeout=90)
    await p.wait(lambda: _eq(replicas(), 1), "scaled back down to min")


async def _eq(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def test_database_down_during_recording(
    cluster: devenv.ControlPlane, redis_server: devenv.Redis, postgres_server: devenv.Postgres, tmp_path: Any,
    llm: FakeLLM,
) -> None:
    dbname = f"faults_{tmp_path.name[-12:].replace('-', '_').lower()}"
    admin = postgres_server.url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    url = admin.rsplit("/", 1)[0] + f"/{dbname}"
    async with Pipeline(cluster, redis_server, tmp_path, url) as p:
        llm.latency = 1.5
        await p.pool("default", **llm_pool(llm, concurrency=4))
        p.start_operator()
        names = [f"pg{i}" for i in range(6)]
        await asyncio.gather(*(p.job(n, llm_job(n)) for n in names))
        await p.wait(lambda: _requests_at_least(llm, 1), "jobs at the LLM")
        postgres_server.stop()
        try:
            jobs = await p.wait_terminal(names, timeout=60)
            assert any(j["status"].get("recorded") is False for j in jobs.values())
            for j in jobs.values():
                assert j["status"]["phase"] == "Succeeded"
        finally:
            postgres_server.start()

        async def all_recorded() -> bool:
            return all((j.get("status") or {}).get("recorded") is True for j in await p.jobs())

        await p.wait(all_recorded, "all recorded after the database came back", timeout=60)
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT job_name, count(*) FROM triage_verdicts GROUP BY job_name").fetchall()
        assert dict(rows) == dict.fromkeys(names, 1)
        cond = {c["type"]: c["status"] for c in (await p.get("pg0"))["status"]["conditions"]}
        assert cond["Recorded"] == "True"


async def test_standby_replica_takes_over(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=4)
    active = p.start_operator("op-a", "--priority", "200", standalone=False, peering_lifetime_seconds=4)
    p.start_operator("op-b", "--priority", "100", standalone=False, peering_lifetime_seconds=4)
    first = [f"s{i}" for i in range(5)]
    await asyncio.gather(*(p.job(n, script_spec(n)) for n in first))
    await p.wait_terminal(first, timeout=60)
    peering = json.loads(p.cluster.kubectl("get", "kopfpeering", "kubetriage", "-n", p.ns, "-o", "json").stdout)
    assert len(peering.get("status") or {}) == 2  # both replicas announced themselves
    active.kill()
    second = [f"t{i}" for i in range(5)]
    await asyncio.gather(*(p.job(n, script_spec(n)) for n in second))
    jobs = await p.wait_terminal(second, timeout=90)
    assert {j["status"]["phase"] for j in jobs.values()} == {"Succeeded"}
    assert Counter(r["job_uid"] for r in p.audit_rows()).most_common(1)[0][1] == 1
    assert len(p.audit_rows()) == 10
