"""The DuckDB file: the schema, batched writes, retention and the queries.

DuckDB allows one writing process, and the metrics service is it. A
``MetricsStore`` holds one connection and is not thread-safe: the servicer
calls it from a single worker thread.

Column names follow the proto's records, except where the record's name is a
keyword in DuckDB's SQL: a breaker transition's ``at`` is ``changed_at``, an
agent sample's ``at`` is ``sampled_at`` and a span's ``start`` is
``started_at``. Every table also has ``ingested_at``, which retention falls
back on for rows whose event time was unset.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from services.metrics.events import TABLE_COLUMNS

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS faults (
    fault_id VARCHAR NOT NULL, kind VARCHAR, intensity VARCHAR, state VARCHAR,
    targets VARCHAR[], injected_at TIMESTAMP, reverted_at TIMESTAMP, detail VARCHAR,
    run_id VARCHAR, ingested_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS recoveries (
    recovery_id VARCHAR NOT NULL, fault_id VARCHAR, scenario VARCHAR, strategy VARCHAR,
    model VARCHAR, execution_provider VARCHAR, succeeded BOOLEAN, started_at TIMESTAMP,
    duration_ms DOUBLE, trace_id VARCHAR, run_id VARCHAR, breakers_enabled BOOLEAN,
    redundancy_restored_ms DOUBLE, engine VARCHAR, ingested_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS recovery_phases (
    recovery_id VARCHAR NOT NULL, run_id VARCHAR, started_at TIMESTAMP, position INTEGER,
    name VARCHAR, level VARCHAR, duration_ms DOUBLE, ok BOOLEAN,
    ingested_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id VARCHAR NOT NULL, model VARCHAR, started_at TIMESTAMP, latency_ms DOUBLE,
    ok BOOLEAN, correct BOOLEAN, checked BOOLEAN, recovered BOOLEAN, run_id VARCHAR,
    execution_provider VARCHAR, engines VARCHAR, ingested_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS breaker_transitions (
    target_id VARCHAR NOT NULL, from_state VARCHAR, to_state VARCHAR, changed_at TIMESTAMP,
    reason VARCHAR, ingested_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS agent_samples (
    agent_id VARCHAR NOT NULL, sampled_at TIMESTAMP, browsers INTEGER,
    memory_used_bytes BIGINT, in_flight INTEGER, ingested_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS spans (
    trace_id VARCHAR NOT NULL, span_id VARCHAR NOT NULL, parent_span_id VARCHAR,
    name VARCHAR, service VARCHAR, started_at TIMESTAMP, duration_ms DOUBLE,
    attributes VARCHAR, ingested_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS delivery_losses (
    service VARCHAR NOT NULL, dropped BIGINT, first_dropped_at TIMESTAMP,
    last_dropped_at TIMESTAMP, reason VARCHAR, ingested_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS webshard_metadata (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
"""

APPLICATION = "webshard-metrics"
"""What ``webshard_metadata`` says under ``application`` in a file webshard created."""

SCHEMA_VERSION = 4
"""The schema this build writes. Version 1 (before ``webshard_metadata`` and
``delivery_losses``) is recognised by its tables and upgraded, as are version 2
(before ``recoveries.redundancy_restored_ms``) and 3 (before the engine columns); a
higher version is a file from a newer webshard and is refused."""

ADDED_COLUMNS = {
    "recoveries": {"redundancy_restored_ms": "DOUBLE", "engine": "VARCHAR"},
    "requests": {"engines": "VARCHAR"},
}
"""Columns added since version 2, per table: an older file gains them on opening."""

_V1_TABLES = (
    "faults",
    "recoveries",
    "recovery_phases",
    "requests",
    "breaker_transitions",
    "agent_samples",
    "spans",
)

EVENT_TIME = {
    "faults": "injected_at",
    "recoveries": "started_at",
    "recovery_phases": "started_at",
    "requests": "started_at",
    "breaker_transitions": "changed_at",
    "agent_samples": "sampled_at",
    "spans": "started_at",
    "delivery_losses": "first_dropped_at",
}
"""The column retention and time filters read, per table."""

