"""The Redis dispatch path: per-pool priority queues, leases, retries, the event stream, dedup and memory.

``Queue`` is the only code that touches Redis keys: every other module calls
one of its methods, so key names and their contents are defined here once.
Every state change of a job is one Lua script, so a claim, a lease expiry or a
report is atomic however many workers and operator replicas race. Redis is
disposable: everything here can be rebuilt from the TriageJobs in Kubernetes
and the database (``Queue.epoch_ok`` tells the operator when it must).

Keys, for prefix ``kt``, a pool key ``P`` (``namespace/name``) and a job
identity ``I`` (``{uid}/{name}``, so a duplicate's status can name its primary):

- ``kt:job:{uid}``        hash: ``payload`` (the AnalysisRequest JSON), ``pool``, ``prio`` (the PriorityClass
                          value), ``score`` (FIFO score, µs), ``ns``, ``name``, ``attempts`` (claims so far; a
                          release gives one back), ``max`` (max attempts), ``state`` (queued, leased, delayed or
                          reported), and once claimed ``worker`` (lease holder, empty after a release),
                          ``started_us`` (last claim, µs) and after a failed attempt ``last_error``
- ``kt:q:{P}:{prio}``     zset: uid -> FIFO score, the job's queuedAt in µs (kept across retries, hand-backs
                          and rebuilds, so a job never loses its place)
- ``kt:prios:{P}``        zset: priority value -> itself, the classes that may have work (a claim walks them
                          highest first and drops the empty ones)
- ``kt:leases:{P}``       zset: uid -> lease expiry (ms)
- ``kt:delayed:{P}``      zset: uid -> time its retry is due (ms); a claim moves due ones back to their queue
- ``kt:wake:{P}``         list of ``1``: one push per enqueue or hand-back, popped by an idle worker slot
                          (trimmed to 4096 on enqueue)
- ``kt:poolcfg:{P}``      hash: ``rate`` (jobs/s) and ``burst``, set by the operator; absent = no rate limit
- ``kt:bucket:{P}``       hash: token-bucket state, ``tokens`` (float) and ``ts`` (last refill, ms)
- ``kt:events``           stream (about 100k entries), read by the operator's consumer group ``operator``:
                          ``type`` (started, result or failed), ``uid``, ``attempt``, ``us`` (µs), ``worker``
                          (absent on failed), ``body`` (a result's ``WorkerResult`` JSON: the verdict and its
                          evidence; the reason of a failure; absent on started)
- ``kt:fp:{scope}:{fp}``  string: ``I`` of the primary job for a fingerprint in its scope (namespace, source
  type, target: ``fingerprint.dedup_scope``), TTL = dedup window
- ``kt:dups:{I}``         set: duplicates waiting for the primary's verdict, each a JSON object with ``ns``,
                          ``name``, ``uid``, ``type``, ``id`` and ``summary`` (enough to record their verdict
                          without reading them back), TTL = DUPLICATES_TTL_FACTOR x dedup window
- ``kt:verdict:{I}``      string: a finished primary's verdict (status wire JSON, camelCase), TTL = dedup
                          window; a human override replaces it and keeps the TTL
- ``kt:memory``           list: human verdicts for the workers' memory analyzer (workers have no database),
                          each a JSON object with ``text``, ``classification``, ``reason``, ``source``,
                          ``check_type``, ``kind`` and ``subject``; oldest first, at most MEMORY_MAX
- ``kt:memory:version``   string (integer): counts the cases ever published to ``kt:memory``, so a worker
                          asks only for the ones it has not seen; created at the time in µs, so a version
                          from before Redis lost its data is never mistaken for a recent one
- ``kt:epoch``            string: the identity of the operator that last rebuilt the queues; present while
                          the queues are complete, absent after Redis lost its data
- ``kt:fpready``          string ``1``: present once the rebuild gave the primaries their fingerprints back (its
                          first step); admission does not deduplicate while neither it nor the epoch exists
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

EVENTS_GROUP = "operator"
# Human verdicts kept for the memory analyzer: every worker holds them all in memory, and the operator
# reads as many back from the database when Redis lost them.
MEMORY_MAX = 20000
# Duplicates wait for their primary's verdict longer than the dedup window: the primary may queue and
# retry for a while after the window closed, and its verdict must still reach them.
DUPLICATES_TTL_FACTOR = 4

_CLAIM = """
local prefix, pool = ARGV[1], ARGV[2]
local worker, lease_ms = ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- as a string: Lua 5.1's tostring() would print a 16-digit number in exponent form
local now_us = t[1] .. string.format('%06d', tonumber(t[2]))

