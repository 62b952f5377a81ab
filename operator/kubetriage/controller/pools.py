"""TriagePools: one owned worker Deployment each, scaled on backlog; and the pool's control loop.

The control loop runs as a kopf daemon per TriagePool, so kopf's peering
stops it on a standby replica: only the active operator reaps a pool's leases,
scales its workers and writes its status. Work that is not per pool (recording
results, the Redis rebuild, the database retry) is the leader loop's
(``controller.leader``), which the pool daemons keep alive while they run.
Jobs have no timers of their own except one: the late "Running" write
(``controller.status.schedule_running``), cancelled when the job finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

import kopf

from kubetriage.api.keys import POOL_LABEL
from kubetriage.api.models import (
    ConfigMapKeyRef,
    EvidenceEndpoint,
    PoolEvidence,
    PrometheusEndpoint,
    SecretKeyRef,
    TriagePoolSpec,
    TriagePoolStatus,
)
from kubetriage.controller import admission, poolconfig
from kubetriage.controller.runtime import PoolInfo, Runtime
from kubetriage.controller.status import condition, write_pool_status
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError, deployment_path, triagepool_path

log = logging.getLogger("kubetriage.controller.pools")

WORKER_UID = 10001
READY = "Ready"
CLASS_NOT_FOUND = "PriorityClassNotFound"


def deployment_name(pool_name: str) -> str:
    return f"kubetriage-worker-{pool_name}"[:63].rstrip("-")


def labels(pool: PoolInfo) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetriage",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "kubetriage",
        POOL_LABEL: pool.name,
    }


def worker_deployment(rt: Runtime, pool: PoolInfo, replicas: int) -> dict[str, Any]:
    """The worker Deployment for a pool: no API token, non-root, read-only root filesystem."""
    spec = TriagePoolSpec.model_validate(pool.spec)
    s = rt.settings
    env: list[dict[str, Any]] = [
        {"name": "KUBETRIAGE_POOL", "value": pool.key},
        {"name": "KUBETRIAGE_REDIS_PREFIX", "value": s.redis_prefix},
        {"name": "KUBETRIAGE_CONCURRENCY", "value": str(spec.concurrency)},
        {"name": "KUBETRIAGE_ANALYZER_CHAIN", "value": str(spec.analyzer.chain)},
        {"name": "KUBETRIAGE_CONFIDENCE_THRESHOLD", "value": str(spec.analyzer.confidence_threshold)},
        {"name": "KUBETRIAGE_IDENTITY_LABELS", "value": ",".join(spec.analyzer.identity_labels or ())},
        {"name": "KUBETRIAGE_LEASE_SECONDS", "value": str(s.lease_seconds)},
        {"name": "KUBETRIAGE_RETRY_BACKOFF_SECONDS", "value": str(s.retry_backoff_seconds)},
        {"name": "KUBETRIAGE_RETRY_BACKOFF_MAX_SECONDS", "value": str(s.retry_backoff_max_seconds)},
        {"name": "KUBETRIAGE_LLM_TIMEOUT_SECONDS", "value": str(spec.analyzer.timeout_seconds)},
        {"name": "KUBETRIAGE_METRICS_PORT", "value": str(s.metrics_port)},
        {"name": "KUBETRIAGE_SHUTDOWN_GRACE_SECONDS", "value": str(s.shutdown_grace_seconds)},
    ]
    if s.redis_url_secret:
        secret, _, key = s.redis_url_secret.partition("/")
        env.append({"name": "KUBETRIAGE_REDIS_URL",
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": key or "url"}}})
    else:
        env.append({"name": "KUBETRIAGE_REDIS_URL", "value": s.redis_url})
    if spec.analyzer.base_url:
        env.append({"name": "KUBETRIAGE_LLM_BASE_URL", "value": spec.analyzer.base_url})
    if spec.analyzer.model:
        env.append({"name": "KUBETRIAGE_LLM_MODEL", "value": spec.analyzer.model})
    if spec.analyzer.vision_model:
        env.append({"name": "KUBETRIAGE_LLM_VISION_MODEL", "value": spec.analyzer.vision_model})
    if s.vision_allow_hosts:
        env.append({"name": "KUBETRIAGE_VISION_ALLOW_HOSTS", "value": s.vision_allow_hosts})
    if spec.analyzer.api_key_secret_ref:
        ref = spec.analyzer.api_key_secret_ref
        env.append({"name": "KUBETRIAGE_LLM_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": True}}})
    env.extend(evidence_env(spec.evidence))
    env.extend(poolconfig.worker_env(spec))  # the LLM URL policy's opt-ins, the pool's redaction patterns
    container: dict[str, Any] = {
        "name": "worker",
        "image": spec.image or s.worker_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["kubetriage", "worker"],
        "env": env,
        "ports": [{"name": "metrics", "containerPort": s.metrics_port}] if s.metrics_port else [],
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if spec.resources:
        container["resources"] = spec.resources.wire()
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": int(s.shutdown_grace_seconds) + 5,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                            "fsGroup": WORKER_UID},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(pool.name), "namespace": pool.namespace, "labels": labels(pool)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {POOL_LABEL: pool.name, "app.kubernetes.io/component": "worker"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels(pool)}, "spec": pod_spec},
        },
    }
    kopf.adopt(body, owner={"apiVersion": "kubetriage.io/v1alpha1", "kind": "TriagePool",
                            "metadata": {"name": pool.name, "namespace": pool.namespace, "uid": pool.uid}})
    return body


def _ref_env(name: str, kind: str, ref: SecretKeyRef | ConfigMapKeyRef) -> dict[str, Any]:
    # optional: a missing Secret must not keep the pool's pods from starting (no verdicts at all); the
    # endpoint then answers 401, and the evidence says to check this Secret
    return {"name": name, "valueFrom": {kind: {"name": ref.name, "key": ref.key, "optional": True}}}


def evidence_env(evidence: PoolEvidence | None) -> list[dict[str, Any]]:
    """The pool's ``spec.evidence`` as worker environment; credentials and CAs by reference, never by value."""
    if evidence is None:
        return []
    env: list[dict[str, Any]] = [
        {"name": "KUBETRIAGE_EVIDENCE_TIMEOUT_SECONDS", "value": str(evidence.timeout_seconds)},
        {"name": "KUBETRIAGE_EVIDENCE_BUDGET_SECONDS", "value": str(evidence.budget_seconds)},
        {"name": "KUBETRIAGE_EVIDENCE_CACHE_SECONDS", "value": str(evidence.cache_seconds)},
    ]
    endpoints: list[tuple[str, EvidenceEndpoint | None]] = [
        ("PROMETHEUS", evidence.prometheus), ("ALERTMANAGER", evidence.alertmanager)]
    for source, ep in endpoints:
        if ep is None:
            continue
        var = f"KUBETRIAGE_EVIDENCE_{source}_"
        env += [{"name": var + "URL", "value": ep.url},
                {"name": var + "ALLOW_HTTP", "value": str(ep.allow_http).lower()},
                {"name": var + "ALLOW_PRIVATE_ENDPOINTS", "value": str(ep.allow_private_endpoints).lower()}]
        if isinstance(ep, PrometheusEndpoint):
            env.append({"name": var + "ANY_EXPRESSION", "value": str(ep.any_expression).lower()})
        if ep.bearer_token_secret_ref:
            env.append(_ref_env(var + "BEARER_TOKEN", "secretKeyRef", ep.bearer_token_secret_ref))
        if ep.basic_auth:
            env.append(_ref_env(var + "USERNAME", "secretKeyRef", ep.basic_auth.username))
            env.append(_ref_env(var + "PASSWORD", "secretKeyRef", ep.basic_auth.password))
        if ep.tls:
            if ep.tls.ca_secret_ref:
                env.append(_ref_env(var + "CA", "secretKeyRef", ep.tls.ca_secret_ref))
            elif ep.tls.ca_config_map_ref:
                env.append(_ref_env(var + "CA", "configMapKeyRef", ep.tls.ca_config_map_ref))
            env.append({"name": var + "INSECURE_SKIP_VERIFY", "value": str(ep.tls.insecure_skip_verify).lower()})
    return env


