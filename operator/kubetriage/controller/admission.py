"""Admission: from a new TriageJob to a queued one (or a Duplicate, or a clear reason it waits).

Level-triggered: ``admit`` looks at the object as it is now and does what is
missing, so it is safe to call for every watch event, after a restart, and
after Redis lost its data. It writes status at most once per job. An admission
that fails is retried until it succeeds (``admit_or_retry``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import random
from typing import Any

from pydantic import ValidationError

from kubetriage.api import fingerprint
from kubetriage.api.contract import DEFAULT_IDENTITY_LABELS, AnalysisRequest, PastResult, TeamRule
from kubetriage.api.evidence import Evidence
from kubetriage.api.fingerprint import dedup_scope
from kubetriage.api.keys import RESOLVED_AT
from kubetriage.api.models import (
    FINISHED_PHASES,
    AlertStatus,
    Analysis,
    Phase,
    SourceType,
    TriageJobSpec,
    TriageJobStatus,
    TriagePoolSpec,
    Verdict,
)
from kubetriage.api.redact import BUILTIN, Redactor
from kubetriage.api.timeutil import now, parse_time
from kubetriage.controller import history, overrides
from kubetriage.controller.runtime import PoolInfo, Runtime
from kubetriage.controller.status import cancel_running, spec_summary, triaged, write_status
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError, triagejob_path
from kubetriage.infra.queue import Primary, Rebuilding

log = logging.getLogger("kubetriage.controller.admission")

_ACTIVE = {Phase.QUEUED.value, Phase.RUNNING.value}


def member(namespace: str, name: str, uid: str, spec: dict[str, Any], redact: Redactor = BUILTIN) -> str:
    """How a duplicate is remembered in Redis: enough to record its verdict without a GET.

    Its summary goes to the audit table when the verdict comes: redacted with the pool's patterns.
    """
    source = spec.get("source") or {}
    summary = redact(spec_summary(spec))
    return json.dumps({"ns": namespace, "name": name, "uid": uid, "type": source.get("type"),
                       "id": source.get("id"), "summary": summary}, separators=(",", ":"))


def _with_resolution(body: dict[str, Any], spec: TriageJobSpec) -> TriageJobSpec:
    """An alert that resolved after its job was created is analysed as resolved (ingest marks it so)."""
    when = parse_time(((body["metadata"].get("annotations") or {}).get(RESOLVED_AT)) or None)
    if spec.alert is None or when is None or spec.alert.status == AlertStatus.RESOLVED.value:
        return spec
    alert = spec.alert.model_copy(update={"status": AlertStatus.RESOLVED.value, "ends_at": when})
    return spec.model_copy(update={"alert": alert})


def request_payload(body: dict[str, Any], spec: TriageJobSpec, history: list[PastResult] | None = None,
                    rules: list[TeamRule] | None = None, redact: Redactor = BUILTIN, *,
                    evidence: list[Evidence] | None = None, identity: str | None = None) -> dict[str, Any]:
    """The worker's payload. Redacted (``kubetriage.api.redact``) with the pool's patterns: neither Redis, nor the
    worker, nor its LLM sees the secrets in the job's text. The fingerprint was taken from the job as submitted."""
    meta = body["metadata"]
    spec = _with_resolution(body, spec)
    analysis = spec.analysis or Analysis()
    req = AnalysisRequest(
        uid=meta["uid"], name=meta["name"], namespace=meta["namespace"], source=spec.source,
        alert=spec.alert, script_result=spec.script_result, analyzer=analysis.analyzer,
        deadline_seconds=analysis.deadline_seconds, created_at=parse_time(meta.get("creationTimestamp")),
        script_history=history or [], rules=rules or [], evidence=evidence or [], identity=identity,
    )
    return redact.request(req).model_dump(mode="json", exclude_none=True)


async def script_history(rt: Runtime, spec: TriageJobSpec) -> list[PastResult]:
    """Past runs of the same script from the team's table: flakiness evidence. Best effort, bounded."""
    if spec.script_result is None:
        return []
    try:
        rows = await asyncio.wait_for(rt.sink.script_history(
            spec.script_result.script_name, limit=20, exclude_id=spec.source.id), timeout=2)
    except Exception as exc:  # no history is no reason to hold a job back
        log.debug("no script history for %s: %s", spec.script_result.script_name, exc)
        return []
    return [PastResult(success=ok, finished_at=at) for ok, at in rows]


