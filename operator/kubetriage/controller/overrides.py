"""Human verdicts: a person overrides the analyzers with an annotation on the TriageJob.

    kubectl annotate tj NAME kubetriage.io/verdict=false_positive \\
        kubetriage.io/verdict-reason="known flaky login test" kubetriage.io/verdict-by=alice

(``kubetriage verdict set NAME false_positive --reason ...`` does the same, with
``-by`` the name the API server authenticated.) The spec stays immutable;
annotations are the user's to change. Who may set these ones is the API
server's decision: the chart's ValidatingAdmissionPolicy (verdict-policy.yaml)
requires ``update`` on ``triagejobs/verdict`` and ``-by`` equal to the
requester's user name; the reason is redacted like the job's own text. The operator
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
from kubetriage.api.models import CheckType, Classification, Phase, TriageJobStatus, verdict_from_classification
from kubetriage.api.timeutil import now, parse_time
from kubetriage.controller.actions import plan as actions
from kubetriage.controller.recording import record_in_db
from kubetriage.controller.runtime import Runtime
from kubetriage.controller.status import cancel_running, record_of_job, spec_summary, verdict_conditions, write_status
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError
from kubetriage.infra.queue import MEMORY_MAX

log = logging.getLogger("kubetriage.controller.overrides")

ALLOWED = (Classification.VALID.value, Classification.FALSE_POSITIVE.value)


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
        message = f"annotation {VERDICT}={annotations[VERDICT]!r} ignored: use one of {', '.join(ALLOWED)}"[:4096]
        if status.get("message") != message:
            await write_status(rt, ns, name, TriageJobStatus(message=message))
        return False
    by = (annotations.get(VERDICT_BY) or "unknown").strip()[:128]
    # a human may paste what they saw (a token in a log line): redacted like the job's own text
    redact = rt.redactor(status.get("pool"))
    reason = redact(f"{(annotations.get(VERDICT_REASON) or 'set by a human').strip()} (by {by})"[:4000])
    current = status.get("verdict") or {}
    if (current.get("checkType") == CheckType.USER.value and current.get("classification") == wanted
            and current.get("reason") == reason):
        return True  # already applied: this event is our own status write coming back
    verdict = verdict_from_classification(wanted, reason, 1.0, "human", check_type=CheckType.USER)
    spec = body.get("spec") or {}
    source = spec.get("source") or {}
    summary = redact(spec_summary(spec))
    recorded = await record_in_db(rt, record_of_job(body, verdict, redact))
    metrics.VERDICTS.labels(wanted, "human", CheckType.USER.value).inc()
    await rt.queue.remove(uid)  # a queued or running analysis is moot now
    cancel_running(rt, uid)
    fields: dict[str, Any] = {
        "verdict": verdict, "recorded": recorded, "message": None,
        "completed_at": parse_time(status.get("completedAt")) or now(),
        "conditions": verdict_conditions(verdict, recorded, meta.get("generation")),
    }
    if status.get("phase") != Phase.DUPLICATE.value:  # a duplicate keeps its phase: it still names its primary
        fields["phase"] = Phase.SUCCEEDED.value
    rt.phases[uid] = fields.get("phase", status.get("phase", ""))
    # TriagePolicies act on a human verdict too (its notifications), planned in this same write; a silence the
    # job holds is lifted by the executor when the human said valid (controller.actions.executor)
    planned = await actions.for_human_verdict(rt, body, verdict)
    if planned is not None:
        fields["actions"] = planned
    if await write_status(rt, ns, name, TriageJobStatus(**fields)):
        try:
            await rt.kube.event(body, "VerdictOverridden",
                                f"{wanted} by {by}, replacing {current.get('classification') or 'no verdict'}")
        except ApiError as exc:
            log.warning("event for %s/%s: %s", ns, name, exc)
        await actions.announce(rt, body, [a for a in planned or [] if a.key.endswith(f":{wanted}")])
    # later duplicates of this job inherit the human verdict, not the one it replaced
    await rt.queue.replace_remembered_verdict(f"{uid}/{name}", json.dumps(verdict.wire()))
    await rt.queue.publish_human_cases(memory_case(summary, wanted, reason, f"{ns}/{name}", source.get("type"),
                                                   subject_of(spec)))
    return True


async def seed_memory(rt: Runtime) -> int:
    """Redis lost its data (or this is a new install): republish the database's human verdicts."""
    if await rt.queue.memory_seeded():
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
    await rt.queue.publish_human_cases(*cases)
    return len(cases)
