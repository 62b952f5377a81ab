"""The user-facing commands of ``kubetriage``: submit, get, verdict set, queue.

They talk to the cluster with the same small client the operator uses (your
kubeconfig, your RBAC), or, for ``submit --url``, to the ingest endpoint with a
bearer token. Both ways of submitting build jobs with the same code as the
ingest server, so a job gets the same deterministic name whichever way it came
and submitting twice is harmless.

Exit codes: 0 success; 1 the request failed (refused, not found, API or
network error); 2 usage error (bad flags or input files).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from kubetriage import alertmanager, junit
from kubetriage.config import Settings
from kubetriage.ingest_models import (
    ALERT_STATUS_LABEL,
    VERDICT,
    VERDICT_AT,
    VERDICT_BY,
    VERDICT_REASON,
    IngestError,
    JobResult,
    ScriptResultIn,
    create_job,
    rfc3339,
    run_bounded,
    script_job,
    validation_error,
)
from kubetriage.models import MAX_REASON, MAX_SHORT, Classification

if TYPE_CHECKING:
    from kubetriage.kube import ApiError, Kube

# kubetriage.kube (kopf, aiohttp) and httpx are imported inside the commands that use them: building the
# parser must stay cheap, since every ``kubetriage worker`` pod builds it too.

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TOKEN_ENV = "KUBETRIAGE_INGEST_TOKEN"
EPILOG = "exit codes: 0 success, 1 request failed (refused, not found, API/network error), 2 usage error"


class CliError(Exception):
    """Something the user must fix; printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- output


