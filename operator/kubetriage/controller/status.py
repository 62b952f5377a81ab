"""TriageJob status writes: the one place that builds them.

Admission, recording and overrides say *what* changed, as a ``TriageJobStatus``
holding only the fields that change; this module turns it into one merge patch
of ``/status``. The rest of what a status write needs lives here too, so it is
spelled once: the conditions (the Triaged/Recorded pair a verdict gets), the
``VerdictRecord`` a job's verdict becomes in the database, and the timer behind
the late "Running" write (so a fast job costs two status writes, not three). A TriageRule's status (its
``Accepted`` condition, ``controller.rules``) is written here too, with the same condition helper, and so
is a TriagePool's (its replicas, backlog and ``Ready`` condition, ``controller.pools``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from typing import Any

from pydantic import ValidationError

from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.models import (
    FINISHED_PHASES,
    CheckType,
    Condition,
    EvidenceItem,
    Phase,
    TriageJobSpec,
    TriageJobStatus,
    TriagePolicyStatus,
    TriagePoolStatus,
    TriageRuleStatus,
    Verdict,
)
from kubetriage.api.redact import BUILTIN, Redactor
from kubetriage.api.summary import MAX_SUMMARY_BYTES, job_summary
from kubetriage.api.timeutil import now, rfc3339
from kubetriage.controller.runtime import Runtime
from kubetriage.infra.kube import ApiError, triagejob_path, triagepolicy_path, triagepool_path, triagerule_path
from kubetriage.infra.sinks import VerdictRecord

TRIAGED = "Triaged"
RECORDED = "Recorded"
# Condition messages are for `kubectl describe`: the full text is in status.message and the Event.
MAX_CONDITION_MESSAGE = 1024
MAX_VERDICT_CONDITION_MESSAGE = 200


# --------------------------------------------------------------------------- conditions


def condition(type_: str, ok: bool, reason: str, message: str, generation: int | None = None) -> Condition:
    """One condition, stamped now; to the second, the precision metav1.Condition has."""
    return Condition(type=type_, status="True" if ok else "False", reason=reason,
                     message=message[:MAX_CONDITION_MESSAGE],
                     last_transition_time=now().replace(microsecond=0), observed_generation=generation)


def triaged(ok: bool, reason: str, message: str, generation: int | None = None) -> list[Condition]:
    """The conditions of a job without a recorded verdict: Triaged alone (the list replaces the old one)."""
    return [condition(TRIAGED, ok, reason, message, generation)]


def verdict_conditions(verdict: Verdict, recorded: bool, generation: int | None = None) -> list[Condition]:
    """Triaged=True and Recorded, always written together (the list replaces the old one).

    Triaged says who decided (an analyzer, or a human); Recorded whether the database has the verdict
    (False until the backlog retry gets it there, which then writes the same pair with Recorded=True).
    """
    reason = "HumanVerdict" if verdict.check_type == CheckType.USER.value else "Succeeded"
    return [
        condition(TRIAGED, True, reason, verdict.reason[:MAX_VERDICT_CONDITION_MESSAGE], generation),
        condition(RECORDED, recorded, "Recorded" if recorded else "DatabaseUnavailable",
                  "verdict in the database" if recorded else "retrying the database write", generation),
    ]


# --------------------------------------------------------------------------- the write


def merge_patch(status: TriageJobStatus) -> dict[str, Any]:
    """The merge patch of the fields set on ``status``; a field set to None is cleared.

    Not ``model_dump(exclude_unset=True)``: that also drops the defaults of nested models (a verdict's
    checkType), which the stored status must hold. Nested objects go as ``wire()`` writes them.
    """
    wire = status.wire()
    patch: dict[str, Any] = {}
    for name, field in TriageJobStatus.model_fields.items():
        if name not in status.model_fields_set:
            continue
        key, value = field.alias or name, getattr(status, name)
        # Times always with microseconds (pydantic drops a zero fraction): they are compared as strings,
        # and queue order after a rebuild comes from queuedAt.
        patch[key] = rfc3339(value) if isinstance(value, dt.datetime) else wire.get(key)
    return patch


async def write_status(rt: Runtime, namespace: str, name: str, status: TriageJobStatus) -> bool:
    """One merge patch of /status; False when the job is gone (deleted meanwhile)."""
    try:
        await rt.kube.merge_patch(triagejob_path(namespace, name, status=True), {"status": merge_patch(status)})
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def write_status_unchanged(rt: Runtime, namespace: str, name: str, status: TriageJobStatus,
                                 resource_version: str) -> bool:
    """``write_status`` only if the job is still at ``resource_version``; False when it is gone.

    For read-modify-write of a list (``status.actions``, which a merge patch replaces whole): a concurrent
    writer makes this raise ``ApiError`` 409, and the caller reads again and merges.
    """
    try:
        await rt.kube.merge_patch(triagejob_path(namespace, name, status=True),
                                  {"metadata": {"resourceVersion": resource_version}, "status": merge_patch(status)})
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def _patch_if_present(rt: Runtime, path: str, body: dict[str, Any]) -> bool:
    """A merge patch of an object's /status; False when the object is gone (deleted meanwhile)."""
    try:
        await rt.kube.merge_patch(path, body)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def write_policy_status(rt: Runtime, namespace: str, name: str, status: TriagePolicyStatus) -> bool:
    """One merge patch of a TriagePolicy's /status; False when the policy is gone (deleted meanwhile)."""
    return await _patch_if_present(rt, triagepolicy_path(namespace, name, status=True), {"status": status.wire()})


