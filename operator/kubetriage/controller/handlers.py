"""kopf handlers: thin wrappers that call one module per operation.

TriageJobs use ``on.event`` only: kopf keeps no progress annotations, no
diff-base and no finalizer on them, so every API write a job costs is one we
make ourselves (and count). TriagePools get a daemon (their control loop),
which kopf stops on a standby replica; the daemons also keep the leader loop
(``controller.leader``) alive, so a standby runs none of it either. TriageRules use ``on.event`` too
(no annotations, no finalizer): the operator only caches them and writes their ``Accepted`` condition.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetriage.api.models import GROUP, VERSION
from kubetriage.controller import admission, leader, pools, recording, rules, ttl
from kubetriage.controller.actions import executor, policies
from kubetriage.controller.runtime import Runtime
from kubetriage.infra import metrics
from kubetriage.infra.config import Settings
from kubetriage.ingest import server as ingest

log = logging.getLogger("kubetriage")


def _rt(memo: kopf.Memo) -> Runtime:
    return memo["runtime"]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    cfg = Settings.from_env()
    # Fixed before the first release: changing them would re-handle every object.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP, v1=False)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled", v1=False)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.enabled = False  # our own Events, one per terminal transition; not one per log line
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.chunk_size = 500
    # kopf keeps one worker per object alive for idle_timeout after its last event, and a worker_limit
    # makes new objects wait for a free one: with a limit, a burst of status echoes delays the admission
    # of new (p1) jobs by seconds. No limit (kopf's default), and workers that leave after 1 s.
    settings.batching.idle_timeout = 1.0
    settings.networking.request_timeout = 60
    settings.peering.lifetime = cfg.peering_lifetime_seconds
    memo["runtime"] = await Runtime.create(cfg)
    # not started here: a task from a startup handler would run on a standby too (peering pauses only
    # watchers and daemons), so the pool daemons start and stop it
    memo["leader"] = leader.Leader(memo["runtime"])
    if not cfg.standalone:
        await memo["runtime"].ensure_peering_objects()
    metrics.start_server(cfg.metrics_port)
    # on every replica, standby too: ingest only creates TriageJobs, idempotently (see kubetriage.ingest.server)
    memo["ingest"] = await ingest.start_ingest(cfg, memo["runtime"].kube)
    log.info("kubetriage operator %s started (identity %s)", GROUP, memo["runtime"].identity)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await ingest.stop_ingest(memo.get("ingest"))
    if memo.get("leader") is not None:
        await memo["leader"].close()
    rt = memo.get("runtime")
    if rt is not None:
        await rt.close()


@kopf.on.event(GROUP, VERSION, "triagejobs")
async def triagejob_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    rt = _rt(memo)
    body = event["object"]
    if event.get("type") == "DELETED":
        # first: in memory only, it cannot fail (a silence the job held is lifted unless the TTL deleted it)
        executor.forget(rt, body, deleted_by_ttl=ttl.forget(rt, body["metadata"]["uid"]))
        await admission.forget(rt, body)
        return
    await admission.admit_or_retry(rt, body)  # kopf never retries an event handler: admission does
    recording.backlog_from_status(rt, body)
    executor.observe(rt, body)  # Pending actions, silences to lift (done by the leader)
    await ttl.observe_loaded(rt, body)


@kopf.on.event(GROUP, VERSION, "triagepools")
async def triagepool_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    rt = _rt(memo)
    body = event["object"]
    if event.get("type") == "DELETED":
        key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
        rt.pools.pop(key, None)
        rt.pool_generations.pop(key, None)
        return
    await pools.reconcile(rt, body)


@kopf.on.event(GROUP, VERSION, "triagepolicies")
async def triagepolicy_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    rt = _rt(memo)
    body = event["object"]
    if event.get("type") == "DELETED":
        policies.forget(rt, body)
        return
    await policies.reconcile(rt, body)


@kopf.on.event(GROUP, VERSION, "triagerules")
async def triagerule_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    rt = _rt(memo)
    body = event["object"]
    if event.get("type") == "DELETED":
        rules.forget(rt, body)
        return
    await rules.reconcile(rt, body)


@kopf.daemon(GROUP, VERSION, "triagepools", cancellation_timeout=10, initial_delay=0)
async def triagepool_loop(body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    # every pool daemon holds the leader: the first starts the one leader loop, the last one out stops it
    async with memo["leader"].held():
        await pools.run_pool(_rt(memo), dict(body), stopped)


@kopf.on.event("scheduling.k8s.io", "v1", "priorityclasses")
async def priorityclass_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    rt = _rt(memo)
    body = event["object"]
    name = body["metadata"]["name"]
    if event.get("type") == "DELETED":
        rt.priority_classes.pop(name, None)
        await pools.priority_class_changed(rt, name)
        return
    known = rt.priority_classes.get(name)
    rt.priority_classes[name] = int(body.get("value", 0))
    if known is None:
        await pools.priority_class_changed(rt, name)  # a pool waiting for it gets its Deployment
        if rt.waiting:
            await admission.readmit_waiting(rt)