def _time(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _age(ts: str | None, now: dt.datetime) -> str:
    if not ts:
        return "-"
    return duration(max(0, int((now - _time(ts)).total_seconds())))


def duration(seconds: float) -> str:
    """kubectl's style: 42s, 5m, 3h, 2d."""
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def emit(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# --------------------------------------------------------------------------- cluster access


def _kube() -> Kube:
    from kubetriage.kube import Kube

    try:
        return Kube()
    except Exception as exc:  # kopf.LoginError and friends: say what to set, not a traceback
        raise CliError(f"cannot reach Kubernetes: {exc} (set KUBECONFIG or use --url for submit)") from None


def _api_error(exc: ApiError, what: str, namespace: str) -> CliError:
    if exc.status == 404:
        return CliError(f"{what} not found in namespace {namespace!r}")
    if exc.status == 403:
        return CliError(f"forbidden: {exc.message}")
    return CliError(f"Kubernetes API error {exc.status}: {exc.message}")


async def _list(kube: Kube, path: str, **params: Any) -> list[dict[str, Any]]:
    """All items of a LIST, page by page (a big backlog must not be one huge response)."""
    items: list[dict[str, Any]] = []
    cont = ""
    while True:
        page = await kube.get(path, limit=500, **({"continue": cont} if cont else {}), **params)
        items += page.get("items", [])
        cont = (page.get("metadata") or {}).get("continue") or ""
        if not cont:
            return items


def _scope_path(builder: Callable[..., str], all_namespaces: bool, namespace: str) -> str:
    if all_namespaces:
        return builder("_").replace("/namespaces/_", "")
    return builder(namespace)


# --------------------------------------------------------------------------- submit


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} expects key=value, got {item!r}", EXIT_USAGE)
        out[key] = value
    return out


def _load(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return yaml.safe_load(text)  # JSON is YAML
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"cannot read {path}: {exc}", EXIT_USAGE) from None


def _alerts_from_args(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(alerts, webhook payload extras) from -f or the flags."""
    if args.file:
        data = _load(args.file)
        if isinstance(data, dict) and "alerts" in data:
            return data["alerts"], {k: v for k, v in data.items() if k != "alerts"}
        return (data if isinstance(data, list) else [data]), {}
    if not args.name:
        raise CliError("submit alert needs an alert NAME or -f FILE", EXIT_USAGE)
    if args.status == "resolved" and not args.starts_at:
        raise CliError("--status resolved needs --starts-at of the firing alert (that is what identifies the "
                       "episode to resolve)", EXIT_USAGE)
    labels = {"alertname": args.name, **_pairs(args.label, "--label")}
    if args.severity:
        labels["severity"] = args.severity
    alert: dict[str, Any] = {
        "status": args.status,
        "labels": labels,
        "annotations": _pairs(args.annotation, "--annotation"),
        "startsAt": args.starts_at or rfc3339(dt.datetime.now(dt.UTC)),
        "generatorURL": args.generator_url or "",
    }
    if args.ends_at:
        alert["endsAt"] = args.ends_at
    if args.fingerprint:
        alert["fingerprint"] = args.fingerprint
    return [alert], {}


def _script_items(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.file:
        data = _load(args.file)
        items = data if isinstance(data, list) else [data]
        if not all(isinstance(i, dict) for i in items):
            raise CliError(f"{args.file}: expected a JSON/YAML object (or a list of them)", EXIT_USAGE)
        return items
    if not args.script_name:
        raise CliError("submit script needs a SCRIPT_NAME or -f FILE", EXIT_USAGE)
    item: dict[str, Any] = {"script_name": args.script_name, "success": args.success}
    optional = {"id": args.id, "error_msg": args.error, "html_report_r2_url": args.report_url,
                "screenshots": args.screenshot, "duration": args.duration, "attempt": args.attempt,
                "test_case": args.test_case, "commit": args.commit}
    item.update({k: v for k, v in optional.items() if v is not None})
    if args.logs_file:
        try:
            item["logs"] = sys.stdin.read() if args.logs_file == "-" else Path(args.logs_file).read_text(
                errors="replace")
        except OSError as exc:
            raise CliError(f"cannot read {args.logs_file}: {exc}", EXIT_USAGE) from None
    if args.analyze:
        item["analyze"] = True
    return [item]


async def _post(args: argparse.Namespace, route: str, **kw: Any) -> dict[str, Any]:
    import httpx

    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise CliError(f"--url needs a token: pass --token or set {TOKEN_ENV}", EXIT_USAGE)
    params = {k: v for k, v in {"namespace": args.namespace, "pool": args.pool,
                                "priority_class": args.priority_class, **kw.pop("params", {})}.items() if v}
    try:
        async with httpx.AsyncClient(timeout=args.timeout) as http:
            resp = await http.post(args.url.rstrip("/") + route, params=params,
                                   headers={"Authorization": f"Bearer {token}"}, **kw)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {args.url}: {exc}") from None
    try:
        body = resp.json()
    except ValueError:
        raise CliError(f"{args.url}{route} answered {resp.status_code}: {resp.text[:300]}") from None
    if resp.status_code >= 400 and not body.get("jobs"):
        where = f" (field {body['field']})" if body.get("field") else ""
        retry = f"; retry after {resp.headers['Retry-After']}s" if "Retry-After" in resp.headers else ""
        raise CliError(f"ingest refused the request with {resp.status_code}{where}: {body.get('error')}{retry}")
    return body


def _summary(namespace: str, results: list[JobResult], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.result] = counts.get(r.result, 0) + 1
    return {"namespace": namespace, **counts, **(extra or {}), "jobs": [r.public() for r in results]}


def _print_submitted(body: dict[str, Any], output: str) -> int:
    jobs = body.get("jobs") or []
    if output in ("json", "yaml"):
        emit(body, output)
    elif output == "name":
        for j in jobs:
            print(f"triagejob.kubetriage.io/{j['name']}")
    else:
        rows = [[j["name"], j["result"], _one_line(str(j.get("detail") or j.get("testCase") or ""), 80)]
                for j in jobs]
        print(table(["NAME", "RESULT", "DETAIL"], rows) if rows else f"no jobs (namespace {body.get('namespace')})")
        if body.get("summary"):
            print("tests: " + ", ".join(f"{k} {v}" for k, v in body["summary"].items()), file=sys.stderr)
    failed = [j for j in jobs if j["result"] == "failed"]
    for j in failed:
        print(f"error: {j['name']}: {j.get('detail')}", file=sys.stderr)
    return EXIT_FAILED if failed or body.get("status", 200) >= 400 else EXIT_OK


def _submitter() -> str:
    return f"cli:{os.environ.get('USER') or getpass.getuser()}"[:MAX_SHORT]


async def submit_alert(args: argparse.Namespace) -> int:
    alerts, extras = _alerts_from_args(args)
    payload_data = {"version": "4", "status": "firing", "receiver": "kubetriage-cli", **extras, "alerts": alerts}
    try:
        payload = alertmanager.WebhookPayload.model_validate(payload_data)
    except ValidationError as exc:
        raise CliError(validation_error(exc).message, EXIT_USAGE) from None
    if args.url:
        return _print_submitted(await _post(args, "/v1/alertmanager", json=payload_data), args.output)
    priorities = Settings.from_env().alert_priorities
    built = []
    for i, alert in enumerate(payload.alerts):
        try:
            built.append((alert, *alertmanager.alert_job(alert, payload, priorities, pool=args.pool,
                                                         priority_class=args.priority_class,
                                                         submitted_by=_submitter())))
        except IngestError as exc:
            raise CliError(f"alert {i}: {exc.message}", EXIT_USAGE) from None
    kube = _kube()
    try:
        ns = args.namespace or kube.default_namespace
        results = await run_bounded([lambda a=a, n=n, b=b: alertmanager.apply_alert(kube, ns, a, n, b)
                                     for a, n, b in built])
    finally:
        await kube.close()
    return _print_submitted(_summary(ns, results), args.output)


async def submit_script(args: argparse.Namespace) -> int:
    items = _script_items(args)
    if args.url:
        body = items if len(items) > 1 else items[0]
        return _print_submitted(await _post(args, "/v1/script-results", json=body), args.output)
    jobs: list[tuple[str, dict[str, Any]] | JobResult] = []
    for i, raw in enumerate(items):
        try:
            item = ScriptResultIn.model_validate(raw)
            name, body = script_job(item, priority_class=args.priority_class, pool=args.pool)
        except ValidationError as exc:
            raise CliError(validation_error(exc, f"[{i}]" if len(items) > 1 else "").message, EXIT_USAGE) from None
        except IngestError as exc:
            raise CliError(exc.message, EXIT_USAGE) from None
        body["metadata"]["annotations"]["kubetriage.io/submitted-by"] = _submitter()
        skip = item.success and not item.analyze
        jobs.append(JobResult(name, "skipped", "the run succeeded; pass --analyze to triage it anyway")
                    if skip else (name, body))
    kube = _kube()
    try:
        ns = args.namespace or kube.default_namespace
        results = await run_bounded([
            (lambda r=j: _ready(r)) if isinstance(j, JobResult) else (lambda b=j[1]: create_job(kube, ns, b))
            for j in jobs
        ])
    finally:
        await kube.close()
    return _print_submitted(_summary(ns, results), args.output)


async def _ready(result: JobResult) -> JobResult:
    return result


def _read_report(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc}", EXIT_USAGE) from None


async def submit_junit(args: argparse.Namespace) -> int:
    data = _read_report(args.report)
    opts = {"run": args.run, "script": args.script, "report_url": args.report_url,
            "attachments_url": args.attachments_url, "commit": args.commit}
    if args.url:
        body = await _post(args, "/v1/junit", content=data, params={k: v for k, v in opts.items() if v})
        return _print_submitted(body, args.output)
    upload = junit.UploadOptions(run=args.run or "", script=args.script or "", report_url=args.report_url,
                                 attachments_url=args.attachments_url, commit=args.commit,
                                 priority_class=args.priority_class, pool=args.pool, submitted_by=_submitter())
    try:
        jobs, summary = junit.report_jobs(data, upload)
    except IngestError as exc:
        raise CliError(f"{args.report}: {exc.message}", EXIT_USAGE) from None
    kube = _kube()
    try:
        ns = args.namespace or kube.default_namespace
        results = await run_bounded([lambda b=body: create_job(kube, ns, b) for _, body, _ in jobs])
    finally:
        await kube.close()
    for result, (_, _, case) in zip(results, jobs, strict=True):
        result.extra["testCase"] = f"{case.classname}::{case.name}" if case.classname else case.name
    return _print_submitted(_summary(ns, results, {"summary": summary}), args.output)


# --------------------------------------------------------------------------- get


def verdict_of(job: dict[str, Any]) -> dict[str, Any]:
    """The verdict to show: a human override (annotations) wins over the analyzer's (status)."""
    ann = (job.get("metadata") or {}).get("annotations") or {}
    status_verdict = (job.get("status") or {}).get("verdict") or {}
    if ann.get(VERDICT):
        recorded = status_verdict.get("checkType") == "user" and status_verdict.get("classification") == ann[VERDICT]
        by = f"user:{ann.get(VERDICT_BY, '?')}" + ("" if recorded else " (pending)")
        return {"classification": ann[VERDICT], "reason": ann.get(VERDICT_REASON, ""), "by": by,
                "confidence": None, "recorded": recorded}
    if status_verdict:
        by = "user" if status_verdict.get("checkType") == "user" else status_verdict.get("analyzer", "ai")
        return {"classification": status_verdict.get("classification", ""), "reason": status_verdict.get("reason", ""),
                "by": by, "confidence": status_verdict.get("confidence"), "recorded": True}
    return {}


async def get(args: argparse.Namespace) -> int:
    from kubetriage.kube import ApiError, triagejob_path

    kube = _kube()
    try:
        ns = args.namespace or kube.default_namespace
        items = []
        what = "triagejobs"
        try:
            for n in args.names:
                what = f"triagejob {n!r}"
                items.append(await kube.get(triagejob_path(ns, n)))
            if not args.names:
                params = {"labelSelector": args.selector} if args.selector else {}
                items = await _list(kube, _scope_path(triagejob_path, args.all_namespaces, ns), **params)
        except ApiError as exc:
            raise _api_error(exc, what, ns) from None
    finally:
        await kube.close()
    items.sort(key=lambda j: (j["metadata"].get("namespace", ""), j["metadata"]["name"]))
    if args.output in ("json", "yaml"):
        emit(items[0] if len(args.names) == 1 else {"apiVersion": "v1", "kind": "List", "items": items}, args.output)
        return EXIT_OK
    if args.output == "name":
        for j in items:
            print(f"triagejob.kubetriage.io/{j['metadata']['name']}")
        return EXIT_OK
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {ns}"
        print(f"No TriageJobs found in {where}.", file=sys.stderr)
        return EXIT_OK
    now = dt.datetime.now(dt.UTC)
    headers = ["NAME", "SOURCE", "PRIORITY", "PHASE", "VERDICT", "CONFIDENCE", "BY", "AGE", "REASON"]
    rows = []
    for j in items:
        meta, spec, status = j["metadata"], j.get("spec") or {}, j.get("status") or {}
        v = verdict_of(j)
        source = (spec.get("source") or {}).get("type", "")
        if (meta.get("labels") or {}).get(ALERT_STATUS_LABEL) == "resolved":
            source += " (resolved)"
        conf = v.get("confidence")
        row = [meta["name"], source, status.get("priorityClassName") or spec.get("priorityClassName") or "-",
               status.get("phase") or "-", v.get("classification") or "-",
               "-" if conf is None else f"{conf:g}", v.get("by") or "-", _age(meta.get("creationTimestamp"), now),
               v.get("reason", "") if args.output == "wide" else _one_line(v.get("reason", ""), 60)]
        if args.all_namespaces:
            row.insert(0, meta.get("namespace", ""))
        rows.append(row)
    print(table((["NAMESPACE"] if args.all_namespaces else []) + headers, rows))
    return EXIT_OK


# --------------------------------------------------------------------------- verdict set


async def verdict_set(args: argparse.Namespace) -> int:
    from kubetriage.kube import ApiError, triagejob_path

    reason = args.reason.strip()
    if not reason:
        raise CliError("--reason must say why (the memory analyzer learns from it)", EXIT_USAGE)
    if len(reason) > MAX_REASON:
        raise CliError(f"--reason is {len(reason)} characters; the limit is {MAX_REASON}", EXIT_USAGE)
    by = (args.by or os.environ.get("USER") or getpass.getuser())[:MAX_SHORT]
    patch = {"metadata": {"annotations": {
        VERDICT: args.classification, VERDICT_REASON: reason, VERDICT_BY: by,
        VERDICT_AT: rfc3339(dt.datetime.now(dt.UTC)),
    }}}
    kube = _kube()
    try:
        ns = args.namespace or kube.default_namespace
        try:
            job = await kube.merge_patch(triagejob_path(ns, args.name), patch)
        except ApiError as exc:
            raise _api_error(exc, f"triagejob {args.name!r}", ns) from None
    finally:
        await kube.close()
    if args.output in ("json", "yaml"):
        emit(job, args.output)
    else:
        print(f"triagejob.kubetriage.io/{args.name} verdict set: {args.classification} (by {by})")
    return EXIT_OK


# --------------------------------------------------------------------------- queue


async def queue(args: argparse.Namespace) -> int:
    from kubetriage.kube import ApiError, triagejob_path, triagepool_path

    kube = _kube()
    try:
        ns = args.namespace or kube.default_namespace
        try:
            pools = await _list(kube, _scope_path(triagepool_path, args.all_namespaces, ns))
            jobs = await _list(kube, _scope_path(triagejob_path, args.all_namespaces, ns))
        except ApiError as exc:
            raise _api_error(exc, "triagepools", ns) from None
    finally:
        await kube.close()
    now = dt.datetime.now(dt.UTC)
    oldest: dict[str, dt.datetime] = {}
    queued: dict[str, int] = {}
    for j in jobs:
        st = j.get("status") or {}
        if st.get("phase") != "Queued" or not st.get("pool"):
            continue
        queued[st["pool"]] = queued.get(st["pool"], 0) + 1
        at = _time(st.get("queuedAt") or j["metadata"]["creationTimestamp"])
        oldest[st["pool"]] = min(at, oldest.get(st["pool"], at))
    out = []
    for p in sorted(pools, key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"])):
        key = f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        spec, st = p.get("spec") or {}, p.get("status") or {}
        wait = (now - oldest[key]).total_seconds() if key in oldest else None
        out.append({
            "namespace": p["metadata"]["namespace"], "pool": p["metadata"]["name"],
            "priorityClassName": spec.get("priorityClassName"),
            "replicas": st.get("replicas", 0), "minReplicas": (spec.get("replicas") or {}).get("min"),
            "maxReplicas": (spec.get("replicas") or {}).get("max"),
            "running": st.get("running", 0), "backlog": st.get("backlog", 0), "queuedJobs": queued.get(key, 0),
            "oldestWaitSeconds": None if wait is None else round(max(0.0, wait), 1),
        })
    if args.output in ("json", "yaml"):
        emit({"pools": out}, args.output)
        return EXIT_OK
    if not out:
        print(f"No TriagePools found in {'any namespace' if args.all_namespaces else f'namespace {ns}'}.",
              file=sys.stderr)
        return EXIT_OK
    headers = ["POOL", "PRIORITY", "REPLICAS", "RUNNING", "BACKLOG", "OLDEST WAIT"]
    rows = []
    for r in out:
        row = [r["pool"], r["priorityClassName"] or "-", f"{r['replicas']} ({r['minReplicas']}-{r['maxReplicas']})",
               str(r["running"]), str(r["backlog"]),
               "-" if r["oldestWaitSeconds"] is None else duration(r["oldestWaitSeconds"])]
        if args.all_namespaces:
            row.insert(0, r["namespace"])
        rows.append(row)
    print(table((["NAMESPACE"] if args.all_namespaces else []) + headers, rows))
    return EXIT_OK


# --------------------------------------------------------------------------- argparse


def _run(func: Callable[[argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    def runner(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(func(args))
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            return 130

    return runner


def _output(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("table", "json", "yaml", "name")) -> None:
    p.add_argument("-o", "--output", choices=choices, default="table", help="output format (default: table)")


def _namespace(p: argparse.ArgumentParser, all_namespaces: bool = False) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's; with --url the "
                                              "token's default)")
    if all_namespaces:
        p.add_argument("-A", "--all-namespaces", action="store_true", help="across all namespaces")


def _submit_common(p: argparse.ArgumentParser) -> None:
    _namespace(p)
    p.add_argument("--url", help="ingest endpoint (e.g. http://kubetriage.kubetriage:8000); default: write "
                                 "TriageJobs to the cluster directly with your kubeconfig")
    p.add_argument("--token", help=f"ingest bearer token for --url (default: ${TOKEN_ENV})")
    p.add_argument("--pool", help="TriagePool for the jobs (default: the operator's default pool)")
    p.add_argument("--priority-class", help="PriorityClass for the jobs (default: by severity / source type)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the ingest endpoint")
    _output(p)


def add_subcommands(sub: Any) -> None:
    """The user commands, added to ``kubetriage``'s parser by ``kubetriage.cli.build_parser``."""
    fmt = argparse.RawDescriptionHelpFormatter
    submit = sub.add_parser("submit", help="submit an alert, a script result or a JUnit report for triage",
                            description="Create TriageJobs from an alert, a script result or a JUnit report, "
                                        "through the ingest endpoint (--url) or directly in the cluster.",
                            epilog=EPILOG, formatter_class=fmt)
    kinds = submit.add_subparsers(dest="kind", required=True, metavar="{alert,script,junit}")

    alert = kinds.add_parser(
        "alert", help="an alert (flags, or an Alertmanager webhook payload with -f)", epilog=EPILOG,
        formatter_class=fmt,
        description="Submit an alert. Its job name comes from the alert's labels and startsAt, so submitting "
                    "the same alert again changes nothing.\n\nexamples:\n"
                    "  kubetriage submit alert DiskFull --severity critical --label instance=db-1:9100\n"
                    "  kubetriage submit alert -f webhook.json --url http://kubetriage:8000")
    alert.add_argument("name", nargs="?", help="alert name (the alertname label)")
    alert.add_argument("-f", "--file", help="Alertmanager webhook payload, one alert or a list (JSON/YAML; - = stdin)")
    alert.add_argument("-l", "--label", action="append", metavar="KEY=VALUE", help="label (repeatable)")
    alert.add_argument("-a", "--annotation", action="append", metavar="KEY=VALUE", help="annotation (repeatable)")
    alert.add_argument("--severity", help="severity label; picks the PriorityClass (KUBETRIAGE_ALERT_PRIORITY_MAP)")
    alert.add_argument("--status", choices=["firing", "resolved"], default="firing")
    alert.add_argument("--starts-at", help="RFC 3339 time it started firing (default: now)")
    alert.add_argument("--ends-at", help="RFC 3339 time it resolved")
    alert.add_argument("--generator-url", help="link to the alert's source (http/https)")
    alert.add_argument("--fingerprint", help="Alertmanager fingerprint (default: derived from the labels)")
    _submit_common(alert)
    alert.set_defaults(func=_run(submit_alert))

    script = kinds.add_parser(
        "script", help="a script/test run result (flags, or the script_results row with -f)", epilog=EPILOG,
        formatter_class=fmt,
        description="Submit a script result. Only failures are triaged unless --analyze.\n\nexamples:\n"
                    "  kubetriage submit script checkout-e2e --id 88412 --error 'TimeoutError: ...' "
                    "--report-url https://...\n  kubetriage submit script -f row.json --url http://kubetriage:8000")
    script.add_argument("script_name", nargs="?", help="script name")
    script.add_argument("-f", "--file", help="result row(s) as JSON/YAML with id, script_name, success, error_msg, "
                                             "html_report_r2_url, screenshots, logs, duration, attempt (- = stdin)")
    script.add_argument("--id", help="row id in your script_results table")
    state = script.add_mutually_exclusive_group()
    state.add_argument("--failed", dest="success", action="store_false", help="the run failed (default)")
    state.add_argument("--success", dest="success", action="store_true", help="the run succeeded")
    script.set_defaults(success=False)
    script.add_argument("--error", help="error message")
    script.add_argument("--report-url", help="HTML report URL")
    script.add_argument("--screenshot", action="append", metavar="URL", help="screenshot URL (repeatable)")
    script.add_argument("--logs-file", metavar="FILE", help="log file; its tail is sent (- = stdin)")
    script.add_argument("--duration", type=float, help="seconds the run took")
    script.add_argument("--attempt", type=int, help="attempt number (1 = first)")
    script.add_argument("--test-case", help="test case inside the script")
    script.add_argument("--commit", help="commit under test")
    script.add_argument("--analyze", action="store_true", help="triage it even if it succeeded")
    _submit_common(script)
    script.set_defaults(func=_run(submit_script))

    ju = kinds.add_parser(
        "junit", help="a JUnit XML report: one job per failed or errored test", epilog=EPILOG, formatter_class=fmt,
        description="Submit a JUnit XML report (pytest --junitxml, Playwright, Maven/JUnit).\n\nexample:\n"
                    "  kubetriage submit junit report.xml --run $CI_PIPELINE_ID "
                    "--attachments-url https://ci/artifacts/$CI_JOB_ID/")
    ju.add_argument("report", help="the XML file (- = stdin)")
    ju.add_argument("--run", help="CI run id: re-submitting the run is idempotent (default: hash of the file)")
    ju.add_argument("--script", help="script name for every job (default: each test's classname)")
    ju.add_argument("--report-url", help="HTML report URL")
    ju.add_argument("--attachments-url", help="base URL the report's [[ATTACHMENT|path]] files are served from")
    ju.add_argument("--commit", help="commit under test")
    _submit_common(ju)
    ju.set_defaults(func=_run(submit_junit))

    g = sub.add_parser("get", help="list TriageJobs with their verdicts and reasons", epilog=EPILOG,
                       description="Like 'kubectl get tj', plus who decided (analyzer or user:<name>) and why. "
                                   "A human verdict (kubetriage verdict set) is shown over the analyzer's.")
    g.add_argument("names", nargs="*", help="job names (default: all)")
    _namespace(g, all_namespaces=True)
    g.add_argument("-l", "--selector", help="label selector, e.g. kubetriage.io/alert-status=resolved")
    _output(g, ("table", "wide", "json", "yaml", "name"))
    g.set_defaults(func=_run(get))

    v = sub.add_parser("verdict", help="human verdicts", epilog=EPILOG)
    vsub = v.add_subparsers(dest="verdict_command", required=True, metavar="{set}")
    vs = vsub.add_parser(
        "set", help="override a job's verdict", epilog=EPILOG,
        description="Record a human verdict on a TriageJob (annotations kubetriage.io/verdict, -reason, -by, -at). "
                    "The operator records it with check_type 'user', which analyses never overwrite.")
    vs.add_argument("name", help="TriageJob name")
    vs.add_argument("classification", choices=[Classification.VALID.value, Classification.FALSE_POSITIVE.value])
    vs.add_argument("--reason", required=True, help="why (kept with the verdict; the memory analyzer learns from it)")
    vs.add_argument("--by", help="who decides (default: $USER)")
    _namespace(vs)
    _output(vs, ("table", "json", "yaml"))
    vs.set_defaults(func=_run(verdict_set))

    q = sub.add_parser("queue", help="backlog, running jobs and oldest wait per pool", epilog=EPILOG,
                       description="Per TriagePool: replicas, running and backlog (from the pool's status) and the "
                                   "oldest queued job's wait (from the TriageJobs in the same namespace(s)).")
    _namespace(q, all_namespaces=True)
    _output(q, ("table", "json", "yaml"))
    q.set_defaults(func=_run(queue))