RUN_TABLES = ("faults", "recoveries", "recovery_phases", "requests")
"""Tables whose rows carry the campaign run they belong to.

The other tables hold what services record for the whole cluster (breaker
transitions, agent samples, spans, delivery losses): a service does not know
which campaign, if any, is running. A run's report takes their rows from the
run's time window instead (see ``MetricsStore.run_window``): the run owns the
cluster while it runs, so what happened then is what the run saw.
"""

GROUP_FIELDS = (
    "scenario",
    "strategy",
    "model",
    "execution_provider",
    "engine",
    "run_id",
    "breakers_enabled",
)
"""What a recovery summary may be grouped by."""

METRICS = (
    "request_rate",
    "request_latency_p50_ms",
    "request_latency_p95_ms",
    "recoveries",
    "agent_memory_bytes",
)
"""The metrics a time series may show."""

MAX_BUCKETS = 100_000
"""Most buckets one time series may have; more is a bucket too narrow for its range."""


class StoreError(RuntimeError):
    """The database cannot be opened; the message names the file and what to do."""


class QueryError(ValueError):
    """A query's arguments are wrong; the message says which and what is allowed."""


def utc_now() -> dt.datetime:
    """Now, as the naive UTC datetime the TIMESTAMP columns hold."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class SummaryRow:
    """One group of a recovery summary."""

    group: dict[str, str]
    count: int
    success_rate: float
    p50_ms: float
    p95_ms: float
    max_ms: float
    redundancy_restored: int = 0
    """Recoveries whose model was back to its replicas and spares; the two below are
    over these (None when there are none)."""
    redundancy_restored_p50_ms: float | None = None
    redundancy_restored_p95_ms: float | None = None
    engines: dict[str, int] = field(default_factory=dict)
    """The group's recoveries by the engine of the browser that failed (known ones)."""


@dataclass(frozen=True)
class Point:
    """One bucket of a time series: its start (naive UTC) and value."""

    at: dt.datetime
    value: float