-- retries whose backoff has passed go back to their queue, at their old FIFO place
local due = redis.call('ZRANGEBYSCORE', prefix..':delayed:'..pool, '-inf', now_ms, 'LIMIT', 0, 100)
for _, uid in ipairs(due) do
  redis.call('ZREM', prefix..':delayed:'..pool, uid)
  local jk = prefix..':job:'..uid
  local prio = redis.call('HGET', jk, 'prio')
  if prio then
    redis.call('ZADD', prefix..':q:'..pool..':'..prio, redis.call('HGET', jk, 'score'), uid)
    redis.call('ZADD', prefix..':prios:'..pool, prio, prio)
    redis.call('HSET', jk, 'state', 'queued')
  end
end

-- token bucket: refuse (with a wait) before taking anything off a queue
local cfg = prefix..':poolcfg:'..pool
local rate = tonumber(redis.call('HGET', cfg, 'rate') or '0')
local bucket = prefix..':bucket:'..pool
local tokens = 0
if rate > 0 then
  local burst = tonumber(redis.call('HGET', cfg, 'burst') or '1')
  local state = redis.call('HMGET', bucket, 'tokens', 'ts')
  tokens = tonumber(state[1] or burst)
  local ts = tonumber(state[2] or now_ms)
  tokens = math.min(burst, tokens + (now_ms - ts) * rate / 1000.0)
  if tokens < 1 then
    redis.call('HSET', bucket, 'tokens', tokens, 'ts', now_ms)
    return {'wait', tostring(math.ceil((1 - tokens) * 1000.0 / rate))}
  end
end

-- strict priority: the highest class with work wins; FIFO inside it
local prios = redis.call('ZREVRANGE', prefix..':prios:'..pool, 0, -1)
for _, prio in ipairs(prios) do
  local qk = prefix..':q:'..pool..':'..prio
  local popped = redis.call('ZPOPMIN', qk)
  if #popped > 0 then
    local uid = popped[1]
    local jk = prefix..':job:'..uid
    local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HSET', jk, 'state', 'leased', 'worker', worker, 'started_us', now_us)
    redis.call('ZADD', prefix..':leases:'..pool, now_ms + lease_ms, uid)
    if rate > 0 then redis.call('HSET', bucket, 'tokens', tokens - 1, 'ts', now_ms) end
    redis.call('XADD', prefix..':events', 'MAXLEN', '~', 100000, '*',
               'type', 'started', 'uid', uid, 'attempt', attempts, 'us', now_us, 'worker', worker)
    return {'job', uid, redis.call('HGET', jk, 'payload'), tostring(attempts), now_us, redis.call('HGET', jk, 'max'),
            redis.call('HGET', jk, 'score')}
  end
  if redis.call('ZCARD', qk) == 0 then redis.call('ZREM', prefix..':prios:'..pool, prio) end
end
return false
"""

_ENQUEUE = """
local prefix, uid, pool, prio = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jk = prefix..':job:'..uid
if redis.call('EXISTS', jk) == 1 then return 0 end
local score = ARGV[5]
if score == '' then
  local t = redis.call('TIME')
  score = t[1] .. string.format('%06d', tonumber(t[2]))
end
redis.call('HSET', jk, 'payload', ARGV[6], 'pool', pool, 'prio', prio, 'score', score, 'ns', ARGV[7],
           'name', ARGV[8], 'attempts', ARGV[9], 'max', ARGV[10], 'state', 'queued')
