"""TTL: finished TriageJobs are deleted ``ttlSecondsAfterFinished`` after they finished. Leader only.

The job's ``spec.ttlSecondsAfterFinished``, else its pool's; with neither the job is kept. The verdict
stays in the database (``triage_verdicts`` and the team's row): only the Kubernetes object goes. A job
whose actions are still ``Pending`` waits for them (its status is their only record).

Deletions are paced so that the API server never receives more than ``ttl_deletions_per_second`` of them
in any one-second window, whatever the network does: deletion k starts only after deletion k-N (N the
rate) has been answered, and a full second after that answer. The server received k-N before it
answered, and receives k after k starts, so the two are more than a second apart. Up to N run at once.

Each DELETE carries the job's uid as a precondition, so a job deleted and created again under the same
name is never taken for the old one. The uids deleted here are remembered for a while so that the
DELETED event can tell a TTL deletion from a user's: only a user's lifts the silence the job held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubetriage.api import policy as pol
from kubetriage.api.models import FINISHED_PHASES, Phase
from kubetriage.api.timeutil import parse_time
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError, triagejob_path

if TYPE_CHECKING:  # the Runtime holds a TTLState: a runtime import here would be circular
    from kubetriage.controller.runtime import Runtime

log = logging.getLogger("kubetriage.controller.ttl")

IDLE_SECONDS = 0.5
REMEMBER_SECONDS = 3600.0
SAFETY_SECONDS = 0.005


@dataclass
class TTLState:
    heap: list[tuple[float, str]] = field(default_factory=list)  # (when due, epoch s; uid)
    jobs: dict[str, tuple[float, str, str]] = field(default_factory=dict)  # uid -> (due, namespace, name)
    deleted: dict[str, float] = field(default_factory=dict)  # uid -> when the TTL deleted it (monotonic)
    # finished jobs seen before the pools could be listed (their TTL may be their pool's): looked at again then
    unresolved: dict[str, dict[str, Any]] = field(default_factory=dict)


def _finished(status: dict[str, Any]) -> bool:
    phase = status.get("phase")
    if phase in FINISHED_PHASES:
        return True
    # a duplicate is done once it has its primary's verdict (when the primary failed, so is it: Failed)
    return phase == Phase.DUPLICATE.value and bool(status.get("verdict"))


def ttl_of(rt: Runtime, body: dict[str, Any]) -> int | None:
    """The job's TTL in seconds: its own, else its pool's default, else None (kept)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    own = spec.get("ttlSecondsAfterFinished")
    if isinstance(own, int):
        return own
    pool = rt.pools.get(status.get("pool") or "") or rt.find_pool(
        body["metadata"]["namespace"], spec.get("pool") or rt.settings.default_pool)
    default = (pool.spec.get("ttlSecondsAfterFinished") if pool is not None else None)
    return default if isinstance(default, int) else None


def observe(rt: Runtime, body: dict[str, Any]) -> None:
    """A job event: (re)schedule its deletion if it is finished and has a TTL, else drop any schedule."""
    meta, status = body["metadata"], body.get("status") or {}
    uid = meta["uid"]
    state = rt.ttl
    state.unresolved.pop(uid, None)
    ttl = ttl_of(rt, body) if _finished(status) else None
    if ttl is None or pol.pending(pol.parse_actions(status.get("actions"))):
        state.jobs.pop(uid, None)
        return
    finished = parse_time(status.get("completedAt")) or parse_time(meta.get("creationTimestamp"))
    due = (finished.timestamp() if finished else time.time()) + ttl
    current = state.jobs.get(uid)
    if current is not None and current[0] == due:
        return
    _schedule(rt, uid, meta["namespace"], meta["name"], due)


async def observe_loaded(rt: Runtime, body: dict[str, Any]) -> None:
    """``observe``, once the pools are known (a finished job's first event may come before them at startup,
    and its TTL may be its pool's)."""
    if _finished(body.get("status") or {}) and not rt.caches_loaded:
        try:
            await rt.load_caches()
        except ApiError as exc:
            log.warning("cannot list pools for TTL defaults yet: %s", exc)
            rt.ttl.unresolved[body["metadata"]["uid"]] = _trimmed(body)
            return
    observe(rt, body)


