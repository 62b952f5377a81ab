"""A development stand-in for the kubelet: worker Deployments run as local processes.

There is no container runtime on the machines that run ``make demo`` and the
tests, but the operator's Deployments are real objects in a real API server.
This runner reads them and keeps ``spec.replicas`` local processes alive per
Deployment, each with the environment the pod would get (plain values,
``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``), restarting crashed ones
like ``restartPolicy: Always`` and stopping them with SIGTERM then SIGKILL
after the grace period, as the kubelet does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetriage.infra.kube import ApiError, Kube

log = logging.getLogger("devharness.localpods")

SELECTOR = "app.kubernetes.io/managed-by=kubetriage,app.kubernetes.io/component=worker"


@dataclass
class LocalPod:
    name: str
    deployment: str
    popen: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def _command(container: dict[str, Any]) -> list[str]:
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if argv and argv[0] == "kubetriage":
        argv = [sys.executable, "-m", "kubetriage", *argv[1:]]
    return argv


def _spawn(argv: list[str], env: dict[str, str], log_path: Path | None) -> subprocess.Popen[bytes]:
    out: Any = subprocess.DEVNULL
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
    try:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


def _terminate(popen: subprocess.Popen[bytes], grace: float) -> None:
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(5)


class LocalPods:
    """Reconciles worker Deployments into local processes, every ``interval`` seconds."""

    def __init__(self, kube: Kube, namespace: str | None = None, log_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, interval: float = 0.5) -> None:
        self.kube = kube
        self.namespace = namespace
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.interval = interval
        self.pods: dict[str, list[LocalPod]] = {}
        self.grace: dict[str, float] = {}

    async def _env(self, namespace: str, container: dict[str, Any], pod_name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETRIAGE_") or k == "KUBETRIAGE_HARNESS"}
        env.pop("KUBECONFIG", None)  # a worker pod has no API access; neither does its stand-in
        env["HOSTNAME"] = pod_name
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = str(item["value"])
                continue
            source = item.get("valueFrom") or {}
            value = await self._value_from(namespace, source, pod_name)
            if value is not None:
                env[name] = value
        env.update(self.extra_env)
        return env

    async def _value_from(self, namespace: str, source: dict[str, Any], pod_name: str) -> str | None:
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if secret else "configMapKeyRef"]
            kind = "secrets" if secret else "configmaps"
            try:
                obj = await self.kube.get(f"/api/v1/namespaces/{namespace}/{kind}/{ref['name']}")
            except ApiError as exc:
                if exc.status == 404 and ref.get("optional"):
                    return None
                raise
            raw = (obj.get("data") or {}).get(ref["key"])
            if raw is None:
                if ref.get("optional"):
                    return None
                raise KeyError(f"{kind}/{ref['name']} has no key {ref['key']}")
            return base64.b64decode(raw).decode() if secret else raw
        if "fieldRef" in source:
            path = source["fieldRef"].get("fieldPath")
            return {"metadata.name": pod_name, "metadata.namespace": namespace}.get(path, "")
        return None

    async def _start(self, namespace: str, dep: dict[str, Any]) -> LocalPod:
        name = dep["metadata"]["name"]
        pod_name = f"{name}-{secrets.token_hex(3)}"
        container = dep["spec"]["template"]["spec"]["containers"][0]
        env = await self._env(namespace, container, pod_name)
        popen = _spawn(_command(container), env, self.log_dir / f"{pod_name}.log" if self.log_dir else None)
        log.info("started pod %s (pid %d)", pod_name, popen.pid)
        return LocalPod(pod_name, name, popen)

    async def _stop(self, pod: LocalPod, grace: float) -> None:
        """SIGTERM, the grace period, then SIGKILL: what the kubelet does to a pod."""
        await asyncio.to_thread(_terminate, pod.popen, grace)

    async def reconcile(self) -> None:
        path = "/apis/apps/v1/deployments"
        if self.namespace:
            path = f"/apis/apps/v1/namespaces/{self.namespace}/deployments"
        deps = (await self.kube.get(path, labelSelector=SELECTOR)).get("items", [])
        seen = set()
        for dep in deps:
            ns, name = dep["metadata"]["namespace"], dep["metadata"]["name"]
            key = f"{ns}/{name}"
            seen.add(key)
            self.grace[key] = float(dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30))
            pods = self.pods.setdefault(key, [])
            for pod in list(pods):
                if not pod.alive():  # restartPolicy: Always
                    log.info("pod %s exited with %s; restarting", pod.name, pod.popen.returncode)
                    pods.remove(pod)
            want = int(dep["spec"].get("replicas", 1))
            while len(pods) < want:
                pods.append(await self._start(ns, dep))
            while len(pods) > want:
                await self._stop(pods.pop(), self.grace[key])
        for key in list(self.pods):
            if key not in seen:
                for pod in self.pods.pop(key):
                    await self._stop(pod, self.grace.get(key, 30))

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.reconcile()
                except Exception as exc:  # keep running through API hiccups, like the kubelet
                    log.warning("local pods: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            # also when cancelled: an interrupted `make demo` once left its workers running, orphaned
            await self.stop_all()

    async def stop_all(self) -> None:
        await asyncio.gather(*(self._stop(p, self.grace.get(k, 30)) for k, ps in self.pods.items() for p in ps))
        self.pods.clear()

    def all_pods(self) -> list[LocalPod]:
        return [p for ps in self.pods.values() for p in ps]


async def run_forever(namespace: str | None = None) -> None:
    kube = Kube()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await LocalPods(kube, namespace).run(stop)
    finally:
        await kube.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m devharness.localpods``: run the worker Deployments of the current kubeconfig's cluster locally."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devharness.localpods", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--namespace", help="only this namespace")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    asyncio.run(run_forever(namespace=args.namespace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