@dataclasses.dataclass(frozen=True)
class _Job:
    """The job as this watch event shows it: who it is, and the status it had when the event was sent."""

    body: dict[str, Any]
    ns: str
    name: str
    uid: str
    generation: int | None
    status: dict[str, Any]

    @classmethod
    def of(cls, body: dict[str, Any]) -> _Job:
        meta = body["metadata"]
        return cls(body, meta["namespace"], meta["name"], meta["uid"], meta.get("generation"),
                   body.get("status") or {})

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where a job is queued: its pool, its PriorityClass (name and value) and its dedup fingerprint."""

    pool: PoolInfo
    priority_class: str
    priority: int
    fingerprint: str

    def status(self, generation: int | None) -> dict[str, Any]:
        """The status fields every admitted job (queued or duplicate) carries: where it went and why."""
        return {"pool": self.pool.key, "priority_class_name": self.priority_class, "priority": self.priority,
                "fingerprint": self.fingerprint, "observed_generation": generation}


async def admit(rt: Runtime, body: dict[str, Any]) -> None:
    """Do what is missing for this job, as it is now: queue it, fold it into a duplicate, or say why it waits."""
    job = _Job.of(body)
    if not _track(rt, job) or not await _needs_admission(rt, job):
        return
    spec = await _parse_spec(rt, job)
    if spec is None:
        return
    await rt.load_caches()
    priority_class = _resolve_priority_class(rt, spec)
    pool_name, pool = _resolve_pool(rt, job, spec)
    problem = _missing(rt, job, priority_class, pool_name, pool)
    if problem is not None:
        await _park(rt, job, *problem)
        return
    assert pool is not None  # _missing reports a missing pool
    rt.waiting.pop(job.uid, None)
    placement = _Placement(pool, priority_class, rt.priority_classes[priority_class],
                           fingerprint.derive(body.get("spec") or {}))
    if job.phase not in _ACTIVE and await _deduplicate(rt, job, spec, placement):
        return
    payload = await _build_request(rt, job, spec)
    queued_at, fresh, added = await _enqueue(rt, job, spec, placement, payload)
    await _write_queued(rt, job, spec, placement, queued_at, fresh, added)


def _track(rt: Runtime, job: _Job) -> bool:
    """Remember the job's phase and source (the gauges, and cheap skips later); False for a stale event.

    kopf can hand us a job's older event after we recorded its verdict (and removed it from Redis): a
    finished job never runs again, so a stale "Queued" must not re-queue it.
    """
    if rt.phases.get(job.uid) in FINISHED_PHASES and job.phase not in FINISHED_PHASES:
        return False
    rt.phases[job.uid] = job.phase or ""
    rt.sources[job.uid] = ((job.body.get("spec") or {}).get("source") or {}).get("type", "")
    return True


async def _needs_admission(rt: Runtime, job: _Job) -> bool:
    """False when there is nothing to admit: most events are our own status writes coming back.

    A duplicate still waiting for its verdict re-attaches to its primary (Redis may have lost it); a
    finished job is done; a queued or running job Redis knows only picks up a late alert resolution.
    """
    if job.phase == Phase.DUPLICATE.value and not job.status.get("verdict"):
        await _relink_duplicate(rt, job.body)
        return False
    if job.phase in (Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.DUPLICATE.value):
        rt.waiting.pop(job.uid, None)
        return False
    if job.phase in _ACTIVE and await rt.queue.known(job.uid):
        if RESOLVED_AT in (job.body["metadata"].get("annotations") or {}):
            await _apply_resolution(rt, job.body)
        return False
    return True


async def _parse_spec(rt: Runtime, job: _Job) -> TriageJobSpec | None:
    """The spec as the model reads it; None (and the job Failed, naming the field) when it does not validate.

    The API server validates the same schema, so this only catches what CEL and the schema cannot say.
    """
    try:
        return TriageJobSpec.model_validate(job.body.get("spec") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        await write_status(rt, job.ns, job.name, TriageJobStatus(
            phase=Phase.FAILED, message=f"invalid spec: {where}", completed_at=now(),
            observed_generation=job.generation, conditions=triaged(False, "InvalidSpec", where, job.generation)))
        return None


def _resolve_priority_class(rt: Runtime, spec: TriageJobSpec) -> str:
    """The job's PriorityClass, else the default of its source type (alerts ahead of script results)."""
    if spec.priority_class_name:
        return spec.priority_class_name
    if spec.source.type == SourceType.ALERT.value:
        return rt.settings.alert_priority_class
    return rt.settings.script_priority_class