redis.call('ZADD', prefix..':q:'..pool..':'..prio, score, uid)
redis.call('ZADD', prefix..':prios:'..pool, prio, prio)
redis.call('LPUSH', prefix..':wake:'..pool, '1')
redis.call('LTRIM', prefix..':wake:'..pool, 0, 4095)
return 1
"""

_HEARTBEAT = """
local prefix, uid, worker, lease_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local jk = prefix..':job:'..uid
local st = redis.call('HMGET', jk, 'state', 'worker', 'pool')
if st[1] ~= 'leased' or st[2] ~= worker then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', prefix..':leases:'..st[3], 'XX', now_ms + lease_ms, uid)
return 1
"""

_REPORT = """
-- a worker's result: ends the lease and hands the verdict to the operator in one step
local prefix, uid, worker, kind, body = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local jk = prefix..':job:'..uid
local st = redis.call('HMGET', jk, 'state', 'worker', 'pool', 'attempts')
if st[1] ~= 'leased' or st[2] ~= worker then return 0 end
redis.call('ZREM', prefix..':leases:'..st[3], uid)
redis.call('HSET', jk, 'state', 'reported')
local t = redis.call('TIME')
local now_us = t[1] .. string.format('%06d', tonumber(t[2]))
redis.call('XADD', prefix..':events', 'MAXLEN', '~', 100000, '*', 'type', kind, 'uid', uid,
           'attempt', st[4], 'us', now_us, 'worker', worker, 'body', body)
return 1
"""

_RETRY = """
-- an attempt failed (worker error or lease expiry): back off, or give up after max attempts
local prefix, uid, reason, base_ms, cap_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local expect_worker = ARGV[6]
local jk = prefix..':job:'..uid
local st = redis.call('HMGET', jk, 'state', 'worker', 'pool', 'attempts', 'max')
if st[1] ~= 'leased' then return 0 end
if expect_worker ~= '' and st[2] ~= expect_worker then return 0 end
local pool, attempts, max = st[3], tonumber(st[4]), tonumber(st[5])
redis.call('ZREM', prefix..':leases:'..pool, uid)
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if attempts >= max then
  redis.call('HSET', jk, 'state', 'reported')
  redis.call('XADD', prefix..':events', 'MAXLEN', '~', 100000, '*', 'type', 'failed', 'uid', uid,
             'attempt', attempts, 'us', t[1] .. string.format('%06d', tonumber(t[2])), 'body', reason)
  return 2
end
local delay = math.min(cap_ms, base_ms * (2 ^ (attempts - 1)))
redis.call('HSET', jk, 'state', 'delayed', 'last_error', reason)
redis.call('ZADD', prefix..':delayed:'..pool, now_ms + delay, uid)
return 1
"""

_RELEASE = """
-- graceful hand-back: the job keeps its FIFO place and the attempt is not counted
local prefix, uid, worker = ARGV[1], ARGV[2], ARGV[3]
local jk = prefix..':job:'..uid
local st = redis.call('HMGET', jk, 'state', 'worker', 'pool', 'prio', 'score')
if st[1] ~= 'leased' or st[2] ~= worker then return 0 end
redis.call('ZREM', prefix..':leases:'..st[3], uid)
redis.call('HINCRBY', jk, 'attempts', -1)
redis.call('HSET', jk, 'state', 'queued', 'worker', '')
redis.call('ZADD', prefix..':q:'..st[3]..':'..st[4], st[5], uid)
redis.call('ZADD', prefix..':prios:'..st[3], st[4], st[4])
redis.call('LPUSH', prefix..':wake:'..st[3], '1')
return 1
"""

_REMOVE = """
-- the job is finished or deleted: forget it everywhere
local prefix, uid = ARGV[1], ARGV[2]
local jk = prefix..':job:'..uid
local st = redis.call('HMGET', jk, 'pool', 'prio')
if st[1] then
  redis.call('ZREM', prefix..':q:'..st[1]..':'..st[2], uid)
  redis.call('ZREM', prefix..':leases:'..st[1], uid)
  redis.call('ZREM', prefix..':delayed:'..st[1], uid)
end
return redis.call('DEL', jk)
"""

_RESTORE_PRIMARY = """
-- Redis lost its data: a primary still inside its dedup window takes its fingerprint back (unless a job
-- took it meanwhile), and a finished one its verdict, so later duplicates still fold into it
local prefix, key, uid, ttl, verdict, verdict_ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5],
  tonumber(ARGV[6])
