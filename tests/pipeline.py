"""A whole kubetriage installation for one test: its namespace, Redis prefix, database, operator and pods.

Everything is real: the operator is ``kubetriage run`` in its own process, the
workers are the processes ``LocalPods`` starts from the operator's own
Deployments, Redis and the API server are the session's servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from devharness import devenv, localrun
from devharness.localpods import LocalPods
from kubetriage.api.models import API_VERSION
from kubetriage.infra.kube import ApiError, Kube, triagejob_path, triagepool_path, triagerule_path
from tests.waiting import eventually

TERMINAL = {"Succeeded", "Failed"}


def alert_spec(name: str = "HighLatency", **alert: Any) -> dict[str, Any]:
    source = alert.pop("source", {})
    extra = alert.pop("spec", {})
    return {"source": {"type": "alert", **source}, "alert": {"name": name, **alert}, **extra}


def script_spec(script: str = "checkout-e2e", error: str = "AssertionError: total was 0", **sr: Any) -> dict[str, Any]:
    source = sr.pop("source", {})
    extra = sr.pop("spec", {})
    return {"source": {"type": "scriptResult", **source},
            "scriptResult": {"scriptName": script, "success": False, "errorMessage": error, **sr}, **extra}


class Pipeline:
    def __init__(self, cluster: devenv.ControlPlane, redis: devenv.Redis, root: Path, database_url: str) -> None:
        self.cluster = cluster
        self.redis = redis
        self.root = root
        self.ns = f"p-{uuid.uuid4().hex[:8]}"
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.database_url = database_url
        self.kube = Kube()
        self.operators: list[devenv.Proc] = []
        self.pods = LocalPods(self.kube, namespace=self.ns, log_dir=root / "pods",
                              extra_env={"KUBETRIAGE_METRICS_PORT": "0"}, interval=0.3)
        self._pods_stop = asyncio.Event()
        self._pods_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Pipeline:
        self.cluster.kubectl("create", "namespace", self.ns)
        self._pods_task = asyncio.create_task(self.pods.run(self._pods_stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._pods_stop.set()
        if self._pods_task:
            await self._pods_task
        for op in self.operators:
            op.stop()
        self.cluster.kubectl("delete", "namespace", self.ns, "--wait=false", check=False)
        await self.kube.close()

    # ------------------------------------------------------------ processes

    def operator_env(self, **settings: Any) -> dict[str, str]:
        defaults: dict[str, Any] = {
            "standalone": True, "lease_seconds": 3, "retry_backoff_seconds": 0.2, "scale_down_delay_seconds": 2,
            "worker_image": "kubetriage:test",
        }
        namespaces = settings.pop("namespaces", self.ns)  # a test may watch more namespaces than its own
        return localrun.operator_env(
            kubeconfig=self.cluster.kubeconfig, redis_url=self.redis.url, database_url=self.database_url,
            namespaces=namespaces, prefix=self.prefix, **{**defaults, **settings})

    def start_operator(self, name: str = "operator", *args: str, **settings: Any) -> devenv.Proc:
        proc = localrun.start_operator(self.root, self.operator_env(**settings), f"{name}-{self.ns}", *args)
        self.operators.append(proc)
        return proc

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.pods.all_pods() if p.alive()]

    def worker_log(self) -> str:
        """What every worker pod of this test wrote (stdout and stderr), pod by pod."""
        logs = sorted(self.root.glob("pods/*.log"), key=lambda f: f.stat().st_mtime)
        return "".join(f.read_text(errors="replace") for f in logs)

    def kill_worker(self) -> int:
        pid = self.worker_pids()[0]
        os.killpg(pid, signal.SIGKILL)
        return pid

    # ------------------------------------------------------------ objects

    async def pool(self, name: str = "default", **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": API_VERSION, "kind": "TriagePool", "metadata": {"name": name}, "spec": spec}
        return await self.kube.create(triagepool_path(self.ns), body)

    async def patch_pool(self, name: str, spec: dict[str, Any]) -> None:
        await self.kube.merge_patch(triagepool_path(self.ns, name), {"spec": spec})

    async def job(self, name: str, spec: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        body = {"apiVersion": API_VERSION, "kind": "TriageJob", "metadata": {"name": name}, "spec": spec}
        return await self.kube.create(triagejob_path(namespace or self.ns), body)

    async def rule(self, name: str, spec: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        body = {"apiVersion": API_VERSION, "kind": "TriageRule", "metadata": {"name": name}, "spec": spec}
        return await self.kube.create(triagerule_path(namespace or self.ns), body)

    async def wait_rule(self, name: str, accepted: bool = True, namespace: str | None = None) -> dict[str, Any]:
        """The rule once the operator has judged its current generation (what ``kubectl wait
        --for=condition=Accepted`` waits for); fails if it was judged the other way."""
        path = triagerule_path(namespace or self.ns, name)

        async def judged() -> dict[str, Any] | None:
            rule = await self.kube.get(path)
            st = rule.get("status") or {}
            return rule if st.get("observedGeneration") == rule["metadata"]["generation"] else None

        rule = await self.wait(judged, f"TriageRule {name} judged by the operator", timeout=60)
        [cond] = [c for c in rule["status"]["conditions"] if c["type"] == "Accepted"]
        assert cond["status"] == ("True" if accepted else "False"), cond
        return rule

    async def queued_payload(self, uid: str) -> dict[str, Any]:
        """The request a worker will get for a queued job, as admission put it in Redis."""
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.redis.url)
        try:
            raw = await client.hget(f"{self.prefix}:job:{uid}", "payload")
        finally:
            await client.aclose()
        assert raw, f"job {uid} is not queued in Redis"
        return json.loads(raw)

    async def get(self, name: str) -> dict[str, Any]:
        return await self.kube.get(triagejob_path(self.ns, name))

    async def jobs(self) -> list[dict[str, Any]]:
        return (await self.kube.get(triagejob_path(self.ns)))["items"]

    async def delete(self, name: str) -> None:
        await self.kube.delete(triagejob_path(self.ns, name))

    async def wait(self, predicate: Any, what: str, timeout: float = 90, interval: float = 0.25) -> Any:
        """``eventually``, with the operators' logs in the failure message."""
        return await eventually(predicate, what, timeout=timeout, interval=interval,
                                context=lambda: "operator log:\n" + "\n".join(op.tail(40) for op in self.operators))

    async def wait_phase(self, names: list[str], phases: set[str], timeout: float = 90) -> dict[str, dict[str, Any]]:
        async def check() -> dict[str, dict[str, Any]] | None:
            items = {j["metadata"]["name"]: j for j in await self.jobs()}
            if all((items.get(n, {}).get("status") or {}).get("phase") in phases for n in names):
                return items
            return None

        return await self.wait(check, f"{names} in {phases}", timeout)

    async def wait_terminal(self, names: list[str], timeout: float = 90) -> dict[str, dict[str, Any]]:
        async def check() -> dict[str, dict[str, Any]] | None:
            items = {j["metadata"]["name"]: j for j in await self.jobs()}
            for n in names:
                st = (items.get(n) or {}).get("status") or {}
                if st.get("phase") in TERMINAL:
                    continue
                if st.get("phase") == "Duplicate" and (st.get("verdict") or "failed" in (st.get("message") or "")):
                    continue
                return None
            return items

        return await self.wait(check, f"{names} terminal", timeout)

    async def events_for(self, name: str) -> list[dict[str, Any]]:
        try:
            items = (await self.kube.get(f"/api/v1/namespaces/{self.ns}/events"))["items"]
        except ApiError:
            return []
        return [e for e in items if e["involvedObject"]["name"] == name]

    # ------------------------------------------------------------ database (SQLite file)

    def audit_rows(self) -> list[dict[str, Any]]:
        assert self.database_url.startswith("sqlite:///")
        conn = sqlite3.connect(self.database_url.removeprefix("sqlite:///"))
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute("SELECT * FROM triage_verdicts WHERE namespace = ?", (self.ns,)).fetchall()
            return [dict(r) for r in rows]
        finally:
            conn.close()


def audit_events(log: Path) -> list[dict[str, Any]]:
    """The API server's audit log, without a last line it may be writing right now."""
    events = []
    for line in log.read_text().splitlines() if log.exists() else []:
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def audited(log: Path, namespace: str, resource: str, name: str) -> bool:
    """Whether the API server's audit log holds the completed write of that object."""
    for ev in audit_events(log):
        ref = ev.get("objectRef") or {}
        if ev.get("stage") == "ResponseComplete" and (
                ref.get("namespace"), ref.get("resource"), ref.get("name")) == (namespace, resource, name):
            return True
    return False


async def flush_audit_log(p: Pipeline) -> Path:
    """The audit log once every write made so far is in it.

    The API server writes it in batches, in order: once a write made after all the others is in the
    file, theirs are too.
    """
    log = p.cluster.root / "logs" / "audit.log"
    marker = f"audit-marker-{uuid.uuid4().hex[:6]}"
    p.cluster.kubectl("create", "configmap", marker, "-n", p.ns)
    await p.wait(lambda: audited(log, p.ns, "configmaps", marker), "the marker in the audit log")
    return log


def started(job: dict[str, Any]) -> str:
    return (job.get("status") or {}).get("startedAt", "")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)[:4000]