def _resolve_pool(rt: Runtime, job: _Job, spec: TriageJobSpec) -> tuple[str, PoolInfo | None]:
    """The pool's name and the pool, if this replica knows it (the job's namespace, then the operator's)."""
    name = spec.pool or rt.settings.default_pool
    return name, rt.find_pool(job.ns, name)


def _missing(rt: Runtime, job: _Job, priority_class: str, pool_name: str,
             pool: PoolInfo | None) -> tuple[str, str] | None:
    """What the job waits for, as (condition reason, message a user can act on); None when nothing is missing."""
    if priority_class not in rt.priority_classes:
        return ("PriorityClassNotFound", f"PriorityClass {priority_class!r} does not exist; create it or set "
                "spec.priorityClassName to an existing one")
    if pool is None:
        return ("PoolNotFound", f"TriagePool {pool_name!r} not found in namespace {job.ns!r}"
                + (f" or {rt.settings.pool_namespace!r}" if rt.settings.pool_namespace else ""))
    unready = rt.pool_unready(pool)
    if unready is not None:  # queued, it would wait for workers that cannot start, with nothing saying why
        return ("PoolNotReady", f"TriagePool {pool.key} cannot start workers: {unready}")
    return None


async def _park(rt: Runtime, job: _Job, reason: str, message: str) -> None:
    """Keep the job Pending until what it waits for appears (``readmit_waiting``); say so once, not per event."""
    rt.waiting[job.uid] = (job.ns, job.name)
    said = any(c.get("reason") == reason for c in job.status.get("conditions") or [])
    if job.phase != Phase.PENDING.value or not said:
        await write_status(rt, job.ns, job.name, TriageJobStatus(
            phase=Phase.PENDING, message=message, observed_generation=job.generation,
            conditions=triaged(False, reason, message, job.generation)))


async def _deduplicate(rt: Runtime, job: _Job, spec: TriageJobSpec, placement: _Placement) -> bool:
    """True when an earlier job with the same fingerprint (inside the window) is analysed instead of this one.

    Only inside the same scope (``fingerprint.dedup_scope``): the namespace, the source type and the
    target's identity labels, so a caller-chosen fingerprint cannot fold a production alert into a script
    result, or one target's alert into another's verdict.

    The job becomes a Duplicate: it waits for the primary's verdict, or copies it at once when the primary
    already has one. One Redis script decides, so two replicas or a rebuild cannot both pick a primary.
    """
    window = rt.settings.dedup_window_seconds
    if window <= 0:
        return False
    spec_wire = job.body.get("spec") or {}
    # right after Redis lost its data, wait (Rebuilding, retried) until the rebuild gave the queued primaries
    # their fingerprints back: deciding now would make this job a second primary
    kind, primary, verdict = await rt.queue.dedup(
        _scope(job.ns, spec_wire, placement.pool), placement.fingerprint, f"{job.uid}/{job.name}",
        member(job.ns, job.name, job.uid, spec_wire, rt.redactor(placement.pool.key)), window,
        require_fingerprints=True)
    if kind == "primary":
        return False
    primary_name = primary.split("/", 1)[1]
    fields: dict[str, Any] = {
        **placement.status(job.generation), "phase": Phase.DUPLICATE, "duplicate_of": primary_name,
        "completed_at": now(), "message": f"same fingerprint as {primary_name} within {window}s",
        "conditions": triaged(kind != "duplicate", "Duplicate", f"analysed once as {primary_name}", job.generation),
    }
    if kind == "done":
        fields.update(verdict=Verdict.model_validate_json(verdict), recorded=False)
    await write_status(rt, job.ns, job.name, TriageJobStatus(**fields))
    metrics.JOBS_DUPLICATE.labels(spec.source.type).inc()
    return True


