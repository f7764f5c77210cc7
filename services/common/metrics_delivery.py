"""Delivering a service's records to the metrics service: bounded, retried, acknowledged.

A service hands each record (a breaker transition, a fault) to ``MetricsSender.send``,
which never blocks and never raises: the record waits in a bounded queue, and one
task sends the queue in batches, each batch over one Ingest client stream. A batch
counts as delivered only when the IngestResponse's ``committed`` count says every
event of it was committed. While the metrics service is unreachable the same batch
is retried with exponential backoff; after ``give_up_s`` of failures it is dropped.

Nothing is dropped silently. A record that does not fit the queue, or whose batch
was given up, is counted as dropped (per reason, with the span of times the dropped
records were produced), and those counts travel to the metrics service as
``DeliveryLoss`` events at the head of the next batch that goes through, so a
report shows what it is missing. A loss report is itself retried until it is
acknowledged; only what is still queued when the service stops is lost unreported
(it is logged).

Delivery is at least once: a batch the metrics service committed but whose
answer was lost is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.aio import MetricsClient
from webshard.errors import RPCError
from webshard.metrics.v1 import metrics_pb2

log = logging.getLogger(__name__)

QUEUE_FULL = "queue full"
UNREACHABLE = "metrics unreachable"
REFUSED = "refused by metrics"
UNACKNOWLEDGED = "not acknowledged"
STOPPED = "service stopped"


@dataclass(frozen=True)
class DeliveryConfig:
    """How a sender queues and retries."""

    capacity: int = 10_000
    """Records the queue holds; one more is dropped (and counted) rather than kept."""
    batch_size: int = 500
    """Most records one Ingest stream carries."""
    retry_initial_s: float = 0.2
    """Wait before the first retry of a batch; each later one waits twice as long."""
    retry_max_s: float = 5.0
    """Longest wait between two tries."""
    give_up_s: float = 60.0
    """A batch that failed for this long is dropped (and counted), so the queue moves on."""
    timeout_s: float = 10.0
    """Deadline of one Ingest call."""

    def validate(self) -> None:
        """Raise ValueError naming the first value out of range."""
        if self.capacity < 1 or self.batch_size < 1:
            raise ValueError("the delivery queue's capacity and batch size must be at least 1")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError("delivery retry waits must be positive, the first at most the longest")
        if self.give_up_s <= 0 or self.timeout_s <= 0:
            raise ValueError("delivery give-up time and call deadline must be positive")


@dataclass
class _Loss:
    """Records dropped for one reason and not yet reported."""

    count: int
    first_at: float
    last_at: float

    def merge(self, other: _Loss) -> None:
        self.count += other.count
        self.first_at = min(self.first_at, other.first_at)
        self.last_at = max(self.last_at, other.last_at)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


class MetricsSender:
    """One service's queue of records for the metrics service and the task that sends it.

    Use from the event loop's thread: ``start`` in the service's start hook,
    ``send`` from anywhere on the loop, ``close`` in the stop hook.
    """

    def __init__(
        self,
        target: str,
        *,
        service: str,
        config: DeliveryConfig | None = None,
        token: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or DeliveryConfig()
        self._token = token
        """The cluster token (Ingest is guarded when the metrics service has one)."""
        self.config.validate()
        self.service = service
        self._target = target
        self._clock = clock
        self._queue: deque[tuple[float, metrics_pb2.Event]] = deque()
        self._losses: dict[str, _Loss] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._client: MetricsClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.delivered = 0
        """Records the metrics service acknowledged."""
        self.dropped = 0
        """Records given up on (queue full, metrics unreachable too long, refused)."""
        self.losses_reported = 0
        """Dropped records whose count the metrics service acknowledged."""

    @property
    def queued(self) -> int:
        """Records waiting to be sent (the batch in flight included)."""
        return len(self._queue)

    def send(self, event: metrics_pb2.Event) -> bool:
        """Queue ``event``; False (and the record counted as dropped) when the queue is full."""
        now = self._clock()
        if self._closed or len(self._queue) >= self.config.capacity:
            self._lose(1, STOPPED if self._closed else QUEUE_FULL, now, now)
            return False
        self._queue.append((now, event))
        self._idle.clear()
        self._wake.set()
        return True

    def start(self) -> None:
        """Start sending (call on the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"metrics-delivery-{self.service}")

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued and no loss is unreported; False at the deadline."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    async def close(self, *, drain_s: float = 2.0) -> None:
        """Send what is queued for up to ``drain_s``, then stop; what is left is logged."""
        self._closed = True
        if self._task is not None:
            await self.wait_idle(drain_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue or self._losses:
            left = len(self._queue)
            self._lose(left, STOPPED, self._clock(), self._clock())
            log.warning(
                "records never delivered to the metrics service",
                extra={
                    "service": self.service,
                    "unreported": {reason: loss.count for reason, loss in self._losses.items()},
                },
            )
            self._queue.clear()
        if self._client is not None:
            await self._client.close()

    # --- the sending task -----------------------------------------------------

    def _lose(self, count: int, reason: str, first_at: float, last_at: float) -> None:
        if count <= 0:
            return
        self.dropped += count
        loss = _Loss(count, first_at, last_at)
        if reason in self._losses:
            self._losses[reason].merge(loss)
        else:
            self._losses[reason] = loss
        self._idle.clear()
        self._wake.set()

    def _loss_events(self, losses: dict[str, _Loss]) -> list[metrics_pb2.Event]:
        return [
            metrics_pb2.Event(
                delivery_loss=metrics_pb2.DeliveryLoss(
                    service=self.service,
                    dropped=loss.count,
                    first_dropped_at=_timestamp(loss.first_at),
                    last_dropped_at=_timestamp(loss.last_at),
                    reason=reason,
                )
            )
            for reason, loss in losses.items()
        ]

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue or self._losses:
                await self._send_one_batch()
            self._idle.set()

    async def _send_one_batch(self) -> None:
        """Send the oldest batch (and the unreported losses) until acknowledged or given up."""
        batch = [self._queue[i] for i in range(min(self.config.batch_size, len(self._queue)))]
        losses, self._losses = self._losses, {}
        events = self._loss_events(losses) + [event for _, event in batch]
        outcome = await self._deliver(events)
        # Only now do the records leave the queue: while retrying they count against it.
        for _ in batch:
            self._queue.popleft()
        first_at = min((at for at, _ in batch), default=self._clock())
        last_at = max((at for at, _ in batch), default=first_at)
        if isinstance(outcome, int):
            unacknowledged = len(events) - outcome
            self.delivered += len(batch) - max(0, unacknowledged)
            self.losses_reported += sum(loss.count for loss in losses.values())
            self._lose(min(unacknowledged, len(batch)), UNACKNOWLEDGED, first_at, last_at)
            return
        # Given up: the records are lost, the loss counts go back to wait for the next try.
        for reason, loss in losses.items():
            if reason in self._losses:
                self._losses[reason].merge(loss)
            else:
                self._losses[reason] = loss
        self._lose(len(batch), outcome, first_at, last_at)
        if not batch:
            # Only loss reports were pending: wait before trying them again, not in a spin.
            await asyncio.sleep(self.config.retry_max_s)

    async def _deliver(self, events: list[metrics_pb2.Event]) -> int | str:
        """The committed count, or the reason the events were given up."""
        config = self.config
        wait = config.retry_initial_s
        started = time.monotonic()
        while True:
            if self._client is None:
                self._client = MetricsClient(
                    self._target, timeout=config.timeout_s, token=self._token or None
                )
            try:
                return await self._client.ingest(
                    events, batch_size=len(events), timeout=config.timeout_s
                )
            except RPCError as exc:
                if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                    # Sending it again would be refused again.
                    log.error(
                        "the metrics service refused a batch of records",
                        extra={"service": self.service, "error": str(exc)[:200]},
                    )
                    return REFUSED
                error = str(exc)
            except (grpc.RpcError, OSError) as exc:
                error = str(exc)
            # A fresh channel for the next try: a channel whose server was down backs off
            # its reconnects (up to minutes), which would outlast the server's return.
            client, self._client = self._client, None
            await client.close()
            if time.monotonic() - started + wait > config.give_up_s:
                log.warning(
                    "the metrics service stayed unreachable; records dropped",
                    extra={"service": self.service, "error": error[:200]},
                )
                return UNREACHABLE
            await asyncio.sleep(wait)
            wait = min(wait * 2, config.retry_max_s)


class SenderSettings(Protocol):
    """The settings of a service that sends records to the metrics service."""

    metrics: str
    metrics_queue: int
    metrics_give_up_s: float
    cluster_token: str


def sender_from(settings: SenderSettings, service: str) -> MetricsSender | None:
    """The sender ``settings`` ask for, or None when they name no metrics service."""
    if not settings.metrics:
        return None
    return MetricsSender(
        settings.metrics,
        service=service,
        config=DeliveryConfig(
            capacity=settings.metrics_queue, give_up_s=settings.metrics_give_up_s
        ),
        token=settings.cluster_token,
    )
