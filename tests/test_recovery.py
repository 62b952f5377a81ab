"""Nothing is lost, analysed twice unseen, or left waiting when Redis fails, is flushed, or an operator dies.

Bursts against a small Redis connection pool, Redis killed and restarted mid-burst,
a FLUSHALL between a primary and its duplicate, a FLUSHALL while a worker holds a
job, a job Redis forgot while its epoch stayed, and verdicts a killed operator had
read but not recorded. Everything is real: the API server, Redis, the operator and
worker processes (and, where a job must take time, the fake LLM server).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from devharness import devenv
from kubetriage.api.models import verdict_from_classification
from kubetriage.infra.kube import ApiError
from kubetriage.infra.queue import EVENTS_GROUP, Primary, Queue, Rebuilding
from tests.fakellm import FakeLLM, verdict_content
from tests.pipeline import Pipeline, alert_spec, script_spec
from tests.test_faults import llm_job, llm_pool
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

BURST = 2000
TERMINAL = {"Succeeded", "Failed"}


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    fake = FakeLLM(default=verdict_content("valid", "the product is broken", 0.92)).start()
    try:
        yield fake
    finally:
        fake.stop()


async def _create_many(p: Pipeline, names: list[str], parallel: int = 48) -> None:
    sem = asyncio.Semaphore(parallel)

    async def one(name: str) -> None:
        async with sem:
            # a script per job: distinct fingerprints, so every job is analysed (none is a duplicate)
            spec = script_spec(f"burst-{name}", f"AssertionError: {name} returned 500")
            await eventually(lambda: _created(p, name, spec), f"{name} created", timeout=120, interval=0.5)

    await asyncio.gather(*(one(n) for n in names))


async def _created(p: Pipeline, name: str, spec: dict[str, Any]) -> bool:
    """Create the job; False (try again) while a loaded API server answers 429 or 5xx, as a client would."""
    try:
        await p.job(name, spec)
    except ApiError as exc:
        if exc.status == 409:  # an earlier try got through
            return True
        if exc.status == 429 or exc.status >= 500:
            return False
        raise
    return True


async def _jobs(p: Pipeline) -> list[dict[str, Any]] | None:
    """The namespace's jobs, or None while the API server is too busy to list them (429, 5xx)."""
    try:
        return await p.jobs()
    except ApiError as exc:
        if exc.status == 429 or exc.status >= 500:
            return None
        raise


