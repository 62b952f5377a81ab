"""``kubetriage submit alert|script|junit``: to the ingest endpoint (``--url``) or straight into the cluster.

Both ways build jobs with the ingest server's code, so a job gets the same deterministic name
whichever way it came, and submitting twice is harmless.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from kubetriage.api.models import MAX_LOGS, MAX_SHORT
from kubetriage.api.timeutil import rfc3339
from kubetriage.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, TOKEN_ENV, CliError, kube_client, load_file, pairs
from kubetriage.cli.output import emit, one_line, table
from kubetriage.infra.config import Settings
from kubetriage.ingest import alertmanager, junit
from kubetriage.ingest.jobs import (
    IngestError,
    JobResult,
    ScriptResultIn,
    create_job,
    run_bounded,
    script_job,
    validation_error,
)


def _alerts_from_args(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(alerts, webhook payload extras) from -f or the flags."""
    if args.file:
        data = load_file(args.file)
        if isinstance(data, dict) and "alerts" in data:
            return data["alerts"], {k: v for k, v in data.items() if k != "alerts"}
        return (data if isinstance(data, list) else [data]), {}
    if not args.name:
        raise CliError("submit alert needs an alert NAME or -f FILE", EXIT_USAGE)
    if args.status == "resolved" and not args.starts_at:
        raise CliError("--status resolved needs --starts-at of the firing alert (that is what identifies the "
                       "episode to resolve)", EXIT_USAGE)
    labels = {"alertname": args.name, **pairs(args.label, "--label")}
    if args.severity:
        labels["severity"] = args.severity
    alert: dict[str, Any] = {
        "status": args.status,
        "labels": labels,
        "annotations": pairs(args.annotation, "--annotation"),
        "startsAt": args.starts_at or rfc3339(dt.datetime.now(dt.UTC)),
        "generatorURL": args.generator_url or "",
    }
    if args.ends_at:
        alert["endsAt"] = args.ends_at
    if args.fingerprint:
        alert["fingerprint"] = args.fingerprint
    return [alert], {}


LOG_TAIL_BYTES = 4 * MAX_LOGS  # enough for MAX_LOGS characters of any UTF-8 text
LOG_DEVICE_LIMIT = 1 << 30  # a device is read this far at most: /dev/zero never ends
LOG_CHUNK = 1 << 20


def read_log_tail(path: str) -> str:
    """The end of a log (``-`` = stdin) in at most MAX_LOGS characters, in bounded memory whatever its size.

    Only the end is sent (that is where the error is, and the job keeps MAX_LOGS characters anyway), so only
    the end is read: a regular file from LOG_TAIL_BYTES before its end; a pipe, FIFO or device in chunks,
    keeping the last LOG_TAIL_BYTES. Reading all of it made a 100 MB log a 629 MB request. A pipe is read to
    its end however long it is, as ``tail`` does (its writer decides when it ends); a device only up to
    LOG_DEVICE_LIMIT, since nothing ends ``/dev/zero``.
    """
    try:
        if path == "-":
            return _tail(sys.stdin.buffer, "standard input")
        with open(path, "rb") as f:
            return _tail(f, path)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc}", EXIT_USAGE) from None


def _tail(f: BinaryIO, what: str) -> str:
    skipped, endless = 0, False
    info = os.fstat(f.fileno())
    if stat.S_ISREG(info.st_mode):  # also stdin redirected from a file: seekable
        skipped = max(0, info.st_size - LOG_TAIL_BYTES)
        f.seek(skipped)
        data = f.read(LOG_TAIL_BYTES)  # not to its end: the file may grow while we read
    else:
        pipe = stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode)
        limit = sys.maxsize if pipe else LOG_DEVICE_LIMIT
        buf, total = bytearray(), 0
        while chunk := f.read(min(LOG_CHUNK, limit - total)):
            total += len(chunk)
            buf += chunk
            del buf[:-LOG_TAIL_BYTES]
        endless = total >= limit
        skipped, data = total - len(buf), bytes(buf)
    if skipped:  # the cut may have split a character: start at the next whole one
        start = next((i for i, b in enumerate(data[:4]) if b & 0xC0 != 0x80), 0)
        skipped, data = skipped + start, data[start:]
    # surrogateescape: one character per undecodable byte, so the bytes cut below are counted exactly
    text = data.decode("utf-8", "surrogateescape")
    room = MAX_LOGS - 300  # the marker below fits in 300 characters
    if len(text) > room:
        skipped += len(text[:-room].encode("utf-8", "surrogateescape"))
        text = text[-room:]
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if endless:
        return (f"…[kubetriage submit stopped reading {what[:60]} after {LOG_DEVICE_LIMIT >> 20} MiB: a device "
                f"that does not end; this is the end of what it read]…\n{text}")
    if skipped:
        return f"…[the first {skipped} bytes of {what[:60]} were not sent: only its end is]…\n{text}"
    return text


def _script_items(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.file:
        data = load_file(args.file)
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
        item["logs"] = read_log_tail(args.logs_file)
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
        rows = [[j["name"], j["result"], one_line(str(j.get("detail") or j.get("testCase") or ""), 80)]
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
    kube = kube_client()
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
    kube = kube_client()
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
    kube = kube_client()
    try:
        ns = args.namespace or kube.default_namespace
        results = await run_bounded([lambda b=body: create_job(kube, ns, b) for _, body, _ in jobs])
    finally:
        await kube.close()
    for result, (_, _, case) in zip(results, jobs, strict=True):
        result.extra["testCase"] = f"{case.classname}::{case.name}" if case.classname else case.name
    return _print_submitted(_summary(ns, results, {"summary": summary}), args.output)
