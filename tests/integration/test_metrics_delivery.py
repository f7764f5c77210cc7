"""A real recovery service's breaker transitions reach the metrics service and a run's
report; while metrics is down they are retried, and what is given up shows as a count.

Real processes on loopback: the metrics service and the recovery service, whose
coordinator address leads nowhere. A failure report naming an agent and no model is
a recovery that fails, which with a one-outcome breaker window opens that agent's
breaker; ResetBreaker closes it again: two transitions per cycle.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from webshard.aio import MetricsClient, RecoveryClient
from webshard.common.v1 import common_pb2
from webshard.metrics.v1 import metrics_pb2
from webshard.recovery.v1 import recovery_pb2

from tests.conftest import REPO, ServiceProcess, free_port

RUN = "run-delivery"


def breaker_args(metrics: str) -> list[str]:
    return [
        "--coordinators",
        f"127.0.0.1:{free_port()}",
        "--metrics",
        metrics,
        "--breaker-window",
        "1",
        "--breaker-minimum-calls",
        "1",
        "--breaker-consecutive-failures",
        "1",
        "--metrics-give-up-s",
        "1",
        "--action-timeout-s",
        "1",
        "--recovery-retries",
        "0",
    ]


def start_metrics(db: Path, port: int, log: Path) -> ServiceProcess:
    """The metrics service on ``port`` (fixed, so a restart is found at the same address)."""
    proc = ServiceProcess.__new__(ServiceProcess)
    proc.port, proc.address, proc.log = port, f"127.0.0.1:{port}", log
    with open(log, "ab") as out:
        proc.popen = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.metrics", "--port", str(port)),
                *("--http-port", "0", "--db-path", str(db)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, "TMPDIR": str(log.parent)},
        )
    proc.wait_serving()
    return proc


async def until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():  # type: ignore[misc]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def open_and_close(recovery: RecoveryClient, agent: str) -> None:
    """One failure opens ``agent``'s breaker; a reset closes it."""
    await recovery.report_failure(
        recovery_pb2.FailureReport(
            source=recovery_pb2.FAILURE_SOURCE_HEARTBEAT,
            kind=recovery_pb2.FAILURE_KIND_AGENT_GONE,
            agent_id=agent,
        )
    )

    async def opened() -> bool:
        return (await recovery.get_breaker(agent)).state == common_pb2.BREAKER_STATE_OPEN

    await until(opened, 30, f"{agent}'s breaker to open")
    await recovery.reset_breaker(agent)


async def mark_run(metrics: MetricsClient, i: int) -> None:
    """A request of the run now: the run's window reaches to this moment."""
    request = metrics_pb2.RequestRecord(request_id=f"req-{i}", ok=True, run_id=RUN)
    request.started_at.GetCurrentTime()
    await metrics.ingest([metrics_pb2.Event(request=request)])


async def report(metrics: MetricsClient) -> dict[str, object]:
    doc: dict[str, object] = json.loads(await metrics.report(format="json", run_id=RUN))
    return doc


def test_breaker_transitions_reach_the_run_report_and_an_outage_shows_its_losses(
    tmp_path: Path,
) -> None:
    db, port = tmp_path / "metrics.duckdb", free_port()
    metrics_proc = start_metrics(db, port, tmp_path / "metrics.log")
    recovery_proc = ServiceProcess(
        "recovery", breaker_args(metrics_proc.address), tmp_path / "recovery.log"
    )
    try:
        recovery_proc.wait_serving()

        async def scenario() -> None:
            nonlocal metrics_proc
            recovery = RecoveryClient(recovery_proc.address, timeout=10)
            try:
                metrics = MetricsClient(metrics_proc.address, timeout=10)
                await mark_run(metrics, 0)
                await open_and_close(recovery, "agent-1")

                # Both transitions are in the run's report once the run reaches past them.
                async def in_report() -> bool:
                    await mark_run(metrics, 1)
                    doc = await report(metrics)
                    return doc["breaker_transitions"] == 2

                await until(in_report, 30, "the transitions in the run's report")
                await metrics.close()

                # Metrics goes away mid-run: the transitions made meanwhile are retried,
                # then given up (after --metrics-give-up-s) and counted.
                metrics_proc.stop()
                await open_and_close(recovery, "agent-2")

                async def given_up() -> bool:
                    return "records dropped" in recovery_proc.log.read_text()

                await until(given_up, 30, "recovery to give up on the batch")
                metrics_proc = start_metrics(db, port, tmp_path / "metrics.log")
                metrics = MetricsClient(metrics_proc.address, timeout=10)
                await open_and_close(recovery, "agent-3")  # something to send: the loss rides along

                dropped: list[int] = []

                async def loss_reported() -> bool:
                    # Every one of the 6 transitions is in the report or counted as lost,
                    # and the outage lost some (which of its records were given up, and
                    # whether a batch sent while metrics restarted was too, is timing).
                    await mark_run(metrics, 2)
                    doc = await report(metrics)
                    delivery = doc["delivery"]
                    assert isinstance(delivery, dict)
                    dropped[:] = [int(delivery["dropped"])]
                    return bool(
                        dropped[0] >= 1 and dropped[0] + int(doc["breaker_transitions"]) == 6
                    )

                await until(loss_reported, 30, "the dropped count in the run's report")
                markdown = (await metrics.report(format="markdown", run_id=RUN)).decode()
                lost = dropped[0]
                assert f"**{lost} record(s) never reached the metrics service**" in markdown
                assert f"| recovery | metrics unreachable | {lost} |" in markdown
                await metrics.close()
            finally:
                await recovery.close()

        asyncio.run(scenario())
    finally:
        recovery_proc.stop()
        metrics_proc.stop()