local ok = redis.call('SET', prefix..':fp:'..key, uid, 'NX', 'EX', ttl)
if verdict ~= '' and verdict_ttl > 0 then
  redis.call('SET', prefix..':verdict:'..uid, verdict, 'NX', 'EX', verdict_ttl)
end
if ok then return 1 end
return 0
"""

_FORGET_CONSUMER = """
-- a consumer that stopped long ago and holds nothing: remove it, in one step with the check, so that no
-- entry it holds is dropped with it (deleting a consumer drops its pending entries)
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
if #redis.call('XPENDING', stream, group, '-', '+', 1, consumer) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer)
"""

_PUBLISH_MEMORY = """
-- append human-verdict cases, keep the newest ones, and count them: the count is the list's version
local prefix, max = ARGV[1], tonumber(ARGV[2])
local list, version = prefix..':memory', prefix..':memory:version'
if redis.call('EXISTS', version) == 0 then
  -- a new memory (new install, or Redis lost its data): counting from the time in µs puts it far above
  -- anything an older memory counted to, so a worker holding an old version is sent the whole list
  local t = redis.call('TIME')
  redis.call('SET', version, t[1] .. string.format('%06d', tonumber(t[2])))
end
-- in slices: unpack() of thousands of arguments overflows Lua's stack
for i = 3, #ARGV, 1000 do
  redis.call('RPUSH', list, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('LTRIM', list, -max, -1)
return redis.call('INCRBY', version, #ARGV - 2)
"""

_MEMORY_SINCE = """
-- the cases published after the caller's version, or the whole list when those are not all still there
local prefix, since = ARGV[1], ARGV[2]
local list = prefix..':memory'
local version = redis.call('GET', prefix..':memory:version')
local size = redis.call('LLEN', list)
if version and since ~= '' then
  -- exact in Lua's doubles: versions stay far below 2^53
  local new = tonumber(version) - tonumber(since)
  if new >= 0 and new <= size then
    local items = {}
    if new > 0 then items = redis.call('LRANGE', list, -new, -1) end
    table.insert(items, 1, 'delta')
    table.insert(items, 1, version)
    return items
  end
end
local items = redis.call('LRANGE', list, 0, -1)
table.insert(items, 1, 'full')
table.insert(items, 1, version or '')
return items
"""

_UPDATE_PAYLOAD = """
-- new evidence for a job no worker has started yet (a resolved alert): swap its payload in place
local prefix, uid, payload = ARGV[1], ARGV[2], ARGV[3]
local jk = prefix..':job:'..uid
local state = redis.call('HGET', jk, 'state')
if state ~= 'queued' and state ~= 'delayed' then return 0 end
redis.call('HSET', jk, 'payload', payload)
return 1
"""

_DEDUP = """
-- first job with a fingerprint inside the window is the primary; later ones attach to it
local prefix, key, uid, ttl, member = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local dups_ttl = tonumber(ARGV[6])
-- Redis lost its data (no epoch) and the rebuild has not given the primaries their fingerprints back yet: a
-- duplicate deciding now would become a second primary, so the caller retries in a moment
if ARGV[7] == '1' and redis.call('EXISTS', prefix..':epoch', prefix..':fpready') == 0 then
  return {'rebuilding', ''}
end
local ok = redis.call('SET', prefix..':fp:'..key, uid, 'NX', 'EX', ttl)
if ok then return {'primary', uid} end
local primary = redis.call('GET', prefix..':fp:'..key)
if primary == uid then return {'primary', uid} end
local verdict = redis.call('GET', prefix..':verdict:'..primary)
if verdict then return {'done', primary, verdict} end
redis.call('SADD', prefix..':dups:'..primary, member)
redis.call('EXPIRE', prefix..':dups:'..primary, dups_ttl)
return {'duplicate', primary}
"""


@dataclass(frozen=True)
class Primary:
    """A primary whose fingerprint the rebuild puts back: for ``ttl_s`` more seconds (what is left of its dedup
    window), with its verdict (status wire JSON) for ``verdict_ttl_s`` when it is finished."""

    scope: str
    fingerprint: str
    identity: str
    ttl_s: int
    verdict_json: str = ""
    verdict_ttl_s: int = 0


class Rebuilding(Exception):
    """Redis lost its data and the operator has not rebuilt the queues yet: try again after the rebuild."""


@dataclass(frozen=True)
class MemoryDelta:
    """Human-verdict cases a worker has not seen (oldest first), and the memory version they bring it to.

    ``complete``: the cases are the whole list, to start over from (the
    worker had no version, or cases it never saw were trimmed, or Redis lost
    its data since); otherwise they follow the ones it has.
    """

    version: int | None
    complete: bool
    cases: list[bytes]


@dataclass(frozen=True)
class Claimed:
    uid: str
    payload: dict[str, Any]
    attempt: int
    started_us: int
    max_attempts: int = 1
    queued_us: int = 0


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    uid: str
    attempt: int
    us: int
    body: str
    worker: str


def _event(eid: bytes, fields: dict[bytes, bytes]) -> Event:
    f = {k.decode(): v.decode() for k, v in fields.items()}
    return Event(
        id=eid.decode(), type=f.get("type", ""), uid=f.get("uid", ""), attempt=int(f.get("attempt", "0") or 0),
        us=int(f.get("us", "0") or 0), body=f.get("body", ""), worker=f.get("worker", ""),
    )


def _duplicates_ttl(window_s: int) -> int:
    return max(1, window_s) * DUPLICATES_TTL_FACTOR


class Queue:
    """Typed wrappers around the Lua scripts and the other keys; one instance per process."""

    def __init__(self, client: aioredis.Redis, prefix: str = "kt") -> None:
        self._redis = client
        self.prefix = prefix
        self._claim = client.register_script(_CLAIM)
        self._enqueue = client.register_script(_ENQUEUE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._report = client.register_script(_REPORT)
        self._retry = client.register_script(_RETRY)
        self._release = client.register_script(_RELEASE)
        self._remove = client.register_script(_REMOVE)
        self._dedup = client.register_script(_DEDUP)
        self._update_payload = client.register_script(_UPDATE_PAYLOAD)
        self._publish_memory = client.register_script(_PUBLISH_MEMORY)
        self._memory_since = client.register_script(_MEMORY_SINCE)
        self._restore_primary = client.register_script(_RESTORE_PRIMARY)
        self._forget_consumer = client.register_script(_FORGET_CONSUMER)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ---------------------------------------------------------------- operator side

    async def enqueue(
        self,
        *,
        uid: str,
        pool: str,
        priority: int,
        payload: dict[str, Any],
        namespace: str,
        name: str,
        max_attempts: int,
        attempts: int = 0,
        score_us: int | None = None,
    ) -> bool:
        """Queue a job once; False when it is already known (a re-delivered watch event)."""
        done = await self._enqueue(args=[
            self.prefix, uid, pool, str(priority), "" if score_us is None else str(score_us),
            json.dumps(payload, separators=(",", ":")), namespace, name, str(attempts), str(max_attempts),
        ])
        return bool(done)

    async def update_payload(self, uid: str, payload: dict[str, Any]) -> bool:
        """Replace a waiting job's payload; False when a worker already has it (or it is gone)."""
        body = json.dumps(payload, separators=(",", ":"))
        return bool(await self._update_payload(args=[self.prefix, uid, body]))

    async def known(self, uid: str) -> bool:
        return bool(await self._redis.exists(self._key("job", uid)))

    async def known_many(self, uids: list[str]) -> set[str]:
        """The uids of ``uids`` that have a job entry (queued, leased, delayed or reported), in one round trip."""
        if not uids:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for uid in uids:
            pipe.exists(self._key("job", uid))
        return {uid for uid, n in zip(uids, await pipe.execute(), strict=True) if n}

    async def job(self, uid: str) -> dict[str, str]:
        raw = await self._redis.hgetall(self._key("job", uid))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def remove(self, uid: str) -> None:
        await self._remove(args=[self.prefix, uid])

    async def remove_many(self, uids: list[str]) -> None:
        if not uids:
            return
        pipe = self._redis.pipeline(transaction=False)
        for uid in uids:
            await self._remove(args=[self.prefix, uid], client=pipe)
        await pipe.execute()

    async def jobs(self, uids: list[str]) -> dict[str, dict[str, str]]:
        """Many job hashes in one round trip (missing ones are left out)."""
        pipe = self._redis.pipeline(transaction=False)
        for uid in uids:
            pipe.hgetall(self._key("job", uid))
        out = {}
        for uid, raw in zip(uids, await pipe.execute(), strict=True):
            if raw:
                out[uid] = {k.decode(): v.decode() for k, v in raw.items()}
        return out

    async def dedup(
        self, scope: str, fingerprint: str, identity: str, member: str, window_s: int, *,
        require_fingerprints: bool = False,
    ) -> tuple[str, str, str]:
        """('primary'|'duplicate'|'done', primary identity, verdict JSON when done).

        The first job with a fingerprint inside the window is the primary; a later
        one is added to the primary's duplicates, or gets its verdict at once
        when the primary is already done. ``scope`` is where the fingerprint counts
        (``fingerprint.dedup_scope``: namespace, source type, target). ``identity`` is ``uid/name``, ``member``
        the JSON a duplicate is remembered by (see the module docstring).

        ``require_fingerprints``: raise ``Rebuilding`` instead of deciding while Redis lost its data and the
        rebuild has not given the primaries their fingerprints back yet (``restore_primaries``).
        """
        res = await self._dedup(args=[self.prefix, f"{scope}:{fingerprint}", identity, str(window_s), member,
                                      str(_duplicates_ttl(window_s)), "1" if require_fingerprints else ""])
        parts = [p.decode() if isinstance(p, bytes) else p for p in res]
        if parts[0] == "rebuilding":
            raise Rebuilding("Redis lost its data; deduplication waits for the queues to be rebuilt")
        return parts[0], parts[1], parts[2] if len(parts) > 2 else ""

    async def restore_primaries(self, primaries: list[Primary]) -> int:
        """Give primaries their fingerprints back (and finished ones their verdicts), in one round trip;
        returns how many got theirs (another job may hold one already: it is left as it is)."""
        if not primaries:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for p in primaries:
            await self._restore_primary(args=[self.prefix, f"{p.scope}:{p.fingerprint}", p.identity,
                                              str(max(1, p.ttl_s)), p.verdict_json, str(p.verdict_ttl_s)], client=pipe)
        return sum(int(n) for n in await pipe.execute())

    async def fingerprints_restored(self) -> None:
        """The rebuild gave the primaries their fingerprints back: new jobs may be deduplicated again."""
        await self._redis.set(self._key("fpready"), "1")

    async def add_duplicate(self, primary: str, member: str, window_s: int) -> None:
        """Attach a duplicate to its primary again (Redis lost the set): it gets the primary's verdict."""
        key = self._key("dups", primary)
        pipe = self._redis.pipeline(transaction=True)
        pipe.sadd(key, member)
        pipe.expire(key, _duplicates_ttl(window_s))
        await pipe.execute()

    async def take_duplicates(self, primary: str) -> list[str]:
        """The primary is done: its waiting duplicates, removed so that each is resolved once."""
        key = self._key("dups", primary)
        pipe = self._redis.pipeline(transaction=True)
        pipe.smembers(key)
        pipe.delete(key)
        members, _ = await pipe.execute()
        return sorted(m.decode() for m in members)

    async def remember_verdict(self, primary: str, verdict_json: str, window_s: int) -> None:
        """A primary's verdict, for later duplicates inside the dedup window."""
        await self._redis.set(self._key("verdict", primary), verdict_json, ex=max(1, window_s))

    async def replace_remembered_verdict(self, primary: str, verdict_json: str) -> bool:
        """A human overrode the primary: later duplicates get that verdict. False when none is remembered.

        The expiry is kept: the window runs from the primary's verdict, not from the override.
        """
        return bool(await self._redis.set(self._key("verdict", primary), verdict_json, xx=True, keepttl=True))

    async def publish_human_cases(self, *cases: str) -> int | None:
        """Append human-verdict cases (JSON) to the memory list, keeping only the newest MEMORY_MAX.

        Returns the memory's new version (None when there was nothing to publish): it grows by one per case,
        also once the list is full and its length no longer changes.
        """
        if not cases:
            return None
        return int(await self._publish_memory(args=[self.prefix, str(MEMORY_MAX), *cases]))

    async def memory_seeded(self) -> bool:
        """Whether the memory list exists; absent after Redis lost its data (or on a new install)."""
        return bool(await self._redis.exists(self._key("memory")))

    async def memory_version(self) -> int | None:
        """The count of cases ever published to the memory list; None before the first (or after a data loss)."""
        raw = await self._redis.get(self._key("memory", "version"))
        return None if raw is None else int(raw)

    async def memory_since(self, version: int | None) -> MemoryDelta:
        """The cases published after ``version`` (the caller's last ``MemoryDelta.version``), in one atomic read.

        When they are no longer all in the list (trimmed, or Redis lost its data) or ``version`` is None, the
        whole list instead, with ``complete`` set.
        """
        res = await self._memory_since(args=[self.prefix, "" if version is None else str(version)])
        head, mode = res[0].decode() if isinstance(res[0], bytes) else str(res[0]), res[1]
        return MemoryDelta(int(head) if head else None, mode in (b"full", "full"), list(res[2:]))

    async def memory_cases(self) -> list[bytes]:
        """Every human-verdict case of the memory list, oldest first (raw JSON)."""
        return list(await self._redis.lrange(self._key("memory"), 0, -1))

    async def reap(self, pool: str, base_backoff_ms: int, cap_backoff_ms: int, limit: int = 500) -> tuple[int, int]:
        """Expired leases -> retry with backoff, or failed. Returns (retried, failed)."""
        now_ms = int(time.time() * 1000)
        expired = await self._redis.zrangebyscore(self._key("leases", pool), "-inf", now_ms, start=0, num=limit)
        retried = failed = 0
        for raw in expired:
            uid = raw.decode()
            res = await self._retry(args=[
                self.prefix, uid, "lease expired: the worker stopped answering", str(base_backoff_ms),
                str(cap_backoff_ms), "",
            ])
            retried += res == 1
            failed += res == 2
        return retried, failed

    async def set_pool_config(self, pool: str, jobs_per_second: float | None, burst: int | None) -> None:
        key = self._key("poolcfg", pool)
        if jobs_per_second:
            burst = burst or max(1, int(jobs_per_second))
            await self._redis.hset(key, mapping={"rate": str(jobs_per_second), "burst": str(burst)})
        else:
            await self._redis.delete(key)

    async def depth(self, pool: str) -> dict[str, int]:
        """Queued jobs per priority value, plus 'delayed' and 'running'."""
        out: dict[str, int] = {}
        prios = await self._redis.zrevrange(self._key("prios", pool), 0, -1)
        for p in prios:
            n = await self._redis.zcard(self._key("q", pool, p.decode()))
            if n:
                out[p.decode()] = n
        out["delayed"] = await self._redis.zcard(self._key("delayed", pool))
        out["running"] = await self._redis.zcard(self._key("leases", pool))
        return out

    async def oldest_queued_age(self, pool: str) -> dict[str, float]:
        """Seconds the oldest queued job of each priority has waited."""
        now_us = time.time() * 1e6
        out = {}
        for p in await self._redis.zrevrange(self._key("prios", pool), 0, -1):
            first = await self._redis.zrange(self._key("q", pool, p.decode()), 0, 0, withscores=True)
            if first:
                out[p.decode()] = max(0.0, (now_us - first[0][1]) / 1e6)
        return out

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._key("events"), EVENTS_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_events(self, consumer: str, count: int = 256, block_ms: int = 1000,
                          pending: bool = False) -> list[Event]:
        """New events for this consumer, or (pending=True) the ones it read but never acked."""
        res = await self._redis.xreadgroup(
            EVENTS_GROUP, consumer, {self._key("events"): "0" if pending else ">"}, count=count,
            block=None if pending else block_ms,
        )
        return [_event(eid, fields) for _stream, entries in res or [] for eid, fields in entries]

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int = 256) -> list[Event]:
        """Events another consumer read but never acked (it died): take them over."""
        res = await self._redis.xautoclaim(self._key("events"), EVENTS_GROUP, consumer, min_idle_ms, "0-0", count=count)
        entries = res[1] if res else []
        return [_event(eid, fields) for eid, fields in entries if fields]  # empty: deleted meanwhile

    async def take_over_stopped(self, consumer: str, min_idle_ms: int, forget_idle_ms: int,
                                count: int = 512) -> tuple[list[Event], list[str]]:
        """Events read but never acknowledged by consumers that stopped: ``consumer`` takes them over.

        A consumer has stopped when it has not read for ``min_idle_ms`` (a live one reads every half second).
        Its entries are claimed with the same idle bound, so two replicas cannot both take one. Stopped
        consumers that hold nothing and have been idle for ``forget_idle_ms`` are removed (every operator
        start has a new name). Returns the events and the names of the consumers they came from.
        """
        stream = self._key("events")
        try:
            consumers = await self._redis.xinfo_consumers(stream, EVENTS_GROUP)
        except aioredis.ResponseError:  # no stream or group yet (a new or flushed Redis): nothing to take over
            return [], []
        taken: list[Event] = []
        owners: list[str] = []
        for info in consumers:
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            idle, pending = int(info["idle"]), int(info["pending"])
            if name == consumer or idle < min_idle_ms:
                continue
            if pending == 0:
                if idle >= forget_idle_ms:
                    await self._forget_consumer(keys=[stream], args=[EVENTS_GROUP, name])
                continue
            entries = await self._redis.xpending_range(stream, EVENTS_GROUP, "-", "+", count - len(taken),
                                                       consumername=name)
            ids = [e["message_id"] for e in entries]
            if ids:
                claimed = await self._redis.xclaim(stream, EVENTS_GROUP, consumer, min_idle_ms, ids)
                got = [_event(eid, fields) for eid, fields in claimed if fields]
                if got:
                    taken += got
                    owners.append(name)
            if len(taken) >= count:
                break
        return taken, owners

    async def ack(self, *event_ids: str) -> None:
        if event_ids:
            await self._redis.xack(self._key("events"), EVENTS_GROUP, *event_ids)
            await self._redis.xdel(self._key("events"), *event_ids)

    async def epoch_ok(self) -> bool:
        return bool(await self._redis.exists(self._key("epoch")))

    async def set_epoch(self, value: str) -> None:
        await self._redis.set(self._key("epoch"), value)

    # ---------------------------------------------------------------- worker side

    async def claim(self, pool: str, worker: str, lease_ms: int) -> Claimed | float | None:
        """A job, or seconds to wait for the rate limit, or None when every queue is empty."""
        res = await self._claim(args=[self.prefix, pool, worker, str(lease_ms)])
        if not res:
            return None
        kind = res[0].decode()
        if kind == "wait":
            return int(res[1]) / 1000.0
        return Claimed(uid=res[1].decode(), payload=json.loads(res[2]), attempt=int(res[3]), started_us=int(res[4]),
                       max_attempts=int(res[5] or 1), queued_us=int(float(res[6] or 0)))

    async def wait_for_work(self, pool: str, timeout_s: float) -> None:
        await self._redis.blpop([self._key("wake", pool)], timeout=timeout_s)

    async def heartbeat(self, uid: str, worker: str, lease_ms: int) -> bool:
        """False when the lease is gone (expired and requeued, or the job was deleted)."""
        return bool(await self._heartbeat(args=[self.prefix, uid, worker, str(lease_ms)]))

    async def report(self, uid: str, worker: str, verdict_json: str) -> bool:
        return bool(await self._report(args=[self.prefix, uid, worker, "result", verdict_json]))

    async def fail_attempt(
        self, uid: str, worker: str, reason: str, base_backoff_ms: int, cap_backoff_ms: int
    ) -> int:
        """1 = will retry, 2 = attempts exhausted (operator marks Failed), 0 = lease no longer ours."""
        return int(await self._retry(args=[
            self.prefix, uid, reason[:2000], str(base_backoff_ms), str(cap_backoff_ms), worker,
        ]))

    async def release(self, uid: str, worker: str) -> bool:
        return bool(await self._release(args=[self.prefix, uid, worker]))
