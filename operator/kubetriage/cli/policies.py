"""``kubetriage policy test FILE``: what a TriagePolicy would have done, before anyone applies it.

It reads the policy from the file, lists the finished TriageJobs of the policy's namespace (a policy acts
in its own namespace only) and that namespace's TriageRules, and plans each recorded verdict through the
same function the operator plans with (``kubetriage.api.policy.plan``), as if the policy were enforced:
which alerts it would silence (with the exact matchers), which it must not (a neverDiscard rule, no
target), and which notifications it would send. Nothing is written and nothing is sent.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from pydantic import ValidationError

from kubetriage.api import policy as pol
from kubetriage.api.contract import TeamRule
from kubetriage.api.models import FINISHED_PHASES, TriagePolicySpec, TriageRuleSpec, Verdict
from kubetriage.api.timeutil import parse_time
from kubetriage.cli.common import EXIT_OK, api_error, kube_client, list_all, load_file
from kubetriage.cli.output import emit, one_line, table
from kubetriage.cli.rules import parse_manifest, request_of


def parse_policy(doc: Any, path: str) -> tuple[str, str | None, TriagePolicySpec]:
    """(name, namespace, spec) from a TriagePolicy manifest."""
    return parse_manifest(doc, path, "TriagePolicy", TriagePolicySpec)


def replay(policy: pol.Policy, jobs: list[dict[str, Any]], rules: list[TeamRule]) -> list[dict[str, Any]]:
    """One row per action the policy, enforced, would have planned for a recorded verdict."""
    enforced = pol.Policy(policy.namespace, policy.name, policy.spec.model_copy(update={"mode": "enforce"}))
    rows = []
    for job in jobs:
        meta, status = job["metadata"], job.get("status") or {}
        if status.get("phase") not in FINISHED_PHASES or not status.get("verdict"):
            continue  # duplicates are covered by their primary's actions
        request = request_of(job)
        try:
            verdict = Verdict.model_validate(status["verdict"])
        except ValidationError:
            continue
        if request is None:
            continue
        when = parse_time(status.get("completedAt")) or dt.datetime.now(dt.UTC)
        for entry in pol.plan([enforced], request, verdict, uid=request.uid, now=when, rules=rules):
            would = entry.result == "Pending"
            rows.append({"job": meta["name"], "verdict": f"{verdict.classification} {verdict.confidence:.2f}",
                         "action": entry.action + (f" {entry.target}" if entry.target else ""),
                         "would": "yes" if would else "no",
                         "detail": (entry.message or "").removeprefix("silence ").removeprefix("notify ")})
    return rows


async def policy_test(args: argparse.Namespace) -> int:
    from kubetriage.infra.kube import ApiError, triagejob_path, triagerule_path

    name, policy_ns, spec = parse_policy(load_file(args.file), args.file)
    kube = kube_client()
    try:
        ns = args.namespace or policy_ns or kube.default_namespace
        try:
            jobs = await list_all(kube, triagejob_path(ns))
        except ApiError as exc:
            raise api_error(exc, "triagejobs", ns) from None
        try:
            rule_items = await list_all(kube, triagerule_path(ns))
        except ApiError as exc:
            if exc.status != 404:  # no TriageRule CRD: no rules
                raise api_error(exc, "triagerules", ns) from None
            rule_items = []
    finally:
        await kube.close()
    rules = []
    for item in rule_items:
        try:
            rules.append(TeamRule(name=item["metadata"]["name"], spec=TriageRuleSpec.model_validate(item["spec"])))
        except (ValidationError, KeyError):
            continue
    rows = replay(pol.Policy(ns, name, spec), jobs, rules)
    acting = [r for r in rows if r["would"] == "yes"]
    summary = {"policy": name, "namespace": ns, "mode": spec.mode, "jobs": len(jobs), "actions": len(acting),
               "refused": len(rows) - len(acting), "rows": rows}
    if args.output in ("json", "yaml"):
        emit(summary, args.output)
        return EXIT_OK
    print(f"TriagePolicy {name} in namespace {ns} ({spec.mode}), enforced on the {len(jobs)} TriageJobs recorded "
          f"there: {len(acting)} action(s), {len(rows) - len(acting)} refused. Nothing was written or sent.")
    if rows:
        print(table(["JOB", "VERDICT", "ACTION", "WOULD", "DETAIL"],
                    [[r["job"], r["verdict"], r["action"], r["would"], one_line(r["detail"], 90)] for r in rows]))
    return EXIT_OK
