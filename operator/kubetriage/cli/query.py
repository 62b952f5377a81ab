"""``kubetriage get`` and ``kubetriage queue``: read-only views of jobs, verdicts and backlog."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from kubetriage.api.keys import ALERT_STATUS_LABEL, VERDICT, VERDICT_BY, VERDICT_REASON
from kubetriage.cli.common import EXIT_OK, api_error, kube_client, list_all, scope_path
from kubetriage.cli.output import age, duration, emit, one_line, parse_ts, table


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


def evidence_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    """``status.evidence``: what the verdict rested on, one {source, summary, value} per source."""
    items = (job.get("status") or {}).get("evidence") or []
    return [e for e in items if isinstance(e, dict)]


def evidence_cell(job: dict[str, Any]) -> str:
    """The EVIDENCE column of ``get -o wide``: each source's headline (``prometheus=recovered``)."""
    return ", ".join(f"{e.get('source', '?')}={e.get('value') or '-'}" for e in evidence_of(job)) or "-"


async def _fetch_jobs(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    from kubetriage.infra.kube import ApiError, triagejob_path

    kube = kube_client()
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
                items = await list_all(kube, scope_path(triagejob_path, args.all_namespaces, ns), **params)
        except ApiError as exc:
            raise api_error(exc, what, ns) from None
    finally:
        await kube.close()
    items.sort(key=lambda j: (j["metadata"].get("namespace", ""), j["metadata"]["name"]))
    return ns, items


async def get(args: argparse.Namespace) -> int:
    ns, items = await _fetch_jobs(args)
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
    wide = args.output == "wide"
    headers = ["NAME", "SOURCE", "PRIORITY", "PHASE", "VERDICT", "CONFIDENCE", "BY", "AGE",
               *(["EVIDENCE"] if wide else []), "REASON"]
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
               "-" if conf is None else f"{conf:g}", v.get("by") or "-", age(meta.get("creationTimestamp"), now),
               *([evidence_cell(j)] if wide else []),
               v.get("reason", "") if wide else one_line(v.get("reason", ""), 60)]
        if args.all_namespaces:
            row.insert(0, meta.get("namespace", ""))
        rows.append(row)
    print(table((["NAMESPACE"] if args.all_namespaces else []) + headers, rows))
    return EXIT_OK


async def describe(args: argparse.Namespace) -> int:
    """One block per job, like ``kubectl describe``: the verdict, why, and each piece of evidence in full."""
    _, items = await _fetch_jobs(args)
    now = dt.datetime.now(dt.UTC)
    blocks = []
    for j in items:
        meta, spec, status = j["metadata"], j.get("spec") or {}, j.get("status") or {}
        v = verdict_of(j)
        conf = v.get("confidence")
        lines = [f"Name:        {meta['name']}", f"Namespace:   {meta.get('namespace', '')}",
                 f"Source:      {(spec.get('source') or {}).get('type', '')}",
                 f"Phase:       {status.get('phase') or '-'}",
                 f"Age:         {age(meta.get('creationTimestamp'), now)}",
                 f"Verdict:     {v.get('classification') or '-'}"
                 + ("" if conf is None else f" ({conf:g})") + (f" by {v['by']}" if v.get("by") else ""),
                 f"Reason:      {v.get('reason') or '-'}"]
        evidence = evidence_of(j)
        lines.append("Evidence:" + ("" if evidence else "    none"))
        for e in evidence:
            lines.append(f"  {e.get('source', '?')}: {e.get('summary', '')}"
                         + (f" [{e['value']}]" if e.get("value") else ""))
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return EXIT_OK


async def queue(args: argparse.Namespace) -> int:
    from kubetriage.infra.kube import ApiError, triagejob_path, triagepool_path

    kube = kube_client()
    try:
        ns = args.namespace or kube.default_namespace
        try:
            pools = await list_all(kube, scope_path(triagepool_path, args.all_namespaces, ns))
            jobs = await list_all(kube, scope_path(triagejob_path, args.all_namespaces, ns))
        except ApiError as exc:
            raise api_error(exc, "triagepools", ns) from None
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
        at = parse_ts(st.get("queuedAt") or j["metadata"]["creationTimestamp"])
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
