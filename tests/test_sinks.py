"""The database sink against real databases: a SQLite file and the session's PostgreSQL server.

Every behavioural test runs on both engines (the ``db`` fixture is
parametrised); each PostgreSQL test gets a database of its own, created and
dropped around it, so tests cannot see each other's tables. What the sink wrote
is read back with a separate plain connection, never through the sink itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from devharness import devenv
from kubetriage.api.models import (
    MAX_REASON,
    Alert,
    CheckType,
    ScriptResult,
    Source,
    SourceType,
    Tokens,
    TriageJobSpec,
    Verdict,
    verdict_from_classification,
)
from kubetriage.api.summary import job_summary
from kubetriage.infra.sinks import (
    MAX_SUMMARY_BYTES,
    USER_COLUMNS,
    PostgresSink,
    Sink,
    SinkError,
    SqliteSink,
    VerdictRecord,
    open_sink,
)

FIVE = {name for name, _ in USER_COLUMNS}
T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@dataclass
class Db:
    """A database under test, inspected with its own plain connection ('?' placeholders on both engines)."""

    kind: str
    url: str
    path: Path | None = None

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            assert self.path is not None
            conn = sqlite3.connect(self.path)
            try:
                cur = conn.execute(query, tuple(params))
                rows = cur.fetchall() if cur.description else []
                conn.commit()
                return rows
            finally:
                conn.close()
        with psycopg.connect(self.url, autocommit=True) as pg:
            cur = pg.execute(query.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def columns(self, table: str) -> set[str]:
        if self.kind == "sqlite":
            return {row[1] for row in self.sql(f"PRAGMA table_info({table})")}
        return {r[0] for r in self.sql("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                       (table,))}

    def has_table(self, table: str) -> bool:
        return bool(self.columns(table))

    def audit(self, where: str = "1 = 1", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cols = ["job_uid", "check_type", "classification", "discard", "reason", "summary", "source_id",
                "prompt_tokens", "completion_tokens", "cost_usd", "model", "attempts", "pool", "priority_class",
                "job_name", "namespace", "recorded_at"]
        rows = self.sql(f"SELECT {', '.join(cols)} FROM triage_verdicts WHERE {where} ORDER BY id", params)
        return [dict(zip(cols, row, strict=True)) for row in rows]

    def user_row(self, table: str, row_id: Any) -> dict[str, Any]:
        cols = sorted(FIVE)
        rows = self.sql(f"SELECT {', '.join(cols)} FROM {table} WHERE id = ?", (row_id,))
        assert len(rows) == 1, f"{table} row {row_id!r}: {rows}"
        out = dict(zip(cols, rows[0], strict=True))
        for key in ("checked", "discard"):
            out[key] = None if out[key] is None else bool(out[key])  # SQLite says 0/1, PostgreSQL says False/True
        return out


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        path = tmp_path / "triage.db"
        yield Db("sqlite", f"sqlite:///{path}", path)  # an absolute path: sqlite:////tmp/...
        return
    server: devenv.Postgres = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield Db("postgres", f"postgresql://kubetriage@127.0.0.1:{server.port}/{name}")
    finally:
        with psycopg.connect(server.url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
async def sink(db: Db) -> AsyncIterator[Sink]:
    s = open_sink(db.url)
    try:
        yield s
    finally:
        await s.close()


def verdict(classification: str = "false_positive", reason: str = "flapping disk alert", **extra: Any) -> Verdict:
    return verdict_from_classification(
        classification, reason, 0.9, "llm", model="test-model",
        tokens=Tokens(prompt=120, completion=30, total=150), cost_usd=0.0012, **extra,
    )


def record(
    uid: str = "uid-1",
    *,
    source_type: str = "alert",
    source_id: str | None = "1",
    v: Verdict | None = None,
    check_type: str = "ai",
    classification: str = "false_positive",
    reason: str = "flapping disk alert",
    at: dt.datetime = T0,
    summary: str | None = "DiskFull host=db1",
    job_name: str = "job-1",
) -> VerdictRecord:
    return VerdictRecord(
        job_uid=uid, job_name=job_name, namespace="team-a", source_type=source_type, source_id=source_id,
        fingerprint="fp-1", verdict=v or verdict(classification, reason, check_type=check_type), pool="default",
        priority_class="kubetriage-p1", attempts=2, summary=summary, recorded_at=at,
    )


def make_alerts(db: Db, *ids: Any, id_type: str = "INTEGER") -> None:
    """The team's alerts table as it was before kubetriage: none of the five columns."""
    db.sql(f"CREATE TABLE alerts (id {id_type} PRIMARY KEY, name TEXT)")
    for i in ids:
        db.sql("INSERT INTO alerts (id, name) VALUES (?, ?)", (i, f"alert {i}"))


