"""The shared metrics sender against a real in-process metrics server: bounded, retried,
acknowledged, and every dropped record counted and reported."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from webshard.common.v1 import common_pb2
from webshard.metrics.v1 import metrics_pb2 as pb
from webshard.metrics.v1 import metrics_pb2_grpc as pb_grpc

from services.common.auth import TokenInterceptor
from services.common.metrics_delivery import (
    QUEUE_FULL,
    UNREACHABLE,
    DeliveryConfig,
    MetricsSender,
)
from services.common.server import Lifecycle
from services.metrics.servicer import GUARDED_METHODS, MetricsServicer
from services.metrics.store import MetricsStore

FAST = DeliveryConfig(capacity=5, batch_size=3, retry_initial_s=0.01, retry_max_s=0.05)


class Metrics:
    """A metrics server on a fixed loopback port that can be stopped and started again."""

    def __init__(self, path: Path, port: int, token: str = "") -> None:
        self.path = path
        self.port = port
        self.token = token
        self._server: grpc.aio.Server | None = None
        self._servicer: MetricsServicer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._servicer = MetricsServicer(MetricsStore.open(self.path), Lifecycle())
        self._server = grpc.aio.server(interceptors=[TokenInterceptor(self.token, GUARDED_METHODS)])
        pb_grpc.add_MetricsServiceServicer_to_server(self._servicer, self._server)
        assert self._server.add_insecure_port(self.address) == self.port
        await self._server.start()

    async def stop(self) -> None:
        assert self._server is not None and self._servicer is not None
        await self._server.stop(None)
        await asyncio.to_thread(self._servicer.close)
        self._server = self._servicer = None

    async def count(self, table: str) -> int:
        """Rows in ``table``; the server stops for the look and starts again."""
        await self.stop()
        store = MetricsStore.open(self.path)
        try:
            return store.count(table)
        finally:
            store.close()
            await self.start()

    async def report(self, fmt: pb.ReportFormat.ValueType, run_id: str = "") -> bytes:
        assert self._servicer is not None
        response = await self._servicer.GetReport(
            pb.GetReportRequest(format=fmt, run_id=run_id),
            None,  # type: ignore[arg-type]
        )
        return response.content


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def metrics(tmp_path: Path) -> AsyncIterator[Metrics]:
    server = Metrics(tmp_path / "metrics.duckdb", free_port())
    await server.start()
    try:
        yield server
    finally:
        if server._server is not None:
            await server.stop()


def transition(i: int) -> pb.Event:
    event = pb.Event(
        breaker_transition=pb.BreakerTransition(
            target_id=f"agent-{i}",
            from_state=common_pb2.BREAKER_STATE_CLOSED,
            to_state=common_pb2.BREAKER_STATE_OPEN,
            reason="5 consecutive failures",
        )
    )
    event.breaker_transition.at.GetCurrentTime()
    return event


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for ``condition`` with a deadline, looking every 10 ms."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the sender's counters have no event to wait on
            await asyncio.sleep(0.01)


async def test_records_are_delivered_and_acknowledged(metrics: Metrics) -> None:
    sender = MetricsSender(metrics.address, service="recovery", config=FAST)
    sender.start()
    try:
        for i in range(4):
            assert sender.send(transition(i))
        assert await sender.wait_idle(10)
        assert sender.delivered == 4 and sender.dropped == 0
    finally:
        await sender.close()
    assert await metrics.count("breaker_transitions") == 4
    assert await metrics.count("delivery_losses") == 0


async def test_a_sender_with_the_cluster_token_delivers_to_a_guarded_metrics_service(
    tmp_path: Path,
) -> None:
    guarded = Metrics(tmp_path / "guarded.duckdb", free_port(), token="s3cret")
    await guarded.start()
    try:
        sender = MetricsSender(guarded.address, service="recovery", config=FAST, token="s3cret")
        sender.start()
        try:
            assert sender.send(transition(0))
            assert await sender.wait_idle(10)
            assert sender.delivered == 1 and sender.dropped == 0
        finally:
            await sender.close()
        assert await guarded.count("breaker_transitions") == 1
    finally:
        await guarded.stop()


async def test_a_full_queue_drops_and_counts_and_the_count_reaches_metrics(
    metrics: Metrics,
) -> None:
    await metrics.stop()  # nothing drains the queue while metrics is down
    sender = MetricsSender(metrics.address, service="recovery", config=FAST)
    sender.start()
    try:
        accepted = [sender.send(transition(i)) for i in range(8)]
        assert accepted == [True] * 5 + [False] * 3  # bounded: capacity 5
        assert sender.dropped == 3 and sender.queued == 5
        await metrics.start()
        # Retried with backoff until metrics answers: the queued five arrive, then the loss.
        assert await sender.wait_idle(10)
        assert sender.delivered == 5 and sender.losses_reported == 3
    finally:
        await sender.close()
    report = json.loads(await metrics.report(pb.REPORT_FORMAT_JSON))
    assert report["delivery"] == {
        "dropped": 3,
        "losses": [{"service": "recovery", "reason": QUEUE_FULL, "dropped": 3}],
    }
    assert report["breaker_transitions"] == 5
    markdown = (await metrics.report(pb.REPORT_FORMAT_MARKDOWN)).decode()
    assert "**3 record(s) never reached the metrics service**" in markdown
    assert "| recovery | queue full | 3 |" in markdown
    html = (await metrics.report(pb.REPORT_FORMAT_HTML)).decode()
    assert "3 record(s) never reached the metrics service" in html


async def test_a_batch_given_up_is_counted_and_reported_once_metrics_is_back(
    metrics: Metrics,
) -> None:
    await metrics.stop()
    config = DeliveryConfig(
        capacity=10, batch_size=10, retry_initial_s=0.01, retry_max_s=0.02, give_up_s=0.2
    )
    sender = MetricsSender(metrics.address, service="fault-injector", config=config)
    sender.start()
    try:
        for i in range(2):
            sender.send(transition(i))
        await until(lambda: sender.dropped == 2)  # gave up after give_up_s of failures
        assert sender.delivered == 0
        await metrics.start()
        sender.send(transition(9))
        assert await sender.wait_idle(10)
        assert sender.delivered == 1 and sender.losses_reported == 2
    finally:
        await sender.close()
    report = json.loads(await metrics.report(pb.REPORT_FORMAT_JSON))
    assert report["delivery"]["losses"] == [
        {"service": "fault-injector", "reason": UNREACHABLE, "dropped": 2}
    ]
    assert report["breaker_transitions"] == 1
