"""History evidence: the audit table's identity and evidence columns, the two history questions, on both
engines; then the operator putting history into a job's payload and its verdict's status.

The sink tests reuse test_sinks.py's ``db`` fixture (a SQLite file and a fresh PostgreSQL database per test)
and read back with their own plain connection. The pipeline tests run the real operator and workers.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kubetriage.api.models import EvidenceItem, SourceType
from kubetriage.infra.sinks import (
    _PG_AUDIT_DDL,
    _SQLITE_AUDIT_DDL,
    MAX_EVIDENCE_BYTES,
    AlertCounts,
    RunCounts,
    Sink,
    VerdictRecord,
    open_sink,
)
from tests.pipeline import Pipeline, alert_spec, script_spec
from tests.test_sinks import Db, verdict
from tests.test_sinks import db as engine  # noqa: F401  (the fixture: a SQLite file, then a PostgreSQL database)

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def database(engine: Db) -> Db:  # noqa: F811  (the imported fixture, requested by name)
    return engine


@pytest.fixture
async def store(database: Db) -> AsyncIterator[Sink]:
    s = open_sink(database.url)
    try:
        yield s
    finally:
        await s.close()


def rec(uid: str, identity: str | None, *, check: str = "ai", classification: str = "false_positive",
        at: dt.datetime = NOW, evidence: list[EvidenceItem] | None = None) -> VerdictRecord:
    v = verdict(classification).model_copy(update={"check_type": check})
    return VerdictRecord(job_uid=uid, job_name=f"job-{uid}", namespace="team-a", source_type=SourceType.ALERT,
                         verdict=v, recorded_at=at, identity=identity, evidence=evidence or [])


# --------------------------------------------------------------------------- the audit columns


async def test_identity_and_evidence_are_recorded(database: Db, store: Sink) -> None:
    items = [EvidenceItem(source="prometheus", summary="not firing now, recovered on its own after 28s",
                          value="recovered"),
             EvidenceItem(source="alertmanager", summary="unavailable: Alertmanager did not answer within 5s",
                          value="error")]
    await store.setup()
    await store.record(rec("u1", "team-a:alert:abc", evidence=items))
    await store.record(rec("u2", None))
    rows = dict(database.sql("SELECT job_uid, evidence FROM triage_verdicts"))
    assert [EvidenceItem.model_validate(e) for e in json.loads(rows["u1"])] == items
    assert rows["u2"] is None
    assert database.sql("SELECT identity FROM triage_verdicts WHERE job_uid = ?", ("u1",)) == [("team-a:alert:abc",)]


async def test_huge_evidence_is_cut_by_items_and_still_parses(database: Db, store: Sink) -> None:
    items = [EvidenceItem(source=f"s{i}", summary="\u00e9" * 500, value="v" * 200) for i in range(16)]
    await store.setup()
    await store.record(rec("u1", "x", evidence=items))
    (text,) = database.sql("SELECT evidence FROM triage_verdicts")[0]
    kept = json.loads(text)
    assert 0 < len(kept) < len(items) and len(text.encode()) <= MAX_EVIDENCE_BYTES
    assert kept[0]["source"] == "s0"


async def test_an_older_audit_table_gains_the_new_columns_and_keeps_its_rows(database: Db) -> None:
    old = (_SQLITE_AUDIT_DDL if database.kind == "sqlite" else _PG_AUDIT_DDL).replace(
        "    identity TEXT,\n    evidence TEXT,\n", "")
    assert "identity" not in old
    database.sql(old)
    database.sql("INSERT INTO triage_verdicts (job_uid, job_name, namespace, source_type, check_type, classification, "
           "discard, attempts, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
           ("old", "old-job", "team-a", "alert", "ai", "valid", False, 1, "2025-01-01T00:00:00.000000Z"))
    s = open_sink(database.url)
    try:
        await s.setup()
        await s.setup()  # a second replica, or a restart: nothing to add any more
        assert {"identity", "evidence"} <= database.columns("triage_verdicts")
        await s.record(rec("new", "team-a:alert:abc", evidence=[EvidenceItem(source="history", summary="x")]))
        assert sorted(r[0] for r in database.sql("SELECT job_uid FROM triage_verdicts")) == ["new", "old"]
        assert await s.alert_history("team-a:alert:abc", NOW - dt.timedelta(days=7)) == AlertCounts(1, 0, 0)
    finally:
        await s.close()


# --------------------------------------------------------------------------- alert history


async def test_alert_history_counts_one_identity_and_how_humans_judged_it(database: Db, store: Sink) -> None:
    me, other = "team-a:alert:me", "team-a:alert:other"
    await store.setup()
    await store.record_many([
        rec("a1", me), rec("a2", me), rec("a3", me, at=NOW - dt.timedelta(days=8)),  # too old to count as fired
        rec("b1", other), rec("b2", other),
    ])
    # humans judged a2 and a3 (their rows carry no identity: they are found through the job)
    await store.record(rec("a2", None, check="user", classification="valid", at=NOW + dt.timedelta(seconds=1)))
    await store.record(rec("a3", None, check="user", classification="false_positive"))
    await store.record(rec("b1", None, check="user", classification="false_positive"))
    since = NOW - dt.timedelta(days=7)
    assert await store.alert_history(me, since) == AlertCounts(fired=2, human_false_positive=1, human_valid=1)
    assert await store.alert_history(other, since) == AlertCounts(2, 1, 0)
    assert await store.alert_history("team-b:alert:me", since) == AlertCounts(0, 0, 0)


# --------------------------------------------------------------------------- script runs


def _runs_table(db: Db, commit_col: str = '"commit"', branch: bool = True) -> None:
    branch_col = ", branch TEXT" if branch else ""
    db.sql(f"CREATE TABLE script_results (id INTEGER PRIMARY KEY, script_name TEXT, success BOOLEAN, "
           f"{commit_col} TEXT{branch_col}, created_at TEXT)")


def _run(db: Db, rid: int, ok: bool, commit: str, branch: str | None = "main", script: str = "checkout-e2e",
         commit_col: str = '"commit"') -> None:
    if branch is None:
        db.sql(f"INSERT INTO script_results (id, script_name, success, {commit_col}, created_at) VALUES "
               "(?, ?, ?, ?, ?)", (rid, script, ok, commit, f"2026-01-01T00:00:{rid:02d}Z"))
        return
    db.sql(f"INSERT INTO script_results (id, script_name, success, {commit_col}, branch, created_at) VALUES "
           "(?, ?, ?, ?, ?, ?)", (rid, script, ok, commit, branch, f"2026-01-01T00:00:{rid:02d}Z"))


async def test_script_runs_at_the_same_commit_and_on_the_default_branch(database: Db, store: Sink) -> None:
    _runs_table(database)
    for rid, ok, commit, branch in [(1, True, "abc", "feature"), (2, False, "abc", "feature"),
                                    (3, False, "abc", "feature"),  # the job's own row
                                    (4, True, "old", "main"), (5, True, "old", "main"), (6, False, "old2", "master"),
                                    (7, True, "x", "release")]:
        _run(database, rid, ok, commit, branch)
    _run(database, 8, False, "abc", "feature", script="other-test")
    got = await store.script_runs("checkout-e2e", "abc", ["main", "master"], exclude_id="3")
    assert got == RunCounts(same_commit_runs=2, same_commit_passes=1, default_branch_runs=3,
                            default_branch_failures=1)
    assert await store.script_runs("checkout-e2e", None, ["main"]) == RunCounts(0, 0, 2, 0)


async def test_script_runs_need_a_commit_or_branch_column(database: Db, store: Sink) -> None:
    assert await store.script_runs("checkout-e2e", "abc", ["main"]) is None  # no table at all
    database.sql("CREATE TABLE script_results (id INTEGER PRIMARY KEY, script_name TEXT, success BOOLEAN)")
    assert await store.script_runs("checkout-e2e", "abc", ["main"]) is None


async def test_a_commit_sha_column_without_branches(database: Db, store: Sink) -> None:
    _runs_table(database, commit_col="commit_sha", branch=False)
    for rid, ok in [(1, True), (2, True), (3, False)]:
        _run(database, rid, ok, "abc", None, commit_col="commit_sha")
    assert await store.script_runs("checkout-e2e", "abc", ["main"]) == RunCounts(3, 2, 0, 0)


# --------------------------------------------------------------------------- the operator at admission


def _annotate(p: Pipeline, name: str, *pairs: str) -> None:
    p.cluster.kubectl("annotate", "--overwrite", "tj", name, "-n", p.ns, *pairs)


def _evidence(job: dict[str, Any], source: str) -> dict[str, Any]:
    (found,) = [e for e in job["status"].get("evidence") or [] if e["source"] == source]
    return found


@pytest.mark.cluster
async def test_an_alerts_history_reaches_the_worker_and_its_verdict(pipeline: Pipeline) -> None:
    p = pipeline
    await p.pool("default", concurrency=2)
    p.start_operator(dedup_window_seconds=0)  # the second firing is analysed, not folded into the first
    labels = {"instance": "db-1:9100", "job": "node"}
    await p.job("first", alert_spec("DiskFull", severity="warning", labels=labels))
    first = (await p.wait_terminal(["first"]))["first"]
    assert _evidence(first, "history")["summary"].startswith("fired 0 time(s) in 7 days")
    _annotate(p, "first", "kubetriage.io/verdict=valid", "kubetriage.io/verdict-reason=the disk really filled up",
              "kubetriage.io/verdict-by=alice")
    await p.wait(lambda: len(p.audit_rows()) == 2, "the human verdict in the audit table")
    # another firing of the same target, and one of another target (another instance)
    await p.job("again", alert_spec("DiskFull", severity="warning", labels=labels))
    await p.job("elsewhere", alert_spec("DiskFull", severity="warning", labels={**labels, "instance": "db-2:9100"}))
    jobs = await p.wait_terminal(["again", "elsewhere"])
    again = _evidence(jobs["again"], "history")
    assert again["summary"] == "fired 1 time(s) in 7 days; humans called it false_positive 0, valid 1 time(s)"
    assert _evidence(jobs["elsewhere"], "history")["summary"].startswith("fired 0 time(s)")
    assert jobs["again"]["status"]["verdict"]["classification"] == "valid"
    rows = {r["job_name"]: r for r in p.audit_rows() if r["check_type"] == "ai"}
    assert rows["first"]["identity"] == rows["again"]["identity"] != rows["elsewhere"]["identity"]


@pytest.mark.cluster
async def test_a_scripts_runs_at_its_commit_reach_the_worker(pipeline: Pipeline, tmp_path: Path) -> None:
    p = pipeline
    path = p.database_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE script_results (id INTEGER PRIMARY KEY, script_name TEXT, success BOOLEAN, '
                 '"commit" TEXT, branch TEXT, created_at TEXT)')
    conn.executemany("INSERT INTO script_results VALUES (?, ?, ?, ?, ?, ?)", [
        (1, "checkout-e2e", 1, "3f9c2ab", "feature/x", "2026-01-01T00:00:01Z"),
        (2, "checkout-e2e", 0, "3f9c2ab", "feature/x", "2026-01-01T00:00:02Z"),
        (3, "checkout-e2e", 1, "1111111", "main", "2026-01-01T00:00:03Z"),
        (4, "checkout-e2e", 0, "3f9c2ab", "feature/x", "2026-01-01T00:00:04Z"),  # the job's own run
    ])
    conn.commit()
    conn.close()
    await p.pool("default", concurrency=2)
    p.start_operator()
    await p.job("run4", script_spec("checkout-e2e", "AssertionError: expected 3 items, got 2", commit="3f9c2ab",
                                    source={"id": "4"}))
    job = (await p.wait_terminal(["run4"]))["run4"]
    history = _evidence(job, "history")
    assert history["summary"] == ("same commit: 1 of 2 run(s) passed; default branch: 0 of 1 run(s) failed")
    assert history["value"] == "1/2 passed"