def make_script_results(db: Db) -> None:
    """The team's script_results table as it was before kubetriage, with its creation time."""
    created = "TEXT DEFAULT CURRENT_TIMESTAMP" if db.kind == "sqlite" else "TIMESTAMPTZ DEFAULT now()"
    db.sql("CREATE TABLE script_results (id INTEGER PRIMARY KEY, script_name TEXT, success BOOLEAN, "
           f"error_msg TEXT, html_report_r2_url TEXT, created_at {created})")


# --------------------------------------------------------------------------- setup


async def test_setup_creates_audit_table_and_adds_five_columns_idempotently(db: Db, sink: Sink) -> None:
    # One of the five columns exists already, with data the setup must keep.
    db.sql("CREATE TABLE alerts (id INTEGER PRIMARY KEY, name TEXT, checked BOOLEAN DEFAULT FALSE)")
    db.sql("INSERT INTO alerts (id, name, checked) VALUES (?, ?, ?)", (1, "a", True))
    db.sql("CREATE TABLE script_results (id INTEGER PRIMARY KEY, script_name TEXT, success BOOLEAN, "
           "error_msg TEXT, html_report_r2_url TEXT)")
    db.sql("INSERT INTO script_results (id, script_name, success) VALUES (?, ?, ?)", (5, "login", False))

    await sink.setup()
    await sink.setup()
    await open_sink(db.url).setup()  # a second instance (another replica) is harmless too

    assert db.has_table("triage_verdicts")
    assert FIVE <= db.columns("alerts")
    assert FIVE <= db.columns("script_results")
    assert db.user_row("alerts", 1) == {"checked": True, "check_type": None, "discard": False,
                                        "discard_type": None, "discard_comment": None}
    assert db.user_row("script_results", 5)["discard"] is False  # DEFAULT FALSE reaches existing rows
    assert db.sql("SELECT name FROM alerts WHERE id = ?", (1,)) == [("a",)]


async def test_setup_does_not_create_the_users_tables(db: Db, sink: Sink) -> None:
    await sink.setup()
    assert db.has_table("triage_verdicts")
    assert not db.has_table("alerts")
    assert not db.has_table("script_results")


# --------------------------------------------------------------------------- record


async def test_record_inserts_audit_row_and_updates_source_row(db: Db, sink: Sink) -> None:
    make_alerts(db, 1, 2)
    await sink.setup()

    assert await sink.record(record()) is True

    [row] = db.audit()
    assert row["job_uid"] == "uid-1"
    assert row["check_type"] == "ai"
    assert row["classification"] == "false_positive"
    assert bool(row["discard"]) is True
    assert row["reason"] == "flapping disk alert"
    assert row["summary"] == "DiskFull host=db1"
    assert row["source_id"] == "1"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (120, 30)
    assert row["cost_usd"] == pytest.approx(0.0012)
    assert (row["model"], row["attempts"], row["pool"], row["priority_class"]) == (
        "test-model", 2, "default", "kubetriage-p1")
    assert db.user_row("alerts", 1) == {"checked": True, "check_type": "ai", "discard": True,
                                        "discard_type": "false_positive", "discard_comment": "flapping disk alert"}
    assert db.user_row("alerts", 2)["checked"] is False  # only the job's own row


async def test_script_result_verdict_updates_script_results(db: Db, sink: Sink) -> None:
    make_script_results(db)
    db.sql("INSERT INTO script_results (id, script_name, success, error_msg) VALUES (?, ?, ?, ?)",
           (3, "checkout", False, "timeout"))
    await sink.setup()
    rec = record("uid-s", source_type="scriptResult", source_id="3", classification="valid", reason="real bug")
    assert await sink.record(rec) is True
    assert db.user_row("script_results", 3) == {"checked": True, "check_type": "ai", "discard": False,
                                                "discard_type": "valid", "discard_comment": "real bug"}