class MetricsStore:
    """One DuckDB database of metric events."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, path: str) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: str | Path) -> MetricsStore:
        """Open or create the database at ``path`` (":memory:" for none).

        Raises StoreError when the file exists but is not a DuckDB database,
        another process holds it, it is not webshard's (tables of its own and no
        ``webshard_metadata``), or a newer webshard wrote it. The file is never
        modified or removed then: it may hold the only copy of someone's results.
        An existing file is checked through a read-only connection before
        anything is written to it.
        """
        where = str(path)
        if where != ":memory:":
            Path(where).parent.mkdir(parents=True, exist_ok=True)
            if Path(where).exists():
                _check_owned(where)
        try:
            connection = duckdb.connect(where)
        except duckdb.Error as exc:
            raise _unopenable(where, exc) from exc
        # TIMESTAMP columns hold UTC; with the session in UTC, now() agrees with them.
        connection.execute("SET TimeZone = 'UTC'")
        connection.execute("BEGIN TRANSACTION")
        try:
            connection.execute(SCHEMA)
            for table, added in ADDED_COLUMNS.items():
                for column, kind in added.items():
                    connection.execute(
                        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}"
                    )
            connection.execute(
                "INSERT OR REPLACE INTO webshard_metadata VALUES "
                "('application', ?), ('schema_version', ?)",
                [APPLICATION, str(SCHEMA_VERSION)],
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            connection.close()
            raise
        return cls(connection, where)

    def close(self) -> None:
        """Checkpoint and close the database."""
        self._db.close()

    def write(self, batches: Mapping[str, Mapping[str, np.ndarray[Any, Any]]]) -> None:
        """Insert column batches (from ``EventBuffer.take``) in one transaction."""
        if not batches:
            return
        now = utc_now()
        self._db.execute("BEGIN TRANSACTION")
        try:
            for table, batch in batches.items():
                names = ", ".join(TABLE_COLUMNS[table])
                self._db.register("incoming", dict(batch))
                try:
                    self._db.execute(
                        f"INSERT INTO {table} ({names}, ingested_at) "
                        f"SELECT {names}, ?::TIMESTAMP FROM incoming",
                        [now],
                    )
                finally:
                    self._db.unregister("incoming")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def drop_expired(self, retention_days: float, now: dt.datetime | None = None) -> int:
        """Delete rows older than ``retention_days``; return how many went."""
        cutoff = (now or utc_now()) - dt.timedelta(days=retention_days)
        dropped = 0
        self._db.execute("BEGIN TRANSACTION")
        try:
            for table, column in EVENT_TIME.items():
                row = self._db.execute(
                    f"DELETE FROM {table} WHERE coalesce({column}, ingested_at) < ?", [cutoff]
                ).fetchone()
                dropped += int(row[0]) if row else 0
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return dropped

    def count(self, table: str) -> int:
        """Rows in ``table``."""
        if table not in TABLE_COLUMNS:
            raise QueryError(f"no table {table!r}")
        row = self._db.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0

    def recovery_summary(
        self,
        group_by: Sequence[str] = (),
        *,
        run_id: str = "",
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
    ) -> list[SummaryRow]:
        """Recovery count, success rate and duration percentiles per group.

        ``start``/``end`` bound the recoveries' start times as [start, end).
        Raises QueryError for an unknown grouping field or an empty range.
        """
        unknown = [field for field in group_by if field not in GROUP_FIELDS]
        if unknown:
            raise QueryError(
                f"cannot group by {', '.join(map(repr, unknown))}; "
                f"group_by takes any of {', '.join(GROUP_FIELDS)}"
            )
        check_range(start, end)
        fields = list(dict.fromkeys(group_by))  # a field named twice groups once
        where, params = _filters("started_at", run_id, start, end)
        keys = ", ".join(f"{field}::VARCHAR" for field in fields)
        select = f"{keys}, " if fields else ""
        group = f"GROUP BY {keys} ORDER BY {keys}" if fields else ""
        rows = self._db.execute(
            f"SELECT {select} count(*), avg(succeeded::INTEGER), "
            "quantile_cont(duration_ms, 0.5), quantile_cont(duration_ms, 0.95), max(duration_ms), "
            "count(redundancy_restored_ms), quantile_cont(redundancy_restored_ms, 0.5), "
            "quantile_cont(redundancy_restored_ms, 0.95), histogram(nullif(engine, '')) "
            f"FROM recoveries {where} {group}",
            params,
        ).fetchall()
        result = []
        for row in rows:
            count = int(row[len(fields)])
            if count == 0:
                continue  # no groups and no recoveries: an empty summary, not a row of zeros
            values = row[len(fields) + 1 :]
            result.append(
                SummaryRow(
                    group={field: str(value) for field, value in zip(fields, row, strict=False)},
                    count=count,
                    success_rate=float(values[0]),
                    p50_ms=float(values[1]),
                    p95_ms=float(values[2]),
                    max_ms=float(values[3]),
                    redundancy_restored=int(values[4]),
                    redundancy_restored_p50_ms=_optional(values[5]),
                    redundancy_restored_p95_ms=_optional(values[6]),
                    engines={str(k): int(v) for k, v in (values[7] or {}).items()},
                )
            )
        return result

    def run_window(self, run_id: str) -> tuple[dt.datetime, dt.datetime] | None:
        """When ``run_id`` ran: its first recorded moment to its last, or None with no rows.

        Taken from the run's own rows: faults from injection to revert, recoveries
        and requests from their start to their end.
        """
        row = self._db.execute(
            "SELECT min(t0), max(t1) FROM ("
            "SELECT injected_at AS t0, coalesce(reverted_at, injected_at) AS t1 "
            "FROM faults WHERE run_id = $run "
            "UNION ALL SELECT started_at, started_at + to_microseconds("
            "CAST(coalesce(duration_ms, 0) * 1000 AS BIGINT)) FROM recoveries WHERE run_id = $run "
            "UNION ALL SELECT started_at, started_at + to_microseconds("
            "CAST(coalesce(latency_ms, 0) * 1000 AS BIGINT)) FROM requests WHERE run_id = $run)",
            {"run": run_id},
        ).fetchone()
        if row is None or row[0] is None or row[1] is None:
            return None
        return row[0], row[1]

    def rows(self, table: str, *, run_id: str = "") -> list[dict[str, Any]]:
        """Every row of ``table``, oldest first; with ``run_id``, those of that run.

        Tables that record runs are filtered by ``run_id``; the others by the
        run's window (``run_window``): a delivery loss when the time its records
        were dropped overlaps the window, any other row when its event time lies
        in it. A run with no rows of its own has no window, so none of theirs.
        """
        if table not in EVENT_TIME:
            raise QueryError(f"no table {table!r}; tables: {', '.join(EVENT_TIME)}")
        params: list[Any]
        if table in RUN_TABLES or not run_id:
            where, params = _filters(EVENT_TIME[table], run_id, None, None)
        else:
            window = self.run_window(run_id)
            if window is None:
                return []
            start, end = window
            if table == "delivery_losses":
                where = (
                    "WHERE coalesce(first_dropped_at, ingested_at) <= ? "
                    "AND coalesce(last_dropped_at, first_dropped_at, ingested_at) >= ?"
                )
                params = [end, start]
            else:
                where = f"WHERE {EVENT_TIME[table]} BETWEEN ? AND ?"
                params = [start, end]
        cursor = self._db.execute(
            f"SELECT * EXCLUDE (ingested_at) FROM {table} {where} "
            f"ORDER BY {EVENT_TIME[table]} NULLS LAST",
            params,
        )
        names = [column[0] for column in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def time_series(
        self,
        metric: str,
        *,
        bucket: dt.timedelta,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
    ) -> list[Point]:
        """``metric`` in buckets of ``bucket`` over [start, end), oldest first.

        Buckets start at ``start`` (when unset, at the earliest event in range);
        ``end`` unset means now. Counting metrics (request_rate, recoveries)
        have a point for every bucket, zero when empty; the others only for
        buckets with data. Raises QueryError for an unknown metric, a bucket
        that is not positive, an empty range or too many buckets.
        """
        if metric not in METRICS:
            raise QueryError(f"unknown metric {metric!r}; metric is one of {', '.join(METRICS)}")
        if bucket <= dt.timedelta(0):
            raise QueryError(f"bucket must be positive, not {bucket.total_seconds()} s")
        check_range(start, end)
        table, column, value, counting = _SERIES[metric]
        end = end or utc_now()
        if start is None:
            row = self._db.execute(
                f"SELECT min({column}) FROM {table} WHERE {column} < ?", [end]
            ).fetchone()
            if row is None or row[0] is None:
                return []
            start = row[0]
            if start >= end:
                return []
        bucket_us = _micros(bucket)
        buckets = -(-_micros(end - start) // bucket_us)
        if buckets > MAX_BUCKETS:
            raise QueryError(
                f"{buckets} buckets of {bucket.total_seconds()} s over the range; at most "
                f"{MAX_BUCKETS}: widen the bucket or narrow the range"
            )
        rows = self._db.execute(
            f"WITH b AS (SELECT (epoch_us({column}) - epoch_us(?::TIMESTAMP)) // ? AS k, * "
            f"FROM {table} WHERE {column} >= ? AND {column} < ?) {value}",
            [start, bucket_us, start, end],
        ).fetchall()
        scale = 1 / bucket.total_seconds() if metric == "request_rate" else 1.0
        values = {int(k): float(v) * scale for k, v in rows if v is not None}
        origin = start
        indexes: Sequence[int] = range(buckets) if counting else sorted(values)
        return [Point(origin + bucket * k, values.get(k, 0.0)) for k in indexes]


_SERIES: dict[str, tuple[str, str, str, bool]] = {
    # metric: (table, time column, SQL over the bucketed rows `b` -> (k, value), counting);
    # request_rate is the count divided by the bucket's seconds.
    "request_rate": (
        "requests",
        "started_at",
        "SELECT k, count(*) FROM b GROUP BY k",
        True,
    ),
    "request_latency_p50_ms": (
        "requests",
        "started_at",
        "SELECT k, quantile_cont(latency_ms, 0.5) FROM b GROUP BY k",
        False,
    ),
    "request_latency_p95_ms": (
        "requests",
        "started_at",
        "SELECT k, quantile_cont(latency_ms, 0.95) FROM b GROUP BY k",
        False,
    ),
    "recoveries": (
        "recoveries",
        "started_at",
        "SELECT k, count(*) FROM b GROUP BY k",
        True,
    ),
    # The agents' memory together: each agent's mean over the bucket, summed.
    "agent_memory_bytes": (
        "agent_samples",
        "sampled_at",
        "SELECT k, sum(m) FROM (SELECT k, agent_id, avg(memory_used_bytes) AS m "
        "FROM b GROUP BY k, agent_id) GROUP BY k",
        False,
    ),
}


def _unopenable(where: str, exc: Exception) -> StoreError:
    return StoreError(
        f"cannot open the metrics database {where}: {exc}. The file was left as it is; "
        "move it aside (or set --db-path to another file) to start with an empty one"
    )


def _refused(where: str, why: str) -> StoreError:
    return StoreError(
        f"refusing the metrics database {where}: {why}. Nothing was written to it; give "
        "--db-path a new file (or another data directory) for webshard's metrics"
    )


def _check_owned(where: str) -> None:
    """Raise StoreError unless the file at ``where`` is empty or webshard's, of a schema
    this build reads. Reads through a read-only connection: the file stays as it is."""
    try:
        connection = duckdb.connect(where, read_only=True)
    except duckdb.Error as exc:
        raise _unopenable(where, exc) from exc
    try:
        columns: dict[str, set[str]] = {}
        for schema, table, column in connection.execute(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns "
            "WHERE table_catalog = current_database()"
        ).fetchall():
            name = table if schema == "main" else f"{schema}.{table}"
            columns.setdefault(name, set()).add(column)
        if not columns:
            return  # an empty DuckDB file: webshard may make it its own
        if "webshard_metadata" in columns:
            meta = dict(connection.execute("SELECT key, value FROM webshard_metadata").fetchall())
            if meta.get("application") != APPLICATION:
                raise _refused(
                    where,
                    f"its webshard_metadata names application {meta.get('application')!r}, "
                    f"not {APPLICATION!r}",
                )
            version = meta.get("schema_version", "")
            if not version.isdigit() or int(version) > SCHEMA_VERSION:
                raise _refused(
                    where,
                    f"its schema version is {version[:20]!r}, and this webshard reads "
                    f"versions up to {SCHEMA_VERSION}: it was written by a newer webshard",
                )
            return
        # Schema version 1 had no metadata table: recognise it by its exact tables.
        expected = {
            t: {*TABLE_COLUMNS[t], "ingested_at"} - set(ADDED_COLUMNS.get(t, ()))
            for t in _V1_TABLES
        }
        foreign = sorted(t for t in columns if expected.get(t) != columns[t])
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise _refused(
                where,
                f"it is not a webshard metrics database (no webshard_metadata table; "
                f"tables not webshard's: {shown})",
            )
    except duckdb.Error as exc:
        raise _refused(where, f"its tables cannot be read ({exc})") from exc
    finally:
        connection.close()


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)


def check_range(start: dt.datetime | None, end: dt.datetime | None) -> None:
    """Raise QueryError unless start < end (either may be open)."""
    if start is not None and start >= (end or utc_now()):
        raise QueryError(
            f"time range start {start.isoformat()}Z is not before its end "
            f"{(end.isoformat() + 'Z') if end else '(now)'}"
        )


def _micros(delta: dt.timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _filters(
    column: str, run_id: str, start: dt.datetime | None, end: dt.datetime | None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if run_id:
        clauses.append("run_id = ?")
        params.append(run_id)
    if start is not None:
        clauses.append(f"{column} >= ?")
        params.append(start)
    if end is not None:
        clauses.append(f"{column} < ?")
        params.append(end)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
