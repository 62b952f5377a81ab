"""The Queue's Lua scripts and keys, called directly against the session's real Redis (no operator, no worker).

Each test has a prefix of its own, so tests cannot see each other's keys. What
the queue stored is read back with the plain client where the test needs to see
it, never through the method under test.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from devharness import devenv
from kubetriage.infra.queue import DUPLICATES_TTL_FACTOR, EVENTS_GROUP, MEMORY_MAX, Claimed, MemoryDelta, Queue
from tests.waiting import eventually

POOL = "team-a/default"
P1, P2, P3 = 1000, 500, 100  # the values of examples/00-priorityclasses.yaml
LEASE_MS = 30_000


@dataclass
class Q:
    queue: Queue
    redis: aioredis.Redis
    prefix: str

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def enqueue(self, uid: str, priority: int = P2, score_us: int | None = None, max_attempts: int = 3,
                      pool: str = POOL) -> bool:
        return await self.queue.enqueue(uid=uid, pool=pool, priority=priority, payload={"uid": uid},
                                        namespace="team-a", name=f"job-{uid}", max_attempts=max_attempts,
                                        score_us=score_us)

    async def claim(self, worker: str = "w1", lease_ms: int = LEASE_MS) -> Claimed:
        got = await self.queue.claim(POOL, worker, lease_ms)
        assert isinstance(got, Claimed), got
        return got

    async def claim_all(self) -> list[str]:
        uids = []
        while isinstance(got := await self.queue.claim(POOL, "w1", LEASE_MS), Claimed):
            uids.append(got.uid)
        assert got is None, got
        return uids

    async def redis_ms(self) -> int:
        """Now on the Redis clock, which the scripts use."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def events(self) -> list[dict[str, str]]:
        entries = await self.redis.xrange(self.key("events"))
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]

    async def state(self, uid: str) -> str:
        return (await self.redis.hget(self.key("job", uid), "state") or b"").decode()


