"""The leader loop: the operator's work that must run once per active operator, not once per pool.

- the result-stream consumer (``recording.consume``): one consumer of the Redis group per replica;
- the rebuild after Redis lost its data (``resync.rebuild``) and the memory reseed;
- the periodic resync, which admits any unfinished job missing from the queue (``resync.resync``);
- the retry of verdicts the database missed (``recording.retry_db_backlog``);
- the ``kubetriage_jobs`` gauges, which count every job, not a pool's.

Per-pool work (lease reap, scaling, pool status, queue gauges) stays in each pool's daemon.

Why it hangs off the pool daemons: kopf peering pauses the daemons of a standby
replica, but not tasks started from ``@kopf.on.startup``, and it tells handlers
nothing else about it. So every TriagePool daemon *holds* the leader while it
runs: the first holder starts the one loop, the last one to let go stops it.
A standby (all its daemons paused) thus runs no leader loop, and the active
replica runs exactly one, however many pools it has. With no TriagePool there
is no loop either, which costs nothing: without a pool no job is admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from redis.exceptions import RedisError

from kubetriage.controller import overrides, recording, resync, ttl
from kubetriage.controller.actions import executor
from kubetriage.controller.runtime import Runtime
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError

log = logging.getLogger("kubetriage.controller.leader")

TICK_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 5.0


class Leader:
    """Reference-counted: the loop runs while at least one pool daemon holds it.

    The count changes without an ``await``, so a holder that is cancelled (kopf cancels a daemon that
    does not stop in time) still lets go. A new loop waits for the previous one to be fully stopped:
    one replica never has two consumers.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.holders = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold the leader for the body's duration (a pool daemon's life)."""
        self._acquire()
        try:
            yield
        finally:
            stopping = self._release()
            if stopping is not None:
                await _finish(stopping)

    async def close(self) -> None:
        """Operator shutdown: stop the loop whoever still holds it (cleanup may run before the daemons end)."""
        self.holders = 0
        task, self._task = self._task, None
        self._stop.set()
        for t in (task, self._stopping):
            if t is not None:
                await _finish(t)

    def _acquire(self) -> None:
        self.holders += 1
        if self._task is None or self._task.done():  # done: it died; the next holder starts a fresh one
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run(self._stopping, self._stop), name="kubetriage-leader")

    def _release(self) -> asyncio.Task[None] | None:
        self.holders = max(0, self.holders - 1)  # never below 0: close() may have zeroed it already
        if self.holders > 0 or self._task is None:
            return None
        self._stop.set()
        self._stopping, self._task = self._task, None
        return self._stopping

    async def _run(self, previous: asyncio.Task[None] | None, stop: asyncio.Event) -> None:
        if previous is not None:  # a quick pause/resume: the old consumer must be gone first
            await asyncio.wait({previous})
        if not stop.is_set():
            await run(self.rt, stop)


async def _finish(task: asyncio.Task[None]) -> None:
    """Wait for a stopping loop, then cancel it if it hangs; never raises for the loop's own errors."""
    done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_SECONDS)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    elif not task.cancelled() and task.exception() is not None:
        log.error("leader loop ended with an error", exc_info=task.exception())


async def run(rt: Runtime, stop: asyncio.Event) -> None:
    """The leader loop until ``stop``: the consumer task, and the periodic work once a second."""
    log.info("leader loop started (consumer %s)", rt.identity)
    consumer = asyncio.create_task(recording.consume(rt, rt.identity, stop), name="kubetriage-consumer")
    # TriagePolicy actions and TTL deletions act once per cluster too (controller.actions.executor, controller.ttl)
    helpers = {asyncio.create_task(executor.run(rt, stop), name="kubetriage-actions"),
               asyncio.create_task(ttl.run(rt, stop), name="kubetriage-ttl")}
    loop = asyncio.get_running_loop()
    next_resync = loop.time() + rt.settings.resync_seconds
    try:
        while not stop.is_set():
            try:
                if await tick(rt):  # rebuilt: jobs admitted meanwhile into the Redis that died may be lost too
                    next_resync = min(next_resync, loop.time() + resync.GRACE_SECONDS)
                if rt.settings.resync_seconds and loop.time() >= next_resync:
                    next_resync = loop.time() + rt.settings.resync_seconds
                    await resync.resync(rt)
            except (OSError, ConnectionError, RedisError, ApiError) as exc:
                log.warning("leader loop: %s", exc)
            except Exception:
                log.exception("leader loop failed; continuing")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)
    finally:
        stop.set()  # the consumer checks it between reads (each blocks at most 0.5 s)
        # together: the actions executor lets deliveries in flight finish and be recorded meanwhile (a restart
        # must not send them again)
        _, hung = await asyncio.wait({consumer, *helpers}, timeout=STOP_TIMEOUT_SECONDS)
        for task in hung:
            task.cancel()
        log.info("leader loop stopped")


async def tick(rt: Runtime) -> bool:
    """One round of the periodic leader work; True when it rebuilt the queues."""
    rebuilt = False
    if not await rt.queue.epoch_ok():  # Redis is new or lost its data: the queues come back from Kubernetes
        rebuilt = bool(await resync.rebuild(rt))
        await overrides.seed_memory(rt)
    if rt.db_backlog:
        await recording.retry_db_backlog(rt)
    export_jobs(rt)
    return rebuilt


_jobs_exported: set[tuple[str, str]] = set()


def export_jobs(rt: Runtime) -> None:
    """``kubetriage_jobs`` by phase and source; a combination that emptied is set to 0, not left stale."""
    counts: dict[tuple[str, str], int] = {}
    for uid, phase in rt.phases.items():
        key = (phase or "New", rt.sources.get(uid, ""))
        counts[key] = counts.get(key, 0) + 1
    for (phase, source), n in counts.items():
        metrics.JOBS.labels(phase, source).set(n)
    for labels in list(_jobs_exported - set(counts)):
        metrics.JOBS.labels(*labels).set(0)
    _jobs_exported.update(counts)
