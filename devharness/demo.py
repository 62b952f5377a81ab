"""``make demo``: the whole pipeline on this machine, on the embedded defaults.

Starts a real kube-apiserver + etcd, Redis, a SQLite database with the team's
``alerts`` / ``script_results`` tables, the operator, and one local worker
process per pool Deployment; applies ``examples/``; waits for the verdicts;
prints ``kubectl get tj`` and the database rows. No API key is needed: the
offline analyzers decide. With ``KUBETRIAGE_LLM_API_KEY`` and
``KUBETRIAGE_LLM_MODEL`` (and ``KUBETRIAGE_LLM_BASE_URL`` for a non-OpenRouter
endpoint, with ``KUBETRIAGE_LLM_ALLOW_HTTP=true`` and
``KUBETRIAGE_LLM_ALLOW_PRIVATE_ENDPOINTS=true`` for one on this machine) in the
environment, the pools use that model too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from devharness import devenv, localrun
from devharness.localpods import LocalPods
from kubetriage.infra.kube import Kube

REPO = devenv.REPO_ROOT
EXAMPLES = REPO / "examples"


def say(msg: str) -> None:
    # a closed terminal (SIGHUP) makes every write fail: that must not stop the demo from stopping its processes
    with contextlib.suppress(OSError):
        print(f"==> {msg}", flush=True)


class Interrupted(Exception):
    """A stop signal came before the demo was up; it stops what it started and exits with 128 + the signal."""


class Signals:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP, noted for the demo to act on at its next step.

    A flag set by a plain signal handler, not asyncio's KeyboardInterrupt and task cancellation: those landed
    anywhere, also inside the cleanup, where a cancelled ``await`` skipped stopping the worker processes and
    left them orphaned (issue 12, item 13). The ``kubectl`` the demo runs at that moment is in the terminal's
    process group, gets the SIGINT too and fails; with a signal noted, that failure is read as the interrupt.
    """

    STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        # before asyncio.run: it then leaves SIGINT alone instead of cancelling the main task
        for sig in self.STOP:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            # os.write, not print: a print interrupted by a handler that prints raises "reentrant call"
            with contextlib.suppress(OSError):
                os.write(1, b"==> still stopping: waiting for the processes the demo started to exit\n")
            return
        self.received = signum
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(event.set)

    def attach(self) -> None:
        """Bind to the running loop, so that :meth:`wait` wakes up on a signal."""
        self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        if self.received is not None:
            self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Until a stop signal (or ``timeout`` seconds); whether one came."""
        assert self._event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        return self.received is not None

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted


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
    # a model server on this machine (Ollama, vLLM) is plain http on loopback: the pools must opt in
    for env, field in (("KUBETRIAGE_LLM_ALLOW_HTTP", "allowHTTP"),
                       ("KUBETRIAGE_LLM_ALLOW_PRIVATE_ENDPOINTS", "allowPrivateEndpoints")):
        if os.environ.get(env, "").lower() in ("1", "true", "yes"):
            analyzer[field] = True
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


async def run(keep: bool, root: Path, signals: Signals) -> int:
    ns = "default"
    signals.attach()
    say(f"working folder {root}")
    say("control plane: kube-apiserver + etcd (built once with Go if not cached; this can take minutes)")
    cp = devenv.ControlPlane(root / "control-plane")
    redis = None
    operator = None
    pods_stop = asyncio.Event()
    pods_task = None
    kube = None
    try:
        cp.start()
        signals.check()
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
        signals.check()
        say("operator: kubetriage run")
        operator = localrun.start_operator(root, env)
        kube = Kube()
        say("worker pods: each pool's Deployment runs as local processes")
        pods = LocalPods(kube, log_dir=root / "pods", extra_env={"KUBETRIAGE_METRICS_PORT": "0"})
        pods_task = asyncio.create_task(pods.run(pods_stop))
        # The README's order: a TriageRule applies to jobs admitted after the operator observed it, so
        # PriorityClasses, pools and rules first, each rule Accepted, and only then the jobs.
        docs = _example_docs()
        setup = [d for d in docs if d["kind"] != "TriageJob"]
        say("applying examples/: PriorityClasses, TriagePools and TriageRules")
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(setup))
        if analyzer:
            for pool in ("default", "backfill"):
                patch = json.dumps({"spec": {"analyzer": analyzer}})
                cp.kubectl("patch", "tpool", pool, "--type=merge", "-p", patch)
        for rule in (d["metadata"]["name"] for d in setup if d["kind"] == "TriageRule"):
            signals.check()
            say(f"kubectl wait --for=condition=Accepted trule/{rule}")
            waited = cp.kubectl("wait", "--for=condition=Accepted", f"trule/{rule}", "--timeout=60s", check=False)
            signals.check()  # Ctrl-C also ends the kubectl wait: not a rule that was refused
            if waited.returncode != 0:
                print(operator.tail(), file=sys.stderr)
                raise SystemExit(f"TriageRule {rule} was not accepted: {waited.stderr.strip()}; "
                                 f"see `kubectl describe trule {rule}` and the operator log above")
        signals.check()
        say("applying examples/: TriageJobs")
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([d for d in docs if d["kind"] == "TriageJob"]))
        names = [d["metadata"]["name"] for d in docs if d["kind"] == "TriageJob"]
        say(f"waiting for {len(names)} verdicts")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            signals.check()
            items = json.loads(cp.kubectl("get", "tj", "-o", "json").stdout)["items"]
            phases = [(i.get("status") or {}).get("phase") for i in items]
            done = [p for p in phases if p in ("Succeeded", "Failed", "Duplicate")]
            if len(done) >= len(names):
                break
            if not operator.alive():
                print(operator.tail(), file=sys.stderr)
                raise SystemExit("the operator exited; its log is above")
            await signals.wait(0.5)
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
            print(f"    {kubectl} get trule")
            print(f"    {kubectl} apply -f examples/21-alert-api-down.yaml   # edit the name first")
            print(f"    sqlite3 {db} 'select * from triage_verdicts'")
            say("press Ctrl-C to stop: every process the demo started is stopped, the folder removed")
            await signals.wait()  # the documented way to stop: exit 0
        return 0
    except (Exception, SystemExit) as exc:
        # a kubectl killed by the same Ctrl-C, or a check that failed because of it: report the interrupt
        if signals.received is not None and not isinstance(exc, Interrupted):
            raise Interrupted from exc
        raise
    finally:
        say("stopping: workers, operator, redis, control plane")
        # Nothing cancels this task (see Signals), so each step runs; one that fails does not skip the others.
        pods_stop.set()
        if pods_task:
            try:
                await pods_task
            except Exception as exc:
                say(f"stopping the worker processes failed ({exc!r}); the sweep below ends them")
        if kube:
            await kube.close()
        for proc in (operator, redis, cp):
            if proc is not None:
                try:
                    proc.stop()
                except Exception as exc:
                    say(f"stopping {type(proc).__name__} failed ({exc!r}); the sweep below ends it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devharness.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--exit", action="store_true", help="stop after printing the verdicts (no Ctrl-C wait)")
    args = parser.parse_args(argv)
    keep = not args.exit and sys.stdin.isatty()
    # every process the demo starts inherits this marker (and its workers get it from LocalPods), so the
    # sweep below finds them all, whichever process group they ended up in
    marker = devenv.own_harness_id("demo")
    signals = Signals()
    signals.install()
    try:
        with devenv.temp_root("kubetriage-demo-") as root:
            try:
                return asyncio.run(run(keep, root, signals))
            except Exception:
                if signals.received is None:
                    raise
                # Interrupted, or a step that failed because of the signal (a `go build` of the control
                # plane in the terminal's process group dies of the Ctrl-C too)
                say(f"interrupted ({signal.Signals(signals.received).name}) before the demo was up")
                return 128 + signals.received
            finally:
                left = devenv.stop_marked(marker)
                if left:
                    say(f"stopped {len(left)} process(es) that outlived the steps above: "
                        + "; ".join(cmd[:80] for _, cmd in left))
                say("stopped: no process the demo started is running")
    finally:
        signals.restore()


if __name__ == "__main__":
    raise SystemExit(main())
