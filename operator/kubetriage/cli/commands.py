"""The user-facing commands of ``kubetriage``: submit, get, describe, verdict set, queue, rule/policy test.

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
from typing import Any

from kubetriage.api.models import Classification
from kubetriage.cli.common import EPILOG, add_namespace, add_output, add_submit_options, run_async
from kubetriage.cli.policies import policy_test
from kubetriage.cli.query import describe, get, queue
from kubetriage.cli.submit import submit_alert, submit_junit, submit_script
from kubetriage.cli.verdict import verdict_set


async def _rule_test(args: argparse.Namespace) -> int:
    from kubetriage.cli.rules import rule_test  # loads the analyzers: only for this command

    return await rule_test(args)


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
    add_submit_options(alert)
    alert.set_defaults(func=run_async(submit_alert))

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
    add_submit_options(script)
    script.set_defaults(func=run_async(submit_script))

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
    add_submit_options(ju)
    ju.set_defaults(func=run_async(submit_junit))

    g = sub.add_parser("get", help="list TriageJobs with their verdicts and reasons", epilog=EPILOG,
                       description="Like 'kubectl get tj', plus who decided (analyzer or user:<name>) and why. "
                                   "A human verdict (kubetriage verdict set) is shown over the analyzer's.")
    g.add_argument("names", nargs="*", help="job names (default: all)")
    add_namespace(g, all_namespaces=True)
    g.add_argument("-l", "--selector", help="label selector, e.g. kubetriage.io/alert-status=resolved")
    add_output(g, ("table", "wide", "json", "yaml", "name"))
    g.set_defaults(func=run_async(get))

    d = sub.add_parser("describe", help="one TriageJob's verdict, reason and evidence in full", epilog=EPILOG,
                       description="Like 'kubectl describe tj', reduced to what was decided, by whom, why, and "
                                   "the evidence it rested on (Prometheus, Alertmanager, history).")
    d.add_argument("names", nargs="+", help="job names")
    add_namespace(d)
    d.set_defaults(func=run_async(describe), all_namespaces=False, selector=None, output="describe")

    v = sub.add_parser("verdict", help="human verdicts", epilog=EPILOG)
    vsub = v.add_subparsers(dest="verdict_command", required=True, metavar="{set}")
    vs = vsub.add_parser(
        "set", help="override a job's verdict", epilog=EPILOG,
        description="Record a human verdict on a TriageJob (annotations kubetriage.io/verdict, -reason, -by, -at). "
                    "The operator records it with check_type 'user', which analyses never overwrite.")
    vs.add_argument("name", help="TriageJob name")
    vs.add_argument("classification", choices=[Classification.VALID.value, Classification.FALSE_POSITIVE.value])
    vs.add_argument("--reason", required=True, help="why (kept with the verdict; the memory analyzer learns from it)")
    vs.add_argument("--by", help="who decides (default: your authenticated Kubernetes user name; with the "
                                 "chart's verdict policy on, no other name is accepted)")
    add_namespace(vs)
    add_output(vs, ("table", "json", "yaml"))
    vs.set_defaults(func=run_async(verdict_set))

    q = sub.add_parser("queue", help="backlog, running jobs and oldest wait per pool", epilog=EPILOG,
                       description="Per TriagePool: replicas, running and backlog (from the pool's status) and the "
                                   "oldest queued job's wait (from the TriageJobs in the same namespace(s)).")
    add_namespace(q, all_namespaces=True)
    add_output(q, ("table", "json", "yaml"))
    q.set_defaults(func=run_async(queue))

    r = sub.add_parser("rule", help="TriageRules: test one against the recorded verdicts", epilog=EPILOG)
    rsub = r.add_subparsers(dest="rule_command", required=True, metavar="{test}")
    rt = rsub.add_parser(
        "test", help="replay a TriageRule file against recorded verdicts; writes nothing", epilog=EPILOG,
        description="Show which recorded verdicts a TriageRule would have changed, before you apply it. The "
                    "rule is matched and passed through the same safety policy the workers apply; human "
                    "verdicts never change.")
    rt.add_argument("file", help="the TriageRule manifest (YAML/JSON; - = stdin)")
    add_namespace(rt)
    rt.add_argument("--all", action="store_true", help="also list matched jobs whose verdict would not change")
    add_output(rt, ("table", "json", "yaml"))
    rt.set_defaults(func=run_async(_rule_test))

    pol = sub.add_parser("policy", help="TriagePolicies: test one against the recorded verdicts", epilog=EPILOG)
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="{test}")
    pt = psub.add_parser(
        "test", help="replay a TriagePolicy file against recorded verdicts; writes and sends nothing",
        epilog=EPILOG,
        description="Show what a TriagePolicy would have done, enforced, with the verdicts recorded in its "
                    "namespace: the silences it would make (exact matchers), those it must not (a neverDiscard "
                    "TriageRule, no target), and the notifications it would send.")
    pt.add_argument("file", help="the TriagePolicy manifest (YAML/JSON; - = stdin)")
    add_namespace(pt)
    add_output(pt, ("table", "json", "yaml"))
    pt.set_defaults(func=run_async(policy_test))
