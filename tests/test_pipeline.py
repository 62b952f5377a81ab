"""The triage pipeline end to end: real API server, Redis, SQLite, operator and worker processes."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.pipeline import Pipeline, alert_spec, audit_events, flush_audit_log, script_spec, started

pytestmark = pytest.mark.cluster


async def test_examples_get_verdicts_in_status_events_and_database(pipeline: Pipeline) -> None:
    """The examples in the order the README gives: pools and TriageRules first, each rule Accepted (a rule
    applies to jobs admitted after the operator observed it), then the jobs."""
    docs = [d for f in sorted(EXAMPLES.glob("*.yaml")) if not f.name.startswith("00-")
            for d in yaml.safe_load_all(f.read_text()) if d]
    setup = [d for d in docs if d["kind"] != "TriageJob"]
    rules = [d["metadata"]["name"] for d in setup if d["kind"] == "TriageRule"]
    assert rules, "the examples hold TriageRules"
    pipeline.cluster.kubectl("apply", "-n", pipeline.ns, "-f", "-", input=yaml.safe_dump_all(setup))
    pipeline.start_operator()
    for name in rules:
        await pipeline.wait_rule(name)
    pipeline.cluster.kubectl("apply", "-n", pipeline.ns, "-f", "-",
                             input=yaml.safe_dump_all([d for d in docs if d["kind"] == "TriageJob"]))
    names = [j["metadata"]["name"] for j in await pipeline.jobs()]
    assert len(names) >= 6
    jobs = await pipeline.wait_terminal(names)
    for name in names:
        st = jobs[name]["status"]
        assert st["phase"] == "Succeeded", (name, st)
        assert st["verdict"]["classification"] in {"false_positive", "valid", "inconclusive"}
        assert st["verdict"]["discard"] == (st["verdict"]["classification"] == "false_positive")
        assert st["recorded"] is True
        assert st["attempts"] == 1
        assert st["queuedAt"] <= st["startedAt"] <= st["completedAt"]
        assert {c["type"]: c["status"] for c in st["conditions"]} == {"Triaged": "True", "Recorded": "True"}
    assert jobs["script-backfill-dns"]["status"]["pool"] == f"{pipeline.ns}/backfill"
    assert jobs["alert-api-down"]["status"]["verdict"]["classification"] == "valid"
    assert jobs["alert-maintenance"]["status"]["verdict"]["classification"] == "false_positive"
    assert "TriageRule maintenance-worker-12-kernel-patch" in jobs["alert-maintenance"]["status"]["verdict"]["reason"]
    rows = pipeline.audit_rows()
    assert sorted(r["job_name"] for r in rows) == sorted(names)
    for name in names:
        events = await pipeline.wait(lambda n=name: pipeline.events_for(n), f"event for {name}")
        assert [e["reason"] for e in events] == ["Triaged"]
    deploys = json.loads(pipeline.cluster.kubectl("get", "deploy", "-n", pipeline.ns, "-o", "json").stdout)["items"]
    pod = deploys[0]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert deploys[0]["metadata"]["ownerReferences"][0]["kind"] == "TriagePool"


async def _create_queued(p: Pipeline, name: str, spec: dict) -> None:
    await p.job(name, spec)
    await p.wait_phase([name], {"Queued"}, timeout=30)


async def test_strict_priority_then_fifo_then_lower_classes(pipeline: Pipeline) -> None:
    """One slot, nine queued jobs in mixed order: p1 (FIFO) first, then p2, then p3 (work-conserving)."""
    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator()
    order = ["p3", "p1", "p2", "p3", "p1", "p2", "p3", "p1", "p2"]
    names = []
    for i, cls in enumerate(order):
        name = f"{cls}-{i}"
        names.append(name)
        await _create_queued(p, name, script_spec(f"s{i}", spec={"priorityClassName": f"kubetriage-{cls}"}))
    await asyncio.sleep(0.5)
    assert all((j.get("status") or {}).get("phase") == "Queued" for j in await p.jobs()), "no worker yet"
    await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
    jobs = await p.wait_terminal(names)
    by_start = sorted(names, key=lambda n: started(jobs[n]))
    expected = sorted(names, key=lambda n: (n.split("-")[0], int(n.split("-")[1])))
    assert by_start == expected


async def test_duplicates_are_analysed_once_and_share_the_verdict(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator()
    spec = alert_spec("DiskFull", labels={"instance": "db-1", "flaps_last_hour": "7"}, consecutiveCount=1)
    await _create_queued(p, "first", spec)
    await p.job("second", {**spec, "alert": {**spec["alert"], "labels": {"instance": "db-1", "flaps_last_hour": "8"}}})
    dup = await p.wait_phase(["second"], {"Duplicate"}, timeout=30)
    assert dup["second"]["status"]["duplicateOf"] == "first"
    assert "verdict" not in dup["second"]["status"]
    await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
    jobs = await p.wait_terminal(["first", "second"])
    assert jobs["second"]["status"]["verdict"] == jobs["first"]["status"]["verdict"]
    # after the primary is done, a third copy gets the verdict at admission without any analysis
    await p.job("third", spec)
    jobs = await p.wait_terminal(["third"])
    assert jobs["third"]["status"]["phase"] == "Duplicate"
    assert jobs["third"]["status"]["verdict"] == jobs["first"]["status"]["verdict"]
    await p.wait(lambda: len(p.audit_rows()) == 3, "three audit rows")
    rows = p.audit_rows()
    assert Counter(r["job_name"] for r in rows) == {"first": 1, "second": 1, "third": 1}
    # a different fingerprint is not a duplicate
    await p.job("other", alert_spec("DiskFull", labels={"instance": "db-2"}))
    jobs = await p.wait_terminal(["other"])
    assert jobs["other"]["status"]["phase"] == "Succeeded"


async def test_a_waiting_duplicate_survives_redis_losing_everything(pipeline: Pipeline) -> None:
    """The rebuild re-attaches a duplicate to its primary, which Redis forgot, and it still gets the verdict."""
    import redis.asyncio as aioredis

    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator()
    spec = alert_spec("DiskFull", labels={"instance": "db-3", "flaps_last_hour": "7"}, consecutiveCount=1)
    first = await p.job("first", spec)
    await p.wait_phase(["first"], {"Queued"}, timeout=30)
    await p.job("second", spec)
    await p.wait_phase(["second"], {"Duplicate"}, timeout=30)
    client = aioredis.from_url(p.redis.url)
    dups = f"{p.prefix}:dups:{first['metadata']['uid']}/first"
    try:
        assert await client.scard(dups) == 1
        await client.flushall()
        await p.wait(lambda: client.exists(dups), "the duplicate re-attached after the rebuild")
        assert await client.ttl(dups) > 0  # it cannot outlive its primary forever
    finally:
        await client.aclose()
    await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
    jobs = await p.wait_terminal(["first", "second"])
    assert jobs["first"]["status"]["phase"] == "Succeeded"
    assert jobs["second"]["status"]["verdict"] == jobs["first"]["status"]["verdict"]


async def test_job_waits_for_its_priority_class_and_pool(pipeline: Pipeline) -> None:
    p = pipeline
    p.start_operator()
    late = f"late-{p.ns}"
    await p.job("waiting", script_spec(spec={"priorityClassName": late}))
    jobs = await p.wait_phase(["waiting"], {"Pending"}, timeout=30)
    st = jobs["waiting"]["status"]
    assert st["conditions"][0]["reason"] == "PriorityClassNotFound"
    assert late in st["message"]
    pipeline.cluster.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": late}, "value": 5}))
    try:
        jobs = await p.wait(lambda: _reason(p, "waiting", "PoolNotFound"), "PoolNotFound")
        await p.pool("default", concurrency=2)
        jobs = await p.wait_terminal(["waiting"])
        assert jobs["waiting"]["status"]["priority"] == 5
    finally:
        pipeline.cluster.kubectl("delete", "priorityclass", late, check=False)


async def _reason(p: Pipeline, name: str, reason: str) -> bool:
    st = (await p.get(name)).get("status") or {}
    return any(c.get("reason") == reason for c in st.get("conditions") or [])


async def test_rate_limit_spaces_job_starts(pipeline: Pipeline) -> None:
    """A pool limited to 4 jobs/s with burst 1: 9 jobs cannot all start within 2 s."""
    p = pipeline
    await p.pool("default", concurrency=8, rateLimit={"jobsPerSecond": 4, "burst": 1})
    p.start_operator()
    names = [f"r{i}" for i in range(9)]
    await asyncio.gather(*(p.job(n, script_spec(f"rl{n}")) for n in names))
    jobs = await p.wait_terminal(names)
    starts = sorted(started(jobs[n]) for n in names)
    from kubetriage.api.timeutil import parse_time

    span = (parse_time(starts[-1]) - parse_time(starts[0])).total_seconds()
    assert span >= 8 / 4 - 0.05  # the bucket admits one job per 250 ms after the first


async def test_operator_crash_and_restart_loses_nothing(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=2, replicas={"min": 1, "max": 1})
    op = p.start_operator()
    names = [f"c{i}" for i in range(40)]
    await asyncio.gather(*(p.job(n, script_spec(f"crash{n}")) for n in names[:20]))
    await p.wait(lambda: _count_phase(p, "Succeeded", 3), "some jobs done")
    op.kill()
    await asyncio.gather(*(p.job(n, script_spec(f"crash{n}")) for n in names[20:]))
    p.start_operator("operator2")
    jobs = await p.wait_terminal(names, timeout=120)
    assert {j["status"]["phase"] for j in jobs.values()} == {"Succeeded"}
    await p.wait(lambda: len(p.audit_rows()) == len(names), "all audit rows")
    assert Counter(r["job_uid"] for r in p.audit_rows()).most_common(1)[0][1] == 1


async def _count_phase(p: Pipeline, phase: str, n: int) -> bool:
    return sum((j.get("status") or {}).get("phase") == phase for j in await p.jobs()) >= n


@pytest.mark.parametrize("how", ["flushall", "restart"])
async def test_redis_loses_everything_mid_run(pipeline: Pipeline, how: str) -> None:
    p = pipeline
    await p.pool("default", concurrency=2, replicas={"min": 1, "max": 1}, rateLimit={"jobsPerSecond": 20})
    p.start_operator()
    names = [f"f{i}" for i in range(30)]
    await asyncio.gather(*(p.job(n, script_spec(f"flush{n}")) for n in names))
    await p.wait(lambda: _count_phase(p, "Succeeded", 3), "some jobs done")
    if how == "flushall":
        import redis.asyncio as aioredis

        client = aioredis.from_url(p.redis.url)
        await client.flushall()
        await client.aclose()
    else:
        p.redis.restart()
    jobs = await p.wait_terminal(names, timeout=120)
    assert {j["status"]["phase"] for j in jobs.values()} == {"Succeeded"}
    await p.wait(lambda: len(p.audit_rows()) == len(names), "all audit rows")
    assert Counter(r["job_uid"] for r in p.audit_rows()).most_common(1)[0][1] == 1
    # the pool's rate limit came back with the queues (no pool event re-sent it)
    import redis.asyncio as aioredis

    client = aioredis.from_url(p.redis.url)
    cfg = await client.hgetall(f"{p.prefix}:poolcfg:{p.ns}/default")
    await client.aclose()
    assert cfg.get(b"rate") == b"20.0"


async def test_api_writes_per_job_are_few(pipeline: Pipeline) -> None:
    """Counted from the API server's own audit log: status PATCHes per job after creation.

    ``Running`` is written only for jobs still running after the delay; it is set
    high here so a busy machine cannot make the count vary.
    """
    p = pipeline
    await p.pool("default", concurrency=4)
    p.start_operator(running_status_delay_seconds=60)
    names = [f"w{i}" for i in range(10)]
    await asyncio.gather(*(p.job(n, script_spec(f"w{n}")) for n in names))
    await p.wait_terminal(names)

    async def all_events() -> bool:  # a job's Event comes after its last status write
        items = (await p.kube.get(f"/api/v1/namespaces/{p.ns}/events"))["items"]
        return {e["involvedObject"]["name"] for e in items} >= set(names)

    await p.wait(all_events, "an Event for every job")
    log = await flush_audit_log(p)
    writes = Counter()
    for ev in audit_events(log):
        ref = ev.get("objectRef") or {}
        if ref.get("namespace") != p.ns or ev.get("stage") != "ResponseComplete":
            continue
        if ref.get("resource") == "triagejobs" and ev["verb"] != "create":
            writes[ref.get("name")] += 1
        if ref.get("resource") == "events":
            writes["<events>"] += 1
    per_job = [writes[n] for n in names]
    assert max(per_job) <= 2, writes
    assert writes["<events>"] == len(names)


async def test_alert_resolved_before_analysis_is_analysed_as_resolved(pipeline: Pipeline) -> None:
    """Ingest marks a resolved alert with an annotation; a job still waiting is analysed with that evidence."""
    import datetime as dt

    import redis.asyncio as aioredis

    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator()
    started_at = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    resolved = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    created = await p.job("blip", alert_spec("LatencyHigh", severity="warning", startsAt=started_at))
    await p.wait_phase(["blip"], {"Queued"})
    p.cluster.kubectl("annotate", "tj", "blip", "-n", p.ns, f"kubetriage.io/resolved-at={resolved}")
    client = aioredis.from_url(p.redis.url)

    async def payload_resolved() -> bool:
        raw = await client.hget(f"{p.prefix}:job:{created['metadata']['uid']}", "payload")
        return bool(raw) and json.loads(raw)["alert"]["status"] == "resolved"

    try:
        await p.wait(payload_resolved, "the queued payload to carry the resolution")
    finally:
        await client.aclose()
    await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
    jobs = await p.wait_terminal(["blip"])
    assert "resolved" in jobs["blip"]["status"]["verdict"]["reason"]


async def test_an_invalid_verdict_from_a_worker_fails_the_job_instead_of_looping(pipeline: Pipeline) -> None:
    """A worker of another version reports garbage through the real stream: the job fails with the reason."""
    import redis.asyncio as aioredis

    from kubetriage.infra.queue import Queue

    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator()
    await p.job("odd", script_spec("odd"))
    await p.wait_phase(["odd"], {"Queued"})
    client = aioredis.from_url(p.redis.url)
    try:
        queue = Queue(client, p.prefix)
        claimed = await queue.claim(f"{p.ns}/default", "impostor", 30_000)
        assert claimed is not None and not isinstance(claimed, float)
        assert await queue.report(claimed.uid, "impostor", '{"classification": "maybe"}')
    finally:
        await client.aclose()
    jobs = await p.wait_terminal(["odd"])
    st = jobs["odd"]["status"]
    assert st["phase"] == "Failed" and "the worker sent an invalid verdict" in st["message"]
