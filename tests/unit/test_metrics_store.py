"""The metrics store and event checks: round trips, queries, retention, a corrupt file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration
from webshard.common.v1 import common_pb2
from webshard.metrics.v1 import metrics_pb2 as pb

from services.metrics.events import EventBuffer, InvalidEvent
from services.metrics.store import MetricsStore, QueryError, StoreError

T0 = dt.datetime(2030, 1, 1)


def recovery(
    i: int, *, scenario: str = "browser_crash", ms: float = 100.0, ok: bool = True, run: str = "r1"
) -> pb.Event:
    event = pb.Event()
    r = event.recovery
    r.recovery_id = f"rec-{i}"
    r.scenario = scenario
    r.strategy = common_pb2.RECOVERY_STRATEGY_PROGRESSIVE
    r.model = "vit-tiny"
    r.execution_provider = common_pb2.EXECUTION_PROVIDER_WASM
    r.succeeded = ok
    r.started_at.FromDatetime((T0 + dt.timedelta(seconds=i)).replace(tzinfo=dt.UTC))
    r.duration.FromMilliseconds(int(ms))
    r.run_id = run
    r.breakers_enabled = True
    r.phases.add(name="detect", level="shard").duration.FromMilliseconds(10)
    return event


def request(i: int, ms: int) -> pb.Event:
    event = pb.Event()
    q = event.request
    q.request_id = f"req-{i}"
    q.started_at.FromDatetime((T0 + dt.timedelta(seconds=i)).replace(tzinfo=dt.UTC))
    q.latency.FromMilliseconds(ms)
    q.ok = True
    return event


def store_with(events: list[pb.Event], path: str | Path = ":memory:") -> MetricsStore:
    store = MetricsStore.open(path)
    buffer = EventBuffer()
    buffer.add(events)
    store.write(buffer.take()[1])
    return store


def test_every_kind_of_event_lands_in_its_table(tmp_path: Path) -> None:
    fault = pb.Event(fault=pb.FaultRecord(fault_id="f1", targets=["a", "b"], state="active"))
    fault.fault.injected_at.FromDatetime(T0.replace(tzinfo=dt.UTC))
    sample = pb.Event(agent_sample=pb.AgentSample(agent_id="a1", memory_used_bytes=2**33))
    sample.agent_sample.at.FromDatetime(T0.replace(tzinfo=dt.UTC))
    events = [
        fault,
        recovery(1),
        request(1, 5),
        pb.Event(breaker_transition=pb.BreakerTransition(target_id="a1", reason="errors")),
        sample,
        pb.Event(span=pb.SpanRecord(trace_id="t", span_id="s", attributes={"k": "v"})),
    ]
    path = tmp_path / "m.duckdb"
    store_with(events, path).close()
    store = MetricsStore.open(path)  # what was written survives a reopen
    counts = {
        table: store.count(table)
        for table in (
            "faults",
            "recoveries",
            "recovery_phases",
            "requests",
            "breaker_transitions",
            "agent_samples",
            "spans",
        )
    }
    assert counts == dict.fromkeys(counts, 1)
    [row] = store.recovery_summary(["strategy", "execution_provider", "breakers_enabled"])
    assert row.group == {
        "strategy": "progressive",
        "execution_provider": "wasm",
        "breakers_enabled": "true",
    }
    assert (row.count, row.success_rate, row.max_ms) == (1, 1.0, 100.0)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (pb.Event(), "event 1 has no event set"),
        (pb.Event(request=pb.RequestRecord()), "event 1: request_id is empty"),
        (
            pb.Event(request=pb.RequestRecord(request_id="q", latency=Duration(seconds=-1))),
            "request latency is negative",
        ),
        (pb.Event(span=pb.SpanRecord(trace_id="t")), "span span_id is empty"),
    ],
)
def test_a_malformed_event_refuses_its_whole_request(event: pb.Event, message: str) -> None:
    buffer = EventBuffer()
    with pytest.raises(InvalidEvent, match=message):
        buffer.add([request(0, 1), event])
    assert buffer.events == 0


def test_summary_groups_filters_and_percentiles() -> None:
    events = [recovery(i, ms=float(10 * (i + 1))) for i in range(10)]
    events += [recovery(100 + i, scenario="latency", ok=i % 2 == 0, run="r2") for i in range(4)]
    store = store_with(events)
    rows = {row.group["scenario"]: row for row in store.recovery_summary(["scenario"])}
    crash = rows["browser_crash"]
    assert (crash.count, crash.success_rate, crash.max_ms) == (10, 1.0, 100.0)
    assert crash.p50_ms == pytest.approx(55.0)  # quantile_cont interpolates
    assert crash.p95_ms == pytest.approx(95.5)
    assert rows["latency"].success_rate == 0.5
    [only] = store.recovery_summary(run_id="r2")
    assert only.count == 4
    later = store.recovery_summary(
        start=T0 + dt.timedelta(seconds=5), end=T0 + dt.timedelta(seconds=8)
    )
    assert later[0].count == 3
    with pytest.raises(QueryError, match="group_by takes any of scenario, strategy"):
        store.recovery_summary(["colour"])
    with pytest.raises(QueryError, match="is not before its end"):
        store.recovery_summary(start=T0, end=T0)


def test_time_series_buckets() -> None:
    store = store_with([request(i, 10 * (i % 3)) for i in range(6)])
    window = {"start": T0, "end": T0 + dt.timedelta(seconds=8)}
    rate = store.time_series("request_rate", bucket=dt.timedelta(seconds=2), **window)
    assert [p.value for p in rate] == [1.0, 1.0, 1.0, 0.0]
    assert rate[1].at == T0 + dt.timedelta(seconds=2)
    p50 = store.time_series("request_latency_p50_ms", bucket=dt.timedelta(seconds=3), **window)
    assert [p.value for p in p50] == [10.0, 10.0]
    assert len(store.time_series("recoveries", bucket=dt.timedelta(seconds=1), **window)) == 8
    with pytest.raises(QueryError, match="unknown metric 'cpu'"):
        store.time_series("cpu", bucket=dt.timedelta(seconds=1))
    with pytest.raises(QueryError, match="bucket must be positive"):
        store.time_series("recoveries", bucket=dt.timedelta(0))


def test_retention_drops_only_old_rows() -> None:
    store = store_with([recovery(0), recovery(86_400 * 40)])
    assert store.drop_expired(30, now=T0 + dt.timedelta(days=45)) == 2  # a recovery and its phase
    assert store.count("recoveries") == 1


def test_a_corrupt_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "metrics.duckdb"
    junk = b"not a database " * 1000
    path.write_bytes(junk)
    with pytest.raises(StoreError, match=str(path)):
        MetricsStore.open(path)
    assert path.read_bytes() == junk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.duckdb"]