async def test_retry_is_a_no_op_and_does_not_clobber_the_source_row(db: Db, sink: Sink) -> None:
    make_alerts(db, 1)
    await sink.setup()
    assert await sink.record(record()) is True
    # The team's tool edits the row between the crash and the retry; the retry carries a different answer.
    db.sql("UPDATE alerts SET discard_comment = ? WHERE id = ?", ("edited by the team", 1))

    assert await sink.record(record(classification="valid", reason="second opinion")) is False

    [row] = db.audit()
    assert (row["classification"], row["reason"]) == ("false_positive", "flapping disk alert")
    assert db.user_row("alerts", 1)["discard_comment"] == "edited by the team"


async def test_concurrent_records_of_one_job_write_one_row(db: Db, sink: Sink) -> None:
    make_alerts(db, 1)
    await sink.setup()
    # Several sink objects = several connections, so the database itself must arbitrate, not our lock.
    sinks = [sink, *(open_sink(db.url) for _ in range(3))]
    try:
        results = await asyncio.gather(*(sinks[i % 4].record(record()) for i in range(20)))
    finally:
        for extra in sinks[1:]:
            await extra.close()
    assert sorted(results) == [False] * 19 + [True]
    assert len(db.audit()) == 1
    assert db.user_row("alerts", 1)["check_type"] == "ai"


async def test_ai_verdict_never_overwrites_a_human_checked_row(db: Db, sink: Sink) -> None:
    make_alerts(db, 1)
    await sink.setup()
    db.sql("UPDATE alerts SET checked = ?, check_type = ?, discard = ?, discard_type = ?, discard_comment = ? "
           "WHERE id = ?", (True, "user", False, "valid", "the human says it is real", 1))
    human = db.user_row("alerts", 1)

    assert await sink.record(record(classification="false_positive")) is True

    assert db.user_row("alerts", 1) == human
    [row] = db.audit()
    assert (row["check_type"], row["classification"]) == ("ai", "false_positive")


async def test_user_verdict_overwrites_ai_and_is_upserted(db: Db, sink: Sink) -> None:
    make_alerts(db, 1)
    await sink.setup()
    assert await sink.record(record(classification="false_positive")) is True
    assert db.user_row("alerts", 1)["check_type"] == "ai"

    first = record(check_type="user", classification="valid", reason="real outage", at=T0 + dt.timedelta(hours=1))
    assert await sink.record(first) is True
    assert db.user_row("alerts", 1) == {"checked": True, "check_type": "user", "discard": False,
                                        "discard_type": "valid", "discard_comment": "real outage"}

    # The human changes their mind: same job, same check type, a later verdict.
    changed = record(check_type="user", classification="false_positive", reason="was a test",
                     at=T0 + dt.timedelta(hours=2), summary=None)
    assert await sink.record(changed) is False  # the row existed: updated, not inserted
    users = db.audit("check_type = ?", ("user",))
    assert len(users) == 1
    assert (users[0]["classification"], users[0]["reason"]) == ("false_positive", "was a test")
    assert users[0]["summary"] == "DiskFull host=db1"  # a verdict without text keeps the stored text
    assert db.user_row("alerts", 1)["discard_type"] == "false_positive"
    assert len(db.audit("check_type = ?", ("ai",))) == 1  # the AI's verdict stays in the audit trail

    # A late retry of the first human verdict must not undo the change of mind.
    assert await sink.record(first) is False
    assert db.audit("check_type = ?", ("user",))[0]["reason"] == "was a test"
    assert db.user_row("alerts", 1)["discard_comment"] == "was a test"

    # And a later AI verdict for the same job is audited but leaves the human's row alone.
    assert await sink.record(record(classification="valid", reason="ai again")) is False
    assert db.user_row("alerts", 1)["discard_comment"] == "was a test"


