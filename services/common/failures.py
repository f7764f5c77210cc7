"""Hands detected failures to the recovery service (from the coordinator and the agents).

Reports go out in the background: the data path never waits for recovery, and
a recovery service that is down costs a log line, not a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.aio import RecoveryClient
from webshard.common.v1 import common_pb2
from webshard.errors import RPCError
from webshard.recovery.v1 import recovery_pb2

log = logging.getLogger(__name__)

Kind = recovery_pb2.FailureKind


def failure_kind(code: grpc.StatusCode) -> recovery_pb2.FailureKind.ValueType:
    """What a failed hop's status says about the failure."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Kind.FAILURE_KIND_TIMEOUT
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Kind.FAILURE_KIND_STREAM_BROKEN
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Kind.FAILURE_KIND_OUT_OF_MEMORY
    return Kind.FAILURE_KIND_SHARD_ERROR


@dataclasses.dataclass(frozen=True)
class FaultCause:
    """The injected fault a failure report names as its cause."""

    fault_id: str
    intensity: common_pb2.Intensity.ValueType = common_pb2.INTENSITY_UNSPECIFIED
    traceparent: str = ""
    """The W3C traceparent of the injection (the agent's span of the hook call)."""


class FailureReporter:
    """Sends FailureReports to recovery, if an address is configured."""

    def __init__(self, address: str, timeout_s: float = 2.0, *, token: str = "") -> None:
        # ``token``: the cluster token, which recovery requires of ReportFailure.
        self._client = (
            RecoveryClient(address, token=token or None, timeout=timeout_s) if address else None
        )
        self._tasks: set[asyncio.Task[None]] = set()

    def report(
        self,
        *,
        source: recovery_pb2.FailureSource.ValueType,
        kind: recovery_pb2.FailureKind.ValueType,
        agent_id: str,
        browser_id: str = "",
        model: str = "",
        shard_index: int = -1,
        request_id: str = "",
        message: str = "",
        cause: FaultCause | None = None,
    ) -> None:
        """Queue one report; returns at once."""
        if self._client is None:
            return
        detected = Timestamp()
        detected.FromNanoseconds(time.time_ns())
        report = recovery_pb2.FailureReport(
            source=source,
            kind=kind,
            agent_id=agent_id,
            browser_id=browser_id,
            model=model,
            shard_index=shard_index,
            request_id=request_id,
            message=message,
            detected_at=detected,
        )
        if cause is not None:
            report.fault_id = cause.fault_id
            report.fault_intensity = cause.intensity
            report.fault_traceparent = cause.traceparent
        task = asyncio.get_running_loop().create_task(self._send(report))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, report: recovery_pb2.FailureReport) -> None:
        assert self._client is not None
        try:
            await self._client.report_failure(report)
        except RPCError as exc:
            log.warning(
                "recovery did not take a failure report",
                extra={"agent_id": report.agent_id, "code": exc.code.name, "error": exc.message},
            )

    async def close(self) -> None:
        """Wait briefly for reports in flight, then close the channel."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._client is not None:
            await self._client.close()
