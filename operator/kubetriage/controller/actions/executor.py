"""The executor: carries out ``Pending`` actions and lifts silences that must end early. Leader only.

Level-triggered on the jobs' own status: ``observe`` looks at every TriageJob event (on every replica,
cheaply: most jobs have no ``status.actions``) and marks a job due when it has a ``Pending`` entry, or
holds an active silence that must be lifted (a human set the verdict to valid; an alert of the same
target arrived at a higher severity). ``run``, a task of the leader loop, takes due jobs, reads each
fresh, does the work through the sinks, and writes the results in one status write (guarded by
resourceVersion, so a concurrent write is merged, not lost) plus one Event.

Retries: a failure that may pass (5xx, timeout, unreachable) is tried again after a doubling backoff, up
to ``actions_max_attempts``, without any status write in between; then the entry is ``Failed``. A crash
loses only the in-memory counters: the entry is still ``Pending`` in status and is sent again, with the
same idempotency key. On a graceful stop the loop takes no new work and lets what is in flight (sent
but not yet recorded) finish and be written, so a restart sends nothing twice.

A job a user deletes lifts the silence it held (unless another job holds it too, after a renewal); a job
the TTL deletes does not (``controller.ttl`` tells which). Those results go to an Event and the metrics:
the job is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
from typing import Any

from pydantic import ValidationError

from kubetriage.api import policy as pol
from kubetriage.api.models import (
    ActionResult,
    CheckType,
    Classification,
    JobAction,
    SourceType,
    TriageJobSpec,
    TriageJobStatus,
    TriagePoolSpec,
    Verdict,
)
from kubetriage.api.timeutil import now, parse_time
from kubetriage.controller.actions.http import ActionFailed
from kubetriage.controller.actions.plan import identity_labels
from kubetriage.controller.actions.silence import SilenceSink, UnsilenceSink
from kubetriage.controller.actions.sinks import ActionSkipped, Context, Done, Sink
from kubetriage.controller.actions.slack import SlackSink
from kubetriage.controller.actions.state import Due, Orphan
from kubetriage.controller.actions.webhook import WebhookSink
from kubetriage.controller.runtime import Runtime
from kubetriage.controller.status import write_status_unchanged
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError, triagejob_path

log = logging.getLogger("kubetriage.controller.actions")

SINKS: dict[str, Sink] = {s.action: s for s in (SilenceSink(), UnsilenceSink(), WebhookSink(), SlackSink())}
CONCURRENCY = 16
IDLE_SECONDS = 0.25
# On stop: how long actions in flight get to finish and be written (inside the leader's own stop timeout)
DRAIN_SECONDS = 4.0
MAX_BACKOFF_SECONDS = 300.0
WRITE_TRIES = 5


# --------------------------------------------------------------------------- observe (every replica)


def _alert_target(rt: Runtime, body: dict[str, Any]) -> tuple[tuple[tuple[str, str], ...], int, str] | None:
    """The alert's target (silence matchers without severity), its severity rank and severity; None for a
    job that is no alert or names no target."""
    spec = body.get("spec") or {}
    if (spec.get("source") or {}).get("type") != SourceType.ALERT.value:
        return None
    try:
        alert = TriageJobSpec.model_validate(spec).alert
    except ValidationError:
        return None
    if alert is None:
        return None
    wanted = pol.silence_for(alert, identity_labels(rt, (body.get("status") or {}).get("pool")))
    if isinstance(wanted, str):
        return None
    return wanted.target(), pol.severity_rank(wanted.severity), wanted.severity


def _after(created: float, at: float) -> bool:
    """A job created at ``created`` (whole seconds: creationTimestamp) came after a silence made at ``at``.

    Within the silence's second counts as after: a rise is then taken as one, which only lifts a silence.
    """
    return created >= math.floor(at)


def _created(body: dict[str, Any]) -> float:
    when = parse_time(body["metadata"].get("creationTimestamp"))
    return when.timestamp() if when else 0.0


def observe(rt: Runtime, body: dict[str, Any]) -> None:
    """Look at a job event: work to do (mark the job due), silences held, and alert severities by target."""
    meta, status = body["metadata"], body.get("status") or {}
    uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
    state = rt.actions
    raw = status.get("actions")
    if raw:
        entries = pol.parse_actions(raw)
        active = pol.active_silence(entries, now())
        state.hold(uid, active.silence_id if active else None)
        if active is not None and active.silence_id:
            state.jobs[uid] = (ns, name)
            found = _alert_target(rt, body)
            if found is not None:
                state.silence_target[active.silence_id] = (ns, found[0], found[1], active.at.timestamp())
        if pol.pending(entries) or (active is not None and lift_reason(rt, body, active) is not None):
            state.mark_due(uid, ns, name)
    elif uid in state.held_by:
        state.hold(uid, None)
    if not state.holders or not rt.policies.silences_in(ns):
        return
    found = _alert_target(rt, body)
    if found is None:
        return
    target, rank, severity = found
    seen = state.targets.setdefault((ns, target), {})
    created = _created(body)
    if created > seen.get(rank, (0.0, ""))[0]:
        seen[rank] = (created, severity)
    # a rise: a silence of this target at a lower severity, made before this alert's job, is lifted
    for sid, (s_ns, s_target, s_rank, s_at) in list(state.silence_target.items()):
        if s_ns == ns and s_target == target and rank > s_rank and _after(created, s_at):
            for holder in state.holders.get(sid, set()):
                job = state.jobs.get(holder)
                if job is not None:
                    state.mark_due(holder, *job)


def lift_reason(rt: Runtime, body: dict[str, Any], active: JobAction) -> str | None:
    """Why the job's active silence must end now, or None."""
    status = body.get("status") or {}
    verdict = status.get("verdict") or {}
    if verdict.get("checkType") == CheckType.USER.value and verdict.get("classification") == Classification.VALID.value:
        return f"a human set the verdict to valid: {str(verdict.get('reason') or '')[:200]}"
    found = _alert_target(rt, body)
    if found is None:
        return None
    target, rank, _severity = found
    seen = rt.actions.targets.get((body["metadata"]["namespace"], target), {})
    for higher, (created, severity) in sorted(seen.items(), reverse=True):
        if higher > rank and _after(created, active.at.timestamp()):
            return f"the alert's severity rose to {severity or '?'}"
    return None


