"""Database sink: verdicts into the team's own tables and into an audit table.

Two engines behind one ``Sink`` protocol: PostgreSQL (production, psycopg 3
async) and SQLite (the embedded default, stdlib ``sqlite3`` in a worker thread).

What the sink guarantees, because the operator relies on it:

* **Exactly-once recording per (job uid, check type).** Jobs run at least once
  and the operator may crash between writing the database and marking the
  TriageJob ``recorded``, so ``record()`` is retried. The audit table
  ``triage_verdicts`` has ``UNIQUE (job_uid, check_type)``; an ``ai`` verdict is
  inserted with ``ON CONFLICT DO NOTHING`` and a retry is a no-op.
* **Humans win.** The user's row (``alerts`` / ``script_results``) is updated in
  the same transaction as the audit insert, and an ``ai`` verdict never touches
  a row whose ``check_type`` is ``'user'``. A ``user`` verdict is upserted (a
  human may change their mind) and always overwrites the user's row, unless it
  is older than the human verdict already stored (a late retry of a stale one).
* **No user-row write without an audit insert.** A retried ``ai`` record finds
  its audit row and skips the user-row update, so it cannot clobber anything a
  human did in between.
* **Every database failure is a ``SinkError``** naming the database and the
  operation; the operator retries on it. The PostgreSQL sink reconnects by
  itself, so the same object works again after the server restarts.

Text is untrusted (alert labels, test output, model answers): values are only
ever bound as parameters, NUL characters are removed (PostgreSQL ``text``
cannot hold them; SQLite gets the same treatment so both engines store the same
data), unpaired surrogates are replaced, and sizes are capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import sqlite3
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel, Field, field_validator

from kubetriage.api.models import MAX_REASON, CheckType, Classification, EvidenceItem, SourceType, Verdict
from kubetriage.api.summary import MAX_SUMMARY_BYTES, clean_text

log = logging.getLogger("kubetriage.infra.sinks")

T = TypeVar("T")

AUDIT_TABLE = "triage_verdicts"
USER_TABLES: dict[SourceType, str] = {SourceType.ALERT: "alerts", SourceType.SCRIPT_RESULT: "script_results"}

# The five columns the team's existing tools read on their own alerts and script_results rows (the system
# before kubetriage wrote them there): setup adds the missing ones, and a verdict fills them in.
USER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("checked", "BOOLEAN DEFAULT FALSE"),
    ("check_type", "VARCHAR(10)"),
    ("discard", "BOOLEAN DEFAULT FALSE"),
    ("discard_type", "VARCHAR(20)"),
    ("discard_comment", "TEXT"),
)

MAX_SHORT_TEXT = 512  # names, uids, model ids: far above any legitimate value
PG_CONNECT_TIMEOUT = 5
SQLITE_BUSY_TIMEOUT_MS = 10_000
ACCEPTED_SCHEMES = "sqlite:///<path> (or sqlite:///:memory:), postgresql://... or postgres://..."

_AUDIT_COLUMNS: tuple[str, ...] = (
    "job_uid", "job_name", "namespace", "source_type", "source_id", "fingerprint", "check_type",
    "classification", "discard", "reason", "confidence", "analyzer", "model", "prompt_tokens",
    "completion_tokens", "cost_usd", "pool", "priority_class", "attempts", "summary", "recorded_at",
    "identity", "evidence",
)  # fmt: skip
# Columns added after the first release: setup adds them to an older audit table (both engines).
_LATER_AUDIT_COLUMNS: tuple[tuple[str, str], ...] = (("identity", "TEXT"), ("evidence", "TEXT"))
# What a later human verdict replaces; the job's identity columns stay as first recorded.
_VERDICT_COLUMNS: tuple[str, ...] = (
    "classification", "discard", "reason", "confidence", "analyzer", "model", "prompt_tokens",
    "completion_tokens", "cost_usd", "attempts", "recorded_at",
)  # fmt: skip
_HUMAN_COLUMNS: tuple[str, ...] = (
    "job_uid", "job_name", "namespace", "source_type", "source_id", "fingerprint", "classification",
    "discard", "reason", "confidence", "summary", "recorded_at",
)  # fmt: skip
_TIME_COLUMNS: tuple[str, ...] = ("finished_at", "created_at")  # preference order for script_history
# Optional columns of the team's script_results table that script_runs reads when they exist.
_COMMIT_COLUMNS: tuple[str, ...] = ("commit_sha", "commit")
_BRANCH_COLUMNS: tuple[str, ...] = ("branch",)
MAX_HISTORY_ROWS = 200  # per script_runs question: enough for a rate, bounded for the admission path
MAX_EVIDENCE_BYTES = 16384


class SinkError(Exception):
    """A database operation failed; the message names the database and the operation. Retryable."""


# --------------------------------------------------------------------------- record


def _utc(value: dt.datetime) -> dt.datetime:
    # Naive timestamps are taken as UTC: that is what the operator and most team databases use.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class VerdictRecord(BaseModel):
    """One verdict for one TriageJob, as it goes to the database.

    ``verdict.check_type`` says who decided (``ai`` or ``user``); together with
    ``job_uid`` it is the idempotency key. ``identity`` is the target's history
    key (``AnalysisRequest.identity``), ``evidence`` what the verdict rested on.
    """

    job_uid: str = Field(min_length=1)
    job_name: str
    namespace: str
    source_type: SourceType
    source_id: str | None = None
    fingerprint: str | None = None
    verdict: Verdict
    pool: str | None = None
    priority_class: str | None = None
    attempts: int = Field(0, ge=0)
    summary: str | None = None
    recorded_at: dt.datetime = Field(default_factory=_now)
    identity: str | None = None
    evidence: list[EvidenceItem] = Field(default_factory=list)

    @field_validator("recorded_at")
    @classmethod
    def _as_utc(cls, value: dt.datetime) -> dt.datetime:
        return _utc(value)

    @property
    def check_type(self) -> CheckType:
        return CheckType(self.verdict.check_type)


def _audit_params(rec: VerdictRecord) -> dict[str, Any]:
    # Caps are applied here and not only by pydantic: model_construct/model_copy bypass validation.
    v = rec.verdict
    return {
        "job_uid": clean_text(rec.job_uid, MAX_SHORT_TEXT),
        "job_name": clean_text(rec.job_name, MAX_SHORT_TEXT),
        "namespace": clean_text(rec.namespace, MAX_SHORT_TEXT),
        "source_type": SourceType(rec.source_type).value,
        "source_id": clean_text(rec.source_id, MAX_SHORT_TEXT),
        "fingerprint": clean_text(rec.fingerprint, MAX_SHORT_TEXT),
        "check_type": rec.check_type.value,
        "classification": Classification(v.classification).value,
        "discard": bool(v.discard),
        "reason": clean_text(v.reason, MAX_REASON),
        "confidence": float(v.confidence),
        "analyzer": clean_text(v.analyzer, MAX_SHORT_TEXT),
        "model": clean_text(v.model, MAX_SHORT_TEXT),
        "prompt_tokens": v.tokens.prompt if v.tokens else None,
        "completion_tokens": v.tokens.completion if v.tokens else None,
        "cost_usd": v.cost_usd,
        "pool": clean_text(rec.pool, MAX_SHORT_TEXT),
        "priority_class": clean_text(rec.priority_class, MAX_SHORT_TEXT),
        "attempts": int(rec.attempts),
        "summary": clean_text(rec.summary, max_bytes=MAX_SUMMARY_BYTES),
        "recorded_at": _utc(rec.recorded_at),
        "identity": clean_text(rec.identity, MAX_SHORT_TEXT),
        "evidence": _evidence_json(rec.evidence),
    }


def _evidence_json(items: Sequence[EvidenceItem]) -> str | None:
    """The evidence as a JSON list of {source, summary, value}; None when there was none.

    Items are dropped from the end rather than the JSON cut, so the column always parses.
    """
    out = [item.wire() for item in items]
    while out:
        text = clean_text(json.dumps(out, ensure_ascii=False))
        if text is not None and len(text.encode()) <= MAX_EVIDENCE_BYTES:
            return text
        out.pop()
    return None


def _as_bool(value: Any) -> bool | None:
    """Team tables store success as boolean, 0/1 or text; all mean the same."""
    if value is None:
        return None
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "t", "true", "y", "yes"):
            return True
        if low in ("0", "f", "false", "n", "no"):
            return False
        return None
    return bool(value)


def _as_time(value: Any) -> dt.datetime | None:
    """Timestamps from a team table: datetime, ISO text, or epoch seconds; None when unreadable."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return _utc(value)
    if isinstance(value, int | float):
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return dt.datetime.fromtimestamp(value, dt.UTC)
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return _utc(dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
    return None


# --------------------------------------------------------------------------- history answers


@dataclasses.dataclass(frozen=True)
class AlertCounts:
    """One alert identity in the audit table: analysed since a time, and how humans judged it (ever)."""

    fired: int
    human_false_positive: int
    human_valid: int


@dataclasses.dataclass(frozen=True)
class RunCounts:
    """One script in the team's script_results: runs at one commit, and recent runs on the default branch."""

    same_commit_runs: int
    same_commit_passes: int
    default_branch_runs: int
    default_branch_failures: int


def _human_counts(rows: Sequence[Any]) -> tuple[int, int]:
    counts = {str(c): int(n) for c, n in rows}
    return counts.get(Classification.FALSE_POSITIVE.value, 0), counts.get(Classification.VALID.value, 0)


def _run_counts(same: Sequence[Any], branch: Sequence[Any]) -> RunCounts:
    same_ok = [b for s in same if (b := _as_bool(s)) is not None]
    branch_ok = [b for s in branch if (b := _as_bool(s)) is not None]
    return RunCounts(len(same_ok), sum(same_ok), len(branch_ok), sum(not b for b in branch_ok))


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Sink(Protocol):
    """Where verdicts go. Every method raises ``SinkError`` on a database failure."""

    @property
    def name(self) -> str: ...

    async def setup(self) -> None: ...

    async def record(self, rec: VerdictRecord) -> bool: ...

    async def record_many(self, recs: Sequence[VerdictRecord]) -> list[bool]: ...

    async def close(self) -> None: ...

    async def script_history(
        self, script_name: str, limit: int = 50, *, exclude_id: str | None = None
    ) -> list[tuple[bool, dt.datetime | None]]: ...

    async def human_verdicts(self, limit: int = 5000) -> list[dict[str, Any]]: ...

    async def alert_history(self, identity: str, since: dt.datetime) -> AlertCounts: ...

    async def script_runs(
        self, script_name: str, commit: str | None, default_branches: Sequence[str], *, exclude_id: str | None = None
    ) -> RunCounts | None: ...


def open_sink(url: str) -> Sink:
    """A sink for ``url``; nothing is connected until the first call."""
    if url.startswith("sqlite:///"):
        path = urllib.parse.unquote(url[len("sqlite:///") :])
        if not path:
            raise ValueError(f"sqlite URL {url!r} has no path; accepted: {ACCEPTED_SCHEMES}")
        return SqliteSink(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresSink(url)
    shown = url.split("@")[-1] if "@" in url else url  # never echo a password
    raise ValueError(f"unsupported database URL {shown!r}; accepted: {ACCEPTED_SCHEMES}")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:500]}"


