"""Status writes are built from the pydantic status model: what reaches the API server, exactly.

The end-to-end behaviour (two status PATCHes per job, conditions, recorded) is
proved against the real API server in test_pipeline, test_faults and
test_overrides; this pins the three rules of the patch that those runs cannot
tell apart from luck: a None clears, nested defaults stay, times keep their
microseconds.
"""

from __future__ import annotations

import datetime as dt

from kubetriage.api.models import CheckType, Phase, TriageJobStatus, verdict_from_classification
from kubetriage.controller.status import merge_patch, triaged, verdict_conditions


def test_only_the_fields_set_are_sent_and_none_clears() -> None:
    patch = merge_patch(TriageJobStatus(phase=Phase.QUEUED, attempts=0, message=None))
    assert patch == {"phase": "Queued", "attempts": 0, "message": None}  # merge patch: null deletes the message


def test_a_verdict_keeps_its_defaults() -> None:
    verdict = verdict_from_classification("valid", "the product is broken", 0.9, "rules")
    patch = merge_patch(TriageJobStatus(verdict=verdict, recorded=False))
    assert patch["verdict"]["checkType"] == "ai" and "model" not in patch["verdict"]
    assert patch["recorded"] is False


def test_times_always_carry_microseconds() -> None:
    on_the_second = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    patch = merge_patch(TriageJobStatus(queued_at=on_the_second))
    assert patch == {"queuedAt": "2026-01-02T03:04:05.000000Z"}  # compared as strings: one width for all


def test_conditions_say_who_decided_and_whether_it_is_recorded() -> None:
    human = verdict_from_classification("false_positive", "known flaky (by alice)", 1.0, "human",
                                        check_type=CheckType.USER)
    triaged_, recorded = merge_patch(TriageJobStatus(conditions=verdict_conditions(human, False, 3)))["conditions"]
    assert (triaged_["type"], triaged_["status"], triaged_["reason"]) == ("Triaged", "True", "HumanVerdict")
    assert (recorded["type"], recorded["status"], recorded["reason"]) == ("Recorded", "False", "DatabaseUnavailable")
    assert triaged_["observedGeneration"] == 3
    assert triaged_["lastTransitionTime"].endswith("Z") and "." not in triaged_["lastTransitionTime"]
    [waiting] = merge_patch(TriageJobStatus(conditions=triaged(False, "Queued", "x" * 5000)))["conditions"]
    assert waiting["status"] == "False" and len(waiting["message"]) == 1024