async def test_without_source_id_or_users_table_only_the_audit_row_is_written(db: Db, sink: Sink) -> None:
    make_alerts(db, 1)
    await sink.setup()
    assert await sink.record(record("no-id", source_id=None)) is True
    assert db.user_row("alerts", 1)["checked"] is False
    # script_results does not exist in this database
    assert await sink.record(record("no-table", source_type="scriptResult", source_id="1")) is True
    assert await sink.record(record("no-row", source_id="999")) is True
    # A text id against an integer id column is no match, not a type error the operator would retry forever.
    assert await sink.record(record("not-a-number", source_id="alert-abc")) is True
    assert [r["job_uid"] for r in db.audit()] == ["no-id", "no-table", "no-row", "not-a-number"]
    assert not db.has_table("script_results")
    assert db.user_row("alerts", 1)["checked"] is False


async def test_users_table_created_after_setup_gets_the_columns_on_first_record(db: Db, sink: Sink) -> None:
    await sink.setup()
    make_alerts(db, 1)
    assert await sink.record(record()) is True
    assert db.user_row("alerts", 1)["discard_type"] == "false_positive"


@pytest.mark.parametrize(("id_type", "row_id", "other_id"), [("INTEGER", 7, 70), ("TEXT", "run-7", "run-70")])
async def test_integer_and_text_ids(db: Db, sink: Sink, id_type: str, row_id: Any, other_id: Any) -> None:
    make_alerts(db, row_id, other_id, id_type=id_type)
    await sink.setup()
    assert await sink.record(record(source_id=str(row_id))) is True
    assert db.user_row("alerts", row_id)["check_type"] == "ai"
    assert db.user_row("alerts", other_id)["check_type"] is None


async def test_record_is_atomic_when_the_source_row_update_fails(db: Db, sink: Sink) -> None:
    # The team's table refuses our comment: the audit insert must roll back with it, so the retry redoes both.
    db.sql("CREATE TABLE alerts (id INTEGER PRIMARY KEY, name TEXT, discard_comment TEXT "
           "CHECK (length(discard_comment) < 5))")
    db.sql("INSERT INTO alerts (id, name) VALUES (?, ?)", (1, "a"))
    await sink.setup()
    with pytest.raises(SinkError) as err:
        await sink.record(record(reason="far too long"))
    assert "record of job uid-1" in str(err.value)
    assert db.audit() == []
    assert await sink.record(record("uid-2", reason="ok")) is True  # the sink is still usable
    assert db.user_row("alerts", 1)["discard_comment"] == "ok"


