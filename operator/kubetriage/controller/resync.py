"""The queues, put back level-triggered from the TriageJobs in Kubernetes: the rebuild and the resync.

Watch events are edges: a job whose admission failed and was never retried
(an operator stopped in between), or whose event never arrived, would wait
forever. Both functions here list the jobs instead and do what is missing;
both run in the leader loop (``controller.leader``), so once per cluster.

- ``rebuild``: Redis lost its data (no epoch). Primaries inside their dedup
  window first get their fingerprints back (and finished ones their
  verdicts), since admission does not deduplicate before that; then every
  unfinished job goes back into its queue, keeping its FIFO place, and waiting
  duplicates re-attach to their primaries.
- ``resync``: every ``resync_seconds`` (and once soon after a rebuild: jobs
  admitted into the Redis that died, after the rebuild listed them, are lost
  too), any unfinished job (whatever its phase: new, Pending, Queued or
  Running) that Redis does not know is admitted.

API cost: one paginated LIST of every TriageJob the operator watches (500 per
page, finished ones included: a field selector on status is not available for
custom resources), per ``resync_seconds`` (60 s by default). The API server
serves such lists from its watch cache, not from etcd, but it still
serialises every object: about 2.5 KB per job (1,500 jobs: 3.7 MB, listed in
0.3 s on a 2-core test machine), so 10,000 kept jobs are about 25 MB per
minute, and the operator parses as much. Redis gets one pipelined
EXISTS per page. Nothing is written unless a job was missing. Raise
``resync_seconds`` (or set 0) where many finished jobs are kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from kubetriage.api.models import API_VERSION, FINISHED_PHASES, Phase
from kubetriage.api.timeutil import now, parse_time
from kubetriage.controller import admission
from kubetriage.controller.runtime import Runtime
from kubetriage.infra import metrics
from kubetriage.infra.kube import triagejob_path

log = logging.getLogger("kubetriage.controller.resync")

PAGE = 500
# A job this young and never queued is left to its own watch event (usually being admitted at this moment):
# the resync is for jobs nothing else will look at again, and admitting one twice at once is wasted work.
GRACE_SECONDS = 10.0
# admissions a resync or rebuild runs at once: quick after a Redis loss, without flooding the API server
CONCURRENCY = 16
_ACTIVE = {Phase.QUEUED.value, Phase.RUNNING.value}
_UNQUEUED = {None, "", Phase.PENDING.value}


async def _pages(rt: Runtime) -> AsyncIterator[list[dict[str, Any]]]:
    """Every TriageJob the operator watches, a page at a time (a page is what is held in memory)."""
    for ns in rt.settings.watched_namespaces or [None]:
        path = triagejob_path(ns) if ns else f"/apis/{API_VERSION}/triagejobs"
        cont = None
        while True:
            page = await rt.kube.get(path, limit=PAGE, **({"continue": cont} if cont else {}))
            yield page.get("items", [])
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                break


def _phase(item: dict[str, Any]) -> str | None:
    return (item.get("status") or {}).get("phase")


async def resync(rt: Runtime) -> int:
    """Admit every unfinished job Redis does not know; returns how many were missing (Pending ones aside)."""
    missing = 0
    async for items in _pages(rt):
        missing += await _admit_missing(rt, [i for i in items if _phase(i) in _UNQUEUED or _phase(i) in _ACTIVE])
    if missing:
        metrics.RESYNC_ADMITTED.inc(missing)
    return missing


async def _admit_missing(rt: Runtime, items: list[dict[str, Any]]) -> int:
    """Admit those of ``items`` Redis does not know, a few at a time; returns how many (Pending ones aside)."""
    cutoff = now().timestamp() - GRACE_SECONDS
    candidates = []
    for item in items:
        meta = item["metadata"]
        created = parse_time(meta.get("creationTimestamp"))
        # a job being admitted, with a retry pending, or parked waiting for a class or pool, is looked after
        # already; one this replica recorded since the page was listed (and removed from Redis) is finished
        uid = meta["uid"]
        looked_after = uid in rt.admitting or uid in rt.admission_retries or uid in rt.waiting \
            or rt.phases.get(uid) in FINISHED_PHASES
        young = _phase(item) in _UNQUEUED and created is not None and created.timestamp() >= cutoff
        if not looked_after and not young:
            candidates.append(item)
    known = await rt.queue.known_many([i["metadata"]["uid"] for i in candidates])
    missing = [i for i in candidates if i["metadata"]["uid"] not in known]
    for item in missing:
        if _phase(item) != Phase.PENDING.value:  # Pending ones wait for a class or pool, and say so
            log.warning("%s/%s (phase %s) was missing from the queue; admitting it",
                        item["metadata"]["namespace"], item["metadata"]["name"], _phase(item) or "none")
    await _each(rt, missing)
    return sum(_phase(i) != Phase.PENDING.value for i in missing)


async def _each(rt: Runtime, items: list[dict[str, Any]]) -> None:
    """``admit_or_retry`` each item, CONCURRENCY at a time (it never raises: a failure is retried later)."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(item: dict[str, Any]) -> None:
        async with sem:
            await admission.admit_or_retry(rt, item)

    await asyncio.gather(*(one(i) for i in items))


async def rebuild(rt: Runtime) -> int:
    """Redis came back empty: put back every TriageJob that is not finished. Returns how many were seen.

    Two passes over the jobs. First the primaries' fingerprints (one pipelined round trip per page), so that
    new jobs, which wait for them before they deduplicate, wait as little as possible; then the queues (the
    queued and running jobs, keeping their FIFO place; the waiting duplicates; the unqueued jobs nothing
    else looks after), and the epoch last, so that a rebuild cut short is done again from the start.
    """
    async with rt.rebuild_lock:
        if await rt.queue.epoch_ok():
            return 0
        await rt.queue.ensure_group()
        await rt.load_caches()  # the pools: their identity labels scope the fingerprints
        for pool in list(rt.pools.values()):  # rate limits were lost with the rest
            await rt.push_pool_config(pool)
        restored = 0
        async for items in _pages(rt):
            restored += await rt.queue.restore_primaries(
                [p for i in items if (p := admission.primary_to_restore(rt, i)) is not None])
        await rt.queue.fingerprints_restored()
        seen = 0
        async for items in _pages(rt):
            seen += len(items)
            # a waiting duplicate re-attaches to its primary (its set of duplicates was lost too)
            await _each(rt, [i for i in items if _phase(i) in _ACTIVE or _phase(i) == Phase.DUPLICATE.value])
            await _admit_missing(rt, [i for i in items if _phase(i) in _UNQUEUED])
        await rt.queue.set_epoch(rt.identity)
        log.info("queues rebuilt from %d TriageJobs (%d fingerprints restored)", seen, restored)
        return seen
