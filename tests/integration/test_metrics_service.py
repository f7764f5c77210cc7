"""The metrics service as a real process: durable acknowledgements, bad input, a corrupt file."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import webshard
from google.protobuf.duration_pb2 import Duration
from webshard.metrics.v1 import metrics_pb2 as pb

from tests.conftest import REPO, ServiceProcess, free_port, wait_for

BATCH = 500
COMMAND = [sys.executable, "-m", "services.metrics"]


def recoveries(run_id: str, count: int) -> list[pb.Event]:
    events = []
    for i in range(count):
        event = pb.Event()
        event.recovery.recovery_id = f"{run_id}-{i}"
        event.recovery.run_id = run_id
        event.recovery.scenario = "browser_crash"
        event.recovery.succeeded = True
        event.recovery.started_at.GetCurrentTime()
        event.recovery.duration.FromMilliseconds(40 + i % 50)
        events.append(event)
    return events


def test_every_acknowledged_event_survives_sigkill(
    start_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    data_dir = str(tmp_path / "data")
    proc = start_service("metrics", "--data-dir", data_dir)
    acknowledged: list[str] = []  # run ids whose ingest returned, one per batch
    stopped = threading.Event()

    def ingest() -> None:
        with webshard.MetricsClient(proc.address, timeout=10) as client:
            for n in range(10_000):
                run_id = f"run-{n}"
                try:
                    committed = client.ingest(recoveries(run_id, BATCH), batch_size=100)
                except webshard.RPCError:
                    break
                assert committed == BATCH
                acknowledged.append(run_id)
        stopped.set()

    writer = threading.Thread(target=ingest, daemon=True)
    writer.start()
    wait_for(lambda: len(acknowledged) >= 20, 60, "20 acknowledged ingest streams")
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(timeout=10)
    assert stopped.wait(30)
    writer.join(timeout=10)

    restarted = start_service("metrics", "--data-dir", data_dir)
    with webshard.MetricsClient(restarted.address, timeout=10) as client:
        rows = client.recovery_summary(group_by=["run_id"])
    stored = {row.group["run_id"]: row.count for row in rows}
    lost = [run_id for run_id in acknowledged if stored.get(run_id) != BATCH]
    assert not lost, f"acknowledged but not stored in full: {lost}"


def test_bad_input_is_invalid_argument(start_service: Callable[..., ServiceProcess]) -> None:
    proc = start_service("metrics")
    with webshard.MetricsClient(proc.address, timeout=10) as client:
        # Three good events, then a request holding an empty one: the first request is kept.
        with pytest.raises(webshard.InvalidArgumentError, match="event 3 has no event set"):
            client.ingest([*recoveries("good", 3), pb.Event()], batch_size=3)
        with pytest.raises(webshard.InvalidArgumentError, match="request latency is negative"):
            bad = pb.Event(request=pb.RequestRecord(request_id="q", latency=Duration(seconds=-2)))
            client.ingest([bad])
        [row] = client.recovery_summary(group_by=["run_id"])
        assert (row.group["run_id"], row.count) == ("good", 3)

        with pytest.raises(webshard.InvalidArgumentError, match="group_by takes any of"):
            client.recovery_summary(group_by=["colour"])
        now = dt.datetime.now(dt.UTC)
        with pytest.raises(webshard.InvalidArgumentError, match="is not before its end"):
            client.recovery_summary(time_range=(now, now - dt.timedelta(seconds=1)))
        with pytest.raises(webshard.InvalidArgumentError, match="unknown metric 'cpu'"):
            client.time_series("cpu", time_range=(None, now), bucket_s=1)
        points = client.time_series(
            "recoveries", time_range=(now - dt.timedelta(seconds=60), now), bucket_s=60
        )
        assert [p.value for p in points] == [3.0]


def test_a_corrupt_database_stops_the_service_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "metrics.duckdb"
    junk = b"this is not a DuckDB file\n" * 500
    path.write_bytes(junk)
    result = subprocess.run(
        [*COMMAND, "--port", str(free_port()), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert f"cannot open the metrics database {path}" in result.stdout + result.stderr
    assert path.read_bytes() == junk
