"""``kubetriage rule test FILE``: what a TriageRule would have changed, before anyone applies it.

It reads the rule from the file, lists the finished TriageJobs of the rule's namespace, and replays the
rule on each recorded verdict through the same matching and safety policy the workers apply. Nothing
is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kubetriage.analyzers.team_rules import Replayed, regex_problem, replay
from kubetriage.api.contract import AnalysisRequest, TeamRule
from kubetriage.api.models import FINISHED_PHASES, TriageJobSpec, TriageRuleSpec, Verdict
from kubetriage.api.timeutil import parse_time
from kubetriage.cli.common import EXIT_OK, EXIT_USAGE, CliError, api_error, kube_client, list_all, load_file
from kubetriage.cli.output import emit, one_line, table

M = TypeVar("M", bound=BaseModel)


def parse_manifest(doc: Any, path: str, kind: str, model: type[M]) -> tuple[str, str | None, M]:
    """(name, namespace, spec) from a TriageRule or TriagePolicy manifest; a usage error naming the field."""
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise CliError(f"{path}: expected a {kind} manifest (kind: {kind})", EXIT_USAGE)
    meta = doc.get("metadata") or {}
    name = str(meta.get("name") or "")
    if not name:
        raise CliError(f"{path}: metadata.name is required", EXIT_USAGE)
    try:
        spec = model.model_validate(doc.get("spec") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CliError(f"{path}: spec.{where}: {first['msg']}", EXIT_USAGE) from None
    regex = spec.match.error_regex  # type: ignore[attr-defined]  # both kinds select with a RuleMatch
    if regex is not None and (problem := regex_problem(regex)):
        raise CliError(f"{path}: spec.match.{problem}", EXIT_USAGE)
    return name, meta.get("namespace"), spec


def parse_rule(doc: Any, path: str) -> tuple[str, str | None, TeamRule]:
    """(name, namespace, rule) from a TriageRule manifest."""
    name, namespace, spec = parse_manifest(doc, path, "TriageRule", TriageRuleSpec)
    return name, namespace, TeamRule(name=name, spec=spec)


def request_of(job: dict[str, Any]) -> AnalysisRequest | None:
    meta = job["metadata"]
    try:
        spec = TriageJobSpec.model_validate(job.get("spec") or {})
    except ValidationError:
        return None
    return AnalysisRequest(uid=meta.get("uid", ""), name=meta["name"], namespace=meta.get("namespace", ""),
                           source=spec.source, alert=spec.alert, script_result=spec.script_result)


def replay_jobs(rule: TeamRule, jobs: list[dict[str, Any]]) -> list[Replayed]:
    out = []
    for job in jobs:
        status = job.get("status") or {}
        if status.get("phase") not in FINISHED_PHASES or not status.get("verdict"):
            continue
        request = request_of(job)
        if request is None:
            continue
        when = parse_time(status.get("completedAt") or job["metadata"].get("creationTimestamp")) \
            or dt.datetime.now(dt.UTC)
        found = replay(rule, request, Verdict.model_validate(status["verdict"]), when)
        if found is not None:
            out.append(found)
    return out


async def rule_test(args: argparse.Namespace) -> int:
    from kubetriage.infra.kube import ApiError, triagejob_path

    name, rule_ns, rule = parse_rule(load_file(args.file), args.file)
    kube = kube_client()
    try:
        ns = args.namespace or rule_ns or kube.default_namespace
        try:
            jobs = await list_all(kube, triagejob_path(ns))
        except ApiError as exc:
            raise api_error(exc, "triagejobs", ns) from None
    finally:
        await kube.close()
    results = replay_jobs(rule, jobs)
    changed = [r for r in results if r.changed]
    summary = {"rule": name, "namespace": ns, "jobs": len(jobs), "matched": len(results), "changed": len(changed),
               "changes": [{"job": r.job, "recorded": r.recorded, "withRule": r.with_rule, "note": r.note}
                           for r in (results if args.all else changed)]}
    if args.output in ("json", "yaml"):
        emit(summary, args.output)
        return EXIT_OK
    print(f"TriageRule {name} in namespace {ns}: matches {len(results)} of {len(jobs)} TriageJobs; "
          f"would change {len(changed)} recorded verdict(s). Nothing was written.")
    shown = results if args.all else changed
    if shown:
        print(table(["JOB", "RECORDED", "WITH RULE", "NOTE"],
                    [[r.job, r.recorded, r.with_rule, one_line(r.note, 80)] for r in shown]))
    return EXIT_OK
