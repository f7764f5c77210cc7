"""The recovery service's gRPC servicer: checks requests, converts messages, nothing more."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.common.v1 import common_pb2
from webshard.recovery.v1 import recovery_pb2 as pb
from webshard.recovery.v1 import recovery_pb2_grpc as pb_grpc

from services.common.auth import methods
from services.common.durations import duration
from services.common.server import Lifecycle
from services.recovery.breakers import BreakerKey, Breakers, BreakerView
from services.recovery.execution import PhaseRecord
from services.recovery.recoveries import Recoveries, RecoveryRecord, WatchOverflow
from services.recovery.strategies import Failure, FailureKind, FailureSource, Strategy

SERVICE = pb.DESCRIPTOR.services_by_name["RecoveryService"].full_name
GUARDED_METHODS = methods(SERVICE, "ReportFailure", "ResetBreaker")
"""The calls that need the cluster token when one is set: a report starts a recovery
(shards move), a reset lets faults and traffic through. Reads and watches stay open."""

Context = grpc.aio.ServicerContext[object, object]

INTENSITIES = {
    value: name.removeprefix("INTENSITY_").lower()
    for name, value in common_pb2.Intensity.items()
    if value != common_pb2.INTENSITY_UNSPECIFIED
}
"""Intensity numbers and the labels recovery's domain and spans use."""
LABELS = {label: value for value, label in INTENSITIES.items()}

MAX_ID_CHARS = 200
"""The longest id or name a report may carry (agent, browser, model, request, fault)."""
MAX_CLOCK_SKEW_S = 60.0
"""How far in the future a report's detection time may lie (clocks differ a little)."""
MAX_REPORT_AGE_S = 3600.0
"""How long ago a reported failure may have been detected; an older one is history,
not something to recover from now."""
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ID = re.compile(r"[^\s/]+")


