"""Recording: worker events from Redis -> TriageJob status, Events, and the database.

The operator is the single writer. An event is acknowledged in Redis only
after it is fully recorded, so a crash replays it; replays are harmless because
the database write is keyed by job uid and the status write is skipped once a
job is terminal. "Running" is written late (after ``running_status_delay``) so
a fast job costs two status writes, not three.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import Any

from kubetriage.api.contract import WorkerResult
from kubetriage.api.models import FINISHED_PHASES, Phase, TriageJobStatus, Verdict
from kubetriage.api.redact import Redactor
from kubetriage.api.timeutil import now
from kubetriage.controller.actions import plan as actions
from kubetriage.controller.runtime import Runtime
from kubetriage.controller.status import (
    cancel_running,
    record_of_duplicate,
    record_of_job,
    record_of_queued,
    schedule_running,
    triaged,
    us_time,
    verdict_conditions,
    write_status,
)
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError
from kubetriage.infra.queue import Event
from kubetriage.infra.sinks import SinkError, VerdictRecord

log = logging.getLogger("kubetriage.controller.recording")


async def handle_batch(rt: Runtime, events: list[Event]) -> list[str]:
    """Record a batch of worker events; returns the ids that are done and may be acknowledged.

    Verdicts of the batch go to the database in one transaction (one commit for
    a burst, not one per job); status and Event writes then run concurrently.
    """
    done: list[str] = []
    finals: dict[str, Event] = {}
    for ev in events:
        if ev.type == "started":
            schedule_running(rt, ev.uid, ev.us, ev.attempt)
            done.append(ev.id)
        elif ev.type in ("result", "failed"):
            if ev.uid in finals:  # a replayed duplicate inside one batch: the first one wins
                done.append(ev.id)
            else:
                finals[ev.uid] = ev
        else:
            log.warning("unknown event type %r in the event stream; dropped", ev.type)
            done.append(ev.id)
    if not finals:
        return done
    jobs = await rt.queue.jobs(list(finals))
    plans: list[_Plan] = []
    for uid, ev in finals.items():
        job = jobs.get(uid)
        if not job:
            done.append(ev.id)  # deleted while running, or already recorded before a crash
            continue
        plans.append(_plan(ev, job, rt.redactor(job.get("pool"))))
    records = [pl.record for pl in plans if pl.record is not None]
    flags = await record_many_in_db(rt, records)
    for pl in plans:
        if pl.record is not None:
            pl.recorded = flags[pl.record.job_uid]
    sem = asyncio.Semaphore(64)

    async def write(pl: _Plan) -> str | None:
        async with sem:
            try:
                await _write_plan(rt, pl)
            except Exception:
                log.exception("recording %s for %s/%s failed; it will be replayed", pl.ev.type, pl.ns, pl.name)
                return None
            return pl.ev.id

    written = await asyncio.gather(*(write(pl) for pl in plans))
    ok = [pl for pl, eid in zip(plans, written, strict=True) if eid]
    await rt.queue.remove_many([pl.ev.uid for pl in ok])
    done += [pl.ev.id for pl in ok]
    return done


@dataclasses.dataclass
class _Plan:
    ev: Event
    ns: str
    name: str
    status: TriageJobStatus  # the terminal write; a verdict's conditions are added once the database answered
    record: VerdictRecord | None
    recorded: bool = False
    failure: str = "attempts_exhausted"
    payload: str | None = None  # the job's request as queued: what TriagePolicies select on
    pool: str | None = None


def _plan(ev: Event, job: dict[str, str], redact: Redactor) -> _Plan:
    """The terminal write, Event and record of a worker's event. The worker's text is redacted again with the pool's
    patterns (``redact``): a model may quote what it read in a screenshot, and an older worker redacted nothing."""
    ns, name = job["ns"], job["name"]
    started = int(job.get("started_us") or ev.us)
    common: dict[str, Any] = {"attempts": ev.attempt, "started_at": us_time(started), "completed_at": now(),
                              "message": None}
    if ev.type == "result":
        try:
            result = WorkerResult.parse(ev.body)
        except ValueError as exc:  # a worker of another version: fail the job clearly, never replay forever
            reason = f"the worker sent an invalid verdict: {exc}"[:2000]
            failed = TriageJobStatus(**{**common, "phase": Phase.FAILED, "message": reason,
                                        "conditions": triaged(False, "InvalidVerdict", reason)})
            return _Plan(ev, ns, name, failed, None, failure="invalid_verdict")
        verdict = redact.verdict(result.verdict)
        found = redact.evidence(result.evidence)
        # the evidence goes in the same status write as the verdict: no API write of its own
        evidence = {"evidence": found} if found else {}
        succeeded = TriageJobStatus(**common, phase=Phase.SUCCEEDED, verdict=verdict, **evidence)
        return _Plan(ev, ns, name, succeeded, record_of_queued(ev.uid, job, verdict, ev.attempt, found),
                     payload=job.get("payload"), pool=job.get("pool"))
    why = redact(ev.body)  # an exception's text may quote the job's (a URL with its credentials)
    failed = TriageJobStatus(**{**common, "phase": Phase.FAILED,
                                "message": f"gave up after {ev.attempt} attempt(s): {why}"[:4096],
                                "conditions": triaged(False, "AttemptsExhausted", why)})
    return _Plan(ev, ns, name, failed, None)


async def _write_plan(rt: Runtime, pl: _Plan) -> None:
    ev, done = pl.ev, pl.status
    verdict = pl.record.verdict if pl.record is not None else None
    if verdict is not None:
        done.recorded = pl.recorded  # assignment marks the field set: it goes into the patch
        done.conditions = verdict_conditions(verdict, pl.recorded)
        event = ("Triaged", f"{verdict.classification} ({verdict.confidence:.2f}) by {verdict.analyzer}: "
                 f"{verdict.reason}", "Normal")
    else:
        event = ("TriageFailed", done.message or "", "Warning")
    cancel_running(rt, ev.uid)
    if rt.phases.get(ev.uid) not in FINISHED_PHASES:  # a replay of something already recorded writes nothing
        if verdict is not None:
            metrics.VERDICTS.labels(verdict.classification, verdict.analyzer, verdict.check_type).inc()
        else:
            metrics.JOBS_FAILED.labels(pl.failure).inc()
        # what TriagePolicies do about the verdict goes in the same write: no write more for a job none acts on
        planned = await actions.for_verdict(rt, pl.ns, ev.uid, pl.payload, verdict, pl.pool) if verdict else []
        if planned:
            done.actions = planned
        alive = await write_status(rt, pl.ns, pl.name, done)
        rt.phases[ev.uid] = done.phase or ""
        if alive:
            obj = {"metadata": {"name": pl.name, "namespace": pl.ns, "uid": ev.uid}}
            with contextlib.suppress(ApiError):
                await rt.kube.event(obj, *event)
            await actions.announce(rt, obj, planned)
    await _resolve_duplicates(rt, f"{ev.uid}/{pl.name}", pl.name, verdict)


async def record_many_in_db(rt: Runtime, records: list[VerdictRecord]) -> dict[str, bool]:
    """job uid -> in the database; on failure all of them join the backlog retried in the background."""
    if not records:
        return {}
    try:
        await rt.sink.record_many(records)
    except (SinkError, OSError) as exc:
        log.warning("database write of %d verdict(s) failed, will retry: %s", len(records), exc)
        metrics.DB_FAILURES.inc()
        for rec in records:
            rt.db_backlog[rec.job_uid] = rec
        metrics.DB_BACKLOG.set(len(rt.db_backlog))
        return {rec.job_uid: False for rec in records}
    for rec in records:
        rt.db_backlog.pop(rec.job_uid, None)
    metrics.DB_BACKLOG.set(len(rt.db_backlog))
    return {rec.job_uid: True for rec in records}


async def record_in_db(rt: Runtime, record: VerdictRecord) -> bool:
    """True when the database has it; otherwise it joins the backlog retried in the background."""
    try:
        await rt.sink.record(record)
        rt.db_backlog.pop(record.job_uid, None)
        return True
    except (SinkError, OSError) as exc:
        log.warning("database write for %s/%s failed, will retry: %s", record.namespace, record.job_name, exc)
        metrics.DB_FAILURES.inc()
        rt.db_backlog[record.job_uid] = record
        metrics.DB_BACKLOG.set(len(rt.db_backlog))
        return False


async def _resolve_duplicates(rt: Runtime, identity: str, primary_name: str, verdict: Verdict | None) -> None:
    """The primary finished: its waiting duplicates get its verdict (None: it failed, and so do they)."""
    if verdict is not None:
        await rt.queue.remember_verdict(identity, json.dumps(verdict.wire()), rt.settings.dedup_window_seconds)
    for raw in await rt.queue.take_duplicates(identity):
        dup = json.loads(raw)
        if verdict is not None:
            recorded = await record_in_db(rt, record_of_duplicate(dup, verdict))
            patch = TriageJobStatus(verdict=verdict, recorded=recorded,
                                    conditions=triaged(True, "Duplicate", f"verdict of {primary_name}"))
        else:
            patch = TriageJobStatus(phase=Phase.FAILED, message=f"duplicate of {primary_name}, which failed")
        with contextlib.suppress(ApiError):
            await write_status(rt, dup["ns"], dup["name"], patch)


async def retry_db_backlog(rt: Runtime) -> int:
    """Write verdicts the database missed; mark their jobs recorded. Returns how many are left."""
    for uid, record in list(rt.db_backlog.items()):
        try:
            await rt.sink.record(record)
        except (SinkError, OSError):
            break  # still down: try again on the next tick, in order
        rt.db_backlog.pop(uid, None)
        metrics.DB_BACKLOG.set(len(rt.db_backlog))
        with contextlib.suppress(ApiError):
            await write_status(rt, record.namespace, record.job_name, TriageJobStatus(
                recorded=True, conditions=verdict_conditions(record.verdict, True)))
    return len(rt.db_backlog)


def backlog_from_status(rt: Runtime, body: dict[str, Any]) -> None:
    """After a restart, terminal jobs whose verdict never reached the database re-join the backlog."""
    status = body.get("status") or {}
    if status.get("recorded") is not False or not status.get("verdict"):
        return
    uid = body["metadata"]["uid"]
    if uid not in rt.db_backlog:
        rt.db_backlog[uid] = record_of_job(body, Verdict.model_validate(status["verdict"]),
                                           rt.redactor(status.get("pool")))


# A consumer that has not read for this long has stopped (a live one reads every 0.5 s, and records a batch
# in well under this): what it read but never acknowledged is taken over, at startup and then every
# TAKEOVER_CHECK_SECONDS, instead of after the 30 s every stale entry waits. Killed with -9, an operator's
# unrecorded verdicts are thus recorded about this long after its death, by its successor.
STOPPED_CONSUMER_IDLE_MS = 5_000
TAKEOVER_CHECK_SECONDS = 2.0
# Stopped consumers holding nothing are removed after this (every operator start is a new consumer name).
FORGET_CONSUMER_IDLE_MS = 600_000


async def consume(rt: Runtime, consumer: str, stop: asyncio.Event) -> None:
    """Read worker events and record them a batch at a time; replay our own unacked ones first, and take over
    the ones a stopped operator read but never recorded."""
    await rt.queue.ensure_group()
    pending_first = True
    loop = asyncio.get_running_loop()
    next_sweep = loop.time() + 5
    next_takeover = loop.time()
    while not stop.is_set():
        try:
            events = await rt.queue.read_events(consumer, pending=pending_first, block_ms=500, count=512)
            pending_first = False
            if loop.time() >= next_takeover:
                next_takeover = loop.time() + TAKEOVER_CHECK_SECONDS
                taken, owners = await rt.queue.take_over_stopped(consumer, STOPPED_CONSUMER_IDLE_MS,
                                                                 FORGET_CONSUMER_IDLE_MS)
                if taken:
                    log.info("took over %d unrecorded event(s) from stopped consumer(s) %s",
                             len(taken), ", ".join(owners))
                    events += taken
            if loop.time() >= next_sweep:  # entries a live consumer (this one, too) failed to record
                next_sweep = loop.time() + 15
                events += await rt.queue.claim_stale(consumer, min_idle_ms=30_000)
            if events:
                await rt.queue.ack(*await handle_batch(rt, events))
        except (OSError, ConnectionError) as exc:
            log.warning("event stream unavailable (%s); retrying", exc)
            await asyncio.sleep(1)
        except Exception as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data: recreate the group
                await rt.queue.ensure_group()
                continue
            log.exception("event consumer error; retrying")
            await asyncio.sleep(1)