async def write_rule_status(rt: Runtime, namespace: str, name: str, status: TriageRuleStatus) -> bool:
    """One merge patch of a TriageRule's /status; False when the rule is gone (deleted meanwhile)."""
    return await _patch_if_present(rt, triagerule_path(namespace, name, status=True), {"status": status.wire()})


async def write_pool_status(rt: Runtime, namespace: str, name: str, status: TriagePoolStatus) -> bool:
    """One merge patch of a TriagePool's /status (the fields set on ``status``); False when the pool is gone."""
    return await _patch_if_present(rt, triagepool_path(namespace, name, status=True), {"status": status.wire()})


# --------------------------------------------------------------------------- the verdict record


def spec_summary(spec: dict[str, Any]) -> str:
    """``job_summary`` of a wire-form spec (what duplicates, overrides and the backlog store)."""
    try:
        return job_summary(TriageJobSpec.model_validate(spec)) or ""
    except ValidationError:
        return ""


def _record(uid: str, name: str, namespace: str, source: dict[str, Any], verdict: Verdict, summary: str, *,
            fingerprint: str | None = None, pool: str | None = None, priority_class: str | None = None,
            attempts: int = 0, identity: str | None = None,
            evidence: list[EvidenceItem] | None = None) -> VerdictRecord:
    return VerdictRecord(
        job_uid=uid, job_name=name, namespace=namespace, source_type=source.get("type") or "alert",
        source_id=source.get("id"), fingerprint=fingerprint, verdict=verdict, pool=pool,
        priority_class=priority_class, attempts=attempts, recorded_at=now(), summary=summary[:MAX_SUMMARY_BYTES],
        identity=identity, evidence=evidence or [],
    )


def record_of_job(body: dict[str, Any], verdict: Verdict, redact: Redactor = BUILTIN) -> VerdictRecord:
    """The record of a TriageJob as the API server has it (a human verdict, or the backlog after a restart).

    Its summary comes from the spec as submitted, so it is redacted here (``redact``: the job's pool's).
    """
    meta, spec, st = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    evidence: list[EvidenceItem] = []
    with contextlib.suppress(ValidationError, TypeError):
        evidence = [EvidenceItem.model_validate(e) for e in st.get("evidence") or []]
    return _record(meta["uid"], meta["name"], meta["namespace"], spec.get("source") or {}, verdict,
                   redact(spec_summary(spec)), fingerprint=st.get("fingerprint"), pool=st.get("pool"),
                   priority_class=st.get("priorityClassName"), attempts=int(st.get("attempts") or 0),
                   evidence=evidence)


def record_of_queued(uid: str, job: dict[str, str], verdict: Verdict, attempts: int,
                     evidence: list[EvidenceItem] | None = None) -> VerdictRecord:
    """The record of a job from its Redis entry (a worker's result): no API read on the hot path. Its identity
    (the history key admission computed) comes from the payload."""
    payload = json.loads(job.get("payload") or "{}")
    source = payload.get("source") or {}
    try:
        summary = job_summary(AnalysisRequest.model_validate(payload)) or ""
    except ValueError:
        summary = ""
    identity = payload.get("identity")
    return _record(uid, job["name"], job["ns"], source, verdict, summary, fingerprint=source.get("fingerprint"),
                   pool=job.get("pool"), attempts=attempts, identity=identity if isinstance(identity, str) else None,
                   evidence=evidence)


def record_of_duplicate(member: dict[str, Any], verdict: Verdict) -> VerdictRecord:
    """The record of a duplicate from what admission remembered of it (``admission.member``)."""
    return _record(member["uid"], member["name"], member["ns"], {"type": member.get("type"), "id": member.get("id")},
                   verdict, member.get("summary") or "")


# --------------------------------------------------------------------------- the late Running write

_background: set[asyncio.Task[None]] = set()


def cancel_running(rt: Runtime, uid: str) -> None:
    """The job finished, was overridden or deleted: its pending Running write must not land after that."""
    rt.claimed.pop(uid, None)
    handle = rt.running_timers.pop(uid, None)
    if handle:
        handle.cancel()


def schedule_running(rt: Runtime, uid: str, started_us: int, attempt: int) -> None:
    """Write Running only if the job still runs after ``running_status_delay``: fast jobs never show it.

    This is the one per-TriageJob timer of the operator; every terminal write cancels it.
    """
    loop = asyncio.get_running_loop()
    cancel_running(rt, uid)
    if rt.phases.get(uid) not in FINISHED_PHASES:  # a replayed claim of a finished job is no claim to remember
        rt.claimed[uid] = attempt

    def fire() -> None:
        rt.running_timers.pop(uid, None)
        task = loop.create_task(_write_running(rt, uid, started_us, attempt))
        _background.add(task)  # a task nobody references may be garbage-collected mid-write
        task.add_done_callback(_background.discard)

    rt.running_timers[uid] = loop.call_later(rt.settings.running_status_delay_seconds, fire)


def us_time(us: int) -> dt.datetime:
    """A Redis microsecond timestamp as a UTC datetime."""
    return dt.datetime.fromtimestamp(us / 1_000_000, dt.UTC)


async def _write_running(rt: Runtime, uid: str, started_us: int, attempt: int) -> None:
    job = await rt.queue.job(uid)
    if not job or job.get("state") != "leased" or rt.phases.get(uid) in FINISHED_PHASES:
        return
    with contextlib.suppress(ApiError):
        await write_status(rt, job["ns"], job["name"], TriageJobStatus(
            phase=Phase.RUNNING, started_at=us_time(started_us), attempts=attempt))
