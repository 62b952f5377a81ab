"""``make bench``: throughput, queue wait, API writes and memory of the real pipeline.

Everything runs here for real (kube-apiserver + etcd, Redis, SQLite, the
operator and worker processes); the LLM is the local fake at a fixed latency
L, so the ideal throughput with C worker slots is C / L and efficiency is
measured against it. The baseline (bench/baseline.py, the original design)
runs in the same session on the same machine, so ratios compare like with like.

Results: a table on stdout and bench/results/bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.baseline import run_baseline
from devharness import devenv, localrun
from devharness.localpods import LocalPods
from kubetriage.api.models import API_VERSION
from kubetriage.api.timeutil import parse_time
from kubetriage.infra.kube import Kube, triagejob_path, triagepool_path

REPO = devenv.REPO_ROOT
sys.path.insert(0, str(REPO))
from tests.fakellm import FakeLLM, verdict_content  # noqa: E402 - the fake LLM lives with the tests

CLASSES = ["kubetriage-p1", "kubetriage-p2", "kubetriage-p3"]


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def job_body(name: str, i: int, priority: str, label: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION, "kind": "TriageJob",
        "metadata": {"name": name, "labels": {"bench": label}},
        "spec": {
            "source": {"type": "scriptResult", "id": str(i), "fingerprint": f"bench-{label}-{i}"},
            "priorityClassName": priority,
            "scriptResult": {"scriptName": f"suite-{i % 50}", "success": False,
                             "errorMessage": f"AssertionError: expected 200, got 500 (run {i})"},
            "analysis": {"analyzer": "llm", "maxAttempts": 3},
        },
    }


async def create_jobs(kube: Kube, ns: str, bodies: list[dict[str, Any]], parallel: int = 48) -> float:
    sem = asyncio.Semaphore(parallel)

    async def one(body: dict[str, Any]) -> None:
        async with sem:
            await kube.create(triagejob_path(ns), body)

    t0 = time.monotonic()
    await asyncio.gather(*(one(b) for b in bodies))
    return time.monotonic() - t0


async def list_jobs(kube: Kube, ns: str, label: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cont = None
    while True:
        page = await kube.get(triagejob_path(ns), labelSelector=f"bench={label}", limit=1000,
                              **({"continue": cont} if cont else {}))
        items += page["items"]
        cont = page["metadata"].get("continue")
        if not cont:
            return items


async def wait_phase(kube: Kube, ns: str, label: str, n: int, phases: set[str], timeout: float,
                     stall: float = 60) -> list[dict[str, Any]]:
    """Wait until ``n`` jobs are in ``phases``; fail fast, naming the stuck jobs, when nothing moves for ``stall`` s."""
    deadline = time.monotonic() + timeout
    best, moved = -1, time.monotonic()
    while True:
        items = await list_jobs(kube, ns, label)
        done = [j for j in items if (j.get("status") or {}).get("phase") in phases]
        if len(done) >= n:
            return items
        now = time.monotonic()
        if len(done) > best:
            best, moved = len(done), now
        if now > deadline or now - moved > stall:
            stuck = [j for j in items if (j.get("status") or {}).get("phase") not in phases][:10]
            named = "; ".join(f"{j['metadata']['name']} phase={(j.get('status') or {}).get('phase') or 'none'} "
                              f"{((j.get('status') or {}).get('message') or '')[:80]}".strip() for j in stuck)
            why = "no progress for %.0f s" % (now - moved) if now <= deadline else "timeout"
            raise SystemExit(f"{why}: {len(done)}/{n} jobs labelled {label} reached {sorted(phases)}; "
                             f"{len(items)} exist; stuck (first 10): {named or 'none created'}")
        await asyncio.sleep(0.5)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kubetriage", "kopf", "aiohttp", "redis", "pydantic", "httpx", "psycopg", "prometheus-client"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of a process from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def api_writes(audit_log: Path, ns: str, names: set[str]) -> tuple[float, float, Counter[str]]:
    """Status writes per job after creation, and Events per job, from the API server's audit log."""
    per_job: Counter[str] = Counter()
    events = 0
    verbs: Counter[str] = Counter()
    for line in audit_log.read_text().splitlines():
        ev = json.loads(line)
        ref = ev.get("objectRef") or {}
        if ref.get("namespace") != ns or ev.get("stage") != "ResponseComplete":
            continue
        if ref.get("resource") == "triagejobs" and ev["verb"] != "create" and ref.get("name") in names:
            per_job[ref["name"]] += 1
            verbs[f"{ev['verb']} {ref.get('subresource', '')}".strip()] += 1
        elif ref.get("resource") == "events" and ev["verb"] == "create":
            events += 1
    return sum(per_job.values()) / max(1, len(names)), events / max(1, len(names)), verbs


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "libraries": library_versions(),
        "params": vars(args),
    }
    latency = args.latency_ms / 1000
    with devenv.temp_root("kubetriage-bench-") as root:
        cp = devenv.ControlPlane(root / "cp").start()
        redis = devenv.Redis(root / "redis").start()
        llm = FakeLLM(default=verdict_content("valid", "bench verdict", 0.9), latency=latency).start()
        kube = None
        pods_stop = asyncio.Event()
        pods_task = None
        op = None
        try:
            cp.kubectl("apply", "-f", str(REPO / "crds"))
            cp.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            cp.kubectl("apply", "-f", str(REPO / "examples" / "00-priorityclasses.yaml"))
            ns = "bench"
            cp.kubectl("create", "namespace", ns)
            os.environ["KUBECONFIG"] = str(cp.kubeconfig)
            kube = Kube()
            env = localrun.operator_env(
                kubeconfig=cp.kubeconfig, redis_url=redis.url, database_url=f"sqlite:///{root / 'verdicts.db'}",
                namespaces=ns, standalone=True, worker_image="kubetriage:bench", dedup_window_seconds=0,
                scale_down_delay_seconds=3600)
            op = localrun.start_operator(root, env)
            pods = LocalPods(kube, namespace=ns, log_dir=root / "pods", extra_env={"KUBETRIAGE_METRICS_PORT": "0"})
            pods_task = asyncio.create_task(pods.run(pods_stop))
            replicas = args.replicas
            per_pod = args.concurrency // replicas
            slots = per_pod * replicas
            pool = {"apiVersion": API_VERSION, "kind": "TriagePool", "metadata": {"name": "default"},
                    "spec": {"concurrency": per_pod, "replicas": {"min": 0, "max": 0},
                             "analyzer": {"baseURL": llm.url, "allowHTTP": True, "allowPrivateEndpoints": True,
                                          "model": "fake/triage-text", "timeoutSeconds": 30}}}
            await kube.create(triagepool_path(ns), pool)

            # -------------------------------------------------- 1. throughput
            n = args.jobs
            say(f"throughput: creating {n} mixed-priority jobs (pool idle), C={slots}, L={args.latency_ms} ms")
            bodies = [job_body(f"t{i:05d}", i, CLASSES[i % 3], "tp") for i in range(n)]
            create_s = await create_jobs(kube, ns, bodies)
            await wait_phase(kube, ns, "tp", n, {"Queued"}, timeout=600)
            _rss0, cpu0 = proc_stats(op.popen.pid)
            say(f"all {n} queued; starting {replicas} worker pods x {per_pod} slots")
            t_scale = time.time()
            others = {p.name: p.popen.pid for p in cp.procs}
            others["bench+fake-llm"] = os.getpid()
            cpu_before = {k: proc_stats(pid)[1] for k, pid in others.items()}
            await kube.merge_patch(triagepool_path(ns, "default"), {"spec": {"replicas": {"min": replicas,
                                                                                          "max": replicas}}})
            items = await wait_phase(kube, ns, "tp", n, {"Succeeded", "Failed"}, timeout=900)
            rss1, cpu1 = proc_stats(op.popen.pid)
            cpu_split = {k: round(proc_stats(pid)[1] - cpu_before[k], 2) for k, pid in others.items()}
            cpu_split["operator"] = round(cpu1 - cpu0, 2)
            cpu_split["workers"] = round(sum(proc_stats(p.pid)[1] for p in pods.all_pods() if p.alive()), 2)
            apiserver = sum(v for k, v in cpu_split.items() if "apiserver" in k)
            starts = [parse_time(j["status"]["startedAt"]) for j in items]
            ends = [parse_time(j["status"]["completedAt"]) for j in items]
            failed = sum(j["status"]["phase"] == "Failed" for j in items)
            per_job_s = [(e - s).total_seconds() for s, e in zip(starts, ends, strict=True)]
            start_span = (max(starts) - min(starts)).total_seconds()
            first, last = min(starts), max(ends)
            drain = (last - first).total_seconds()
            throughput = n / drain
            ideal = slots / latency
            results["throughput"] = {
                "jobs": n, "slots": slots, "latency_ms": args.latency_ms, "failed": failed,
                "create_seconds": round(create_s, 2), "drain_seconds": round(drain, 2),
                "worker_start_seconds": round(first.timestamp() - t_scale, 2),
                "jobs_per_second": round(throughput, 1), "ideal_jobs_per_second": round(ideal, 1),
                "efficiency": round(throughput / ideal, 3),
                "claim_rate_jobs_per_second": round(n / start_span, 1) if start_span else None,
                "claim_to_recorded_seconds_p50": round(pct(per_job_s, 50), 3),
                "claim_to_recorded_seconds_p90": round(pct(per_job_s, 90), 3),
                "operator_cpu_seconds_per_1000_jobs": round((cpu1 - cpu0) / n * 1000, 2),
                # Machine-independent: what kubetriage itself spends per job, the API server apart.
                "kubetriage_cpu_ms_per_job": None,
                "apiserver_cpu_ms_per_job": None,
                "operator_rss_mib_after": round(rss1, 1),
                "cpu_seconds_during_run": cpu_split,
            }
            results["throughput"]["kubetriage_cpu_ms_per_job"] = round(
                (cpu_split["operator"] + cpu_split["workers"]) / n * 1000, 2)
            results["throughput"]["apiserver_cpu_ms_per_job"] = round(apiserver / n * 1000, 2)
            await asyncio.sleep(2.5)  # audit log batches
            per_job, events, verbs = api_writes(cp.root / "logs" / "audit.log", ns, {b["metadata"]["name"]
                                                                                     for b in bodies})
            results["api_writes"] = {"status_writes_per_job": round(per_job, 3), "events_per_job": round(events, 3),
                                     "total_per_job": round(per_job + events, 3), "by_verb": dict(verbs)}
            say(f"throughput {throughput:.1f} jobs/s (ideal {ideal:.0f}), writes/job {per_job + events:.2f}")

            # -------------------------------------------------- 2. p1 time to verdict during a p3 storm
            say(f"priority: {args.backlog} p3 jobs queued and draining, then {args.p1_jobs} p1 jobs arriving")
            await kube.merge_patch(triagepool_path(ns, "default"), {"spec": {"replicas": {"min": 0, "max": 0}}})
            await asyncio.sleep(2)
            backlog = [job_body(f"b{i:05d}", 100000 + i, "kubetriage-p3", "bl") for i in range(args.backlog)]
            await create_jobs(kube, ns, backlog)
            await wait_phase(kube, ns, "bl", args.backlog, {"Queued"}, timeout=600)
            await kube.merge_patch(triagepool_path(ns, "default"), {"spec": {"replicas": {"min": replicas,
                                                                                          "max": replicas}}})
            # The storm must be both queued and being recorded when the p1 jobs arrive.
            await wait_phase(kube, ns, "bl", max(1, args.backlog // 20), {"Succeeded", "Failed"}, timeout=120)
            created: dict[str, float] = {}
            for i in range(args.p1_jobs):
                name = f"h{i:04d}"
                await kube.create(triagejob_path(ns), job_body(name, 200000 + i, "kubetriage-p1", "p1"))
                created[name] = time.time()
                await asyncio.sleep(args.p1_gap_ms / 1000)
            p1 = await wait_phase(kube, ns, "p1", args.p1_jobs, {"Succeeded"}, timeout=300)
            await wait_phase(kube, ns, "bl", args.backlog, {"Succeeded", "Failed"}, timeout=600)
            bl_items = await list_jobs(kube, ns, "bl")
            bl_times = [(parse_time(j["status"]["queuedAt"]), parse_time(j["status"]["startedAt"])) for j in bl_items]

            def p3_queued_at(t: Any) -> int:
                return sum(1 for q, s in bl_times if q <= t < s)

            behind = [p3_queued_at(parse_time(j["status"]["startedAt"])) for j in p1]
            to_verdict = [(parse_time(j["status"]["completedAt"]).timestamp() - created[j["metadata"]["name"]])
                          * 1000 for j in p1]
            waits = [(parse_time(j["status"]["startedAt"]) - parse_time(j["status"]["queuedAt"])).total_seconds()
                     * 1000 for j in p1]
            admit = [(parse_time(j["status"]["queuedAt"]).timestamp() - created[j["metadata"]["name"]]) * 1000
                     for j in p1]
            results["p1_wait_ms"] = {
                "p50": round(pct(waits, 50), 1), "p99": round(pct(waits, 99), 1), "max": round(max(waits), 1),
                "jobs": len(waits),
                "time_to_verdict_ms_p50": round(pct(to_verdict, 50), 1),
                "time_to_verdict_ms_p99": round(pct(to_verdict, 99), 1),
                "time_to_verdict_target_ms": round(args.latency_ms + 500, 1),
                "p3_queued_when_p1_started_min": min(behind), "p3_queued_when_p1_started_p50": pct(behind, 50),
                "p3_queued_when_each_p1_started": behind,
                "admission_ms_p50": round(pct(admit, 50), 1), "admission_ms_p99": round(pct(admit, 99), 1),
            }
            say(f"p1 time to verdict p50 {pct(to_verdict, 50):.0f} ms p99 {pct(to_verdict, 99):.0f} ms; queue wait "
                f"p99 {pct(waits, 99):.1f} ms; p3 jobs queued when each p1 started: min {min(behind)}, "
                f"median {pct(behind, 50):.0f}")

            # -------------------------------------------------- 3. baseline, same machine, same run
            say(f"baseline: {args.baseline_jobs} jobs, one at a time, 1 s sleep when idle")
            await kube.merge_patch(triagepool_path(ns, "default"), {"spec": {"replicas": {"min": 0, "max": 0}}})
            base_ns = "bench-baseline"
            cp.kubectl("create", "namespace", base_ns)
            await create_jobs(kube, base_ns, [job_body(f"x{i:04d}", 300000 + i, "kubetriage-p2", "base")
                                              for i in range(args.baseline_jobs)])
            base_rate = await run_baseline(kube, base_ns, llm.url, args.baseline_jobs, "base")
            results["baseline"] = {"jobs": args.baseline_jobs, "jobs_per_second": round(base_rate, 2),
                                   "speedup": round(throughput / base_rate, 1)}
            say(f"baseline {base_rate:.2f} jobs/s -> kubetriage is {throughput / base_rate:.1f}x")

            # -------------------------------------------------- 4. memory with many TriageJobs present
            target = args.many
            present = len(await list_jobs(kube, ns, "tp")) + len(await list_jobs(kube, ns, "bl")) + args.p1_jobs
            extra = max(0, target - present)
            say(f"memory: adding {extra} jobs so {target} TriageJobs are present, then restarting the operator")
            await create_jobs(kube, ns, [job_body(f"m{i:05d}", 400000 + i, "kubetriage-p3", "many")
                                         for i in range(extra)])
            await wait_phase(kube, ns, "many", extra, {"Queued"}, timeout=900)
            op.stop()
            op = localrun.start_operator(root, env, "operator-restarted")
            await asyncio.sleep(args.settle)
            rss, _ = proc_stats(op.popen.pid)
            results["memory"] = {"triagejobs_present": present + extra, "queued": extra,
                                 "operator_rss_mib_after_restart": round(rss, 1)}
            say(f"operator RSS {rss:.0f} MiB with {present + extra} TriageJobs present")
        finally:
            pods_stop.set()
            if pods_task:
                await pods_task
            if kube:
                await kube.close()
            if op:
                op.stop()
            llm.stop()
            redis.stop()
            cp.stop()
    return results


TARGETS = [
    ("efficiency at C=64, L=200 ms", lambda r: r["throughput"]["efficiency"], ">=", 0.9),
    ("speedup over the baseline", lambda r: r["baseline"]["speedup"], ">=", 50),
    ("p1 created -> verdict p99 during a p3 storm (ms)", lambda r: r["p1_wait_ms"]["time_to_verdict_ms_p99"], "<=",
     lambda r: r["p1_wait_ms"]["time_to_verdict_target_ms"]),
    ("p1 queue wait p99 (ms)", lambda r: r["p1_wait_ms"]["p99"], "<", 50),
    ("claim -> recorded p90 (s)", lambda r: r["throughput"]["claim_to_recorded_seconds_p90"], "<=", 1),
    ("operator CPU per job (ms)", lambda r: r["throughput"]["operator_cpu_seconds_per_1000_jobs"], "<=", 1),
    ("API writes per job after creation", lambda r: r["api_writes"]["total_per_job"], "<=", 2),
    ("operator RSS at 10k jobs (MiB)", lambda r: r["memory"]["operator_rss_mib_after_restart"], "<", 150),
]


def report(results: dict[str, Any]) -> str:
    lines = ["| figure | value | target | met |", "| --- | --- | --- | --- |"]
    for name, get, op, target in TARGETS:
        value = get(results)
        bound = target(results) if callable(target) else target
        met = {"<": value < bound, "<=": value <= bound, ">=": value >= bound}[op]
        lines.append(f"| {name} | {value} | {op} {bound} | {'yes' if met else 'no'} |")
    t = results["throughput"]
    lines += [
        "",
        f"throughput: {t['jobs_per_second']} jobs/s (ideal C/L = {t['ideal_jobs_per_second']}), "
        f"{t['jobs']} jobs drained in {t['drain_seconds']} s, {t['failed']} failed; creating them took "
        f"{t['create_seconds']} s",
        f"baseline: {results['baseline']['jobs_per_second']} jobs/s",
        f"p1 wait: p50 {results['p1_wait_ms']['p50']} ms, p99 {results['p1_wait_ms']['p99']} ms, "
        f"max {results['p1_wait_ms']['max']} ms",
        f"operator CPU: {t['operator_cpu_seconds_per_1000_jobs']} s per 1000 jobs; "
        f"RSS {t['operator_rss_mib_after']} MiB after the throughput run",
        f"CPU per job: kubetriage (operator + workers) {t['kubetriage_cpu_ms_per_job']} ms, kube-apiserver "
        f"{t['apiserver_cpu_ms_per_job']} ms (co-located here); claim rate {t['claim_rate_jobs_per_second']} jobs/s, "
        f"claim -> recorded p50 {t['claim_to_recorded_seconds_p50']} s, p90 {t['claim_to_recorded_seconds_p90']} s",
        f"p1 during the storm: created -> verdict p50 {results['p1_wait_ms']['time_to_verdict_ms_p50']} ms, "
        f"p3 jobs still queued when each p1 started: min {results['p1_wait_ms']['p3_queued_when_p1_started_min']}",
        "libraries: " + ", ".join(f"{k} {v}" for k, v in results["libraries"].items()),
    ]
    return "\n".join(lines)


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64, help="total worker slots C")
    parser.add_argument("--replicas", type=int, default=2, help="worker pods sharing C")
    parser.add_argument("--latency-ms", type=float, default=200, help="fake LLM latency L")
    parser.add_argument("--backlog", type=int, default=2000, help="p3 storm: jobs queued and draining")
    parser.add_argument("--p1-jobs", type=int, default=200)
    parser.add_argument("--p1-gap-ms", type=float, default=10)
    parser.add_argument("--baseline-jobs", type=int, default=30)
    parser.add_argument("--many", type=int, default=10000, help="TriageJobs present for the memory figure")
    parser.add_argument("--settle", type=float, default=20, help="seconds after restart before reading RSS")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    print(report(results))
    print(f"\n(written to {out / 'bench.json'})")


if __name__ == "__main__":
    cli()
