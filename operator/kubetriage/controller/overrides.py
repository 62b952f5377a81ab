"""Human verdicts: a person overrides the analyzers with an annotation on the TriageJob.

    kubectl annotate tj NAME kubetriage.io/verdict=false_positive \\
        kubetriage.io/verdict-reason="known flaky login test" kubetriage.io/verdict-by=alice

(``kubetriage verdict set NAME false_positive --reason ...`` does the same.) The
spec stays immutable; annotations are the user's to change. The operator
records the override with ``check_type='user'``: it replaces the verdict in
status and in the team's row, is appended to the audit table, cancels any
analysis still queued or running, and joins the memory the memory analyzer
learns from (published to Redis, since workers have no database access).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kubetriage.api.keys import VERDICT, VERDICT_BY, VERDICT_REASON
from kubetriage.api.models import CheckType, Classification, Phase, verdict_from_classification
from kubetriage.api.timeutil import now, rfc3339
from kubetriage.controller.admission import condition, patch_status, spec_summary
from kubetriage.controller.recording import record_in_db
from kubetriage.controller.runtime import Runtime
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError
from kubetriage.infra.sinks import VerdictRecord

log = logging.getLogger("kubetriage.controller.overrides")

ALLOWED = (Classification.VALID.value, Classification.FALSE_POSITIVE.value)
MEMORY_KEY = "memory"
MEMORY_MAX = 20000


def memory_case(summary: str, classification: str, reason: str, source: str, kind: str | None,
                subject: str | None) -> str:
    """One human verdict as the memory analyzer reads it (``subject``: the alert or script name)."""
    return json.dumps({"text": summary, "classification": classification, "reason": reason, "source": source,
                       "check_type": CheckType.USER.value, "kind": kind, "subject": subject}, separators=(",", ":"))


def subject_of(spec: dict[str, Any]) -> str | None:
    if (spec.get("source") or {}).get("type") == "alert":
        return (spec.get("alert") or {}).get("name")
    return (spec.get("scriptResult") or {}).get("scriptName")


async def apply(rt: Runtime, body: dict[str, Any]) -> bool:
    """True when the job carries a human verdict (applied now or before): no analysis is needed."""
    meta = body["metadata"]
    annotations = meta.get("annotations") or {}
    wanted = annotations.get(VERDICT)
    if wanted is None:
        return False
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    status = body.get("status") or {}
    wanted = wanted.strip().lower().replace("-", "_")
    if wanted not in ALLOWED:
        message = f"annotation {VERDICT}={annotations[VERDICT]!r} ignored: use one of {', '.join(ALLOWED)}"
        if status.get("message") != message:
            await patch_status(rt, ns, name, {"message": message})
        return False
    by = (annotations.get(VERDICT_BY) or "unknown").strip()[:128]
    reason = f"{(annotations.get(VERDICT_REASON) or 'set by a human').strip()} (by {by})"[:4000]
    current = status.get("verdict") or {}
    if (current.get("checkType") == CheckType.USER.value and current.get("classification") == wanted
            and current.get("reason") == reason):
        return True  # already applied: this event is our own status write coming back
    verdict = verdict_from_classification(wanted, reason, 1.0, "human", check_type=CheckType.USER)
    spec = body.get("spec") or {}
    source = spec.get("source") or {}
    summary = spec_summary(spec)
    record = VerdictRecord(
        job_uid=uid, job_name=name, namespace=ns, source_type=source.get("type", "alert"),
        source_id=source.get("id"), fingerprint=status.get("fingerprint"), verdict=verdict,
        pool=status.get("pool"), priority_class=status.get("priorityClassName"),
        attempts=int(status.get("attempts") or 0), recorded_at=now(), summary=summary,
    )
    recorded = await record_in_db(rt, record)
    metrics.VERDICTS.labels(wanted, "human", CheckType.USER.value).inc()
    await rt.queue.remove(uid)  # a queued or running analysis is moot now
    timer = rt.running_timers.pop(uid, None)
    if timer:
        timer.cancel()
    patch: dict[str, Any] = {
        "phase": Phase.SUCCEEDED.value, "verdict": verdict.wire(), "recorded": recorded, "message": None,
        "completedAt": status.get("completedAt") or rfc3339(now()),
        "conditions": [condition("Triaged", "True", "HumanVerdict", reason[:200], meta.get("generation")),
                       condition("Recorded", "True" if recorded else "False",
                                 "Recorded" if recorded else "DatabaseUnavailable",
                                 "verdict in the database" if recorded else "retrying the database write", None)],
    }
    if status.get("phase") == Phase.DUPLICATE.value:
        patch.pop("phase")
    rt.phases[uid] = patch.get("phase", status.get("phase", ""))
    if await patch_status(rt, ns, name, patch):
        try:
            await rt.kube.event(body, "VerdictOverridden",
                                f"{wanted} by {by}, replacing {current.get('classification') or 'no verdict'}")
        except ApiError as exc:
            log.warning("event for %s/%s: %s", ns, name, exc)
    # later duplicates of this job inherit the human verdict, not the one it replaced
    remembered = rt.queue.k("verdict", f"{uid}/{name}")
    await rt.redis.set(remembered, json.dumps(verdict.wire()), xx=True, keepttl=True)
    key = rt.queue.k(MEMORY_KEY)
    await rt.redis.rpush(key, memory_case(summary, wanted, reason, f"{ns}/{name}", source.get("type"),
                                          subject_of(spec)))
    await rt.redis.ltrim(key, -MEMORY_MAX, -1)
    return True


async def seed_memory(rt: Runtime) -> int:
    """Redis lost its data (or this is a new install): republish the database's human verdicts."""
    key = rt.queue.k(MEMORY_KEY)
    if await rt.redis.exists(key):
        return 0
    try:
        rows = await rt.sink.human_verdicts(limit=MEMORY_MAX)
    except Exception as exc:  # the database may be down: memory comes back with it (next rebuild)
        log.warning("cannot read human verdicts for the memory analyzer: %s", exc)
        return 0
    # no subject: the memory analyzer takes it from the summary, which starts with the alert or script name
    cases = [memory_case(str(r.get("summary") or ""), str(r.get("classification")), str(r.get("reason") or ""),
                         f"{r.get('namespace', '')}/{r.get('job_name', '')}", r.get("source_type"), None)
             for r in reversed(rows) if r.get("summary")]
    if cases:
        await rt.redis.rpush(key, *cases)
    return len(cases)
