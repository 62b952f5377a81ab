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
import datetime as dt
import json
import logging
from typing import Any

from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.models import FINISHED_PHASES, Phase, Verdict
from kubetriage.api.summary import job_summary
from kubetriage.api.timeutil import now, rfc3339
from kubetriage.controller.admission import condition, patch_status
from kubetriage.controller.runtime import Runtime
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError
from kubetriage.infra.queue import Event
from kubetriage.infra.sinks import SinkError, VerdictRecord

log = logging.getLogger("kubetriage.controller.recording")



def _us_time(us: int) -> str:
    return rfc3339(dt.datetime.fromtimestamp(us / 1_000_000, dt.UTC))


async def handle_batch(rt: Runtime, events: list[Event]) -> list[str]:
    """Record a batch of worker events; returns the ids that are done and may be acknowledged.

    Verdicts of the batch go to the database in one transaction (one commit for
    a burst, not one per job); status and Event writes then run concurrently.
    """
    done: list[str] = []
    finals: dict[str, Event] = {}
    for ev in events:
        if ev.type == "started":
            _schedule_running(rt, ev)
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
        plans.append(_plan(ev, job))
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


def _schedule_running(rt: Runtime, ev: Event) -> None:
    loop = asyncio.get_running_loop()
    old = rt.running_timers.pop(ev.uid, None)
    if old:
        old.cancel()

    def fire() -> None:
        rt.running_timers.pop(ev.uid, None)
        task = loop.create_task(_write_running(rt, ev))
        _background.add(task)
        task.add_done_callback(_background.discard)

    rt.running_timers[ev.uid] = loop.call_later(rt.settings.running_status_delay_seconds, fire)


_background: set[asyncio.Task[None]] = set()


async def _write_running(rt: Runtime, ev: Event) -> None:
    job = await rt.queue.job(ev.uid)
    if not job or job.get("state") != "leased" or rt.phases.get(ev.uid) in FINISHED_PHASES:
        return
    with contextlib.suppress(ApiError):
        await patch_status(rt, job["ns"], job["name"], {
            "phase": Phase.RUNNING.value, "startedAt": _us_time(ev.us), "attempts": ev.attempt,
        })


@dataclasses.dataclass
class _Plan:
    ev: Event
    ns: str
    name: str
    status: dict[str, Any]
    record: VerdictRecord | None
    recorded: bool = False
    failure: str = "attempts_exhausted"


def _plan(ev: Event, job: dict[str, str]) -> _Plan:
    ns, name = job["ns"], job["name"]
    payload = json.loads(job.get("payload") or "{}")
    started = int(job.get("started_us") or ev.us)
    status: dict[str, Any] = {
        "attempts": ev.attempt, "startedAt": _us_time(started), "completedAt": rfc3339(now()), "message": None,
    }
    if ev.type == "result":
        try:
            verdict = Verdict.model_validate_json(ev.body)
        except ValueError as exc:  # a worker of another version: fail the job clearly, never replay forever
            reason = f"the worker sent an invalid verdict: {exc}"[:2000]
            status.update({"phase": Phase.FAILED.value, "message": reason,
                           "conditions": [condition("Triaged", "False", "InvalidVerdict", reason, None)]})
            return _Plan(ev, ns, name, status, None, failure="invalid_verdict")
        status.update({"phase": Phase.SUCCEEDED.value, "verdict": verdict.wire()})
        return _Plan(ev, ns, name, status, _record(ev.uid, name, ns, payload, verdict, job, ev.attempt))
    status.update({
        "phase": Phase.FAILED.value, "message": f"gave up after {ev.attempt} attempt(s): {ev.body}"[:4096],
        "conditions": [condition("Triaged", "False", "AttemptsExhausted", ev.body, None)],
    })
    return _Plan(ev, ns, name, status, None)


