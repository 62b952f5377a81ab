"""``make bench-scale``: operator memory with many TriageJobs present, and Redis memory per queued job.

Creates ``--jobs`` TriageJobs (100,000 by default) in a pool with no workers, so every job stays Queued
(the worst case: each one is tracked by the operator and held in Redis). Measures the operator's RSS
before any job exists and after all are queued, and again after a restart (a restart lists them all at
once), and Redis ``used_memory`` per queued job. Kept apart from ``make bench`` because creating 100k
objects takes minutes on 2 cores. Results: stdout and bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import redis

from bench.run import REPO, create_jobs, job_body, library_versions, proc_stats, say, wait_phase
from devharness import devenv, localrun
from kubetriage.api.models import API_VERSION
from kubetriage.infra.kube import Kube, triagepool_path


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"params": vars(args), "libraries": library_versions(), "cpus": os.cpu_count()}
    with devenv.temp_root("kubetriage-scale-") as root:
        cp = devenv.ControlPlane(root / "cp").start()
        rds = devenv.Redis(root / "redis").start()
        op = None
        kube = None
        try:
            cp.kubectl("apply", "-f", str(REPO / "crds"))
            cp.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            cp.kubectl("apply", "-f", str(REPO / "examples" / "00-priorityclasses.yaml"))
            ns = "scale"
            cp.kubectl("create", "namespace", ns)
            os.environ["KUBECONFIG"] = str(cp.kubeconfig)
            kube = Kube()
            env = localrun.operator_env(
                kubeconfig=cp.kubeconfig, redis_url=rds.url, database_url=f"sqlite:///{root / 'verdicts.db'}",
                namespaces=ns, standalone=True, worker_image="kubetriage:bench", dedup_window_seconds=0)
            op = localrun.start_operator(root, env)
            await kube.create(triagepool_path(ns), {"apiVersion": API_VERSION, "kind": "TriagePool",
                                                    "metadata": {"name": "default"},
                                                    "spec": {"replicas": {"min": 0, "max": 0}}})
            await asyncio.sleep(args.settle)
            rss_empty, _ = proc_stats(op.popen.pid)
            client = redis.Redis.from_url(rds.url)
            redis_empty = int(client.info("memory")["used_memory"])
            say(f"creating {args.jobs} TriageJobs (no workers: they stay Queued)")
            t0 = time.monotonic()
            for start in range(0, args.jobs, 10_000):
                chunk = [job_body(f"s{i:06d}", i, "kubetriage-p3", "scale")
                         for i in range(start, min(args.jobs, start + 10_000))]
                await create_jobs(kube, ns, chunk)
                say(f"  {start + len(chunk)} created")
            create_s = time.monotonic() - t0
            await wait_phase(kube, ns, "scale", args.jobs, {"Queued"}, timeout=3600, stall=120)
            await asyncio.sleep(args.settle)
            rss_full, _ = proc_stats(op.popen.pid)
            redis_full = int(client.info("memory")["used_memory"])
            op.stop()
            op = localrun.start_operator(root, env, "operator-restarted")
            await asyncio.sleep(args.settle * 2)
            rss_restart, _ = proc_stats(op.popen.pid)
            per_obj = (rss_full - rss_empty) * 1024 * 1024 / args.jobs
            results.update({
                "jobs": args.jobs, "create_seconds": round(create_s, 1),
                "create_rate_per_second": round(args.jobs / create_s, 1),
                "operator_rss_mib_empty": round(rss_empty, 1), "operator_rss_mib_all_queued": round(rss_full, 1),
                "operator_rss_mib_after_restart": round(rss_restart, 1),
                "operator_bytes_per_job": round(per_obj),
                "redis_bytes_per_queued_job": round((redis_full - redis_empty) / args.jobs),
            })
        finally:
            if kube:
                await kube.close()
            if op:
                op.stop()
            rds.stop()
            cp.stop()
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--settle", type=float, default=15, help="seconds before reading RSS")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2))
    target = 300
    print(f"| figure | value | target |\n| --- | --- | --- |\n"
          f"| operator RSS with {results['jobs']} TriageJobs queued | {results['operator_rss_mib_all_queued']} MiB "
          f"| < {target} MiB |\n"
          f"| operator RSS after a restart with them present | {results['operator_rss_mib_after_restart']} MiB "
          f"| < {target} MiB |\n"
          f"| operator memory per job | {results['operator_bytes_per_job']} bytes | |\n"
          f"| Redis memory per queued job | {results['redis_bytes_per_queued_job']} bytes | |\n"
          f"| create rate (client, 48 in flight) | {results['create_rate_per_second']} /s | |", file=sys.stdout)


if __name__ == "__main__":
    cli()