def _limit(limit: int) -> int:
    return max(0, int(limit))


# --------------------------------------------------------------------------- SQLite


def _sqlite_sql() -> dict[str, str]:
    cols = ", ".join(_AUDIT_COLUMNS)
    values = ", ".join(f":{c}" for c in _AUDIT_COLUMNS)
    sets = ", ".join(f"{c} = excluded.{c}" for c in _VERDICT_COLUMNS)
    return {
        "insert": f"INSERT INTO {AUDIT_TABLE} ({cols}) VALUES ({values}) ON CONFLICT (job_uid, check_type) DO NOTHING",
        "upsert": (
            f"INSERT INTO {AUDIT_TABLE} ({cols}) VALUES ({values}) ON CONFLICT (job_uid, check_type) DO UPDATE SET "
            f"{sets}, summary = COALESCE(excluded.summary, {AUDIT_TABLE}.summary) "
            f"WHERE {AUDIT_TABLE}.recorded_at <= excluded.recorded_at"
        ),
    }


_SQLITE = _sqlite_sql()

_SQLITE_AUDIT_DDL = f"""
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_uid TEXT NOT NULL,
    job_name TEXT NOT NULL,
    namespace TEXT NOT NULL,
    source_type VARCHAR(20) NOT NULL,
    source_id TEXT,
    fingerprint TEXT,
    check_type VARCHAR(10) NOT NULL,
    classification VARCHAR(20) NOT NULL,
    discard BOOLEAN NOT NULL,
    reason TEXT,
    confidence REAL,
    analyzer TEXT,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL,
    pool TEXT,
    priority_class TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    summary TEXT,
    recorded_at TEXT NOT NULL,
    identity TEXT,
    evidence TEXT,
    UNIQUE (job_uid, check_type)
)"""