def _scope(namespace: str, spec: dict[str, Any], pool: PoolInfo) -> str:
    """Where the job's fingerprint counts (``fingerprint.dedup_scope``), with its pool's identity labels."""
    identity = TriagePoolSpec.model_validate(pool.spec).analyzer.identity_labels or DEFAULT_IDENTITY_LABELS
    return dedup_scope(namespace, spec, identity)


def primary_to_restore(rt: Runtime, body: dict[str, Any]) -> Primary | None:
    """Redis lost its data: the fingerprint (and a finished one's verdict) of a primary still inside its dedup
    window, to register again, so that a duplicate arriving after the loss is folded into it, not analysed
    again; None for any other job.

    The rebuild registers them for every queued, running and succeeded job first; admission waits for that
    before it deduplicates. What is left of the window counts from queuedAt (the fingerprint was registered
    just before), the verdict's from completedAt, as when they were first written.
    """
    window = rt.settings.dedup_window_seconds
    meta, st = body["metadata"], body.get("status") or {}
    phase, fp = st.get("phase"), st.get("fingerprint")
    queued_at = parse_time(st.get("queuedAt"))
    pool = rt.pools.get(st.get("pool") or "")
    if window <= 0 or not fp or queued_at is None or pool is None or phase not in (*_ACTIVE, Phase.SUCCEEDED.value):
        return None
    left = window - (now() - queued_at).total_seconds()
    if left < 1:
        return None
    verdict, verdict_left = "", 0
    if phase == Phase.SUCCEEDED.value and st.get("verdict"):
        completed_at = parse_time(st.get("completedAt")) or now()
        verdict_left = int(window - (now() - completed_at).total_seconds())
        verdict = json.dumps(Verdict.model_validate(st["verdict"]).wire())
    return Primary(_scope(meta["namespace"], body.get("spec") or {}, pool), fp, f"{meta['uid']}/{meta['name']}",
                   int(left), verdict, verdict_left)


async def _build_request(rt: Runtime, job: _Job, spec: TriageJobSpec) -> dict[str, Any]:
    """What the worker gets: the spec (resolution applied), identity, the script's history, and the TriageRules
    of the job's own namespace as this operator knows them now (a rule never reaches another namespace's jobs).

    The history is read here because workers have no database access: the script's past runs, and the history
    evidence of the target (``controller.history``) under its identity, which the verdict is recorded under too.
    """
    pool = _resolve_pool(rt, job, spec)[1]
    identity = _scope(job.ns, job.body.get("spec") or {}, pool) if pool else None
    return request_payload(job.body, spec, await script_history(rt, spec), rt.rules.for_namespace(job.ns),
                           rt.redactor(pool.key if pool else None),
                           evidence=await history.gather(rt, spec, identity), identity=identity)


async def _enqueue(rt: Runtime, job: _Job, spec: TriageJobSpec, placement: _Placement,
                   payload: dict[str, Any]) -> tuple[dt.datetime, bool, bool]:
    """Queue the job in its pool; returns (queuedAt, fresh: never queued before, added: Redis took it now).

    A job queued before (a rebuild after Redis lost its data) keeps its queuedAt, so it keeps its FIFO place.
    Stamped after the (database) history read: queuedAt and the FIFO score are when it entered the queue.
    """
    queued_at = parse_time(job.status.get("queuedAt"))
    fresh = queued_at is None
    queued_at = queued_at or now()
    analysis = spec.analysis or Analysis()
    # A worker claimed it before Redis lost it (the claim's "started" event was seen): that analysis, and any
    # verdict it sent, is gone, so the next one is a re-run and counts as an attempt. status.attempts alone
    # misses claims of jobs never shown Running (most of them: Running is written late).
    claimed = rt.claimed.get(job.uid, 0)
    added = await rt.queue.enqueue(
        uid=job.uid, pool=placement.pool.key, priority=placement.priority, payload=payload, namespace=job.ns,
        name=job.name, max_attempts=analysis.max_attempts,
        attempts=max(int(job.status.get("attempts") or 0), claimed), score_us=int(queued_at.timestamp() * 1_000_000),
    )
    if added and claimed:
        metrics.RERUNS.labels(placement.pool.key).inc()
        log.info("%s/%s: Redis lost it after attempt %d was claimed; analysing it again as attempt %d",
                 job.ns, job.name, claimed, claimed + 1)
    return queued_at, fresh, added