async def _wait_all_terminal(p: Pipeline, n: int, timeout: float) -> list[dict[str, Any]]:
    """Every one of the namespace's ``n`` jobs terminal; polled slowly, since each poll lists them all."""

    async def done() -> list[dict[str, Any]] | None:
        items = await _jobs(p)
        if items is None:
            return None
        stuck = [j["metadata"]["name"] for j in items if (j.get("status") or {}).get("phase") not in TERMINAL]
        return items if len(items) == n and not stuck else None

    async def stuck() -> str:
        items = await _jobs(p) or []
        phases = Counter((j.get("status") or {}).get("phase") or "none" for j in items)
        return f"{len(items)} jobs, phases {dict(phases)}"

    try:
        return await p.wait(done, f"all {n} jobs terminal", timeout=timeout, interval=2.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nnow: {await stuck()}") from None


def _assert_each_recorded_once(p: Pipeline, items: list[dict[str, Any]]) -> None:
    assert Counter(j["status"]["phase"] for j in items) == {"Succeeded": len(items)}
    rows = Counter(r["job_uid"] for r in p.audit_rows())
    assert set(rows) == {j["metadata"]["uid"] for j in items}
    assert set(rows.values()) == {1}


def _metric(port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name}{{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --------------------------------------------------------------------------- item 1: admission never drops a job


@pytest.mark.timeout(900)  # about 70 s alone on 2 cores; far longer while the rest of the suite runs beside it
async def test_a_burst_through_four_redis_connections_admits_every_job(pipeline: Pipeline) -> None:
    """2000 creates at once, the operator limited to 4 Redis connections: commands wait for a connection
    (bounded) instead of failing with "Too many connections", and anything that still fails is retried."""
    p = pipeline
    await p.pool("default", concurrency=16, replicas={"min": 2, "max": 2})
    op = p.start_operator(redis_max_connections=4)
    names = [f"b{i:04d}" for i in range(BURST)]
    await _create_many(p, names)
    items = await _wait_all_terminal(p, BURST, timeout=600)
    _assert_each_recorded_once(p, items)
    assert op.alive()


@pytest.mark.timeout(900)
async def test_redis_killed_and_restarted_mid_burst_every_job_ends_terminal(pipeline: Pipeline) -> None:
    """Redis dies while jobs are being created and comes back empty on the same port: the jobs whose admission
    failed are retried, the rebuild and the resync put back the rest; the operator is never restarted."""
    p = pipeline
    await p.pool("default", concurrency=16, replicas={"min": 2, "max": 2})
    op = p.start_operator(redis_max_connections=8, resync_seconds=5)
    n = 1500
    names = [f"r{i:04d}" for i in range(n)]
    creating = asyncio.create_task(_create_many(p, names))
    # mid-burst, with jobs admitted and analysed already: Redis loses queued jobs and results in flight
    await p.wait(lambda: _count(p, 300, {"Succeeded"}), "300 jobs created, some analysed", timeout=300)
    await asyncio.to_thread(p.redis.restart)  # creation goes on while Redis is down
    await creating
    items = await _wait_all_terminal(p, n, timeout=600)
    _assert_each_recorded_once(p, items)
    assert op.alive(), "the operator was not restarted"
    assert "failed with an exception and will ignore it" not in op.tail(100000)


async def _count(p: Pipeline, n: int, some: set[str]) -> bool:
    """At least ``n`` jobs, and at least one of them in one of the phases ``some``."""
    items = await _jobs(p) or []
    return len(items) >= n and any((j.get("status") or {}).get("phase") in some for j in items)


async def test_the_resync_puts_back_a_queued_job_redis_forgot(pipeline: Pipeline) -> None:
    """Redis lost one job but not its epoch (so no rebuild runs): the periodic resync, which compares the
    TriageJobs with the queue whatever their phase, queues it again, and it is analysed."""
    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator(resync_seconds=1)
    job = await p.job("forgotten", script_spec("forgotten"))
    await p.wait_phase(["forgotten"], {"Queued"}, timeout=30)
    uid = job["metadata"]["uid"]
    client = aioredis.from_url(p.redis.url)
    try:
        queue = Queue(client, p.prefix)
        await queue.remove(uid)
        assert not await queue.known(uid)
        await p.wait(lambda: queue.known(uid), "the resync to queue the job again")
    finally:
        await client.aclose()
    await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
    jobs = await p.wait_terminal(["forgotten"])
    assert jobs["forgotten"]["status"]["phase"] == "Succeeded"
    assert jobs["forgotten"]["status"]["attempts"] == 1


# --------------------------------------------------------------------------- item 15: after Redis lost its data


async def test_after_flushall_a_duplicate_is_still_folded_into_its_primary(pipeline: Pipeline) -> None:
    """The rebuild gives queued primaries their fingerprints back, and finished ones their verdicts, before
    any new job deduplicates: a duplicate arriving after the flush is never analysed a second time."""
    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator()
    spec = alert_spec("DiskFull", labels={"instance": "db-7"}, consecutiveCount=1)
    await p.job("first", spec)
    await p.wait_phase(["first"], {"Queued"}, timeout=30)
    client = aioredis.from_url(p.redis.url)
    try:
        await client.flushall()
        await p.job("second", spec)  # right away: it must wait for the rebuild, not become a second primary
        jobs = await p.wait_phase(["second"], {"Duplicate", "Queued"}, timeout=30)
        assert jobs["second"]["status"]["phase"] == "Duplicate", jobs["second"]["status"]
        assert jobs["second"]["status"]["duplicateOf"] == "first"
        await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
        jobs = await p.wait_terminal(["first", "second"])
        assert jobs["second"]["status"]["verdict"] == jobs["first"]["status"]["verdict"]
        # the primary is finished now: after another flush, a third copy gets its verdict without analysis
        await client.flushall()
        await p.job("third", spec)
        jobs = await p.wait_terminal(["third"])
    finally:
        await client.aclose()
    assert jobs["third"]["status"]["phase"] == "Duplicate"
    assert jobs["third"]["status"]["verdict"] == jobs["first"]["status"]["verdict"]
    await p.wait(lambda: len(p.audit_rows()) == 3, "three audit rows")
    assert Counter(r["job_name"] for r in p.audit_rows()) == {"first": 1, "second": 1, "third": 1}


async def test_a_job_redis_lost_while_a_worker_had_it_is_rerun_as_a_counted_attempt(
        pipeline: Pipeline, llm: FakeLLM) -> None:
    """FLUSHALL while a worker analyses a job that was never shown Running: it is analysed again, and that
    re-run counts as an attempt (status.attempts) and in kubetriage_reruns_total."""
    p = pipeline
    llm.latency = 3
    await p.pool("default", **llm_pool(llm, concurrency=1, replicas={"min": 1, "max": 1}))
    port = devenv.free_port()
    p.start_operator(running_status_delay_seconds=60, metrics_port=port)
    await p.job("held", llm_job("h"))
    await p.wait(lambda: len(llm.requests) >= 1, "the job at the LLM")
    client = aioredis.from_url(p.redis.url)
    try:
        # the claim's "started" event was read (and deleted once recorded): the operator knows it was claimed
        await p.wait(lambda: _stream_empty(client, p.prefix), "the claim recorded by the operator")
        assert (await p.get("held"))["status"]["phase"] == "Queued"  # never shown Running
        llm.latency = 0
        await client.flushall()
    finally:
        await client.aclose()
    jobs = await p.wait_terminal(["held"], timeout=60)
    st = jobs["held"]["status"]
    assert st["phase"] == "Succeeded"
    assert len(llm.requests) == 2
    assert st["attempts"] == 2, st  # the lost analysis was an attempt
    assert _metric(port, "kubetriage_reruns_total", f'{{pool="{p.ns}/default"}}') == 1.0


async def _stream_empty(client: aioredis.Redis, prefix: str) -> bool:
    return await client.xlen(f"{prefix}:events") == 0


async def test_verdicts_a_killed_operator_had_read_are_taken_over_at_startup(pipeline: Pipeline) -> None:
    """An operator read a worker's verdict and was killed (-9) before recording it: its successor takes the
    entry over as soon as the dead consumer has been silent a few seconds, not after the 30 s every stale
    entry waits for."""
    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    first = p.start_operator("operator1")
    await p.job("read-not-recorded", script_spec("rnr"))
    await p.wait_phase(["read-not-recorded"], {"Queued"}, timeout=30)
    first.kill()
    client = aioredis.from_url(p.redis.url)
    try:
        queue = Queue(client, p.prefix)
        claimed = await queue.claim(f"{p.ns}/default", "worker-x", 60_000)
        assert claimed is not None and not isinstance(claimed, float)
        verdict = verdict_from_classification("valid", "the checkout really fails", 0.9, "rules")
        assert await queue.report(claimed.uid, "worker-x", verdict.model_dump_json(by_alias=True, exclude_none=True))
        # what the killed operator's consumer had read when it died, never acknowledged
        read = await queue.read_events("killed-operator", block_ms=100)
        assert [e.type for e in read] == ["started", "result"]
        p.start_operator("operator2")
        # well inside the 30 s after which any stale entry was reclaimed before: only a takeover gets there
        jobs = await p.wait_terminal(["read-not-recorded"], timeout=20)
        consumers = await client.xinfo_consumers(f"{p.prefix}:events", "operator")
        dead = [c for c in consumers if c["name"] == b"killed-operator"]
        assert dead and dead[0]["pending"] == 0
    finally:
        await client.aclose()
    st = jobs["read-not-recorded"]["status"]
    assert st["phase"] == "Succeeded" and st["verdict"]["reason"] == "the checkout really fails"
    assert st["attempts"] == 1
    assert [r["job_name"] for r in p.audit_rows()] == ["read-not-recorded"]


# --------------------------------------------------------------------------- the Queue methods behind them


@pytest.fixture
async def queue(redis_server: devenv.Redis) -> AsyncIterator[Queue]:
    client = aioredis.from_url(redis_server.url)
    q = Queue(client, f"r{uuid.uuid4().hex[:8]}")
    try:
        yield q
    finally:
        keys = [k async for k in client.scan_iter(f"{q.prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_dedup_waits_for_restored_fingerprints_after_a_loss(queue: Queue) -> None:
    window = 60
    with pytest.raises(Rebuilding):  # Redis is empty: no epoch, no fingerprints back yet
        await queue.dedup("ns:alert:t", "fp", "u2/second", "{}", window, require_fingerprints=True)
    verdict = json.dumps({"classification": "valid", "checkType": "ai"})
    assert await queue.restore_primaries([Primary("ns:alert:t", "fp", "u1/first", 40),
                                          Primary("ns:alert:t", "fp-done", "u0/done", 40, verdict, 30)]) == 2
    # a job that took a fingerprint meanwhile keeps it
    assert await queue.restore_primaries([Primary("ns:alert:t", "fp", "u9/other", 40)]) == 0
    await queue.fingerprints_restored()
    assert await queue.dedup("ns:alert:t", "fp", "u2/second", "{}", window, require_fingerprints=True) == (
        "duplicate", "u1/first", "")
    assert await queue.dedup("ns:alert:t", "fp-done", "u3/third", "{}", window, require_fingerprints=True) == (
        "done", "u0/done", verdict)
    # an epoch without the marker (a rebuild by an operator from before it existed) lets admission decide too
    other = Queue(queue._redis, f"{queue.prefix}x")
    await other.set_epoch("older-operator")
    assert (await other.dedup("s", "fp", "u1/a", "{}", window, require_fingerprints=True))[0] == "primary"


async def test_a_stopped_consumers_events_are_taken_over_and_it_is_forgotten(queue: Queue) -> None:
    await queue.ensure_group()
    await queue.enqueue(uid="j", pool="ns/p", priority=1, payload={}, namespace="ns", name="j", max_attempts=3)
    assert await queue.claim("ns/p", "w", 30_000)
    await queue.report("j", "w", "{}")
    read = await queue.read_events("stopped", block_ms=100)
    assert len(read) == 2
    await queue.read_events("idle-empty", block_ms=10)
    # consumers that read within the bound are alive: nothing is taken from them
    assert await queue.take_over_stopped("me", min_idle_ms=600_000, forget_idle_ms=600_000) == ([], [])
    taken, owners = await queue.take_over_stopped("me", min_idle_ms=0, forget_idle_ms=0)
    assert [e.id for e in taken] == [e.id for e in read] and owners == ["stopped"]
    names = {c["name"] for c in await queue._redis.xinfo_consumers(f"{queue.prefix}:events", EVENTS_GROUP)}
    assert names == {b"stopped", b"me"}  # the empty one is forgotten; "stopped" held entries when looked at
    assert await queue.take_over_stopped("me", min_idle_ms=0, forget_idle_ms=0) == ([], [])
    names = {c["name"] for c in await queue._redis.xinfo_consumers(f"{queue.prefix}:events", EVENTS_GROUP)}
    assert names == {b"me"}
    assert [e.id for e in await queue.read_events("me", pending=True)] == [e.id for e in read]