# human_verdicts reads by check type, newest first; operators look rows up by source.
_AUDIT_INDEXES: tuple[str, ...] = (
    f"CREATE INDEX IF NOT EXISTS {AUDIT_TABLE}_check_type_idx ON {AUDIT_TABLE} (check_type, recorded_at)",
    f"CREATE INDEX IF NOT EXISTS {AUDIT_TABLE}_source_idx ON {AUDIT_TABLE} (source_type, source_id)",
    # alert_history: one identity's verdicts by time; its human verdicts are joined on job_uid (UNIQUE index)
    f"CREATE INDEX IF NOT EXISTS {AUDIT_TABLE}_identity_idx ON {AUDIT_TABLE} (identity, recorded_at)",
)


def _sqlite_time(value: dt.datetime) -> str:
    # Fixed width (always microseconds, always Z) so text comparison orders like time does.
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SqliteSink:
    """SQLite through one ``sqlite3`` connection used from worker threads, one call at a time.

    The asyncio lock serialises calls because a sqlite3 connection has one
    transaction state; every call runs a whole transaction inside one thread hop.
    WAL mode lets readers (the team's dashboards) read while we write, and the
    busy timeout makes a second process wait for the write lock instead of failing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return f"SQLite database {self.path}"

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            task = asyncio.ensure_future(asyncio.to_thread(self._call, what, fn))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                # The thread cannot be interrupted: keep the lock until it is done so
                # no other call starts a transaction on the same connection meanwhile.
                with contextlib.suppress(BaseException):
                    await task
                raise

    def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._connection())
        except (sqlite3.Error, OSError) as exc:
            raise SinkError(f"{self.name}: {what} failed: {_describe(exc)}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock
            # is taken before the first read of a transaction (no upgrade deadlocks).
            conn = sqlite3.connect(
                self.path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_MS)}")
                if self.path != ":memory:":
                    conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.Error:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    @staticmethod
    def _tx(conn: sqlite3.Connection, body: Callable[[], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body()
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    @staticmethod
    def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
        # table is one of our constants, never user input; PRAGMA takes no parameters.
        return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}

    def _ensure_user_columns(self, conn: sqlite3.Connection, table: str, have: set[str]) -> None:
        # SQLite has no ADD COLUMN IF NOT EXISTS: compare with table_info first.
        for column, ddl_type in USER_COLUMNS:
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl_type}")
                log.info("%s: added column %s.%s", self.name, table, column)

    async def setup(self) -> None:
        def body(conn: sqlite3.Connection) -> None:
            def tx() -> None:
                conn.execute(_SQLITE_AUDIT_DDL)
                have = self._columns(conn, AUDIT_TABLE)
                for column, ddl_type in _LATER_AUDIT_COLUMNS:  # an audit table from an older release
                    if column not in have:
                        conn.execute(f"ALTER TABLE {AUDIT_TABLE} ADD COLUMN {column} {ddl_type}")
                        log.info("%s: added column %s.%s", self.name, AUDIT_TABLE, column)
                for ddl in _AUDIT_INDEXES:
                    conn.execute(ddl)
                for table in USER_TABLES.values():
                    have = self._columns(conn, table)
                    if have:
                        self._ensure_user_columns(conn, table, have)

            self._tx(conn, tx)

        await self._run("setup", body)

    async def record(self, rec: VerdictRecord) -> bool:
        return (await self.record_many([rec]))[0]

    async def record_many(self, recs: Sequence[VerdictRecord]) -> list[bool]:
        """Several verdicts in one transaction: one fsync for a burst instead of one per verdict."""
        if not recs:
            return []
        items = []
        for rec in recs:
            params = _audit_params(rec)
            params["recorded_at"] = _sqlite_time(params["recorded_at"])
            items.append((rec, params))

        def one(conn: sqlite3.Connection, rec: VerdictRecord, params: dict[str, Any]) -> bool:
            if rec.check_type is CheckType.USER:
                existed = conn.execute(
                    f"SELECT 1 FROM {AUDIT_TABLE} WHERE job_uid = ? AND check_type = ?",
                    (params["job_uid"], params["check_type"]),
                ).fetchone()
                applied = conn.execute(_SQLITE["upsert"], params).rowcount > 0
                inserted = applied and existed is None
            else:
                applied = inserted = conn.execute(_SQLITE["insert"], params).rowcount > 0
            if applied and params["source_id"] is not None:
                self._update_user_row(conn, rec, params)
            return inserted

        def body(conn: sqlite3.Connection) -> list[bool]:
            return self._tx(conn, lambda: [one(conn, rec, params) for rec, params in items])

        what = f"record of job {items[0][1]['job_uid']}" if len(items) == 1 else f"record of {len(items)} jobs"
        return await self._run(what, body)

    def _update_user_row(self, conn: sqlite3.Connection, rec: VerdictRecord, params: dict[str, Any]) -> None:
        table = USER_TABLES[SourceType(rec.source_type)]
        have = self._columns(conn, table)
        if "id" not in have:
            return  # the team has no such table (or no id to match): the audit row is all we write
        # The table may have been created after setup(): add the columns now rather than fail forever.
        self._ensure_user_columns(conn, table, have)
        guard = "" if _is_user(params) else " AND (check_type IS NULL OR check_type <> :user)"
        conn.execute(
            f"UPDATE {table} SET checked = :checked, check_type = :check_type, discard = :discard, "
            f"discard_type = :classification, discard_comment = :reason "
            f"WHERE CAST(id AS TEXT) = :source_id{guard}",
            {**params, "checked": True, "user": CheckType.USER.value},
        )

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await asyncio.to_thread(conn.close)

    async def script_history(
        self, script_name: str, limit: int = 50, *, exclude_id: str | None = None
    ) -> list[tuple[bool, dt.datetime | None]]:
        def body(conn: sqlite3.Connection) -> list[tuple[bool, dt.datetime | None]]:
            have = self._columns(conn, "script_results")
            if not {"script_name", "success"} <= have:
                return []
            time_col = next((c for c in _TIME_COLUMNS if c in have), None)
            select_time = time_col or "NULL"
            order = [f"{time_col} DESC NULLS LAST"] if time_col else []
            where = "script_name = ? AND success IS NOT NULL"
            args: list[Any] = [clean_text(script_name, MAX_SHORT_TEXT)]
            if "id" in have:
                order.append("id DESC")
                if exclude_id is not None:
                    where += " AND CAST(id AS TEXT) <> ?"
                    args.append(exclude_id)
            order_by = f" ORDER BY {', '.join(order)}" if order else ""
            rows = conn.execute(
                f"SELECT success, {select_time} FROM script_results WHERE {where}{order_by} LIMIT ?",
                (*args, _limit(limit)),
            ).fetchall()
            return [(ok, _as_time(t)) for s, t in rows if (ok := _as_bool(s)) is not None]

        return await self._run(f"script history of {script_name!r}", body)

    async def human_verdicts(self, limit: int = 5000) -> list[dict[str, Any]]:
        def body(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT {', '.join(_HUMAN_COLUMNS)} FROM {AUDIT_TABLE} WHERE check_type = ? "
                "ORDER BY recorded_at DESC, id DESC LIMIT ?",
                (CheckType.USER.value, _limit(limit)),
            ).fetchall()
            return [_human_row(dict(zip(_HUMAN_COLUMNS, row, strict=True))) for row in rows]

        return await self._run("reading human verdicts", body)

    async def alert_history(self, identity: str, since: dt.datetime) -> AlertCounts:
        key = clean_text(identity, MAX_SHORT_TEXT)

        def body(conn: sqlite3.Connection) -> AlertCounts:
            fired = conn.execute(
                f"SELECT COUNT(*) FROM {AUDIT_TABLE} WHERE identity = ? AND check_type = ? AND recorded_at >= ?",
                (key, CheckType.AI.value, _sqlite_time(since)),
            ).fetchone()[0]
            humans = conn.execute(
                f"SELECT classification, COUNT(*) FROM {AUDIT_TABLE} WHERE check_type = ? AND job_uid IN "
                f"(SELECT job_uid FROM {AUDIT_TABLE} WHERE identity = ?) GROUP BY classification",
                (CheckType.USER.value, key),
            ).fetchall()
            return AlertCounts(int(fired), *_human_counts(humans))

        return await self._run("reading alert history", body)

    async def script_runs(
        self, script_name: str, commit: str | None, default_branches: Sequence[str], *, exclude_id: str | None = None
    ) -> RunCounts | None:
        def body(conn: sqlite3.Connection) -> RunCounts | None:
            have = self._columns(conn, "script_results")
            commit_col = next((c for c in _COMMIT_COLUMNS if c in have), None)
            branch_col = next((c for c in _BRANCH_COLUMNS if c in have), None)
            if not {"script_name", "success"} <= have or (commit_col is None and branch_col is None):
                return None  # the team's table does not say which commit or branch a run was on
            base = "script_name = ? AND success IS NOT NULL"
            args: list[Any] = [clean_text(script_name, MAX_SHORT_TEXT)]
            if exclude_id is not None and "id" in have:
                base += " AND CAST(id AS TEXT) <> ?"
                args.append(clean_text(exclude_id, MAX_SHORT_TEXT))
            time_col = next((c for c in _TIME_COLUMNS if c in have), None)
            order = f" ORDER BY {time_col} DESC" if time_col else ""
            # column names come from the constants above, never from input; quoted because commit is a keyword
            same: list[Any] = []
            if commit_col and commit:
                same = [r[0] for r in conn.execute(
                    f'SELECT success FROM script_results WHERE {base} AND "{commit_col}" = ?{order} LIMIT ?',
                    (*args, clean_text(commit, MAX_SHORT_TEXT), MAX_HISTORY_ROWS))]
            branch: list[Any] = []
            branches = [clean_text(b, MAX_SHORT_TEXT) for b in default_branches]
            if branch_col and branches:
                marks = ", ".join("?" for _ in branches)
                branch = [r[0] for r in conn.execute(
                    f'SELECT success FROM script_results WHERE {base} AND "{branch_col}" IN ({marks}){order} LIMIT ?',
                    (*args, *branches, MAX_HISTORY_ROWS))]
            return _run_counts(same, branch)

        return await self._run(f"runs of script {script_name!r}", body)


def _is_user(params: dict[str, Any]) -> bool:
    return bool(params["check_type"] == CheckType.USER.value)


def _human_row(row: dict[str, Any]) -> dict[str, Any]:
    row["discard"] = _as_bool(row["discard"])
    row["recorded_at"] = _as_time(row["recorded_at"])
    return row


# --------------------------------------------------------------------------- PostgreSQL


def _pg_sql() -> dict[str, str]:
    cols = ", ".join(_AUDIT_COLUMNS)
    values = ", ".join(f"%({c})s" for c in _AUDIT_COLUMNS)
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in _VERDICT_COLUMNS)
    return {
        "insert": (
            f"INSERT INTO {AUDIT_TABLE} ({cols}) VALUES ({values}) "
            "ON CONFLICT (job_uid, check_type) DO NOTHING RETURNING TRUE"
        ),
        # xmax = 0 tells a fresh insert from an update of an existing row; no row at all
        # means the stored human verdict is newer and this one was not applied.
        "upsert": (
            f"INSERT INTO {AUDIT_TABLE} ({cols}) VALUES ({values}) ON CONFLICT (job_uid, check_type) DO UPDATE SET "
            f"{sets}, summary = COALESCE(EXCLUDED.summary, {AUDIT_TABLE}.summary) "
            f"WHERE {AUDIT_TABLE}.recorded_at <= EXCLUDED.recorded_at RETURNING (xmax = 0)"
        ),
    }


_PG = _pg_sql()

_PG_AUDIT_DDL = f"""
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
    id BIGSERIAL PRIMARY KEY,
    job_uid TEXT NOT NULL,
    job_name TEXT NOT NULL,
    namespace TEXT NOT NULL,
    source_type VARCHAR(20) NOT NULL,
    source_id TEXT,
    fingerprint TEXT,
    check_type VARCHAR(10) NOT NULL,
    classification VARCHAR(20) NOT NULL,
    discard BOOLEAN NOT NULL,
    reason TEXT,
    confidence DOUBLE PRECISION,
    analyzer TEXT,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd DOUBLE PRECISION,
    pool TEXT,
    priority_class TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    summary TEXT,
    recorded_at TIMESTAMPTZ NOT NULL,
    identity TEXT,
    evidence TEXT,
    UNIQUE (job_uid, check_type)
)"""

# Unqualified names resolve through search_path, exactly as the UPDATE will resolve them.
_PG_COLUMNS = """
SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE c.oid = to_regclass(%s::text) AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
"""

_PG_DEFAULTS = {
    "connect_timeout": str(PG_CONNECT_TIMEOUT),
    "application_name": "kubetriage",
    # Notice a dead server within ~30 s instead of waiting on a half-open socket.
    "keepalives": "1",
    "keepalives_idle": "15",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}

AConn = psycopg.AsyncConnection[Any]


class PostgresSink:
    """PostgreSQL through one psycopg 3 async connection, reconnected on demand.

    One connection serialised by a lock is plenty for one active operator
    replica; correctness under several writers (a second replica, the team's
    own tools) comes from the database (UNIQUE constraint, row locks), not from
    the lock. A broken connection is dropped and the call retried once on a new
    one, so the first call after a server restart succeeds; ``record`` is
    idempotent, so that retry is safe even if the commit had reached the server.
    """

    def __init__(self, url: str) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ValueError(f"invalid PostgreSQL URL: {_describe(exc)}") from exc
        for key, value in _PG_DEFAULTS.items():
            params.setdefault(key, value)  # the URL wins: the team may know better
        self._conninfo = make_conninfo("", **params)
        where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/{params.get('dbname') or ''}"
        self._where = f"{params['user']}@{where}" if params.get("user") else where
        self._conn: AConn | None = None
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return f"PostgreSQL {self._where}"

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _run(self, what: str, fn: Callable[[AConn], Awaitable[T]]) -> T:
        async with self._lock:
            for attempt in (1, 2):
                fresh = self._conn is None or self._conn.closed
                if fresh:
                    await self._drop()
                    try:
                        self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                    except (psycopg.Error, OSError) as exc:
                        raise SinkError(f"{self.name}: cannot connect for {what}: {_describe(exc)}") from exc
                conn = self._conn
                assert conn is not None
                try:
                    return await fn(conn)
                except (psycopg.Error, OSError) as exc:
                    if conn.broken or conn.closed:
                        await self._drop()
                        if not fresh and attempt == 1:
                            # Probably a connection that died while idle (server restart): retry on a new one.
                            log.info("%s: connection lost during %s (%s); reconnecting", self.name, what, exc)
                            continue
                    raise SinkError(f"{self.name}: {what} failed: {_describe(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _columns(conn: AConn, table: str) -> set[str]:
        cur = await conn.execute(_PG_COLUMNS, (table,))
        return {str(row[0]) for row in await cur.fetchall()}

    async def _ensure_user_columns(self, conn: AConn, table: str, have: set[str]) -> None:
        # Only ALTER what is missing: ALTER needs table ownership even with IF NOT EXISTS,
        # and a DBA may have added the columns for a sink that only has UPDATE rights.
        for column, ddl_type in USER_COLUMNS:
            if column not in have:
                await conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        sql.Identifier(table), sql.Identifier(column), sql.SQL(ddl_type)
                    )
                )
                log.info("%s: added column %s.%s", self.name, table, column)

    async def setup(self) -> None:
        async def body(conn: AConn) -> None:
            async with conn.transaction():
                # Two replicas starting together would otherwise race on CREATE TABLE IF NOT EXISTS.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("kubetriage.sinks.setup",))
                await conn.execute(_PG_AUDIT_DDL)
                have = await self._columns(conn, AUDIT_TABLE)
                for column, ddl_type in _LATER_AUDIT_COLUMNS:  # an audit table from an older release
                    if column not in have:
                        await conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                            sql.Identifier(AUDIT_TABLE), sql.Identifier(column), sql.SQL(ddl_type)))
                        log.info("%s: added column %s.%s", self.name, AUDIT_TABLE, column)
                for ddl in _AUDIT_INDEXES:
                    await conn.execute(ddl)
                for table in USER_TABLES.values():
                    have = await self._columns(conn, table)
                    if have:
                        await self._ensure_user_columns(conn, table, have)

        await self._run("setup", body)

    async def record(self, rec: VerdictRecord) -> bool:
        return (await self.record_many([rec]))[0]

    async def record_many(self, recs: Sequence[VerdictRecord]) -> list[bool]:
        """Several verdicts in one transaction (one commit for a burst)."""
        if not recs:
            return []
        items = [(rec, _audit_params(rec)) for rec in recs]

        async def body(conn: AConn) -> list[bool]:
            out = []
            async with conn.transaction():
                for rec, params in items:
                    is_user = rec.check_type is CheckType.USER
                    cur = await conn.execute(_PG["upsert"] if is_user else _PG["insert"], params)
                    row = await cur.fetchone()
                    if row is not None and params["source_id"] is not None:
                        await self._update_user_row(conn, rec, params)
                    out.append(bool(row[0]) if row is not None else False)
            return out

        what = f"record of job {items[0][1]['job_uid']}" if len(items) == 1 else f"record of {len(items)} jobs"
        return await self._run(what, body)

    async def _update_user_row(self, conn: AConn, rec: VerdictRecord, params: dict[str, Any]) -> None:
        table = USER_TABLES[SourceType(rec.source_type)]
        have = await self._columns(conn, table)
        if "id" not in have:
            return  # the team has no such table (or no id to match): the audit row is all we write
        await self._ensure_user_columns(conn, table, have)
        query = sql.SQL(
            "UPDATE {} SET checked = TRUE, check_type = %(check_type)s, discard = %(discard)s, "
            "discard_type = %(classification)s, discard_comment = %(reason)s "
            "WHERE CAST(id AS TEXT) = %(source_id)s"
        ).format(sql.Identifier(table))
        if not _is_user(params):
            query += sql.SQL(" AND (check_type IS NULL OR check_type <> %(user)s)")
        await conn.execute(query, {**params, "user": CheckType.USER.value})

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def script_history(
        self, script_name: str, limit: int = 50, *, exclude_id: str | None = None
    ) -> list[tuple[bool, dt.datetime | None]]:
        async def body(conn: AConn) -> list[tuple[bool, dt.datetime | None]]:
            have = await self._columns(conn, "script_results")
            if not {"script_name", "success"} <= have:
                return []
            time_col = next((c for c in _TIME_COLUMNS if c in have), None)
            select_time: sql.Composable = sql.Identifier(time_col) if time_col else sql.SQL("NULL")
            order: list[sql.Composable] = (
                [sql.SQL("{} DESC NULLS LAST").format(sql.Identifier(time_col))] if time_col else []
            )
            where: sql.Composable = sql.SQL("script_name = %s AND success IS NOT NULL")
            args: list[Any] = [clean_text(script_name, MAX_SHORT_TEXT)]
            if "id" in have:
                order.append(sql.SQL("id DESC"))
                if exclude_id is not None:
                    where += sql.SQL(" AND CAST(id AS TEXT) <> %s")
                    args.append(clean_text(exclude_id, MAX_SHORT_TEXT))
            order_by = sql.SQL(" ORDER BY ") + sql.SQL(", ").join(order) if order else sql.SQL("")
            query = sql.SQL("SELECT success, {} FROM script_results WHERE {}{} LIMIT %s").format(
                select_time, where, order_by
            )
            cur = await conn.execute(query, (*args, _limit(limit)))
            rows = await cur.fetchall()
            return [(ok, _as_time(t)) for s, t in rows if (ok := _as_bool(s)) is not None]

        return await self._run(f"script history of {script_name!r}", body)

    async def human_verdicts(self, limit: int = 5000) -> list[dict[str, Any]]:
        async def body(conn: AConn) -> list[dict[str, Any]]:
            cur = await conn.execute(
                f"SELECT {', '.join(_HUMAN_COLUMNS)} FROM {AUDIT_TABLE} WHERE check_type = %s "
                "ORDER BY recorded_at DESC, id DESC LIMIT %s",
                (CheckType.USER.value, _limit(limit)),
            )
            rows = await cur.fetchall()
            return [_human_row(dict(zip(_HUMAN_COLUMNS, row, strict=True))) for row in rows]

        return await self._run("reading human verdicts", body)

    async def alert_history(self, identity: str, since: dt.datetime) -> AlertCounts:
        key = clean_text(identity, MAX_SHORT_TEXT)

        async def body(conn: AConn) -> AlertCounts:
            cur = await conn.execute(
                f"SELECT COUNT(*) FROM {AUDIT_TABLE} WHERE identity = %s AND check_type = %s AND recorded_at >= %s",
                (key, CheckType.AI.value, _utc(since)),
            )
            fired = (await cur.fetchone() or (0,))[0]
            cur = await conn.execute(
                f"SELECT classification, COUNT(*) FROM {AUDIT_TABLE} WHERE check_type = %s AND job_uid IN "
                f"(SELECT job_uid FROM {AUDIT_TABLE} WHERE identity = %s) GROUP BY classification",
                (CheckType.USER.value, key),
            )
            return AlertCounts(int(fired), *_human_counts(await cur.fetchall()))

        return await self._run("reading alert history", body)

    async def script_runs(
        self, script_name: str, commit: str | None, default_branches: Sequence[str], *, exclude_id: str | None = None
    ) -> RunCounts | None:
        async def body(conn: AConn) -> RunCounts | None:
            have = await self._columns(conn, "script_results")
            commit_col = next((c for c in _COMMIT_COLUMNS if c in have), None)
            branch_col = next((c for c in _BRANCH_COLUMNS if c in have), None)
            if not {"script_name", "success"} <= have or (commit_col is None and branch_col is None):
                return None  # the team's table does not say which commit or branch a run was on
            base: sql.Composable = sql.SQL("script_name = %s AND success IS NOT NULL")
            args: list[Any] = [clean_text(script_name, MAX_SHORT_TEXT)]
            if exclude_id is not None and "id" in have:
                base += sql.SQL(" AND CAST(id AS TEXT) <> %s")
                args.append(clean_text(exclude_id, MAX_SHORT_TEXT))
            time_col = next((c for c in _TIME_COLUMNS if c in have), None)
            order: sql.Composable = sql.SQL("")
            if time_col:
                order = sql.SQL(" ORDER BY {} DESC NULLS LAST").format(sql.Identifier(time_col))

            async def successes(where: sql.Composable, extra: Sequence[Any]) -> list[Any]:
                query = sql.SQL("SELECT success FROM script_results WHERE {} AND {}{} LIMIT %s").format(
                    base, where, order)
                cur = await conn.execute(query, (*args, *extra, MAX_HISTORY_ROWS))
                return [row[0] for row in await cur.fetchall()]

            same: list[Any] = []
            if commit_col and commit:
                same = await successes(sql.SQL("{} = %s").format(sql.Identifier(commit_col)),
                                       [clean_text(commit, MAX_SHORT_TEXT)])
            branch: list[Any] = []
            branches = [clean_text(b, MAX_SHORT_TEXT) for b in default_branches]
            if branch_col and branches:
                branch = await successes(sql.SQL("{} = ANY(%s)").format(sql.Identifier(branch_col)), [branches])
            return _run_counts(same, branch)

        return await self._run(f"runs of script {script_name!r}", body)