@pytest.fixture
async def q(redis_server: devenv.Redis) -> AsyncIterator[Q]:
    client = aioredis.from_url(redis_server.url)
    prefix = f"q{uuid.uuid4().hex[:8]}"
    try:
        yield Q(Queue(client, prefix), client, prefix)
    finally:
        keys = [k async for k in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# --------------------------------------------------------------------------- scheduling


async def test_strict_priority_across_classes_then_fifo_within_a_class(q: Q) -> None:
    # enqueued in mixed order; FIFO follows the score (queuedAt), not the order of the calls
    for uid, prio, score in [("p3-second", P3, 1), ("p2-second", P2, 5), ("p1-third", P1, 9), ("p1-first", P1, 7),
                             ("p2-first", P2, 2), ("p3-first", P3, 0), ("p1-second", P1, 8)]:
        assert await q.enqueue(uid, prio, score_us=score)
    assert await q.claim_all() == ["p1-first", "p1-second", "p1-third", "p2-first", "p2-second", "p3-first",
                                   "p3-second"]
    # every class drained: no priority is left advertising work
    assert await q.redis.zcard(q.key("prios", POOL)) == 0


async def test_a_higher_class_arriving_later_goes_first_and_lower_classes_still_run(q: Q) -> None:
    await q.enqueue("low-1", P3)
    await q.enqueue("low-2", P3)
    assert (await q.claim()).uid == "low-1"
    await q.enqueue("urgent", P1)
    assert (await q.claim()).uid == "urgent"
    assert (await q.claim()).uid == "low-2"  # work-conserving: a lower class runs when nothing above waits
    assert await q.queue.claim(POOL, "w1", LEASE_MS) is None


async def test_enqueue_is_once_per_job_and_pools_are_separate(q: Q) -> None:
    assert await q.enqueue("x", P2, score_us=1) is True
    assert await q.enqueue("x", P1, score_us=0) is False  # a re-delivered watch event changes nothing
    await q.enqueue("other-pool", P1, pool="team-a/gpu")
    job = await q.queue.job("x")
    assert (job["prio"], job["score"], job["state"], job["attempts"], job["max"]) == ("500", "1", "queued", "0", "3")
    assert await q.claim_all() == ["x"]
    assert await q.queue.depth("team-a/gpu") == {str(P1): 1, "delayed": 0, "running": 0}
    # each enqueue wakes one idle worker slot of its own pool
    assert await q.redis.llen(q.key("wake", POOL)) == 1
    assert await q.redis.llen(q.key("wake", "team-a/gpu")) == 1


async def test_claim_records_the_lease_and_a_started_event(q: Q) -> None:
    await q.enqueue("j", P2, score_us=123)
    before = await q.redis_ms()
    got = await q.claim("w7", lease_ms=LEASE_MS)
    assert (got.uid, got.payload, got.attempt, got.max_attempts, got.queued_us) == ("j", {"uid": "j"}, 1, 3, 123)
    expiry = await q.redis.zscore(q.key("leases", POOL), "j")
    assert expiry is not None and before + LEASE_MS <= expiry <= await q.redis_ms() + LEASE_MS
    job = await q.queue.job("j")
    assert (job["state"], job["worker"], job["attempts"]) == ("leased", "w7", "1")
    assert job["started_us"] == str(got.started_us)
    assert await q.events() == [{"type": "started", "uid": "j", "attempt": "1", "us": str(got.started_us),
                                 "worker": "w7"}]
    assert await q.queue.depth(POOL) == {"delayed": 0, "running": 1}


# --------------------------------------------------------------------------- token bucket


async def test_token_bucket_allows_the_burst_then_makes_claims_wait_for_the_rate(q: Q) -> None:
    for i in range(6):
        await q.enqueue(f"j{i}", P2, score_us=i)
    await q.queue.set_pool_config(POOL, jobs_per_second=1, burst=3)
    assert [(await q.claim()).uid for _ in range(3)] == ["j0", "j1", "j2"]
    wait = await q.queue.claim(POOL, "w1", LEASE_MS)
    # one token a second: the next one is less than a second away, and nothing was taken off the queue
    assert isinstance(wait, float) and 0 < wait <= 1.0, wait
    assert await q.queue.depth(POOL) == {str(P2): 3, "delayed": 0, "running": 3}
    got = await eventually(lambda: q.queue.claim(POOL, "w1", LEASE_MS), "a token for the fourth claim",
                           accept=lambda r: isinstance(r, Claimed), timeout=5, interval=0.1)
    assert got.uid == "j3"
    # without a limit, the rest goes at once
    await q.queue.set_pool_config(POOL, jobs_per_second=None, burst=None)
    assert not await q.redis.exists(q.key("poolcfg", POOL))
    assert await q.claim_all() == ["j4", "j5"]


async def test_token_bucket_default_burst_is_the_rate(q: Q) -> None:
    for i in range(4):
        await q.enqueue(f"j{i}", P2, score_us=i)
    await q.queue.set_pool_config(POOL, jobs_per_second=2, burst=None)
    assert await q.redis.hgetall(q.key("poolcfg", POOL)) == {b"rate": b"2", b"burst": b"2"}
    assert [(await q.claim()).uid for _ in range(2)] == ["j0", "j1"]
    wait = await q.queue.claim(POOL, "w1", LEASE_MS)
    assert isinstance(wait, float) and 0 < wait <= 0.5, wait


# --------------------------------------------------------------------------- leases, retries, release


async def test_expired_lease_is_retried_with_doubling_capped_backoff_then_failed(q: Q) -> None:
    base_ms, cap_ms = 400, 600
    await q.enqueue("j", P2, max_attempts=3)

    async def reap() -> tuple[int, tuple[int, int]]:
        """The Redis time just before a reap, and what it did: the retry is due at most its delay after it."""
        before = await q.redis_ms()
        return before, await q.queue.reap(POOL, base_ms, cap_ms)

    for attempt, delay in ((1, base_ms), (2, cap_ms)):  # 400 ms, then 800 ms capped at 600 ms
        got = await eventually(lambda: q.queue.claim(POOL, "w1", 1), f"attempt {attempt} to be claimable",
                               accept=lambda r: isinstance(r, Claimed), timeout=10, interval=0.05)
        assert (got.uid, got.attempt) == ("j", attempt)
        # a 1 ms lease: the worker "died" at once, and the reaper finds the lease expired
        before, reaped = await eventually(reap, f"lease of attempt {attempt} reaped",
                                          accept=lambda r: r[1] != (0, 0), timeout=5, interval=0.01)
        after = await q.redis_ms()
        assert reaped == (1, 0)
        due = await q.redis.zscore(q.key("delayed", POOL), "j")
        assert due is not None and due - after <= delay <= due - before, (attempt, due - after, due - before)
        job = await q.queue.job("j")
        assert (job["state"], job["last_error"]) == ("delayed", "lease expired: the worker stopped answering")
        assert not await q.redis.zscore(q.key("leases", POOL), "j")
        if due - await q.redis_ms() > 50:
            assert await q.queue.claim(POOL, "w1", LEASE_MS) is None  # not claimable before its backoff
    got = await eventually(lambda: q.queue.claim(POOL, "w1", 1), "the last attempt to be claimable",
                           accept=lambda r: isinstance(r, Claimed), timeout=10, interval=0.05)
    assert got.attempt == 3
    _, reaped = await eventually(reap, "the last lease reaped", accept=lambda r: r[1] != (0, 0), timeout=5,
                                 interval=0.01)
    assert reaped == (0, 1)
    assert await q.state("j") == "reported"
    assert await q.queue.depth(POOL) == {"delayed": 0, "running": 0}
    failed = (await q.events())[-1]
    assert (failed["type"], failed["uid"], failed["attempt"]) == ("failed", "j", "3")
    assert failed["body"] == "lease expired: the worker stopped answering" and "worker" not in failed


async def test_a_retry_keeps_its_fifo_place(q: Q) -> None:
    await q.enqueue("older", P2, score_us=1)
    await q.enqueue("newer", P2, score_us=2)
    got = await q.claim()
    assert got.uid == "older"
    assert await q.queue.fail_attempt("older", "w1", "LLMError: 503", 1, 1) == 1
    assert (await q.queue.job("older"))["last_error"] == "LLMError: 503"

    async def due() -> bool:
        score = await q.redis.zscore(q.key("delayed", POOL), "older")
        return score is not None and score <= await q.redis_ms()

    await eventually(due, "the retry's backoff to pass", timeout=5, interval=0.01)
    again = await q.claim()
    assert (again.uid, again.attempt) == ("older", 2)
    assert (await q.claim()).uid == "newer"


async def test_only_the_lease_holder_renews_reports_or_fails(q: Q) -> None:
    await q.enqueue("j", P2)
    got = await q.claim("w1", lease_ms=1000)
    assert not await q.queue.heartbeat("j", "w2", LEASE_MS)
    assert await q.queue.heartbeat("j", "w1", LEASE_MS)
    assert await q.redis.zscore(q.key("leases", POOL), "j") > await q.redis_ms() + LEASE_MS - 5000
    assert await q.queue.fail_attempt("j", "w2", "not mine", 1, 1) == 0
    assert not await q.queue.report("j", "w2", '{"x": 1}')
    assert await q.queue.report("j", "w1", '{"classification": "valid"}')
    assert not await q.queue.report("j", "w1", '{"classification": "valid"}')  # once
    assert not await q.queue.heartbeat("j", "w1", LEASE_MS)
    assert await q.state("j") == "reported"
    result = (await q.events())[-1]
    assert result == {"type": "result", "uid": "j", "attempt": "1", "us": result["us"], "worker": "w1",
                      "body": '{"classification": "valid"}'}
    assert int(result["us"]) >= got.started_us
    assert await q.queue.depth(POOL) == {"delayed": 0, "running": 0}


async def test_a_worker_error_on_the_last_attempt_fails_the_job(q: Q) -> None:
    await q.enqueue("j", P2, max_attempts=1)
    await q.claim("w1")
    assert await q.queue.fail_attempt("j", "w1", "x" * 5000, 1, 1) == 2
    failed = (await q.events())[-1]
    assert (failed["type"], failed["attempt"], len(failed["body"])) == ("failed", "1", 2000)


async def test_release_hands_the_job_back_without_counting_an_attempt(q: Q) -> None:
    await q.enqueue("first", P2, score_us=1)
    await q.enqueue("second", P2, score_us=2)
    got = await q.claim("w1")
    assert got.uid == "first"
    await q.redis.delete(q.key("wake", POOL))
    assert not await q.queue.release("first", "w2")  # not its lease
    assert await q.queue.release("first", "w1")
    job = await q.queue.job("first")
    assert (job["state"], job["worker"], job["attempts"]) == ("queued", "", "0")
    assert not await q.redis.zscore(q.key("leases", POOL), "first")
    assert await q.redis.llen(q.key("wake", POOL)) == 1  # an idle slot takes it at once
    again = await q.claim("w2")
    assert (again.uid, again.attempt) == ("first", 1)  # its FIFO place, and the same attempt number
    assert not await q.queue.release("first", "w1")  # the lease is w2's now


# --------------------------------------------------------------------------- payload, removal, depth


async def test_update_payload_only_while_no_worker_has_the_job(q: Q) -> None:
    await q.enqueue("j", P2)
    assert await q.queue.update_payload("j", {"uid": "j", "alert": {"status": "resolved"}})
    assert json.loads((await q.queue.job("j"))["payload"])["alert"] == {"status": "resolved"}
    await q.claim()
    assert not await q.queue.update_payload("j", {"uid": "j", "late": True})
    assert "late" not in json.loads((await q.queue.job("j"))["payload"])
    assert not await q.queue.update_payload("missing", {})


async def test_remove_forgets_a_job_in_every_state(q: Q) -> None:
    for uid in ("queued", "leased", "delayed"):
        await q.enqueue(uid, P2, score_us={"leased": 0, "delayed": 1, "queued": 2}[uid])
    await q.claim()
    await q.claim()
    assert await q.queue.fail_attempt("delayed", "w1", "boom", 60_000, 60_000) == 1
    assert await q.queue.depth(POOL) == {str(P2): 1, "delayed": 1, "running": 1}
    await q.queue.remove("queued")
    await q.queue.remove_many(["leased", "delayed"])
    assert await q.queue.depth(POOL) == {"delayed": 0, "running": 0}
    assert await q.queue.jobs(["queued", "leased", "delayed"]) == {}
    assert not await q.queue.known("leased")
    assert not await q.queue.heartbeat("leased", "w1", LEASE_MS)  # the worker learns at its next heartbeat


async def test_oldest_queued_age_per_priority(q: Q) -> None:
    now_us = int(time.time() * 1e6)
    await q.enqueue("old", P2, score_us=now_us - 90_000_000)
    await q.enqueue("new", P2, score_us=now_us)
    await q.enqueue("p1", P1, score_us=now_us - 5_000_000)
    ages = await q.queue.oldest_queued_age(POOL)
    assert set(ages) == {str(P1), str(P2)}
    assert 90 <= ages[str(P2)] < 100 and 5 <= ages[str(P1)] < 15


# --------------------------------------------------------------------------- events


async def test_events_are_read_once_acknowledged_and_deleted(q: Q) -> None:
    await q.queue.ensure_group()
    await q.queue.ensure_group()  # a second operator start is harmless
    await q.enqueue("j", P2)
    await q.claim("w1")
    await q.queue.report("j", "w1", "{}")
    events = await q.queue.read_events("op-1", block_ms=100)
    assert [(e.type, e.uid, e.attempt, e.worker) for e in events] == [("started", "j", 1, "w1"),
                                                                      ("result", "j", 1, "w1")]
    assert await q.queue.read_events("op-1", block_ms=10) == []
    # read but not acknowledged (a crash): replayed to the same consumer
    assert [e.id for e in await q.queue.read_events("op-1", pending=True)] == [e.id for e in events]
    await q.queue.ack(events[0].id)
    assert [e.id for e in await q.queue.read_events("op-1", pending=True)] == [events[1].id]
    # another consumer takes over what a dead one left unacknowledged
    assert [e.id for e in await q.queue.claim_stale("op-2", min_idle_ms=0)] == [events[1].id]
    await q.queue.ack(events[1].id)
    assert await q.redis.xlen(q.key("events")) == 0
    groups = await q.redis.xinfo_groups(q.key("events"))
    assert [g["name"] for g in groups] == [EVENTS_GROUP.encode()]


async def test_epoch_marks_complete_queues(q: Q) -> None:
    assert not await q.queue.epoch_ok()
    await q.queue.set_epoch("operator-1")
    assert await q.queue.epoch_ok()
    assert await q.redis.get(q.key("epoch")) == b"operator-1"


# --------------------------------------------------------------------------- dedup


async def test_dedup_first_is_primary_later_ones_wait_then_get_the_verdict(q: Q) -> None:
    window = 60
    dup = json.dumps({"ns": "team-a", "name": "b", "uid": "u2", "type": "alert", "id": None, "summary": "s"})
    assert await q.queue.dedup("team-a", "fp1", "u1/a", "{}", window) == ("primary", "u1/a", "")
    assert await q.queue.dedup("team-a", "fp1", "u1/a", "{}", window) == ("primary", "u1/a", "")  # replayed
    assert await q.queue.dedup("team-b", "fp1", "u9/z", "{}", window) == ("primary", "u9/z", "")  # other namespace
    assert await q.queue.dedup("team-a", "fp1", "u2/b", dup, window) == ("duplicate", "u1/a", "")
    assert await q.redis.get(q.key("fp", "team-a", "fp1")) == b"u1/a"
    assert 0 < await q.redis.ttl(q.key("fp", "team-a", "fp1")) <= window
    dups_ttl = await q.redis.ttl(q.key("dups", "u1/a"))
    assert window < dups_ttl <= window * DUPLICATES_TTL_FACTOR
    # after Redis lost the set, a waiting duplicate re-attaches with the same expiry
    relinked = json.dumps({"ns": "team-a", "name": "c", "uid": "u3"})
    await q.queue.add_duplicate("u1/a", relinked, window)
    assert await q.queue.take_duplicates("u1/a") == sorted([dup, relinked])
    assert await q.queue.take_duplicates("u1/a") == []  # taken once
    verdict = json.dumps({"classification": "valid", "checkType": "ai"})
    await q.queue.remember_verdict("u1/a", verdict, window)
    assert await q.queue.dedup("team-a", "fp1", "u4/d", "{}", window) == ("done", "u1/a", verdict)
    assert await q.redis.scard(q.key("dups", "u1/a")) == 0  # a done one does not wait


async def test_a_human_override_replaces_the_remembered_verdict_and_keeps_its_expiry(q: Q) -> None:
    human = json.dumps({"classification": "false_positive", "checkType": "user"})
    assert not await q.queue.replace_remembered_verdict("u1/a", human)
    assert not await q.redis.exists(q.key("verdict", "u1/a"))  # nothing to replace: nothing is created
    await q.queue.remember_verdict("u1/a", json.dumps({"classification": "valid"}), 60)
    assert await q.queue.replace_remembered_verdict("u1/a", human)
    assert await q.redis.get(q.key("verdict", "u1/a")) == human.encode()
    assert 0 < await q.redis.ttl(q.key("verdict", "u1/a")) <= 60


# --------------------------------------------------------------------------- memory


async def test_memory_list_keeps_the_newest_cases_and_its_version_counts_every_publish(q: Q) -> None:
    assert not await q.queue.memory_seeded()
    assert await q.queue.memory_version() is None
    assert await q.queue.publish_human_cases() is None  # nothing to publish creates nothing
    assert not await q.queue.memory_seeded()
    full = await q.queue.publish_human_cases(*(f'{{"n": {i}}}' for i in range(MEMORY_MAX)))
    assert full is not None and await q.queue.memory_seeded()
    assert await q.queue.memory_version() == full
    everything = await q.queue.memory_since(None)
    assert (everything.version, everything.complete, len(everything.cases)) == (full, True, MEMORY_MAX)

    # Full: the length stays MEMORY_MAX, the version still counts the new case (issue 12: workers stopped
    # learning when they compared lengths), and a worker at the old version is sent only that case.
    assert await q.queue.publish_human_cases('{"n": "newest"}') == full + 1
    cases = await q.queue.memory_cases()
    assert len(cases) == MEMORY_MAX
    assert (cases[0], cases[-1]) == (b'{"n": 1}', b'{"n": "newest"}')  # the oldest one made room
    assert await q.queue.memory_since(full) == MemoryDelta(full + 1, False, [b'{"n": "newest"}'])
    assert await q.queue.memory_since(full + 1) == MemoryDelta(full + 1, False, [])
    # The same case again is a new version too (the newest entry alone would not have changed).
    assert await q.queue.publish_human_cases('{"n": "newest"}') == full + 2
    # Behind by cases all still in the list: those; behind by more (some were trimmed): the whole list.
    assert (await q.queue.memory_since(full - 1)).cases == [f'{{"n": {MEMORY_MAX - 1}}}'.encode(),
                                                            b'{"n": "newest"}', b'{"n": "newest"}']
    behind = await q.queue.memory_since(full - MEMORY_MAX)
    assert (behind.version, behind.complete, len(behind.cases)) == (full + 2, True, MEMORY_MAX)

    # Redis lost its data: the operator seeds a new memory, whose versions a worker's old one never matches.
    await q.redis.delete(q.key("memory"), q.key("memory", "version"))
    assert await q.queue.memory_version() is None
    reseeded = await q.queue.publish_human_cases('{"n": "seed"}')
    assert reseeded is not None and reseeded > full + 2 + MEMORY_MAX
    assert await q.queue.memory_since(full + 2) == MemoryDelta(reseeded, True, [b'{"n": "seed"}'])
