"""Dedup on the real operator: a fingerprint folds jobs together only within a namespace, a source type and
a target, so a caller-chosen fingerprint can never turn a production alert into a Duplicate that inherits
a script result's (or another target's) false_positive."""

from __future__ import annotations

import pytest

from tests.pipeline import Pipeline, alert_spec, script_spec

pytestmark = pytest.mark.cluster


async def test_a_shared_fingerprint_does_not_cross_source_types_or_targets(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=2)
    p.start_operator()
    shared = {"fingerprint": "caller-chosen-1"}
    # A flaky script result that becomes false_positive (failed, then passed again, on the same commit).
    flaky = script_spec("login.spec.ts", "Error: page crashed", commit="abc1234", source=shared,
                        history=[{"success": False, "commit": "abc1234"}, {"success": True, "commit": "abc1234"}])
    await p.job("script-first", flaky)
    done = await p.wait_terminal(["script-first"])
    assert done["script-first"]["status"]["verdict"]["classification"] == "false_positive"
    # Later, a production alert arrives with the same fingerprint: it must be analysed on its own.
    outage = alert_spec("PaymentsDown", severity="critical", consecutiveCount=9, source=shared,
                        labels={"service": "payments", "instance": "pay-1:8080"})
    await p.job("alert-later", outage)
    # And the same alert name and fingerprint on another instance is another target.
    other = alert_spec("PaymentsDown", severity="critical", consecutiveCount=9, source=shared,
                       labels={"service": "payments", "instance": "pay-2:8080"})
    await p.job("alert-other-target", other)
    jobs = await p.wait_terminal(["alert-later", "alert-other-target"])
    for name in ("alert-later", "alert-other-target"):
        status = jobs[name]["status"]
        assert status["phase"] == "Succeeded", (name, status)
        assert "duplicateOf" not in status
        assert status["verdict"]["classification"] != "false_positive"
    # The same alert on the same target inside the window is still a duplicate of its first copy.
    await p.job("alert-again", outage)
    again = await p.wait_terminal(["alert-again"])
    assert again["alert-again"]["status"]["phase"] == "Duplicate"
    assert again["alert-again"]["status"]["duplicateOf"] == "alert-later"