_exported: dict[str, set[str]] = {}


def _export_queue(pool: str, depth: dict[str, int], oldest: dict[str, float]) -> None:
    """Set the per-priority gauges; priorities that emptied are set to 0 rather than left stale."""
    seen = _exported.setdefault(pool, set())
    for prio in seen - set(depth):
        metrics.QUEUE_DEPTH.labels(pool, prio).set(0)
        metrics.QUEUE_OLDEST.labels(pool, prio).set(0)
    for prio, n in depth.items():
        metrics.QUEUE_DEPTH.labels(pool, prio).set(n)
        metrics.QUEUE_OLDEST.labels(pool, prio).set(oldest.get(prio, 0.0))
    seen |= set(depth)


async def apply_deployment(rt: Runtime, pool: PoolInfo, replicas: int) -> bool:
    """Create or scale the pool's worker Deployment; False, and nothing applied, while the pool cannot run
    workers (``Runtime.pool_unready``): the one place a Deployment is written, so none exists before then."""
    await rt.load_caches()  # a PriorityClass this replica has not listed yet is not a missing one
    if rt.pool_unready(pool) is not None:
        return False
    body = worker_deployment(rt, pool, replicas)
    await rt.kube.apply(deployment_path(pool.namespace, body["metadata"]["name"]), body)
    return True


def _desired(spec: TriagePoolSpec, backlog: int, running: int) -> int:
    need = math.ceil((backlog + running) / max(1, spec.concurrency))
    return max(spec.replicas.min, min(spec.replicas.max, need))


def _ready(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == READY), None)


