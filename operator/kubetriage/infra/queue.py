"""The Redis dispatch path: per-pool priority queues, leases, retries, and the event stream.

Every state change is one Lua script, so a claim, a lease expiry or a report is
atomic however many workers and operator replicas race. Redis is disposable:
everything here can be rebuilt from the TriageJobs in Kubernetes
(``Queue.epoch_ok`` tells the operator when it must).

Keys, for a pool key ``P`` (``namespace/name``) and prefix ``kt``:

- ``kt:job:{uid}``        hash: payload, pool, prio, score, ns, name, attempts, max, state, worker
- ``kt:q:{P}:{prio}``     zset uid -> FIFO score (queue time, microseconds)
- ``kt:prios:{P}``        zset of priority values that may have work (highest first)
- ``kt:leases:{P}``       zset uid -> lease expiry (ms)
- ``kt:delayed:{P}``      zset uid -> retry-after time (ms)
- ``kt:wake:{P}``         list; one push per enqueue wakes one idle worker slot
- ``kt:poolcfg:{P}``      hash: rate limit (jobs/s, burst) set by the operator
- ``kt:bucket:{P}``       hash: token-bucket state
- ``kt:events``           stream: started / result / failed, read by the operator's consumer group
- ``kt:fp:{ns}:{fp}``     string: the primary job uid for a fingerprint, TTL = dedup window
- ``kt:dups:{uid}``       set: duplicates waiting for the primary's verdict
- ``kt:verdict:{uid}``    string: a finished primary's verdict, TTL = dedup window
- ``kt:epoch``            string: present while the queues are complete
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

EVENTS_GROUP = "operator"

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
local ok = redis.call('SET', prefix..':fp:'..key, uid, 'NX', 'EX', ttl)
if ok then return {'primary', uid} end
local primary = redis.call('GET', prefix..':fp:'..key)
if primary == uid then return {'primary', uid} end
local verdict = redis.call('GET', prefix..':verdict:'..primary)
if verdict then return {'done', primary, verdict} end
redis.call('SADD', prefix..':dups:'..primary, member)
redis.call('EXPIRE', prefix..':dups:'..primary, ttl * 4)
return {'duplicate', primary}
"""


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


class Queue:
    """Typed wrappers around the Lua scripts; one instance per process."""

    def __init__(self, client: aioredis.Redis, prefix: str = "kt") -> None:
        self.r = client
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

    def k(self, *parts: str) -> str:
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
        return bool(await self.r.exists(self.k("job", uid)))

    async def job(self, uid: str) -> dict[str, str]:
        raw = await self.r.hgetall(self.k("job", uid))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def remove(self, uid: str) -> None:
        await self._remove(args=[self.prefix, uid])

    async def remove_many(self, uids: list[str]) -> None:
        if not uids:
            return
        pipe = self.r.pipeline(transaction=False)
        for uid in uids:
            await self._remove(args=[self.prefix, uid], client=pipe)
        await pipe.execute()

    async def jobs(self, uids: list[str]) -> dict[str, dict[str, str]]:
        """Many job hashes in one round trip (missing ones are left out)."""
        pipe = self.r.pipeline(transaction=False)
        for uid in uids:
            pipe.hgetall(self.k("job", uid))
        out = {}
        for uid, raw in zip(uids, await pipe.execute(), strict=True):
            if raw:
                out[uid] = {k.decode(): v.decode() for k, v in raw.items()}
        return out

    async def dedup(
        self, namespace: str, fingerprint: str, uid: str, member: str, window_s: int
    ) -> tuple[str, str, str]:
        """('primary'|'duplicate'|'done', primary uid, verdict JSON when done)."""
        res = await self._dedup(args=[self.prefix, f"{namespace}:{fingerprint}", uid, str(window_s), member])
        parts = [p.decode() if isinstance(p, bytes) else p for p in res]
        return parts[0], parts[1], parts[2] if len(parts) > 2 else ""

    async def take_duplicates(self, primary_uid: str) -> list[str]:
        key = self.k("dups", primary_uid)
        pipe = self.r.pipeline(transaction=True)
        pipe.smembers(key)
        pipe.delete(key)
        members, _ = await pipe.execute()
        return sorted(m.decode() for m in members)

    async def remember_verdict(self, primary_uid: str, verdict_json: str, window_s: int) -> None:
        await self.r.set(self.k("verdict", primary_uid), verdict_json, ex=max(1, window_s))

    async def reap(self, pool: str, base_backoff_ms: int, cap_backoff_ms: int, limit: int = 500) -> tuple[int, int]:
        """Expired leases -> retry with backoff, or failed. Returns (retried, failed)."""
        now_ms = int(time.time() * 1000)
        expired = await self.r.zrangebyscore(self.k("leases", pool), "-inf", now_ms, start=0, num=limit)
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
        key = self.k("poolcfg", pool)
        if jobs_per_second:
            burst = burst or max(1, int(jobs_per_second))
            await self.r.hset(key, mapping={"rate": str(jobs_per_second), "burst": str(burst)})
        else:
            await self.r.delete(key)

    async def depth(self, pool: str) -> dict[str, int]:
        """Queued jobs per priority value, plus 'delayed' and 'running'."""
        out: dict[str, int] = {}
        prios = await self.r.zrevrange(self.k("prios", pool), 0, -1)
        for p in prios:
            n = await self.r.zcard(self.k("q", pool, p.decode()))
            if n:
                out[p.decode()] = n
        out["delayed"] = await self.r.zcard(self.k("delayed", pool))
        out["running"] = await self.r.zcard(self.k("leases", pool))
        return out

    async def oldest_queued_age(self, pool: str) -> dict[str, float]:
        """Seconds the oldest queued job of each priority has waited."""
        now_us = time.time() * 1e6
        out = {}
        for p in await self.r.zrevrange(self.k("prios", pool), 0, -1):
            first = await self.r.zrange(self.k("q", pool, p.decode()), 0, 0, withscores=True)
            if first:
                out[p.decode()] = max(0.0, (now_us - first[0][1]) / 1e6)
        return out

    async def ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(self.k("events"), EVENTS_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_events(self, consumer: str, count: int = 256, block_ms: int = 1000,
                          pending: bool = False) -> list[Event]:
        """New events for this consumer, or (pending=True) the ones it read but never acked."""
        res = await self.r.xreadgroup(
            EVENTS_GROUP, consumer, {self.k("events"): "0" if pending else ">"}, count=count,
            block=None if pending else block_ms,
        )
        return [_event(eid, fields) for _stream, entries in res or [] for eid, fields in entries]

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int = 256) -> list[Event]:
        """Events another consumer read but never acked (it died): take them over."""
        res = await self.r.xautoclaim(self.k("events"), EVENTS_GROUP, consumer, min_idle_ms, "0-0", count=count)
        entries = res[1] if res else []
        return [_event(eid, fields) for eid, fields in entries if fields]  # empty: deleted meanwhile

    async def ack(self, *event_ids: str) -> None:
        if event_ids:
            await self.r.xack(self.k("events"), EVENTS_GROUP, *event_ids)
            await self.r.xdel(self.k("events"), *event_ids)

    async def epoch_ok(self) -> bool:
        return bool(await self.r.exists(self.k("epoch")))

    async def set_epoch(self, value: str) -> None:
        await self.r.set(self.k("epoch"), value)

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
        await self.r.blpop([self.k("wake", pool)], timeout=timeout_s)

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
