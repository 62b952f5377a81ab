"""History evidence, read by the operator at admission from the database it writes (workers have none).

For an alert: how often the same target identity (``AnalysisRequest.identity``: the namespace, the alert
name and the pool's identity labels) was analysed in the last ``ALERT_WINDOW``, and how humans judged
it (every human verdict on a job of that identity). Only verdicts recorded with an identity count, so
history starts with the first verdicts this version records.

For a script result: the same script's runs at the job's commit, and its recent runs on the default
branch (``KUBETRIAGE_HISTORY_DEFAULT_BRANCHES``), from the team's ``script_results`` table when it has
a commit or branch column.

Best effort and bounded: a slow or failing database costs the job its history (an ``Evidence`` with
the error, so the verdict says so), never its admission.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from kubetriage.api.evidence import HISTORY, AlertHistory, Evidence, ScriptHistory
from kubetriage.api.models import TriageJobSpec
from kubetriage.api.timeutil import now
from kubetriage.controller.runtime import Runtime

log = logging.getLogger("kubetriage.controller.history")

ALERT_WINDOW = dt.timedelta(days=7)
TIMEOUT_SECONDS = 2.0


async def gather(rt: Runtime, spec: TriageJobSpec, identity: str | None) -> list[Evidence]:
    """The job's history evidence: one item, none when there is nothing to look up, or the error."""
    try:
        return await asyncio.wait_for(_gather(rt, spec, identity), timeout=TIMEOUT_SECONDS)
    except TimeoutError:
        return [Evidence(source=HISTORY, error=f"the database did not answer within {TIMEOUT_SECONDS:g}s")]
    except Exception as exc:  # no history is no reason to hold a job back
        log.info("no history for the job: %s", exc)
        return [Evidence(source=HISTORY, error=f"the database could not be read: {exc}"[:512])]


async def _gather(rt: Runtime, spec: TriageJobSpec, identity: str | None) -> list[Evidence]:
    if spec.alert is not None and identity:
        counts = await rt.sink.alert_history(identity, now() - ALERT_WINDOW)
        view = AlertHistory(fired_7d=counts.fired, human_false_positive=counts.human_false_positive,
                            human_valid=counts.human_valid)
        return [Evidence(source=HISTORY, value=view.model_dump())]
    sr = spec.script_result
    if sr is not None and not sr.success:
        runs = await rt.sink.script_runs(sr.script_name, sr.commit, rt.settings.default_branches,
                                         exclude_id=spec.source.id)
        if runs is None:
            return []  # the team's table says nothing about commits or branches
        view_runs = ScriptHistory(same_commit_runs=runs.same_commit_runs, same_commit_passes=runs.same_commit_passes,
                                  default_branch_runs=runs.default_branch_runs,
                                  default_branch_failures=runs.default_branch_failures)
        return [Evidence(source=HISTORY, value=view_runs.model_dump())]
    return []