def forget(rt: Runtime, body: dict[str, Any], deleted_by_ttl: bool) -> None:
    """A job was deleted: a silence only it held is lifted, unless the TTL deleted it."""
    meta, status = body["metadata"], body.get("status") or {}
    uid = meta["uid"]
    sid = rt.actions.forget_job(uid)
    if sid is None:
        return
    rt.actions.silence_target.pop(sid, None)
    if deleted_by_ttl:
        return  # the TTL only tidies Kubernetes up: the silence keeps its own end
    active = pol.active_silence(pol.parse_actions(status.get("actions")), now())
    if active is None or active.silence_id != sid:
        return
    rt.actions.orphans[sid] = Orphan(meta["namespace"], meta["name"], uid, active.policy, status.get("pool"), sid)
    rt.actions.orphan_due[sid] = 0.0
    rt.actions.wake.set()


# --------------------------------------------------------------------------- run (leader)


async def run(rt: Runtime, stop: asyncio.Event) -> None:
    """Until ``stop``: start the due work, at most CONCURRENCY jobs at once; then drain what is in flight."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    state = rt.actions
    try:
        while not stop.is_set():
            t = loop.time()
            for uid, due in list(state.due.items()):
                if len(tasks) >= CONCURRENCY:
                    break
                if uid in state.inflight or due.not_before > t:
                    continue
                del state.due[uid]
                state.inflight.add(uid)
                task = asyncio.create_task(_job(rt, uid, due), name=f"kubetriage-actions-{uid}")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            for sid, not_before in list(state.orphan_due.items()):
                if len(tasks) >= CONCURRENCY or not_before > t or sid in state.inflight:
                    continue
                del state.orphan_due[sid]
                state.inflight.add(sid)
                task = asyncio.create_task(_orphan(rt, sid), name=f"kubetriage-unsilence-{sid}")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            state.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.wake.wait(), IDLE_SECONDS)
    finally:
        if tasks:  # sent, maybe not yet recorded: let them finish and write, or a restart would send again
            await asyncio.wait(tasks, timeout=DRAIN_SECONDS)


def _backoff(rt: Runtime, tries: int) -> float:
    return min(MAX_BACKOFF_SECONDS, rt.settings.actions_retry_backoff_seconds * 2 ** (tries - 1))


def _entry_id(e: JobAction) -> str:
    return f"{e.policy}/{e.action}/{e.target or ''}/{e.key}"


async def _job(rt: Runtime, uid: str, due: Due) -> None:
    try:
        await _do_job(rt, uid, due)
    except Exception as exc:  # the API server or the job itself: look again later
        log.warning("actions of %s/%s failed (%s: %s); retrying", due.namespace, due.name, type(exc).__name__, exc)
        rt.actions.retry_at(uid, due.namespace, due.name, asyncio.get_running_loop().time() + _backoff(rt, 2))
    finally:
        rt.actions.done(uid, due.namespace, due.name)


async def _get(rt: Runtime, ns: str, name: str, uid: str) -> dict[str, Any] | None:
    try:
        body = await rt.kube.get(triagejob_path(ns, name))
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    return body if body["metadata"]["uid"] == uid else None


def _context(rt: Runtime, body: dict[str, Any], entry: JobAction, at: dt.datetime) -> Context:
    ns, status = body["metadata"]["namespace"], body.get("status") or {}
    pool = rt.pools.get(status.get("pool") or "")
    pool_spec = None
    if pool is not None:
        with contextlib.suppress(ValidationError):
            pool_spec = TriagePoolSpec.model_validate(pool.spec)
    verdict = None
    if status.get("verdict"):
        with contextlib.suppress(ValidationError):
            verdict = Verdict.model_validate(status["verdict"])
    return Context(settings=rt.settings, job=body, entry=entry, policy=rt.policies.get(ns, entry.policy),
                   verdict=verdict, pool=pool_spec, rules=rt.rules.for_namespace(ns),
                   redact=rt.redactor(status.get("pool")), now=at)


async def _attempt(rt: Runtime, uid: str, ctx: Context, mode: str) -> tuple[JobAction | None, float | None]:
    """One try of one entry: (its final entry, None) or (None, the delay before the next try)."""
    entry = ctx.entry
    key = (uid, _entry_id(entry))
    tries = rt.actions.attempts.get(key, 0) + 1
    result, message, done = ActionResult.FAILED, "", Done("")
    try:
        done = await SINKS[entry.action].run(ctx)
        result, message = ActionResult.SUCCEEDED, done.message
    except ActionSkipped as skipped:
        result, message = ActionResult.SKIPPED, str(skipped)
    except ActionFailed as failed:
        if failed.retry and tries < rt.settings.actions_max_attempts:
            rt.actions.attempts[key] = tries
            metrics.ACTIONS.labels(entry.action, mode, "Retried").inc()
            log.info("%s %s of %s/%s failed (try %d): %s; retrying", entry.action, entry.target or "",
                     ctx.namespace, ctx.name, tries, failed.message)
            return None, _backoff(rt, tries)
        message = f"after {tries} tr{'y' if tries == 1 else 'ies'}: {failed.message}"
    rt.actions.attempts.pop(key, None)
    metrics.ACTIONS.labels(entry.action, mode, result.value).inc()
    return entry.model_copy(update={
        "result": result, "at": now(), "message": message[:1024], "attempts": tries,
        "silence_id": done.silence_id or entry.silence_id, "silence_until": done.silence_until}), None


async def _do_job(rt: Runtime, uid: str, due: Due) -> None:
    body = await _get(rt, due.namespace, due.name, uid)
    if body is None:
        return
    entries = pol.parse_actions((body.get("status") or {}).get("actions"))
    work: list[JobAction] = list(pol.pending(entries))
    active = pol.active_silence(entries, now())
    why = lift_reason(rt, body, active) if active is not None else None
    if active is not None and why is not None:
        work.append(JobAction(policy=active.policy, action="unsilence", key=active.key,
                              result=ActionResult.PENDING, at=now(), message=why, silence_id=active.silence_id))
    results: list[JobAction] = []
    retry_in: float | None = None
    current = pol.action_key(uid, str(((body.get("status") or {}).get("verdict") or {}).get("classification")))
    for entry in work:
        policy = rt.policies.get(due.namespace, entry.policy)
        why_not = None
        if entry.action != "unsilence" and entry.key != current:
            # a human changed the verdict before this ran: acting on the old one now would be wrong
            why_not = "the verdict it was planned for was replaced before it ran"
        elif entry.action != "unsilence" and (policy is None or policy.spec.mode != "enforce"):
            why_not = (f"TriagePolicy {entry.policy} "
                       f"{'was deleted' if policy is None else 'was switched to shadow mode'} before it ran")
        if why_not is not None:
            results.append(entry.model_copy(update={"result": ActionResult.SKIPPED, "at": now(),
                                                    "message": f"not done: {why_not}"}))
            metrics.ACTIONS.labels(entry.action, "enforce", ActionResult.SKIPPED.value).inc()
            continue
        final, delay = await _attempt(rt, uid, _context(rt, body, entry, now()), "enforce")
        if final is not None:
            results.append(final)
        elif delay is not None:
            retry_in = delay if retry_in is None else min(retry_in, delay)
    if results:
        body = await _write(rt, body, results)
    if retry_in is not None and body is not None:
        rt.actions.retry_at(uid, due.namespace, due.name, asyncio.get_running_loop().time() + retry_in)


async def _write(rt: Runtime, body: dict[str, Any], results: list[JobAction]) -> dict[str, Any] | None:
    """Merge ``results`` into the job's ``status.actions`` and write them (read again on a conflict); one
    Event saying what was done. Returns the job as written (None: it is gone)."""
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    for _ in range(WRITE_TRIES):
        merged = pol.merge(pol.parse_actions((body.get("status") or {}).get("actions")), results)
        try:
            if not await write_status_unchanged(rt, ns, name, TriageJobStatus(actions=merged),
                                                meta["resourceVersion"]):
                return None
            break
        except ApiError as exc:
            if exc.status != 409:
                raise
            fresh = await _get(rt, ns, name, uid)
            if fresh is None:
                return None
            body, meta = fresh, fresh["metadata"]
    else:
        raise ApiError(409, f"status.actions of {ns}/{name} kept changing; will retry")
    failed = [r for r in results if r.result == ActionResult.FAILED.value]
    text = "; ".join(f"{r.policy}: {r.action}{' ' + r.target if r.target else ''}: {r.message}" for r in results)
    with contextlib.suppress(ApiError):
        await rt.kube.event(body, "ActionFailed" if failed else "ActionsTaken", text,
                            "Warning" if failed else "Normal")
    return body


async def _orphan(rt: Runtime, sid: str) -> None:
    """Lift the silence of a job a user deleted; say so in an Event on the (deleted) job."""
    state = rt.actions
    orphan = state.orphans.get(sid)
    try:
        if orphan is None or sid in state.holders:  # another job holds it again (a renewal meanwhile)
            state.orphans.pop(sid, None)
            return
        body = {"metadata": {"namespace": orphan.namespace, "name": orphan.name, "uid": orphan.uid},
                "spec": {}, "status": {"pool": orphan.pool}}
        entry = JobAction(policy=orphan.policy, action="unsilence", key=f"{orphan.uid}:deleted",
                          result=ActionResult.PENDING, at=now(), silence_id=sid,
                          message="its TriageJob was deleted by a user")
        final, delay = await _attempt(rt, orphan.uid, _context(rt, body, entry, now()), "enforce")
        if final is None:
            state.orphan_due[sid] = asyncio.get_running_loop().time() + (delay or 1.0)
            return
        state.orphans.pop(sid, None)
        ok = final.result == ActionResult.SUCCEEDED.value
        with contextlib.suppress(ApiError):
            await rt.kube.event(body, "SilenceLifted" if ok else "ActionFailed",
                                f"{orphan.policy}: unsilence: {final.message}", "Normal" if ok else "Warning")
    finally:
        state.inflight.discard(sid)
