"""Dedup scope: a fingerprint only folds jobs of the same namespace, source type and target together."""

from __future__ import annotations

from kubetriage.api.contract import DEFAULT_IDENTITY_LABELS
from kubetriage.api.fingerprint import dedup_scope, derive

ALERT = {"source": {"type": "alert", "fingerprint": "shared"},
         "alert": {"name": "Payments503Errors", "labels": {"namespace": "pay", "service": "payments",
                                                           "instance": "10.0.0.1:9090", "flaps": "3"}}}
SCRIPT = {"source": {"type": "scriptResult", "fingerprint": "shared"},
          "scriptResult": {"scriptName": "login.spec.ts", "testCase": "logs in", "success": False}}


def scope(spec: dict, ns: str = "prod") -> str:
    return dedup_scope(ns, spec, DEFAULT_IDENTITY_LABELS)


def test_a_caller_fingerprint_never_crosses_source_types_or_namespaces() -> None:
    assert derive(ALERT) == derive(SCRIPT) == "shared"  # the caller chose the same fingerprint
    assert scope(ALERT) != scope(SCRIPT)
    assert scope(ALERT, "prod") != scope(ALERT, "staging")
    assert scope(ALERT).startswith("prod:alert:") and scope(SCRIPT).startswith("prod:scriptResult:")


def test_the_same_fingerprint_on_another_target_is_another_scope() -> None:
    other = {**ALERT, "alert": {**ALERT["alert"], "labels": {**ALERT["alert"]["labels"], "instance": "10.0.0.2:9090"}}}
    assert scope(other) != scope(ALERT)
    renamed = {**ALERT, "alert": {**ALERT["alert"], "name": "Ingress502BadGateway"}}
    assert scope(renamed) != scope(ALERT)
    # Labels that are not identity (a flap count) do not split the scope.
    flapped = {**ALERT, "alert": {**ALERT["alert"], "labels": {**ALERT["alert"]["labels"], "flaps": "9"}}}
    assert scope(flapped) == scope(ALERT)


def test_scripts_are_scoped_by_script_and_test_case() -> None:
    other_case = {**SCRIPT, "scriptResult": {**SCRIPT["scriptResult"], "testCase": "logs out"}}
    assert scope(other_case) != scope(SCRIPT)
    assert scope(dict(SCRIPT)) == scope(SCRIPT)


def test_the_pool_chooses_the_identity_labels() -> None:
    other = {**ALERT, "alert": {**ALERT["alert"], "labels": {**ALERT["alert"]["labels"], "instance": "10.0.0.2:9090"}}}
    assert dedup_scope("prod", other, ("namespace", "service")) == dedup_scope("prod", ALERT, ("namespace", "service"))
