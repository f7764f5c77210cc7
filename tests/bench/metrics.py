"""`make bench-metrics`: ingestion rate over a real gRPC stream, and query latency.

One metrics service runs as a real process on loopback with its database in a
temporary directory. The SDK's ``MetricsClient.ingest`` streams pre-built
events in IngestRequests of ``--batch`` events; the rate is events over the
time from the first request to the acknowledgement (which comes only after
every event is committed). Then the recovery summary (grouped by scenario and
strategy) and a time series (request p95 latency in one-minute buckets) are
each asked ``--queries`` times over the ``--events`` rows just ingested.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import webshard
from webshard.common.v1 import common_pb2
from webshard.metrics.v1 import metrics_pb2 as pb

from tests.bench.common import REPO, percentiles, write
from tests.conftest import free_port, health_status

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
SCENARIOS = ["browser_crash", "connection_lost", "latency", "memory_pressure", "partition"]
STRATEGIES = [
    common_pb2.RECOVERY_STRATEGY_SIMPLE,
    common_pb2.RECOVERY_STRATEGY_PROGRESSIVE,
    common_pb2.RECOVERY_STRATEGY_COORDINATED,
]


def recoveries(count: int) -> list[pb.Event]:
    """Recoveries spread over a day, each with two phases."""
    events = []
    for i in range(count):
        event = pb.Event()
        r = event.recovery
        r.recovery_id = f"rec-{i}"
        r.scenario = SCENARIOS[i % len(SCENARIOS)]
        r.strategy = STRATEGIES[i % len(STRATEGIES)]
        r.model = "vit-tiny"
        r.execution_provider = common_pb2.EXECUTION_PROVIDER_WASM
        r.succeeded = i % 17 != 0
        r.started_at.FromDatetime(T0 + dt.timedelta(milliseconds=864 * i))
        r.duration.FromMilliseconds(200 + (i * 7919) % 3000)
        r.run_id = "bench"
        r.phases.add(name="detect", level="shard").duration.FromMilliseconds(20)
        r.phases.add(name="restart", level="shard").duration.FromMilliseconds(150)
        events.append(event)
    return events


def requests(count: int) -> list[pb.Event]:
    """Inference requests spread over a day."""
    events = []
    for i in range(count):
        event = pb.Event()
        q = event.request
        q.request_id = f"req-{i}"
        q.model = "vit-tiny"
        q.started_at.FromDatetime(T0 + dt.timedelta(milliseconds=864 * i))
        q.latency.FromMilliseconds(5 + (i * 104729) % 200)
        q.ok = True
        q.run_id = "bench"
        events.append(event)
    return events


def ingest(
    client: webshard.MetricsClient, kind: str, events: list[pb.Event], batch: int
) -> dict[str, Any]:
    started = time.perf_counter()
    committed = client.ingest(events, batch_size=batch, timeout=300)
    elapsed = time.perf_counter() - started
    assert committed == len(events), (committed, len(events))
    return {
        "case": f"ingest {kind}",
        "events": len(events),
        "batch": batch,
        "events_per_s": round(len(events) / elapsed),
        "seconds": round(elapsed, 3),
    }


def timed(case: str, rows: int, queries: int, call: Any) -> dict[str, Any]:
    call()  # the first answer warms DuckDB's caches; it is not counted
    samples = []
    for _ in range(queries):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return {"case": case, "events": rows, "queries": queries, **percentiles(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        address = f"127.0.0.1:{free_port()}"
        port = address.rsplit(":", 1)[1]
        with open(Path(tmp) / "metrics.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.metrics", "--port", port, "--data-dir", tmp],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            deadline = time.monotonic() + 60
            while health_status(address) != "SERVING":
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"metrics did not start:\n{(Path(tmp) / 'metrics.log').read_text()}"
                    )
                time.sleep(0.05)
            with webshard.MetricsClient(address, timeout=60) as client:
                rows.append(ingest(client, "requests", requests(args.events), args.batch))
                rows.append(ingest(client, "recoveries", recoveries(args.events), args.batch))
                rows.append(
                    timed(
                        "summary by scenario, strategy",
                        args.events,
                        args.queries,
                        lambda: client.recovery_summary(group_by=["scenario", "strategy"]),
                    )
                )
                day = (T0, T0 + dt.timedelta(days=1))
                rows.append(
                    timed(
                        "time series request p95, 60 s buckets",
                        args.events,
                        args.queries,
                        lambda: client.time_series(
                            "request_latency_p95_ms", time_range=day, bucket_s=60
                        ),
                    )
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    write(
        "metrics",
        rows,
        [
            "case",
            "events",
            "batch",
            "events_per_s",
            "seconds",
            "queries",
            "p50_ms",
            "p95_ms",
            "max_ms",
        ],
    )


if __name__ == "__main__":
    main()
