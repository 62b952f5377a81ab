"""TriagePools on the real API server: a pool whose PriorityClass does not exist says so and waits for it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetriage.infra.kube import ApiError, triagepool_path
from tests.pipeline import Pipeline, script_spec

pytestmark = pytest.mark.cluster


async def _deployment(p: Pipeline, name: str = "kubetriage-worker-default") -> dict[str, Any] | None:
    try:
        return await p.kube.get(f"/apis/apps/v1/namespaces/{p.ns}/deployments/{name}")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def _ready(pool: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in (pool.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None)


async def test_a_pool_whose_priority_class_is_missing_waits_for_it_with_no_deployment(pipeline: Pipeline) -> None:
    p = pipeline
    missing = f"workers-{p.ns}"
    await p.pool("default", concurrency=2, priorityClassName=missing, replicas={"min": 1, "max": 2})
    p.start_operator()
    await p.job("waits", script_spec("waits"))

    async def reported() -> dict[str, Any] | None:
        pool = await p.kube.get(triagepool_path(p.ns, "default"))
        # the pool's own loop has run too (it writes the backlog): it must not have scaled a Deployment up
        return pool if _ready(pool) and "backlog" in (pool.get("status") or {}) else None

    pool = await p.wait(reported, "the pool's Ready condition, and a round of its loop", timeout=60)
    ready = _ready(pool)
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "PriorityClassNotFound"), ready
    assert missing in ready["message"] and "create it" in ready["message"]
    assert "deployment" not in pool["status"]
    assert await _deployment(p) is None
    job = (await p.wait_phase(["waits"], {"Pending"}, timeout=30))["waits"]
    cond = job["status"]["conditions"][0]
    assert (cond["status"], cond["reason"]) == ("False", "PoolNotReady")
    assert missing in job["status"]["message"] and f"{p.ns}/default" in job["status"]["message"]

    p.cluster.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": missing}, "value": 7}))
    try:
        dep = await p.wait(lambda: _deployment(p), "the worker Deployment once the class exists", timeout=60)
        assert dep["spec"]["template"]["spec"]["priorityClassName"] == missing
        jobs = await p.wait_terminal(["waits"])
        assert jobs["waits"]["status"]["phase"] == "Succeeded"
        pool = await p.kube.get(triagepool_path(p.ns, "default"))
        ready = _ready(pool)
        assert ready is not None and ready["status"] == "True", ready
    finally:
        p.cluster.kubectl("delete", "priorityclass", missing, check=False)