async def _write_plan(rt: Runtime, pl: _Plan) -> None:
    ev, status = pl.ev, pl.status
    succeeded = pl.record is not None
    if pl.record is not None:
        verdict = pl.record.verdict
        status["recorded"] = pl.recorded
        status["conditions"] = [
            condition("Triaged", "True", "Succeeded", verdict.reason[:200], None),
            condition("Recorded", "True" if pl.recorded else "False",
                      "Recorded" if pl.recorded else "DatabaseUnavailable",
                      "verdict in the database" if pl.recorded else "retrying the database write", None),
        ]
        event = ("Triaged", f"{verdict.classification} ({verdict.confidence:.2f}) by {verdict.analyzer}: "
                 f"{verdict.reason}", "Normal")
    else:
        event = ("TriageFailed", status["message"], "Warning")
    handle_ = rt.running_timers.pop(ev.uid, None)
    if handle_:
        handle_.cancel()
    if rt.phases.get(ev.uid) not in FINISHED_PHASES:  # a replay of something already recorded writes nothing
        if succeeded:
            metrics.VERDICTS.labels(verdict.classification, verdict.analyzer, verdict.check_type).inc()
        else:
            metrics.JOBS_FAILED.labels(pl.failure).inc()
        alive = await patch_status(rt, pl.ns, pl.name, status)
        rt.phases[ev.uid] = status["phase"]
        if alive:
            with contextlib.suppress(ApiError):
                await rt.kube.event({"metadata": {"name": pl.name, "namespace": pl.ns, "uid": ev.uid}}, *event)
    await _resolve_duplicates(rt, f"{ev.uid}/{pl.name}", pl.name, status, succeeded)


def _record(uid: str, name: str, ns: str, payload: dict[str, Any], verdict: Verdict, job: dict[str, str],
            attempts: int) -> VerdictRecord:
    source = payload.get("source") or {}
    try:
        summary = job_summary(AnalysisRequest.model_validate(payload)) or ""
    except ValueError:
        summary = ""
    return VerdictRecord(
        job_uid=uid, job_name=name, namespace=ns, source_type=source.get("type", "alert"),
        source_id=source.get("id"), fingerprint=source.get("fingerprint"), verdict=verdict,
        pool=job.get("pool"), priority_class=None, attempts=attempts, recorded_at=now(), summary=summary[:4096],
    )


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


async def _resolve_duplicates(rt: Runtime, identity: str, primary_name: str, status: dict[str, Any],
                              succeeded: bool) -> None:
    if succeeded:
        await rt.queue.remember_verdict(identity, json.dumps(status["verdict"]), rt.settings.dedup_window_seconds)
    for raw in await rt.queue.take_duplicates(identity):
        dup = json.loads(raw)
        if succeeded:
            verdict = Verdict.model_validate(status["verdict"])
            rec = VerdictRecord(
                job_uid=dup["uid"], job_name=dup["name"], namespace=dup["ns"], source_type=dup.get("type") or "alert",
                source_id=dup.get("id"), fingerprint=None, verdict=verdict, pool=None, priority_class=None,
                attempts=0, recorded_at=now(), summary=(dup.get("summary") or "")[:4096],
            )
            recorded = await record_in_db(rt, rec)
            patch = {"verdict": status["verdict"], "recorded": recorded,
                     "conditions": [condition("Triaged", "True", "Duplicate", f"verdict of {primary_name}", None)]}
        else:
            patch = {"phase": Phase.FAILED.value, "message": f"duplicate of {primary_name}, which failed"}
        with contextlib.suppress(ApiError):
            await patch_status(rt, dup["ns"], dup["name"], patch)


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
            await patch_status(rt, record.namespace, record.job_name, {
                "recorded": True,
                "conditions": [condition("Triaged", "True", "Succeeded", record.verdict.reason[:200], None),
                               condition("Recorded", "True", "Recorded", "verdict in the database", None)],
            })
    return len(rt.db_backlog)


def backlog_from_status(rt: Runtime, body: dict[str, Any]) -> None:
    """After a restart, terminal jobs whose verdict never reached the database re-join the backlog."""
    status = body.get("status") or {}
    if status.get("recorded") is not False or not status.get("verdict"):
        return
    meta, spec = body["metadata"], body.get("spec") or {}
    source = spec.get("source") or {}
    from kubetriage.controller.admission import spec_summary

    rt.db_backlog.setdefault(meta["uid"], VerdictRecord(
        job_uid=meta["uid"], job_name=meta["name"], namespace=meta["namespace"],
        source_type=source.get("type", "alert"), source_id=source.get("id"), fingerprint=status.get("fingerprint"),
        verdict=Verdict.model_validate(status["verdict"]), pool=status.get("pool"),
        priority_class=status.get("priorityClassName"), attempts=int(status.get("attempts") or 0),
        recorded_at=now(), summary=spec_summary(spec),
    ))


async def consume(rt: Runtime, consumer: str, stop: asyncio.Event) -> None:
    """Read worker events and record them a batch at a time; replay our own unacked ones first."""
    await rt.queue.ensure_group()
    pending_first = True
    loop = asyncio.get_running_loop()
    next_sweep = loop.time() + 5
    while not stop.is_set():
        try:
            events = await rt.queue.read_events(consumer, pending=pending_first, block_ms=500, count=512)
            pending_first = False
            if loop.time() >= next_sweep:
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