async def _write_queued(rt: Runtime, job: _Job, spec: TriageJobSpec, placement: _Placement,
                        queued_at: dt.datetime, fresh: bool, added: bool) -> None:
    """Write Queued at most once per queueing: by the admission that queued a fresh job (another one may race
    it: a rebuild), or by one that re-queued a job queued before that is no longer Queued (it waited again)."""
    if not ((fresh and added) or (not fresh and job.phase not in _ACTIVE)):
        return
    await write_status(rt, job.ns, job.name, TriageJobStatus(
        **placement.status(job.generation), phase=Phase.QUEUED, queued_at=queued_at, attempts=0, message=None,
        conditions=triaged(False, "Queued", f"waiting in pool {placement.pool.key}", job.generation)))
    metrics.JOBS_ADMITTED.labels(placement.pool.key, placement.priority_class, spec.source.type).inc()


async def _apply_resolution(rt: Runtime, body: dict[str, Any]) -> None:
    try:
        spec = TriageJobSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return
    if spec.alert is None or spec.alert.status == AlertStatus.RESOLVED.value:
        return
    job = await rt.queue.job(body["metadata"]["uid"])
    payload = json.loads(job.get("payload") or "{}")
    if (payload.get("alert") or {}).get("status") == AlertStatus.RESOLVED.value:
        return  # already applied
    # the rules the job was admitted with: a resolution changes the evidence, not which rules apply
    fresh = request_payload(body, spec, [PastResult.model_validate(h) for h in payload.get("script_history", [])],
                            [TeamRule.model_validate(r) for r in payload.get("rules", [])],
                            rt.redactor(job.get("pool")),
                            evidence=[Evidence.model_validate(e) for e in payload.get("evidence", [])],
                            identity=payload.get("identity"))
    if await rt.queue.update_payload(body["metadata"]["uid"], fresh):
        log.info("%s/%s: alert resolved before analysis; analysed with that evidence",
                 body["metadata"]["namespace"], body["metadata"]["name"])


async def _relink_duplicate(rt: Runtime, body: dict[str, Any]) -> None:
    """After Redis lost its data, a waiting duplicate re-attaches to its primary (or copies its verdict)."""
    meta, status = body["metadata"], body.get("status") or {}
    primary_name = status.get("duplicateOf")
    if not primary_name:
        return
    try:
        primary = await rt.kube.get(triagejob_path(meta["namespace"], primary_name))
    except ApiError as exc:
        if exc.status != 404:
            raise
        await write_status(rt, meta["namespace"], meta["name"], TriageJobStatus(
            phase=Phase.FAILED, message=f"primary {primary_name} was deleted before its verdict"))
        return
    pstatus = primary.get("status") or {}
    if pstatus.get("verdict"):
        await write_status(rt, meta["namespace"], meta["name"], TriageJobStatus(
            verdict=Verdict.model_validate(pstatus["verdict"]), recorded=False))
        return
    await rt.queue.add_duplicate(f"{primary['metadata']['uid']}/{primary_name}",
                                 member(meta["namespace"], meta["name"], meta["uid"], body.get("spec") or {},
                                        rt.redactor(status.get("pool"))),
                                 rt.settings.dedup_window_seconds)


async def readmit_waiting(rt: Runtime) -> None:
    """A PriorityClass or TriagePool appeared: jobs that waited for one get another look."""
    for uid, (ns, name) in list(rt.waiting.items()):
        if not await _attempt(rt, ns, name, uid, 0):
            rt.waiting.pop(uid, None)  # deleted meanwhile


async def forget(rt: Runtime, body: dict[str, Any]) -> None:
    """A deleted job leaves the queues; a worker still on it loses its lease at the next heartbeat."""
    uid = body["metadata"]["uid"]
    rt.waiting.pop(uid, None)
    rt.phases.pop(uid, None)
    rt.sources.pop(uid, None)
    retry = rt.admission_retries.pop(uid, None)
    if retry is not None:
        retry.cancel()
    cancel_running(rt, uid)
    await rt.queue.remove(uid)


# --------------------------------------------------------------------------- retries
#
# kopf never retries an event handler (it logs the exception and waits for the object's next event, which
# for a new job may never come), so an admission that failed (Redis down or restarting, no free connection,
# the API server busy, or Redis being rebuilt) is retried here until it succeeds: each job on its own timer,
# so one job's retries never hold up another's admission, with exponential backoff and jitter, so a Redis
# outage is not answered with a storm; the periodic resync (``controller.resync``) is the safety net behind.

RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 15.0
# a warning at most this often: thousands of jobs fail together when Redis goes away
RETRY_LOG_EVERY_SECONDS = 5.0

_retrying: set[asyncio.Task[None]] = set()  # strong references: the event loop keeps only weak ones
_last_warning = 0.0


async def admit_or_retry(rt: Runtime, body: dict[str, Any]) -> None:
    """What a TriageJob event does: apply a human verdict, or admit the job; a failure is retried, never dropped."""
    meta = body["metadata"]
    try:
        await _handle(rt, body)
    except Exception as exc:
        _schedule_retry(rt, meta["namespace"], meta["name"], meta["uid"], 1, exc)
        return
    waiting = rt.admission_retries.pop(meta["uid"], None)
    if waiting is not None:  # this newer event did what the retry was waiting to do
        waiting.cancel()


async def _handle(rt: Runtime, body: dict[str, Any]) -> None:
    uid = body["metadata"]["uid"]
    _busy(rt, uid, 1)
    try:
        if not await overrides.apply(rt, body):
            await admit(rt, body)
    finally:
        _busy(rt, uid, -1)


def _busy(rt: Runtime, uid: str, delta: int) -> None:
    """Count the admissions of ``uid`` under way (``Runtime.admitting``, which the resync leaves alone)."""
    n = rt.admitting.get(uid, 0) + delta
    if n > 0:
        rt.admitting[uid] = n
    else:
        rt.admitting.pop(uid, None)


async def _attempt(rt: Runtime, ns: str, name: str, uid: str, attempt: int) -> bool:
    """Handle the job as it is now (read again: the failed event's copy may be stale); False when it is gone.

    A failure schedules attempt ``attempt + 1``.
    """
    try:
        body = await rt.kube.get(triagejob_path(ns, name))
        if body["metadata"]["uid"] != uid:
            return False  # deleted and created again under the name: the new job has its own events
        await _handle(rt, body)
    except ApiError as exc:
        if exc.status == 404:
            return False
        _schedule_retry(rt, ns, name, uid, attempt + 1, exc)
    except Exception as exc:
        _schedule_retry(rt, ns, name, uid, attempt + 1, exc)
    else:
        if attempt:
            log.info("%s/%s admitted after %d failed attempt(s)", ns, name, attempt)
    return True


def _schedule_retry(rt: Runtime, ns: str, name: str, uid: str, attempt: int, exc: BaseException) -> None:
    """Try job ``uid`` again after a backoff (a timer, not a sleeping task); a later event or a deletion cancels it."""
    global _last_warning
    delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    rebuilding = isinstance(exc, Rebuilding)
    metrics.ADMISSION_RETRIES.labels("rebuilding" if rebuilding else type(exc).__name__).inc()
    loop = asyncio.get_running_loop()
    if not rebuilding and loop.time() - _last_warning >= RETRY_LOG_EVERY_SECONDS:
        _last_warning = loop.time()
        log.warning("admitting %s/%s failed (%s: %s); retrying in %.1f s (%d job(s) waiting for a retry)",
                    ns, name, type(exc).__name__, exc, delay, len(rt.admission_retries) + 1)
    else:
        log.debug("admitting %s/%s failed (%s); retry %d in %.1f s", ns, name, exc, attempt, delay)

    def fire() -> None:
        rt.admission_retries.pop(uid, None)
        _busy(rt, uid, 1)  # under way from now, also while it waits for a slot
        task = loop.create_task(_retry(rt, ns, name, uid, attempt), name=f"kubetriage-admit-{uid}")
        _retrying.add(task)
        task.add_done_callback(_retrying.discard)

    previous = rt.admission_retries.pop(uid, None)
    if previous is not None:
        previous.cancel()
    rt.admission_retries[uid] = loop.call_later(delay, fire)


async def _retry(rt: Runtime, ns: str, name: str, uid: str, attempt: int) -> None:
    try:
        # bounded: when Redis comes back, the jobs that waited must not all read and admit at once
        async with rt.admission_retry_slots:
            await _attempt(rt, ns, name, uid, attempt)
    finally:
        _busy(rt, uid, -1)
