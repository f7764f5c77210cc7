"""The metrics store writes only to a database that is webshard's, of a schema it reads."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from services.metrics.events import EventBuffer
from services.metrics.store import SCHEMA_VERSION, MetricsStore, StoreError
from tests.unit.test_metrics_store import recovery, store_with


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file DuckDB keeps for ``path`` (the database and any WAL), by name."""
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir())}


def test_a_foreign_duckdb_file_is_refused_unchanged_and_named(tmp_path: Path) -> None:
    path = tmp_path / "theirs.duckdb"
    with duckdb.connect(str(path)) as db:
        db.execute("CREATE TABLE requests (id INTEGER, body VARCHAR)")
        db.execute("INSERT INTO requests VALUES (1, 'keep me')")
    before = snapshot(path)
    with pytest.raises(StoreError) as caught:
        MetricsStore.open(path)
    message = str(caught.value)
    assert str(path) in message
    assert "not a webshard metrics database" in message and "requests" in message
    assert snapshot(path) == before
    with duckdb.connect(str(path), read_only=True) as db:
        tables = [row[0] for row in db.execute("SHOW TABLES").fetchall()]
    assert tables == ["requests"]


def test_a_file_from_a_newer_webshard_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "metrics.duckdb"
    MetricsStore.open(path).close()
    with duckdb.connect(str(path)) as db:
        db.execute(
            "UPDATE webshard_metadata SET value = ? WHERE key = 'schema_version'",
            [str(SCHEMA_VERSION + 1)],
        )
    before = snapshot(path)
    with pytest.raises(StoreError, match="newer webshard") as caught:
        MetricsStore.open(path)
    assert str(path) in str(caught.value)
    assert snapshot(path) == before


def test_webshards_own_file_reopens_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.duckdb"
    store_with([recovery(1)], path).close()
    store = MetricsStore.open(path)
    try:
        assert store.count("recoveries") == 1
    finally:
        store.close()


def test_a_file_of_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    # Schema version 1 had no metadata table: its seven tables, exactly, are webshard's.
    path = tmp_path / "metrics.duckdb"
    MetricsStore.open(path).close()
    with duckdb.connect(str(path)) as db:
        db.execute("DROP TABLE webshard_metadata")
        db.execute("DROP TABLE delivery_losses")
        db.execute("ALTER TABLE recoveries DROP COLUMN redundancy_restored_ms")
        db.execute("ALTER TABLE recoveries DROP COLUMN engine")
        db.execute("ALTER TABLE requests DROP COLUMN engines")
    store = MetricsStore.open(path)
    try:
        assert store.count("delivery_losses") == 0
    finally:
        store.close()
    with duckdb.connect(str(path), read_only=True) as db:
        meta = dict(db.execute("SELECT key, value FROM webshard_metadata").fetchall())
    assert meta["schema_version"] == str(SCHEMA_VERSION)


def test_a_file_of_the_second_schema_gains_the_redundancy_column(tmp_path: Path) -> None:
    path = tmp_path / "metrics.duckdb"
    store_with([recovery(1)], path).close()
    with duckdb.connect(str(path)) as db:
        db.execute("ALTER TABLE recoveries DROP COLUMN redundancy_restored_ms")
        db.execute("UPDATE webshard_metadata SET value = '2' WHERE key = 'schema_version'")
    restored = recovery(2)
    restored.recovery.redundancy_restored.FromMilliseconds(2500)
    store = MetricsStore.open(path)
    try:
        buffer = EventBuffer()
        buffer.add([restored])
        store.write(buffer.take()[1])
        [row] = store.recovery_summary()
        assert (row.count, row.redundancy_restored) == (2, 1)  # the old row kept, without it
        assert row.redundancy_restored_p50_ms == 2500.0
    finally:
        store.close()
    with duckdb.connect(str(path), read_only=True) as db:
        meta = dict(db.execute("SELECT key, value FROM webshard_metadata").fetchall())
    assert meta["schema_version"] == str(SCHEMA_VERSION)


def test_a_file_of_the_third_schema_gains_the_engine_columns(tmp_path: Path) -> None:
    path = tmp_path / "metrics.duckdb"
    store_with([recovery(1)], path).close()
    with duckdb.connect(str(path)) as db:
        db.execute("ALTER TABLE recoveries DROP COLUMN engine")
        db.execute("ALTER TABLE requests DROP COLUMN engines")
        db.execute("UPDATE webshard_metadata SET value = '3' WHERE key = 'schema_version'")
    on_firefox = recovery(2)
    on_firefox.recovery.engine = "firefox"
    store = MetricsStore.open(path)
    try:
        buffer = EventBuffer()
        buffer.add([on_firefox])
        store.write(buffer.take()[1])
        [row] = store.recovery_summary()
        assert (row.count, row.engines) == (2, {"firefox": 1})  # the old row: engine unknown
        [by_engine, unknown] = store.recovery_summary(["engine"])
        assert by_engine.group == {"engine": "firefox"} and unknown.engines == {}
    finally:
        store.close()