def quote(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error message: at most a short prefix of it."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def failure_from_proto(report: pb.FailureReport, now: float | None = None) -> Failure:
    """The report as recovery's domain sees it; ValueError says what is wrong with it.

    With ``now``, a detection time must lie within the last ``MAX_REPORT_AGE_S`` and
    no more than ``MAX_CLOCK_SKEW_S`` ahead.
    """
    if report.source not in {s.value for s in FailureSource}:
        raise ValueError(
            f"report.source must be data_path, heartbeat, page or agent (got {report.source})"
        )
    if report.kind not in {k.value for k in FailureKind}:
        names = ", ".join(k.label for k in FailureKind)
        raise ValueError(f"report.kind must be one of {names} (got {report.kind})")
    if not report.agent_id:
        raise ValueError("report.agent_id is empty; name the agent involved")
    for name, value in (("agent_id", report.agent_id), ("browser_id", report.browser_id)):
        if value and not _ID.fullmatch(value):
            raise ValueError(
                f"report.{name} {quote(value)} may not contain '/' or whitespace; "
                "give the id the agent registered with"
            )
    for name, value in (
        ("agent_id", report.agent_id),
        ("browser_id", report.browser_id),
        ("model", report.model),
        ("request_id", report.request_id),
        ("fault_id", report.fault_id),
    ):
        if len(value) > MAX_ID_CHARS:
            raise ValueError(
                f"report.{name} {quote(value)} is longer than {MAX_ID_CHARS} characters"
            )
    if report.fault_traceparent and not _TRACEPARENT.fullmatch(report.fault_traceparent):
        raise ValueError(
            f"report.fault_traceparent {quote(report.fault_traceparent)} is not a W3C "
            "traceparent (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>); leave it empty "
            "when unknown"
        )
    if report.shard_index < -1:
        raise ValueError(f"report.shard_index {report.shard_index} is below -1 (no shard)")
    if report.fault_intensity and report.fault_intensity not in INTENSITIES:
        raise ValueError(
            "report.fault_intensity must be unspecified, mild, moderate or severe "
            f"(got {report.fault_intensity})"
        )
    detected_at = _detected_at(report, now)
    return Failure(
        source=FailureSource(report.source),
        kind=FailureKind(report.kind),
        agent_id=report.agent_id,
        browser_id=report.browser_id,
        model=report.model,
        shard_index=report.shard_index,
        request_id=report.request_id,
        fault_id=report.fault_id,
        fault_intensity=INTENSITIES.get(report.fault_intensity, ""),
        fault_traceparent=report.fault_traceparent,
        message=report.message,
        detected_at=detected_at,
    )


def _detected_at(report: pb.FailureReport, now: float | None) -> float | None:
    if not report.HasField("detected_at"):
        return None
    try:
        detected = report.detected_at.ToNanoseconds() / 1e9
        report.detected_at.ToDatetime()  # checks the range ToNanoseconds does not
    except (ValueError, OverflowError) as exc:
        raise ValueError(
            f"report.detected_at is not a valid timestamp ({exc}); leave it unset to mean now"
        ) from None
    if now is not None:
        if detected > now + MAX_CLOCK_SKEW_S:
            raise ValueError(
                f"report.detected_at lies {detected - now:.0f} s in the future (more than "
                f"{MAX_CLOCK_SKEW_S:g} s of clock skew); check the reporter's clock, or leave "
                "it unset to mean now"
            )
        if detected < now - MAX_REPORT_AGE_S:
            raise ValueError(
                f"report.detected_at is {now - detected:.0f} s old (more than "
                f"{MAX_REPORT_AGE_S:g} s); report failures as they are detected, or leave it "
                "unset to mean now"
            )
    return detected


def failure_to_proto(failure: Failure) -> pb.FailureReport:
    """The report message of a failure."""
    report = pb.FailureReport(
        source=failure.source.value,  # type: ignore[arg-type]
        kind=failure.kind.value,  # type: ignore[arg-type]
        agent_id=failure.agent_id,
        browser_id=failure.browser_id,
        model=failure.model,
        shard_index=failure.shard_index,
        request_id=failure.request_id,
        fault_id=failure.fault_id,
        fault_intensity=LABELS.get(failure.fault_intensity, common_pb2.INTENSITY_UNSPECIFIED),
        fault_traceparent=failure.fault_traceparent,
        message=failure.message,
    )
    if failure.detected_at is not None:
        report.detected_at.CopyFrom(_timestamp(failure.detected_at))
    return report


def phase_to_proto(phase: PhaseRecord) -> pb.RecoveryPhase:
    """One phase message."""
    return pb.RecoveryPhase(
        name=phase.name,
        level=phase.level.value if phase.level is not None else 0,  # type: ignore[arg-type]
        started_at=_timestamp(phase.started_at),
        duration=duration(phase.duration_s),
        ok=phase.ok,
        detail=phase.detail,
    )


def recovery_to_proto(record: RecoveryRecord) -> pb.Recovery:
    """One recovery message."""
    message = pb.Recovery(
        recovery_id=record.recovery_id,
        report=failure_to_proto(record.failure),
        strategy=record.strategy.value,  # type: ignore[arg-type]
        state=record.state.value,  # type: ignore[arg-type]
        phases=[phase_to_proto(p) for p in record.phases],
        started_at=_timestamp(record.started_at),
        trace_id=record.trace_id,
        highest_level=(
            record.highest_level.value  # type: ignore[arg-type]
            if record.highest_level is not None
            else 0
        ),
        detail=record.detail,
        retry_pending=record.retry_pending,
        retried_by=record.retried_by,
    )
    if record.finished_at is not None:
        message.finished_at.CopyFrom(_timestamp(record.finished_at))
        message.duration.CopyFrom(duration(record.finished_at - record.started_at))
    if record.redundancy_restored_at is not None:
        message.redundancy_restored_at.CopyFrom(_timestamp(record.redundancy_restored_at))
        message.redundancy_restored.CopyFrom(
            duration(record.redundancy_restored_at - record.started_at)
        )
    return message


def breaker_to_proto(view: BreakerView) -> pb.Breaker:
    """One breaker message."""
    message = pb.Breaker(
        scope=view.key.scope.value,  # type: ignore[arg-type]
        target_id=view.key.target_id,
        state=view.state.value,  # type: ignore[arg-type]
        consecutive_failures=view.consecutive_failures,
        failure_rate=view.failure_rate,
    )
    if view.changed_at is not None:
        message.changed_at.CopyFrom(_timestamp(view.changed_at))
    if view.next_probe_at is not None:
        message.next_probe_at.CopyFrom(_timestamp(view.next_probe_at))
    return message


class RecoveryServicer(pb_grpc.RecoveryServiceServicer):
    """Takes failure reports, serves recoveries and breakers."""

    def __init__(
        self,
        *,
        recoveries: Recoveries,
        breakers: Breakers,
        lifecycle: Lifecycle,
        list_limit: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._recoveries = recoveries
        self._breakers = breakers
        self._lifecycle = lifecycle
        self._list_limit = list_limit
        self._clock = clock

    async def ReportFailure(
        self, request: pb.ReportFailureRequest, context: Context
    ) -> pb.ReportFailureResponse:
        """Start a recovery, or join the one running for the same failure."""
        if not request.HasField("report"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "report is missing")
        if request.strategy and request.strategy not in {s.value for s in Strategy}:
            names = ", ".join(s.label for s in Strategy)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"strategy {request.strategy} is unknown; leave it unset or use {names}",
            )
        try:
            failure = failure_from_proto(request.report, now=self._clock())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        strategy = Strategy(request.strategy) if request.strategy else None
        record, joined = self._recoveries.report(failure, strategy)
        return pb.ReportFailureResponse(recovery_id=record.recovery_id, deduplicated=joined)

    async def GetRecovery(
        self, request: pb.GetRecoveryRequest, context: Context
    ) -> pb.GetRecoveryResponse:
        """One recovery by id."""
        if not request.recovery_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recovery_id is empty")
        record = self._recoveries.get(request.recovery_id)
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no recovery {quote(request.recovery_id)} (unknown, or older than the "
                "recoveries kept; ListRecoveries shows those kept)",
            )
        return pb.GetRecoveryResponse(recovery=recovery_to_proto(record))

    async def ListRecoveries(
        self, request: pb.ListRecoveriesRequest, context: Context
    ) -> pb.ListRecoveriesResponse:
        """Recent recoveries, newest first."""
        if request.limit < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit {request.limit} is negative; 0 means the default of {self._list_limit}",
            )
        records = self._recoveries.list(request.limit or self._list_limit)
        return pb.ListRecoveriesResponse(recoveries=[recovery_to_proto(r) for r in records])

    async def WatchRecoveries(
        self, request: pb.WatchRecoveriesRequest, context: Context
    ) -> AsyncIterator[pb.WatchRecoveriesResponse]:
        """Every change to every recovery until the client leaves or the server drains."""
        watch = self._recoveries.watch(include_existing=request.include_existing)
        try:
            async for record in self._lifecycle.stream(watch, context):
                yield pb.WatchRecoveriesResponse(recovery=recovery_to_proto(record))
        except WatchOverflow as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        finally:
            watch.close()

    async def GetBreaker(
        self, request: pb.GetBreakerRequest, context: Context
    ) -> pb.GetBreakerResponse:
        """One breaker; a target never seen has a closed one."""
        key = await self._key(request.scope, request.target_id, context)
        return pb.GetBreakerResponse(breaker=breaker_to_proto(self._breakers.get(key)))

    async def ListBreakers(
        self, request: pb.ListBreakersRequest, context: Context
    ) -> pb.ListBreakersResponse:
        """Every breaker that has seen an outcome."""
        return pb.ListBreakersResponse(
            breakers=[breaker_to_proto(view) for view in self._breakers.list()]
        )

    async def ResetBreaker(
        self, request: pb.ResetBreakerRequest, context: Context
    ) -> pb.ResetBreakerResponse:
        """Close a breaker by hand; one that has seen no outcome is not found."""
        key = await self._key(request.scope, request.target_id, context)
        if not self._breakers.known(key):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no breaker for {key.scope.name.lower()} {quote(key.target_id)}: recovery has "
                "seen no outcome of it, so it is closed already (ListBreakers shows the known "
                "ones; check the id)",
            )
        return pb.ResetBreakerResponse(breaker=breaker_to_proto(self._breakers.reset(key)))

    async def _key(self, scope: int, target_id: str, context: Context) -> BreakerKey:
        try:
            return BreakerKey.parse(scope, target_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
