"""Human verdicts by annotation: they replace the AI verdict everywhere and feed the memory."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from tests.pipeline import Pipeline, alert_spec, script_spec

pytestmark = pytest.mark.cluster


def annotate(p: Pipeline, name: str, *pairs: str) -> None:
    p.cluster.kubectl("annotate", "--overwrite", "tj", name, "-n", p.ns, *pairs)


async def test_override_replaces_ai_verdict_in_status_and_database(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=2)
    p.start_operator()
    await p.job("blip", alert_spec("CPUHigh", severity="warning", consecutiveCount=1, source={"id": "7"}))
    jobs = await p.wait_terminal(["blip"])
    assert jobs["blip"]["status"]["verdict"]["checkType"] == "ai"
    annotate(p, "blip", "kubetriage.io/verdict=valid", "kubetriage.io/verdict-reason=the CPU really was pegged",
             "kubetriage.io/verdict-by=alice")

    async def overridden() -> dict | None:
        st = (await p.get("blip"))["status"]
        return st if st["verdict"].get("checkType") == "user" else None

    st = await p.wait(overridden, "human verdict in status")
    assert st["verdict"]["classification"] == "valid" and st["verdict"]["discard"] is False
    assert st["verdict"]["analyzer"] == "human" and st["verdict"]["confidence"] == 1.0
    assert "the CPU really was pegged (by alice)" in st["verdict"]["reason"]
    assert st["recorded"] is True
    rows = await p.wait(lambda: p.audit_rows() if len(p.audit_rows()) == 2 else None, "rows")
    assert sorted(r["check_type"] for r in rows) == ["ai", "user"]
    events = await p.wait(lambda: _reasons(p, "blip", "VerdictOverridden"), "override event")
    assert "valid by alice" in events[0]["message"]
    client = aioredis.from_url(p.redis.url)
    cases = [json.loads(c) for c in await client.lrange(f"{p.prefix}:memory", 0, -1)]
    await client.aclose()
    assert cases[-1]["classification"] == "valid" and cases[-1]["check_type"] == "user"
    assert "CPUHigh" in cases[-1]["text"]


async def _reasons(p: Pipeline, name: str, reason: str) -> list[dict] | None:
    found = [e for e in await p.events_for(name) if e["reason"] == reason]
    return found or None


async def test_override_of_a_queued_job_skips_analysis(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=1, replicas={"min": 0, "max": 0})
    p.start_operator()
    await p.job("waiting", script_spec("checkout", "AssertionError: price"))
    await p.wait_phase(["waiting"], {"Queued"})
    annotate(p, "waiting", "kubetriage.io/verdict=false-positive")
    jobs = await p.wait_terminal(["waiting"])
    st = jobs["waiting"]["status"]
    assert st["verdict"]["classification"] == "false_positive" and st["verdict"]["checkType"] == "user"
    assert st["verdict"]["reason"] == "set by a human (by unknown)"
    client = aioredis.from_url(p.redis.url)
    keys = [k async for k in client.scan_iter(f"{p.prefix}:job:*")]
    await client.aclose()
    assert keys == []  # nothing left for a worker to pick up
    # queued behind "waiting" (same class, later): one worker slot, FIFO, so had "waiting" still been
    # queued it would have been analysed before this one
    await p.job("later", script_spec("search", "TypeError: results is undefined"))
    await p.wait_phase(["later"], {"Queued"})
    await p.patch_pool("default", {"replicas": {"min": 1, "max": 1}})
    await p.wait_terminal(["later"])
    assert sorted((r["job_name"], r["check_type"]) for r in p.audit_rows()) == [("later", "ai"), ("waiting", "user")]


async def test_duplicates_after_an_override_inherit_the_human_verdict(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=1)
    p.start_operator()
    spec = alert_spec("QueueBacklog", severity="warning", labels={"queue": "emails"})
    await p.job("orig", spec)
    await p.wait_terminal(["orig"])
    annotate(p, "orig", "kubetriage.io/verdict=valid", "kubetriage.io/verdict-reason=backlog is real")
    await p.wait(lambda: _checked_by_user(p, "orig"), "human verdict recorded")
    await p.job("copy", spec)
    jobs = await p.wait_terminal(["copy"])
    st = jobs["copy"]["status"]
    assert st["phase"] == "Duplicate" and st["duplicateOf"] == "orig"
    assert st["verdict"]["classification"] == "valid" and st["verdict"]["checkType"] == "user"


async def test_bad_override_value_is_explained_not_applied(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=1)
    p.start_operator()
    await p.job("odd", script_spec("odd", "AssertionError: x"))
    await p.wait_terminal(["odd"])
    annotate(p, "odd", "kubetriage.io/verdict=maybe")

    async def explained() -> str | None:
        msg = (await p.get("odd"))["status"].get("message") or ""
        return msg if "ignored" in msg else None

    msg = await p.wait(explained, "message about the bad annotation")
    assert "use one of valid, false_positive" in msg
    assert (await p.get("odd"))["status"]["verdict"]["checkType"] == "ai"


async def test_memory_reuses_a_human_verdict_for_a_similar_failure(pipeline: Pipeline) -> None:
    """A human says a failure is a false positive; the same failure with other numbers/ids is then judged alike."""
    p = pipeline
    await p.pool("default", concurrency=2)
    p.start_operator(dedup_window_seconds=0)  # same normalised error would otherwise be a Duplicate
    error = "AssertionError: banner id 8841 missing at 2026-11-23T03:12:09Z on https://shop.example.com/run/771"
    await p.job("first", script_spec("homepage-banner", error))
    await p.wait_terminal(["first"])
    annotate(p, "first", "kubetriage.io/verdict=false_positive",
             "kubetriage.io/verdict-reason=the banner CMS is empty at night, not a bug", "kubetriage.io/verdict-by=qa")
    await p.wait(lambda: _checked_by_user(p, "first"), "human verdict recorded")
    again = "AssertionError: banner id 9120 missing at 2026-11-24T02:55:41Z on https://shop.example.com/run/802"

    async def judged_by_memory() -> dict | None:
        name = f"again-{int(asyncio.get_running_loop().time() * 1000)}"
        await p.job(name, script_spec("homepage-banner", again))
        st = (await p.wait_terminal([name]))[name]["status"]
        return st if st["verdict"]["analyzer"] == "memory" else None

    # the worker re-reads the memory every few seconds: until then a new job is judged by the rules
    st = await p.wait(judged_by_memory, "a verdict from memory", timeout=60, interval=1)
    assert st["verdict"]["classification"] == "false_positive"
    assert "the banner CMS is empty at night" in st["verdict"]["reason"]
    assert f"{p.ns}/first" in st["verdict"]["reason"]


async def _checked_by_user(p: Pipeline, name: str) -> bool:
    return (await p.get(name))["status"]["verdict"].get("checkType") == "user"
