"""``make demo``: the whole pipeline on this machine, on the embedded defaults.

Starts a real kube-apiserver + etcd, Redis, a SQLite database with the team's
``alerts`` / ``script_results`` tables, the operator, and one local worker
process per pool Deployment; applies ``examples/``; waits for the verdicts;
prints ``kubectl get tj`` and the database rows. No API key is needed: the
offline analyzers decide. With ``KUBETRIAGE_LLM_API_KEY`` and
``KUBETRIAGE_LLM_MODEL`` (and ``KUBETRIAGE_LLM_BASE_URL`` for a non-OpenRouter
endpoint) in the environment, the pools use that model too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from devharness import devenv, localrun
from devharness.localpods import LocalPods
from kubetriage.infra.kube import Kube

REPO = devenv.REPO_ROOT
EXAMPLES = REPO / "examples"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _seed_user_tables(db: Path) -> None:
    """The team's own tables, as the original system had them, with the rows the examples refer to."""
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY, name TEXT, host TEXT, created_at TEXT);
        CREATE TABLE IF NOT EXISTS script_results (id INTEGER PRIMARY KEY, script_name TEXT, success BOOLEAN,
            error_msg TEXT, html_report_r2_url TEXT, created_at TEXT);
    """)
    for doc in _example_docs():
        if doc.get("kind") != "TriageJob":
            continue
        spec = doc["spec"]
        row_id = spec["source"].get("id")
        if not row_id:
            continue
        if spec["source"]["type"] == "alert":
            conn.execute("INSERT OR IGNORE INTO alerts (id, name, host) VALUES (?, ?, ?)",
                         (int(row_id), spec["alert"]["name"], spec["alert"].get("host")))
        else:
            sr = spec["scriptResult"]
            conn.execute("INSERT OR IGNORE INTO script_results (id, script_name, success, error_msg, "
                         "html_report_r2_url) VALUES (?, ?, ?, ?, ?)",
                         (int(row_id), sr["scriptName"], sr["success"], sr.get("errorMessage"), sr.get("reportURL")))
    conn.commit()
    conn.close()


def _example_docs() -> list[dict[str, Any]]:
    return [d for f in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _llm_settings(cp: devenv.ControlPlane, ns: str) -> dict[str, Any] | None:
    key = os.environ.get("KUBETRIAGE_LLM_API_KEY", "")
    model = os.environ.get("KUBETRIAGE_LLM_MODEL", "")
    if not key or not model:
        return None
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubetriage-llm", "namespace": ns},
              "data": {"api-key": base64.b64encode(key.encode()).decode()}}
    cp.kubectl("apply", "-f", "-", input=json.dumps(secret))
    analyzer: dict[str, Any] = {"model": model, "apiKeySecretRef": {"name": "kubetriage-llm", "key": "api-key"}}
    if os.environ.get("KUBETRIAGE_LLM_BASE_URL"):
        analyzer["baseURL"] = os.environ["KUBETRIAGE_LLM_BASE_URL"]
    if os.environ.get("KUBETRIAGE_LLM_VISION_MODEL"):
        analyzer["visionModel"] = os.environ["KUBETRIAGE_LLM_VISION_MODEL"]
    return analyzer


def _print_rows(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    for table, cols in (("alerts", "id, name"), ("script_results", "id, script_name")):
        print(f"\n-- {table} (the five verdict columns were added by kubetriage)")
        for r in conn.execute(f"SELECT {cols}, checked, check_type, discard, discard_type, "
                              f"substr(discard_comment, 1, 70) AS comment FROM {table} ORDER BY id"):
            print("  " + " | ".join(str(v) for v in dict(r).values()))
    print("\n-- triage_verdicts (audit: one row per verdict)")
    for r in conn.execute("SELECT job_name, classification, confidence, analyzer, check_type FROM triage_verdicts "
                          "ORDER BY job_name"):
        print("  " + " | ".join(str(v) for v in dict(r).values()))
    conn.close()


async def run(keep: bool, root: Path) -> int:
    ns = "default"
    say(f"working folder {root}")
    say("control plane: kube-apiserver + etcd (built once with Go if not cached; this can take minutes)")
    cp = devenv.ControlPlane(root / "control-plane").start()
    redis = None
    operator = None
    pods_stop = asyncio.Event()
    pods_task = None
    kube = None
    try:
        say("redis-server on a free loopback port")
        redis = devenv.Redis(root / "redis").start()
        db = root / "verdicts.db"
        say(f"SQLite database {db} with the team's alerts and script_results tables")
        _seed_user_tables(db)
        say("CRDs and PriorityClasses")
        cp.kubectl("apply", "-f", str(REPO / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        analyzer = _llm_settings(cp, ns)
        say("LLM: " + (f"model {analyzer['model']}" if analyzer else "no API key, offline analyzers only"))
        env = localrun.operator_env(kubeconfig=cp.kubeconfig, redis_url=redis.url, database_url=f"sqlite:///{db}",
                                    standalone=True, worker_image="kubetriage:demo")
        say("operator: kubetriage run")
        operator = localrun.start_operator(root, env)
        kube = Kube()
        say("worker pods: each pool's Deployment runs as local processes")
        pods = LocalPods(kube, log_dir=root / "pods", extra_env={"KUBETRIAGE_METRICS_PORT": "0"})
        pods_task = asyncio.create_task(pods.run(pods_stop))
        say("applying examples/")
        cp.kubectl("apply", "-f", str(EXAMPLES))
        if analyzer:
            for pool in ("default", "backfill"):
                patch = json.dumps({"spec": {"analyzer": analyzer}})
                cp.kubectl("patch", "tpool", pool, "--type=merge", "-p", patch)
        names = [d["metadata"]["name"] for d in _example_docs() if d["kind"] == "TriageJob"]
        say(f"waiting for {len(names)} verdicts")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            items = json.loads(cp.kubectl("get", "tj", "-o", "json").stdout)["items"]
            phases = [(i.get("status") or {}).get("phase") for i in items]
            done = [p for p in phases if p in ("Succeeded", "Failed", "Duplicate")]
            if len(done) >= len(names):
                break
            if not operator.alive():
                print(operator.tail(), file=sys.stderr)
                raise SystemExit("the operator exited; its log is above")
            await asyncio.sleep(0.5)
        else:
            print(operator.tail(), file=sys.stderr)
            raise SystemExit("verdicts did not arrive within 180 s; the operator log is above")
        print()
        print(cp.kubectl("get", "tj", "-o", "wide").stdout)
        print(cp.kubectl("get", "tpool").stdout)
        _print_rows(db)
        print()
        kubectl = f"{cp.kubectl_bin} --kubeconfig {cp.kubeconfig}"
        if keep:
            say("the demo keeps running. Try:")
            print(f"    {kubectl} get tj")
            print(f"    {kubectl} describe tj alert-api-down")
            print(f"    {kubectl} apply -f examples/21-alert-api-down.yaml   # edit the name first")
            print(f"    sqlite3 {db} 'select * from triage_verdicts'")
            say("press Ctrl-C to stop: every process the demo started is stopped, the folder removed")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return 0
    finally:
        say("stopping: workers, operator, redis, control plane")
        pods_stop.set()
        if pods_task:
            await pods_task
        if kube:
            await kube.close()
        if operator:
            operator.stop()
        if redis:
            redis.stop()
        cp.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devharness.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--exit", action="store_true", help="stop after printing the verdicts (no Ctrl-C wait)")
    args = parser.parse_args(argv)
    keep = not args.exit and sys.stdin.isatty()
    with devenv.temp_root("kubetriage-demo-") as root:
        return asyncio.run(run(keep, root))


if __name__ == "__main__":
    raise SystemExit(main())