async def test_hostile_and_huge_text_is_stored_safely_and_capped(db: Db, sink: Sink) -> None:
    make_alerts(db, 1)
    await sink.setup()
    nasty = "it's \"quoted\" \\ back'; DROP TABLE alerts; --\x00after-nul 🚨 %s %(x)s ? :name"
    assert await sink.record(record("evil", reason=nasty, job_name="x'); DROP TABLE triage_verdicts; --",
                                    summary="label=\x00'; DELETE FROM alerts; --")) is True
    expected = nasty.replace("\x00", "")  # PostgreSQL text cannot hold NUL: the sink strips it on both engines
    [row] = db.audit()
    assert row["reason"] == expected
    assert row["summary"] == "label='; DELETE FROM alerts; --"
    assert row["job_name"] == "x'); DROP TABLE triage_verdicts; --"
    assert db.user_row("alerts", 1)["discard_comment"] == expected
    assert db.has_table("alerts")

    # 1 MB of text and a lone surrogate, past pydantic's own checks (model_copy does not validate).
    big = verdict().model_copy(update={"reason": "\ud800" + "x" * 1_000_000})
    huge = record("huge", v=big, summary="é" * 1_000_000)
    assert await sink.record(huge) is True
    [row] = db.audit("job_uid = ?", ("huge",))
    assert len(row["reason"]) == MAX_REASON
    assert row["reason"].startswith("?x")  # the unencodable surrogate became '?'
    assert len(row["summary"].encode()) <= MAX_SUMMARY_BYTES
    assert row["summary"] == "é" * (MAX_SUMMARY_BYTES // 2)  # cut on a character boundary
    assert len(db.user_row("alerts", 1)["discard_comment"]) == MAX_REASON


# --------------------------------------------------------------------------- reads


async def test_script_history_newest_first_from_the_users_table(db: Db, sink: Sink) -> None:
    assert await sink.script_history("login") == []  # no table at all
    make_script_results(db)
    rows = [(1, "login", True, T0), (2, "login", False, T0 + dt.timedelta(hours=2)),
            (3, "checkout", False, T0 + dt.timedelta(hours=3)), (4, "login", True, T0 + dt.timedelta(hours=1)),
            (5, "login", None, T0 + dt.timedelta(hours=4))]
    for rid, name, ok, at in rows:
        stamp = at.strftime("%Y-%m-%d %H:%M:%S") if db.kind == "sqlite" else at  # SQLite's CURRENT_TIMESTAMP form
        db.sql("INSERT INTO script_results (id, script_name, success, created_at) VALUES (?, ?, ?, ?)",
               (rid, name, ok, stamp))

    history = await sink.script_history("login")
    assert history == [(False, T0 + dt.timedelta(hours=2)), (True, T0 + dt.timedelta(hours=1)), (True, T0)]
    assert all(at is not None and at.tzinfo is not None for _, at in history)
    assert await sink.script_history("login", limit=1) == [(False, T0 + dt.timedelta(hours=2))]
    assert [ok for ok, _ in await sink.script_history("login", exclude_id="2")] == [True, True]
    assert await sink.script_history("'; DROP TABLE script_results; --") == []
    assert db.has_table("script_results")


async def test_script_history_without_timestamps_or_required_columns(db: Db, sink: Sink) -> None:
    db.sql("CREATE TABLE script_results (id INTEGER PRIMARY KEY, script_name TEXT)")
    assert await sink.script_history("login") == []  # no success column: nothing to learn from
    db.sql("DROP TABLE script_results")
    db.sql("CREATE TABLE script_results (id INTEGER PRIMARY KEY, script_name TEXT, success BOOLEAN)")
    for rid, ok in ((1, True), (2, False)):
        db.sql("INSERT INTO script_results (id, script_name, success) VALUES (?, ?, ?)", (rid, "login", ok))
    assert await sink.script_history("login") == [(False, None), (True, None)]  # by id, newest first


async def test_human_verdicts_returns_only_user_verdicts_newest_first(db: Db, sink: Sink) -> None:
    await sink.setup()
    await sink.record(record("a", check_type="ai"))
    await sink.record(record("b", check_type="user", classification="valid", reason="real",
                             summary="DiskFull host=db2", at=T0 + dt.timedelta(hours=1)))
    await sink.record(record("c", source_type="scriptResult", source_id="9", check_type="user",
                             classification="false_positive", reason="flaky", summary="login: timeout", at=T0))

    rows = await sink.human_verdicts()
    assert [r["job_uid"] for r in rows] == ["b", "c"]
    b, c = rows
    assert (b["source_type"], b["source_id"], b["classification"], b["reason"], b["summary"], b["discard"]) == (
        "alert", "1", "valid", "real", "DiskFull host=db2", False)
    assert (c["source_type"], c["source_id"], c["classification"], c["summary"], c["discard"]) == (
        "scriptResult", "9", "false_positive", "login: timeout", True)
    assert b["recorded_at"] == T0 + dt.timedelta(hours=1)
    assert [r["job_uid"] for r in await sink.human_verdicts(limit=1)] == ["b"]


# --------------------------------------------------------------------------- failures


async def test_postgres_down_raises_sink_error_then_the_same_sink_recovers(
    postgres_server: devenv.Postgres, tmp_path: Path
) -> None:
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db = Db("postgres", f"postgresql://kubetriage@127.0.0.1:{postgres_server.port}/{name}")
    make_alerts(db, 1, 2, 3)
    sink = open_sink(db.url)
    try:
        await sink.setup()
        assert await sink.record(record("before", source_id="1")) is True

        postgres_server.stop()
        try:
            with pytest.raises(SinkError) as err:
                await sink.record(record("during", source_id="2"))
            message = str(err.value)
            assert "PostgreSQL" in message
            assert f"127.0.0.1:{postgres_server.port}/{name}" in message
            assert "record of job during" in message
            with pytest.raises(SinkError):
                await sink.human_verdicts(limit=1)
        finally:
            postgres_server.start()

        # The very same object, not re-created: the retry of the failed record goes through.
        assert await sink.record(record("during", source_id="2")) is True
        assert await sink.human_verdicts(limit=1) == []  # reads work again too (both verdicts are the AI's)

        # A restart while the sink is idle leaves it a dead connection; the next call must still work.
        postgres_server.stop()
        postgres_server.start()
        assert await sink.record(record("after-idle-restart", source_id="3")) is True
        assert [r["job_uid"] for r in db.audit()] == ["before", "during", "after-idle-restart"]
        assert db.user_row("alerts", 2)["checked"] is True
    finally:
        await sink.close()
        with psycopg.connect(postgres_server.url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_postgres_unreachable_from_the_start_is_a_sink_error() -> None:
    port = devenv.free_port()  # nothing listens there
    sink = open_sink(f"postgresql://kubetriage:s3cret@127.0.0.1:{port}/kubetriage")
    with pytest.raises(SinkError) as err:
        await sink.setup()
    assert f"127.0.0.1:{port}" in str(err.value)
    assert "cannot connect" in str(err.value)
    assert "s3cret" not in str(err.value)
    await sink.close()


async def test_sqlite_file_that_is_not_a_database_is_a_sink_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a.db"
    path.write_bytes(b"this is not sqlite" * 100)
    sink = open_sink(f"sqlite:///{path}")
    with pytest.raises(SinkError) as err:
        await sink.setup()
    assert "SQLite" in str(err.value)
    assert str(path) in str(err.value)
    await sink.close()


# --------------------------------------------------------------------------- URLs and records


async def test_sqlite_relative_path_and_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_sink("sqlite:///data/sub/triage.db")
    assert isinstance(rel, SqliteSink)
    await rel.setup()
    assert await rel.record(record()) is True
    await rel.close()
    assert (tmp_path / "data" / "sub" / "triage.db").is_file()

    mem = open_sink("sqlite:///:memory:")
    await mem.setup()
    assert await mem.record(record()) is True
    assert await mem.record(record()) is False
    assert [r["job_uid"] for r in await mem.human_verdicts()] == []
    await mem.close()
    assert not (tmp_path / ":memory:").exists()


def test_open_sink_schemes() -> None:
    assert isinstance(open_sink("postgresql://u@127.0.0.1:5432/db"), PostgresSink)
    assert isinstance(open_sink("postgres://u@127.0.0.1:5432/db"), PostgresSink)
    assert isinstance(open_sink("sqlite:///x.db"), SqliteSink)
    assert isinstance(open_sink("sqlite:///x.db"), Sink)


@pytest.mark.parametrize("url", ["mysql://u:hunter2@h/db", "redis://127.0.0.1:6379/0", "", "sqlite:///",
                                 "sqlite://relative.db", "/var/lib/triage.db"])
def test_bad_url_names_the_accepted_schemes(url: str) -> None:
    with pytest.raises(ValueError) as err:
        open_sink(url)
    assert "sqlite:///" in str(err.value)
    assert "postgresql://" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_verdict_record_times_are_utc() -> None:
    naive = record(at=dt.datetime(2025, 1, 1, 10, 0))  # a naive time is what is under test
    assert naive.recorded_at == dt.datetime(2025, 1, 1, 10, 0, tzinfo=dt.UTC)
    plus2 = record(at=dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))))
    assert plus2.recorded_at.utcoffset() == dt.timedelta(0)
    assert plus2.recorded_at.hour == 10
    assert record(check_type="user").check_type is CheckType.USER
    assert record().source_type is SourceType.ALERT


def test_job_summary() -> None:
    alert = TriageJobSpec(source=Source(type="alert"), alert=Alert(name="DiskFull", labels={"z": "1", "host": "db1"}))
    assert job_summary(alert) == "DiskFull host=db1 z=1"
    script = TriageJobSpec(
        source=Source(type="scriptResult"),
        script_result=ScriptResult(script_name="login", success=False, error_message="x" * 16000),
    )
    text = job_summary(script)
    assert text is not None
    assert text.startswith("login: xxx")
    assert len(text.encode()) == MAX_SUMMARY_BYTES