def _trimmed(body: dict[str, Any]) -> dict[str, Any]:
    """What ``observe`` reads of a job, without the rest of it (many may wait at once)."""
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    return {"metadata": {k: meta.get(k) for k in ("uid", "namespace", "name", "creationTimestamp")},
            "spec": {k: spec[k] for k in ("pool", "ttlSecondsAfterFinished") if k in spec},
            "status": {k: status[k] for k in ("phase", "verdict", "pool", "completedAt", "actions") if k in status}}


def _schedule(rt: Runtime, uid: str, ns: str, name: str, due: float) -> None:
    rt.ttl.jobs[uid] = (due, ns, name)
    heapq.heappush(rt.ttl.heap, (due, uid))


def forget(rt: Runtime, uid: str) -> bool:
    """The job is gone; True when the TTL deleted it."""
    rt.ttl.jobs.pop(uid, None)
    rt.ttl.unresolved.pop(uid, None)
    return rt.ttl.deleted.pop(uid, None) is not None


def _due(rt: Runtime, now: float) -> list[tuple[str, str, str]]:
    state, out = rt.ttl, []
    while state.heap and state.heap[0][0] <= now:
        due, uid = heapq.heappop(state.heap)
        job = state.jobs.get(uid)
        if job is not None and job[0] == due:  # else rescheduled or forgotten since it was pushed
            del state.jobs[uid]
            out.append((uid, job[1], job[2]))
    return out


class Pacer:
    """At most ``rate`` deletions received by the API server in any one-second window (see the module doc)."""

    def __init__(self, rate: int) -> None:
        self.rate = max(1, rate)
        # completion times (monotonic) of the last ``rate`` deletions, None while one is in flight
        self._done: collections.deque[asyncio.Future[float]] = collections.deque()

    async def slot(self) -> asyncio.Future[float]:
        """Wait until a deletion may start; set the returned future to its answer's time when it is answered."""
        loop = asyncio.get_running_loop()
        if len(self._done) >= self.rate:
            answered = await asyncio.shield(self._done.popleft())
            # strictly more than a second: asyncio may wake a timer up to its clock resolution early
            wait = answered + 1.0 + SAFETY_SECONDS - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        fut: asyncio.Future[float] = loop.create_future()
        self._done.append(fut)
        return fut


async def _delete(rt: Runtime, uid: str, ns: str, name: str, answered: asyncio.Future[float]) -> None:
    try:
        rt.ttl.deleted[uid] = time.monotonic()  # before the request: its DELETED event may come before the answer
        await rt.kube.request("DELETE", triagejob_path(ns, name), json={
            "apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}})
        metrics.TTL_DELETIONS.inc()
    except ApiError as exc:
        rt.ttl.deleted.pop(uid, None)
        if exc.status not in (404, 409):  # gone already, or another job under the name now: nothing to do
            log.warning("TTL deletion of %s/%s failed (%s); retrying later", ns, name, exc)
            _schedule(rt, uid, ns, name, time.time() + 5)
    finally:
        answered.set_result(time.monotonic())


async def _resolve(rt: Runtime) -> None:
    """The jobs seen before the pools were known, once they are (a job's later event may have done it)."""
    if not rt.caches_loaded:
        try:
            await rt.load_caches()
        except ApiError:
            return
    for uid, body in list(rt.ttl.unresolved.items()):
        del rt.ttl.unresolved[uid]
        if uid not in rt.ttl.jobs:
            observe(rt, body)


async def run(rt: Runtime, stop: asyncio.Event) -> None:
    """Until ``stop``: delete the jobs whose TTL ended, paced."""
    pacer = Pacer(int(rt.settings.ttl_deletions_per_second))
    tasks: set[asyncio.Task[None]] = set()
    try:
        while not stop.is_set():
            if rt.ttl.unresolved:
                await _resolve(rt)
            due = _due(rt, time.time())
            for i, (uid, ns, name) in enumerate(due):
                answered = await pacer.slot()
                if stop.is_set():
                    answered.set_result(time.monotonic())
                    for left in due[i:]:  # not deleted: due again when this replica leads again
                        _schedule(rt, *left, time.time())
                    break
                task = asyncio.create_task(_delete(rt, uid, ns, name, answered))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            cutoff = time.monotonic() - REMEMBER_SECONDS
            for uid in [u for u, at in rt.ttl.deleted.items() if at < cutoff]:
                del rt.ttl.deleted[uid]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), IDLE_SECONDS)
    finally:
        if tasks:
            await asyncio.wait(tasks, timeout=5)
