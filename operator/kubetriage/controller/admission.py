"""Admission: from a new TriageJob to a queued one (or a Duplicate, or a clear reason it waits).

Level-triggered: ``admit`` looks at the object as it is now and does what is
missing, so it is safe to call for every watch event, after a restart, and
after Redis lost its data. It writes status at most once per job.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pydantic import ValidationError

from kubetriage.api import fingerprint
from kubetriage.api.contract import AnalysisRequest, PastResult
from kubetriage.api.keys import RESOLVED_AT
from kubetriage.api.models import FINISHED_PHASES, AlertStatus, Analysis, Phase, SourceType, TriageJobSpec
from kubetriage.api.summary import job_summary
from kubetriage.api.timeutil import now, parse_time, rfc3339
from kubetriage.controller.runtime import Runtime
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError, triagejob_path

log = logging.getLogger("kubetriage.controller.admission")

_ACTIVE = {Phase.QUEUED.value, Phase.RUNNING.value}


def condition(type_: str, status: str, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": rfc3339(now()).split(".")[0] + "Z",
        "observedGeneration": generation,
    }


async def patch_status(rt: Runtime, namespace: str, name: str, status: dict[str, Any]) -> bool:
    """One merge-patch of /status; False when the job is gone (deleted meanwhile)."""
    try:
        await rt.kube.merge_patch(triagejob_path(namespace, name, status=True), {"status": status})
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def member(namespace: str, name: str, uid: str, spec: dict[str, Any]) -> str:
    """How a duplicate is remembered in Redis: enough to record its verdict without a GET."""
    source = spec.get("source") or {}
    summary = spec_summary(spec)
    return json.dumps({"ns": namespace, "name": name, "uid": uid, "type": source.get("type"),
                       "id": source.get("id"), "summary": summary}, separators=(",", ":"))


def spec_summary(spec: dict[str, Any]) -> str:
    """``sinks.job_summary`` of a wire-form spec (what duplicates and overrides store)."""
    try:
        return job_summary(TriageJobSpec.model_validate(spec)) or ""
    except ValidationError:
        return ""


def _with_resolution(body: dict[str, Any], spec: TriageJobSpec) -> TriageJobSpec:
    """An alert that resolved after its job was created is analysed as resolved (ingest marks it so)."""
    when = parse_time(((body["metadata"].get("annotations") or {}).get(RESOLVED_AT)) or None)
    if spec.alert is None or when is None or spec.alert.status == AlertStatus.RESOLVED.value:
        return spec
    alert = spec.alert.model_copy(update={"status": AlertStatus.RESOLVED.value, "ends_at": when})
    return spec.model_copy(update={"alert": alert})


def request_payload(body: dict[str, Any], spec: TriageJobSpec,
                    history: list[PastResult] | None = None) -> dict[str, Any]:
    meta = body["metadata"]
    spec = _with_resolution(body, spec)
    analysis = spec.analysis or Analysis()
    req = AnalysisRequest(
        uid=meta["uid"], name=meta["name"], namespace=meta["namespace"], source=spec.source,
        alert=spec.alert, script_result=spec.script_result, analyzer=analysis.analyzer,
        deadline_seconds=analysis.deadline_seconds, created_at=parse_time(meta.get("creationTimestamp")),
        script_history=history or [],
    )
    return req.model_dump(mode="json", exclude_none=True)


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


async def admit(rt: Runtime, body: dict[str, Any]) -> None:
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    status = body.get("status") or {}
    phase = status.get("phase")
    if rt.phases.get(uid) in FINISHED_PHASES and phase not in FINISHED_PHASES:
        # kopf can hand us a job's older event after we recorded its verdict (and removed it from
        # Redis): a finished job never runs again, so a stale "Queued" must not re-queue it
        return
    rt.phases[uid] = phase or ""
    rt.sources[uid] = ((body.get("spec") or {}).get("source") or {}).get("type", "")
    generation = meta.get("generation")

    if phase == Phase.DUPLICATE.value and not status.get("verdict"):
        await _relink_duplicate(rt, body)
        return
    if phase in (Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.DUPLICATE.value):
        rt.waiting.pop(uid, None)
        return
    if phase in _ACTIVE and await rt.queue.known(uid):
        if RESOLVED_AT in (meta.get("annotations") or {}):
            await _apply_resolution(rt, body)
        return

    try:
        spec = TriageJobSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        await patch_status(rt, ns, name, {
            "phase": Phase.FAILED.value, "message": f"invalid spec: {where}: {first['msg']}",
            "completedAt": rfc3339(now()), "observedGeneration": generation,
            "conditions": [condition("Triaged", "False", "InvalidSpec", f"{where}: {first['msg']}", generation)],
        })
        return

    await rt.load_caches()
    pc_name = spec.priority_class_name or (
        rt.settings.alert_priority_class if spec.source.type == SourceType.ALERT.value
        else rt.settings.script_priority_class
    )
    pool_name = spec.pool or rt.settings.default_pool
    pool = rt.find_pool(ns, pool_name)
    problem = None
    if pc_name not in rt.priority_classes:
        problem = ("PriorityClassNotFound", f"PriorityClass {pc_name!r} does not exist; create it or set "
                   "spec.priorityClassName to an existing one")
    elif pool is None:
        problem = ("PoolNotFound", f"TriagePool {pool_name!r} not found in namespace {ns!r}"
                   + (f" or {rt.settings.pool_namespace!r}" if rt.settings.pool_namespace else ""))
    if problem:
        rt.waiting[uid] = (ns, name)
        conds = status.get("conditions") or []
        if phase != Phase.PENDING.value or not any(c.get("reason") == problem[0] for c in conds):
            await patch_status(rt, ns, name, {
                "phase": Phase.PENDING.value, "message": problem[1], "observedGeneration": generation,
                "conditions": [condition("Triaged", "False", problem[0], problem[1], generation)],
            })
        return
    rt.waiting.pop(uid, None)
    assert pool is not None
    priority = rt.priority_classes[pc_name]
    fp = fingerprint.derive(body.get("spec") or {})
    identity = f"{uid}/{name}"
    base_status: dict[str, Any] = {
        "pool": pool.key, "priorityClassName": pc_name, "priority": priority, "fingerprint": fp,
        "observedGeneration": generation,
    }

    if phase not in _ACTIVE and rt.settings.dedup_window_seconds > 0:
        kind, primary, verdict = await rt.queue.dedup(
            ns, fp, identity, member(ns, name, uid, body.get("spec") or {}), rt.settings.dedup_window_seconds)
        if kind != "primary":
            primary_name = primary.split("/", 1)[1]
            dup_status = {
                **base_status, "phase": Phase.DUPLICATE.value, "duplicateOf": primary_name,
                "completedAt": rfc3339(now()),
                "message": f"same fingerprint as {primary_name} within {rt.settings.dedup_window_seconds}s",
                "conditions": [condition("Triaged", "False" if kind == "duplicate" else "True", "Duplicate",
                                         f"analysed once as {primary_name}", generation)],
            }
            if kind == "done":
                dup_status["verdict"] = json.loads(verdict)
                dup_status["recorded"] = False
            await patch_status(rt, ns, name, dup_status)
            metrics.JOBS_DUPLICATE.labels(spec.source.type).inc()
            return

    payload = request_payload(body, spec, await script_history(rt, spec))
    # stamped after the (database) history read: queuedAt and the FIFO score are when it entered the queue
    queued_at = parse_time(status.get("queuedAt"))
    fresh = queued_at is None
    queued_at = queued_at or now()
    score = int(queued_at.timestamp() * 1_000_000)
    analysis = spec.analysis or Analysis()
    added = await rt.queue.enqueue(
        uid=uid, pool=pool.key, priority=priority, payload=payload, namespace=ns, name=name,
        max_attempts=analysis.max_attempts, attempts=int(status.get("attempts") or 0), score_us=score,
    )
    # only the admission that queued a fresh job writes Queued (another one may race it: a rebuild)
    if (fresh and added) or (not fresh and phase not in _ACTIVE):
        await patch_status(rt, ns, name, {
            **base_status, "phase": Phase.QUEUED.value, "queuedAt": rfc3339(queued_at), "attempts": 0,
            "message": None,
            "conditions": [condition("Triaged", "False", "Queued", f"waiting in pool {pool.key}", generation)],
        })
        metrics.JOBS_ADMITTED.labels(pool.key, pc_name, spec.source.type).inc()


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
    fresh = request_payload(body, spec, [PastResult.model_validate(h) for h in payload.get("script_history", [])])
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
        await patch_status(rt, meta["namespace"], meta["name"], {
            "phase": Phase.FAILED.value, "message": f"primary {primary_name} was deleted before its verdict",
        })
        return
    pstatus = primary.get("status") or {}
    if pstatus.get("verdict"):
        await patch_status(rt, meta["namespace"], meta["name"], {"verdict": pstatus["verdict"], "recorded": False})
        return
    key = rt.queue.k("dups", f"{primary['metadata']['uid']}/{primary_name}")
    await rt.redis.sadd(key, member(meta["namespace"], meta["name"], meta["uid"], body.get("spec") or {}))


async def readmit_waiting(rt: Runtime) -> None:
    """A PriorityClass or TriagePool appeared: jobs that waited for one get another look."""
    for uid, (ns, name) in list(rt.waiting.items()):
        try:
            body = await rt.kube.get(triagejob_path(ns, name))
        except ApiError as exc:
            if exc.status == 404:
                rt.waiting.pop(uid, None)
                continue
            raise
        await admit(rt, body)


async def forget(rt: Runtime, body: dict[str, Any]) -> None:
    """A deleted job leaves the queues; a worker still on it loses its lease at the next heartbeat."""
    uid = body["metadata"]["uid"]
    rt.waiting.pop(uid, None)
    rt.phases.pop(uid, None)
    rt.sources.pop(uid, None)
    handle = rt.running_timers.pop(uid, None)
    if handle:
        handle.cancel()
    await rt.queue.remove(uid)


async def rebuild(rt: Runtime) -> int:
    """Redis came back empty: re-admit every TriageJob that is not finished. Returns how many were seen."""
    async with rt.rebuild_lock:
        if await rt.queue.epoch_ok():
            return 0
        await rt.queue.ensure_group()
        for pool in list(rt.pools.values()):  # rate limits were lost with the rest
            await rt.push_pool_config(pool)
        seen = 0
        namespaces = rt.settings.watched_namespaces or [None]
        for ns in namespaces:
            path = triagejob_path(ns) if ns else "/apis/kubetriage.io/v1alpha1/triagejobs"
            cont = None
            while True:
                page = await rt.kube.get(path, limit=500, **({"continue": cont} if cont else {}))
                for item in page.get("items", []):
                    item.setdefault("metadata", {}).setdefault("namespace", ns)
                    seen += 1
                    phase = (item.get("status") or {}).get("phase")
                    if phase not in _ACTIVE and phase != Phase.DUPLICATE.value:
                        continue  # new and pending jobs come through their own watch events
                    try:
                        await admit(rt, item)
                    except Exception:
                        log.exception("re-admitting %s/%s failed", item["metadata"].get("namespace"),
                                      item["metadata"].get("name"))
                cont = page.get("metadata", {}).get("continue")
                if not cont:
                    break
        await rt.queue.set_epoch(rt.identity)
        log.info("queues rebuilt from %d TriageJobs", seen)
        return seen
