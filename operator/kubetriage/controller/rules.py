"""TriageRules: keep the per-namespace cache admission reads, and say on each rule whether it is usable.

A rule reaches a job through the job's request, built at admission from ``Runtime.rules``; so a rule
applies to the jobs admitted after this operator observed it, never to jobs already queued. The
``Accepted`` condition is written after the cache holds the rule, so ``kubectl wait
--for=condition=Accepted trule/NAME`` returning means jobs created from then on get it.

One status write per generation of a rule, none for the echo of our own write: a rule costs the API
server nothing between spec changes. No finalizer and no annotation: a deleted rule leaves the cache
on its DELETED event.
"""

from __future__ import annotations

import logging
from typing import Any

from kubetriage.api.models import TriageRuleStatus
from kubetriage.controller.runtime import Runtime
from kubetriage.controller.status import condition, write_rule_status

log = logging.getLogger("kubetriage.controller.rules")

ACCEPTED = "Accepted"


async def reconcile(rt: Runtime, body: dict[str, Any]) -> None:
    """A rule was created, changed or re-listed: cache it as it is now, then write its status if not yet done."""
    # First the startup listing, so an older listing cannot overwrite what this event says.
    await rt.load_caches()
    meta = body["metadata"]
    ns, name, uid, generation = meta["namespace"], meta["name"], meta.get("uid", ""), meta.get("generation")
    check = rt.rules.observe(body)
    if not check.ok:
        log.warning("TriageRule %s/%s not used: %s", ns, name, check.message)
    status = body.get("status") or {}
    if status.get("observedGeneration") == generation or rt.rules.written.get(uid) == generation:
        return  # this generation's status is written (the event is its echo, or a metadata-only change)
    written = await write_rule_status(rt, ns, name, TriageRuleStatus(
        observed_generation=generation,
        conditions=[condition(ACCEPTED, check.ok, check.reason, check.message, generation)]))
    if written:
        rt.rules.written[uid] = generation


def forget(rt: Runtime, body: dict[str, Any]) -> None:
    meta = body["metadata"]
    rt.rules.forget(meta["namespace"], meta["name"], meta.get("uid"))