async def reconcile(rt: Runtime, body: dict[str, Any]) -> None:
    """Pool created or changed: record it, push its limits to Redis, (re)apply its Deployment, say if it is Ready."""
    pool = rt.observe_pool(body)
    status = body.get("status") or {}
    generation = body["metadata"].get("generation")
    spec = TriagePoolSpec.model_validate(pool.spec)
    changed = pool.key not in rt.pool_generations or rt.pool_generations[pool.key] != generation
    if changed:  # new to this replica, or its spec changed: not the echo of our own status writes
        await rt.push_pool_config(pool)
        rt.pool_generations[pool.key] = generation
    await rt.load_caches()
    problem = rt.pool_unready(pool)
    if problem is not None:
        await _not_ready(rt, pool, status, generation, problem)
        return
    ready = _ready(status)  # None: a pool from before the condition existed, whose Deployment is fine
    if status.get("observedGeneration") == generation and status.get("deployment") and (
            ready is None or ready.get("status") == "True") and poolconfig.current(spec, status, generation):
        if changed:
            await admission.readmit_waiting(rt)
        return
    replicas = max(spec.replicas.min, min(spec.replicas.max, int(status.get("replicas") or spec.replicas.min)))
    await apply_deployment(rt, pool, replicas)
    name = deployment_name(pool.name)
    await write_pool_status(rt, pool.namespace, pool.name, TriagePoolStatus(
        observed_generation=generation, deployment=name, replicas=replicas,
        conditions=poolconfig.conditions(spec, status, generation, condition(
            READY, True, "WorkersDeployed", f"worker Deployment {name} applied", generation))))
    await admission.readmit_waiting(rt)


async def _not_ready(rt: Runtime, pool: PoolInfo, status: dict[str, Any], generation: int | None,
                     problem: str) -> None:
    """The pool cannot run workers: say why in its Ready condition, once (not again for each status echo).

    Its Deployment is not created (``apply_deployment``), and its jobs wait Pending saying the same
    (``admission``); both resume when the PriorityClass appears (``priority_class_changed``).
    """
    ready = _ready(status)
    spec = TriagePoolSpec.model_validate(pool.spec)
    if (ready is not None and ready.get("status") == "False" and ready.get("reason") == CLASS_NOT_FOUND
            and ready.get("message") == problem and status.get("observedGeneration") == generation
            and poolconfig.current(spec, status, generation)):
        return
    log.warning("TriagePool %s has no workers: %s", pool.key, problem)
    await write_pool_status(rt, pool.namespace, pool.name, TriagePoolStatus(
        observed_generation=generation, conditions=poolconfig.conditions(
            spec, status, generation, condition(READY, False, CLASS_NOT_FOUND, problem, generation))))


async def priority_class_changed(rt: Runtime, name: str) -> None:
    """A PriorityClass appeared or went away: the pools naming it get another look (Deployment, Ready)."""
    for pool in list(rt.pools.values()):
        if pool.spec.get("priorityClassName") != name:
            continue
        # a list of one, not a get: the chart's RBAC lets the operator list and watch pools, nothing more
        found = await rt.kube.get(triagepool_path(pool.namespace), fieldSelector=f"metadata.name={pool.name}")
        for body in found.get("items", []):
            await reconcile(rt, body)


async def run_pool(rt: Runtime, body: dict[str, Any], stopped: kopf.DaemonStopped) -> None:
    """The pool's loop while this replica is active: reap expired leases, scale, export the pool's queue."""
    pool = rt.observe_pool(body)
    s = rt.settings
    current = int((body.get("status") or {}).get("replicas") or 0)
    low_since: float | None = None
    last_status: tuple[int, int, int] | None = None
    loop = asyncio.get_running_loop()
    while not stopped:
        try:
            retried, failed = await rt.queue.reap(pool.key, int(s.retry_backoff_seconds * 1000),
                                                  int(s.retry_backoff_max_seconds * 1000))
            if retried or failed:
                metrics.LEASE_EXPIRIES.labels(pool.key).inc(retried + failed)
                metrics.RETRIES.labels(pool.key, "lease_expired").inc(retried)
            pool = rt.pools.get(pool.key, pool)
            spec = TriagePoolSpec.model_validate(pool.spec)
            depth = await rt.queue.depth(pool.key)
            running = depth.pop("running", 0)
            backlog = sum(depth.values())
            _export_queue(pool.key, depth, await rt.queue.oldest_queued_age(pool.key))
            desired = _desired(spec, backlog, running)
            if desired > current:
                low_since = None
                if await apply_deployment(rt, pool, desired):  # not while the pool cannot run workers
                    current = desired
            elif desired < current:
                low_since = low_since or loop.time()
                if loop.time() - low_since >= s.scale_down_delay_seconds:
                    if await apply_deployment(rt, pool, desired):
                        current = desired
                    low_since = None
            else:
                low_since = None
            snapshot = (current, backlog, running)
            if snapshot != last_status:
                last_status = snapshot
                with contextlib.suppress(ApiError):
                    await write_pool_status(rt, pool.namespace, pool.name, TriagePoolStatus(
                        replicas=current, backlog=backlog, running=running))
        except (OSError, ConnectionError, ApiError) as exc:
            log.warning("pool %s loop: %s", pool.key, exc)
        except Exception:
            log.exception("pool %s loop failed; continuing", pool.key)
        await stopped.wait(1.0)
