"""Recovery bookkeeping, its traces, the servicer over a real in-process gRPC server,
and the coordinator actuator against a fake SDK client."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from webshard.aio import InferResult, ShardHop
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import (
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)
from webshard.recovery.v1 import recovery_pb2 as pb
from webshard.recovery.v1 import recovery_pb2_grpc as pb_grpc

from services.common.server import Lifecycle
from services.common.settings import SettingsError, load_settings
from services.recovery.actuator import (
    MAX_REMEMBERED_MOVES,
    CoordinatorActuator,
    placement_from_proto,
)
from services.recovery.breakers import BreakerConfig, BreakerKey, Breakers, BreakerState
from services.recovery.execution import ActionFailed, ActionUnavailable
from services.recovery.recoveries import (
    Recoveries,
    RecoveriesConfig,
    RecoveryRecord,
    RecoveryState,
    WatchOverflow,
)
from services.recovery.servicer import RecoveryServicer, recovery_to_proto
from services.recovery.settings import RecoverySettings
from services.recovery.strategies import (
    Action,
    AdaptiveChooser,
    FailureKind,
    Level,
    ModelPlacement,
    Replica,
    Strategy,
    Target,
)
from tests.conftest import until
from tests.unit.test_recovery_breakers import T0, FakeClock
from tests.unit.test_recovery_strategies import FAIL, PLACEMENT, FakeActuator, failure


@dataclass
class FakePlacements:
    """Placements by model; ``None`` for a model not deployed."""

    placements: dict[str, ModelPlacement] = field(default_factory=dict)

    async def placement(self, model: str) -> ModelPlacement | None:
        return self.placements.get(model)


@dataclass
class Harness:
    """Recoveries over a fake actuator and clock, with spans kept in memory."""

    clock: FakeClock
    actuator: FakeActuator
    breakers: Breakers
    recoveries: Recoveries
    spans: InMemorySpanExporter


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    clock = FakeClock()
    actuator = FakeActuator(clock)
    breakers = Breakers(BreakerConfig(), clock)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recoveries = Recoveries(
        actuator=actuator,
        placements=FakePlacements({"minilm-l6": PLACEMENT}),
        breakers=breakers,
        chooser=AdaptiveChooser(min_trials=1),
        config=RecoveriesConfig(default_strategy=Strategy.PROGRESSIVE, max_recoveries=5),
        clock=clock,
        tracer_provider=provider,
        new_id=iter(f"r{i}" for i in range(1, 1000)).__next__,
    )
    yield Harness(clock, actuator, breakers, recoveries, exporter)
    await recoveries.close()


# ----------------------------------------------------------------------------- bookkeeping

INJECTION = "00-" + "1f" * 16 + "-" + "2e" * 8 + "-01"
"""The traceparent of a fault's injection, as the agent that applied it reports it."""


async def test_a_recovery_runs_from_detection_to_the_verify_that_passed(harness: Harness) -> None:
    harness.clock.advance(0.5)  # the report arrives half a second after detection
    record, joined = harness.recoveries.report(failure(FailureKind.SHARD_ERROR), Strategy.SIMPLE)
    assert (record.recovery_id, joined, record.state) == ("r1", False, RecoveryState.RUNNING)
    done = await harness.recoveries.wait("r1")
    assert done.state == RecoveryState.SUCCEEDED
    assert [p.name for p in done.phases] == ["detect", "plan", "replace", "verify"]
    assert done.phases[0].duration_s == 0.5
    assert done.started_at == T0
    # detect 0.5 s, then replace and verify at 0.25 s each.
    assert done.finished_at == T0 + 1.0
    assert done.duration_s == 1.0
    assert done.highest_level == Level.REPLACE_ON_STANDBY
    assert done.detail.startswith("restored at replace_on_standby: verify done")
    assert (done.strategy, done.chosen) == (Strategy.SIMPLE, Strategy.SIMPLE)
    # The report counted as a failure; the passing verify as a success.
    assert harness.breakers.get(BreakerKey.browser("agent-1", "b0")).calls == 2


async def test_the_strategy_comes_from_the_request_then_the_model_then_the_default(
    harness: Harness,
) -> None:
    # minilm-l6 was deployed with coordinated.
    record, _ = harness.recoveries.report(failure(shard_index=0))
    assert (await harness.recoveries.wait(record.recovery_id)).strategy == Strategy.COORDINATED
    record, _ = harness.recoveries.report(failure(model="vit-tiny"))
    assert (await harness.recoveries.wait(record.recovery_id)).strategy == Strategy.PROGRESSIVE
    record, _ = harness.recoveries.report(failure(shard_index=2), Strategy.ADAPTIVE)
    done = await harness.recoveries.wait(record.recovery_id)
    assert done.strategy == Strategy.ADAPTIVE
    assert done.chosen in AdaptiveChooser.CANDIDATES
    assert done.phases[1].detail.startswith(f"adaptive chose {done.chosen.label} (exploring")
    # Every finished recovery feeds adaptive's history.
    stats = harness.recoveries.chooser.stats(FailureKind.RENDERER_CRASH)
    assert sum(s.trials for s in stats.values()) == 3


async def test_reports_of_one_failure_share_one_recovery_while_it_runs(harness: Harness) -> None:
    harness.actuator.gate = asyncio.Event()
    first, joined = harness.recoveries.report(failure())
    assert not joined
    second, joined = harness.recoveries.report(failure())
    assert joined
    assert second.recovery_id == first.recovery_id
    assert second.reports == 2
    # The crashed browser's other shard names the same failure; so does a shard's own
    # error there while the browser is being recovered.
    assert harness.recoveries.report(failure(shard_index=2))[0].recovery_id == first.recovery_id
    shard_error = failure(FailureKind.SHARD_ERROR, shard_index=2)
    assert harness.recoveries.report(shard_error)[0].recovery_id == first.recovery_id
    # A shard's error on another browser, or the same failure detected outside the
    # window, is another recovery.
    other, joined = harness.recoveries.report(
        failure(FailureKind.SHARD_ERROR, browser_id="b1", shard_index=2)
    )
    assert not joined and other.recovery_id != first.recovery_id
    late = dataclasses.replace(failure(), detected_at=T0 + 60)
    assert not harness.recoveries.report(late)[1]
    # A deduplicated report is not another failure for the breakers.
    assert harness.breakers.get(BreakerKey.browser("agent-1", "b0")).calls == 2

    harness.actuator.gate.set()
    await harness.recoveries.wait(first.recovery_id)
    # After it finished, the next report starts a new recovery.
    again, joined = harness.recoveries.report(failure())
    assert not joined and again.recovery_id not in (first.recovery_id, other.recovery_id)


async def test_runtimes_under_recovery_or_with_an_open_breaker_are_to_be_avoided(
    harness: Harness,
) -> None:
    harness.actuator.gate = asyncio.Event()
    assert harness.recoveries.unhealthy_runtimes() == []
    first, _ = harness.recoveries.report(failure())
    other, _ = harness.recoveries.report(
        failure(FailureKind.SHARD_ERROR, browser_id="b1", shard_index=2)
    )
    assert harness.recoveries.unhealthy_runtimes() == [("agent-1", "b0"), ("agent-1", "b1")]
    harness.actuator.gate.set()
    for recovery in (first, other):
        await harness.recoveries.wait(recovery.recovery_id)
    assert harness.recoveries.unhealthy_runtimes() == harness.breakers.open_runtimes()


async def test_a_later_report_that_names_the_fault_gives_it_to_the_recovery(
    harness: Harness,
) -> None:
    harness.actuator.gate = asyncio.Event()
    # The coordinator's data path sees the crash first and knows no fault ...
    first, _ = harness.recoveries.report(failure())
    assert first.failure.fault_id == ""
    # ... the agent that applied the fault reports it a moment later.
    named = dataclasses.replace(
        failure(), fault_id="fault-9", fault_intensity="moderate", fault_traceparent=INJECTION
    )
    joined, was_joined = harness.recoveries.report(named)
    assert was_joined and joined.recovery_id == first.recovery_id
    assert (joined.failure.fault_id, joined.failure.fault_intensity) == ("fault-9", "moderate")
    assert joined.failure.source == first.failure.source  # still the first report's failure
    # A third report naming another fault does not take it over.
    other = dataclasses.replace(failure(), fault_id="fault-10", fault_intensity="mild")
    assert harness.recoveries.report(other)[0].failure.fault_id == "fault-9"
    harness.actuator.gate.set()
    done = await harness.recoveries.wait(first.recovery_id)
    assert done.failure.fault_id == "fault-9"
    [root] = [s for s in harness.spans.get_finished_spans() if s.name == "recovery"]
    attributes = dict(root.attributes or {})
    assert (attributes["fault.id"], attributes["fault.intensity"]) == ("fault-9", "moderate")
    assert [format(link.context.trace_id, "032x") for link in root.links] == ["1f" * 16]


async def test_a_report_naming_the_fault_after_a_fast_recovery_attributes_it(
    harness: Harness,
) -> None:
    # A spare took over before the agent's own report of the crash arrived.
    first, _ = harness.recoveries.report(failure())
    done = await harness.recoveries.wait(first.recovery_id)
    assert done.state == RecoveryState.SUCCEEDED and done.failure.fault_id == ""
    named = dataclasses.replace(failure(), fault_id="fault-9", fault_intensity="moderate")
    joined, was_joined = harness.recoveries.report(named)
    assert was_joined and joined.recovery_id == first.recovery_id
    assert joined.state == RecoveryState.SUCCEEDED
    assert (joined.failure.fault_id, joined.failure.fault_intensity) == ("fault-9", "moderate")
    # Attributed once: another report naming a fault is a failure of its own.
    again, was_joined = harness.recoveries.report(
        dataclasses.replace(failure(), fault_id="fault-10")
    )
    assert not was_joined and again.recovery_id != first.recovery_id


async def test_a_failed_recovery_is_started_again_until_one_succeeds(harness: Harness) -> None:
    """A shard must not stay short of a replica because one attempt failed (a leader
    change during the action, say): the recovery starts again, a wait later."""
    recoveries = Recoveries(
        actuator=harness.actuator,
        placements=FakePlacements({"minilm-l6": PLACEMENT}),
        breakers=harness.breakers,
        chooser=AdaptiveChooser(min_trials=1),
        config=RecoveriesConfig(retries=2, retry_after_s=0.01),
        clock=harness.clock,
        new_id=iter(f"x{i}" for i in range(1, 100)).__next__,
    )
    harness.actuator.script[Action.REPLACE_ON_STANDBY] = [FAIL, FAIL]
    try:
        first, _ = recoveries.report(failure(FailureKind.SHARD_ERROR), Strategy.SIMPLE)
        failed = await recoveries.wait(first.recovery_id)
        # It says, as it fails, that it will be started again.
        assert failed.state == RecoveryState.FAILED and failed.retry_pending
        await until(lambda: recoveries.get("x3") is not None, "the second retry")
        once = recoveries.get("x1")
        assert once is not None and (once.retry_pending, once.retried_by) == (False, "x2")
        second, third = recoveries.get("x2"), recoveries.get("x3")
        assert second is not None and third is not None
        assert (second.retry_of, third.retry_of) == ("x1", "x2")
        second = await recoveries.wait("x2")
        assert second.state == RecoveryState.FAILED
        assert "started again after recovery x1 failed" in second.phases[0].detail
        assert (await recoveries.wait("x3")).state == RecoveryState.SUCCEEDED
        # One failure was reported: the retries add none to the breaker.
        assert [c[0] for c in harness.actuator.calls].count("replace") == 3
        # The report and the passing verify.
        assert harness.breakers.get(BreakerKey.browser("agent-1", "b0")).calls == 2
    finally:
        await recoveries.close()


async def test_retries_stop_after_their_number(harness: Harness) -> None:
    recoveries = Recoveries(
        actuator=harness.actuator,
        breakers=harness.breakers,
        chooser=AdaptiveChooser(min_trials=1),
        config=RecoveriesConfig(retries=1, retry_after_s=0.01),
        clock=harness.clock,
        new_id=iter(f"x{i}" for i in range(1, 100)).__next__,
    )
    harness.actuator.script[Action.REPLACE_ON_STANDBY] = FAIL
    try:
        recoveries.report(failure(FailureKind.SHARD_ERROR), Strategy.SIMPLE)
        await until(lambda: recoveries.get("x2") is not None, "the retry")
        last = await recoveries.wait("x2")
        assert last.state == RecoveryState.FAILED and not last.retry_pending
        await asyncio.sleep(0.1)
        assert recoveries.get("x3") is None
    finally:
        await recoveries.close()


async def test_watch_sends_the_existing_then_every_change(harness: Harness) -> None:
    record, _ = harness.recoveries.report(failure())
    await harness.recoveries.wait(record.recovery_id)
    # Its last change: the placement it was planned for is whole again.
    await until(
        lambda: getattr(harness.recoveries.get("r1"), "redundancy_restored_at", None) is not None,
        "r1's redundancy",
    )
    watch = harness.recoveries.watch(include_existing=True)
    existing = await anext(watch)
    assert (existing.recovery_id, existing.state) == ("r1", RecoveryState.SUCCEEDED)

    harness.recoveries.report(failure(shard_index=2))
    changes: list[RecoveryRecord] = []
    async with asyncio.timeout(5):
        while not changes or changes[-1].state == RecoveryState.RUNNING:
            changes.append(await anext(watch))
    assert {c.recovery_id for c in changes} == {"r2"}
    assert changes[0].phases == ()
    # Created, planned, then one change per phase, then finished.
    phases = len(changes[-1].phases)
    assert [len(c.phases) for c in changes] == [0, 0, *range(1, phases + 1), phases]
    assert changes[1].chosen == Strategy.COORDINATED
    watch.close()


async def test_a_watcher_that_falls_behind_is_told_so(harness: Harness) -> None:
    small = Recoveries(
        actuator=harness.actuator,
        breakers=harness.breakers,
        chooser=AdaptiveChooser(),
        config=RecoveriesConfig(watch_buffer=2),
        clock=harness.clock,
    )
    watch = small.watch()
    record, _ = small.report(failure())
    await small.wait(record.recovery_id)
    with pytest.raises(WatchOverflow, match="more than 2 changes behind"):
        await anext(watch)


async def test_recent_recoveries_are_bounded_and_listed_newest_first(harness: Harness) -> None:
    for shard in range(7):
        record, _ = harness.recoveries.report(failure(shard_index=shard))
        await harness.recoveries.wait(record.recovery_id)
    listed = harness.recoveries.list(10)
    assert [r.recovery_id for r in listed] == ["r7", "r6", "r5", "r4", "r3"]
    assert [r.recovery_id for r in harness.recoveries.list(2)] == ["r7", "r6"]
    assert harness.recoveries.get("r1") is None


async def test_stopping_fails_the_running_recoveries(harness: Harness) -> None:
    harness.actuator.gate = asyncio.Event()
    watch = harness.recoveries.watch()
    # One stopped in the middle of its verify, one before it began.
    record, _ = harness.recoveries.report(failure(model="vit-tiny"))
    async with asyncio.timeout(5):
        while len((await anext(watch)).phases) < 3:  # detect, plan, retry
            pass
    unstarted, _ = harness.recoveries.report(failure(shard_index=2))
    await harness.recoveries.close()
    for recovery_id in (record.recovery_id, unstarted.recovery_id):
        done = harness.recoveries.get(recovery_id)
        assert done is not None and done.state == RecoveryState.FAILED
        assert done.detail == "the recovery service stopped before the recovery finished"
    # Every span ended, the interrupted verify's included.
    names = [s.name for s in harness.spans.get_finished_spans()]
    assert names.count("recovery") == 2
    assert "verify" in names


# ----------------------------------------------------------------------------- trace


async def test_each_recovery_is_one_trace_with_a_span_per_phase(harness: Harness) -> None:
    harness.actuator.script = {Action.RETRY_IN_PLACE: FAIL}
    reported = dataclasses.replace(
        failure(FailureKind.SHARD_ERROR, model="vit-tiny"),
        fault_id="fault-7",
        fault_intensity="severe",
        fault_traceparent=INJECTION,
    )
    harness.clock.advance(0.1)
    record, _ = harness.recoveries.report(reported)
    done = await harness.recoveries.wait(record.recovery_id)

    spans = harness.spans.get_finished_spans()
    [root] = [s for s in spans if s.name == "recovery"]
    children = [s for s in spans if s is not root]
    assert root.parent is None
    assert format(root.context.trace_id, "032x") == done.trace_id
    assert len(done.trace_id) == 32 and done.trace_id == done.trace_id.lower()
    assert dict(root.attributes or {}) | {} == {
        "fault.id": "fault-7",
        "fault.intensity": "severe",
        "fault.kind": "shard_error",
        "failure.source": "data_path",
        "agent.id": "agent-1",
        "browser.id": "b0",
        "model.name": "vit-tiny",
        "shard.index": 1,
        "recovery.id": done.recovery_id,
        "recovery.strategy": "progressive",
        "recovery.strategy.chosen": "progressive",
        "recovery.outcome": "succeeded",
        "recovery.highest_level": "reconnect",
    }
    # It links to the fault's injection, in the injector's trace.
    assert [
        (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x"))
        for link in root.links
    ] == [("1f" * 16, "2e" * 8)]
    assert root.start_time == round(T0 * 1e9)
    assert root.end_time == round(done.finished_at * 1e9)  # type: ignore[operator]
    assert [s.name for s in children] == [p.name for p in done.phases]
    assert [s.name for s in children] == ["detect", "plan", "retry", "reconnect", "verify"]
    for span, phase in zip(children, done.phases, strict=True):
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert span.context.trace_id == root.context.trace_id
        assert span.start_time == round(phase.started_at * 1e9)
        assert (span.attributes or {})["recovery.ok"] == phase.ok


async def test_each_action_runs_with_its_phase_span_current(harness: Harness) -> None:
    # What the action calls (the SDK, through its tracing interceptors) is parented
    # by the current span, so the phase's span must be current while it runs.
    seen: list[tuple[str, int]] = []
    act = harness.actuator._act

    async def recording(action: Action, target: Target) -> Any:
        seen.append((action.value, trace.get_current_span().get_span_context().span_id))
        return await act(action, target)

    harness.actuator._act = recording  # type: ignore[method-assign]
    harness.actuator.script = {Action.RETRY_IN_PLACE: FAIL}
    record, _ = harness.recoveries.report(failure(FailureKind.SHARD_ERROR, model="vit-tiny"))
    await harness.recoveries.wait(record.recovery_id)
    phases = {
        s.context.span_id: s.name
        for s in harness.spans.get_finished_spans()
        if s.name not in ("recovery", "detect", "plan")
    }
    assert [(action, phases.get(span_id)) for action, span_id in seen] == [
        ("retry", "retry"),
        ("reconnect", "reconnect"),
        ("verify", "verify"),
    ]


# ----------------------------------------------------------------------------- servicer


@dataclass
class Served:
    stub: pb_grpc.RecoveryServiceStub
    lifecycle: Lifecycle
    harness: Harness


@pytest.fixture
async def served(harness: Harness) -> AsyncIterator[Served]:
    lifecycle = Lifecycle()
    server = grpc.aio.server()
    pb_grpc.add_RecoveryServiceServicer_to_server(
        RecoveryServicer(
            recoveries=harness.recoveries,
            breakers=harness.breakers,
            lifecycle=lifecycle,
            list_limit=3,
            clock=harness.clock,
        ),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Served(pb_grpc.RecoveryServiceStub(channel), lifecycle, harness)
    await server.stop(None)


def report(**fields: Any) -> pb.FailureReport:
    values: dict[str, Any] = {
        "source": pb.FAILURE_SOURCE_PAGE,
        "kind": pb.FAILURE_KIND_DEVICE_LOST,
        "agent_id": "agent-1",
        "browser_id": "b0",
        "model": "minilm-l6",
        "shard_index": 1,
        "fault_id": "fault-1",
        "fault_intensity": common_pb2.INTENSITY_MODERATE,
        "detected_at": Timestamp(seconds=int(T0)),
    }
    values.update(fields)
    return pb.FailureReport(**values)


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    code: grpc.StatusCode = raised.value.code()
    return code


async def test_bad_input_gets_codes_that_say_what_is_wrong(served: Served) -> None:
    stub = served.stub
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(stub.ReportFailure(pb.ReportFailureRequest())) == invalid
    for bad in (
        report(source=pb.FAILURE_SOURCE_UNSPECIFIED),
        report(source=99),
        report(kind=pb.FAILURE_KIND_UNSPECIFIED),
        report(kind=42),
        report(agent_id=""),
        report(shard_index=-2),
        report(fault_intensity=7),
    ):
        request = pb.ReportFailureRequest(report=bad)
        assert await code_of(stub.ReportFailure(request)) == invalid, bad
    request = pb.ReportFailureRequest(report=report(), strategy=17)  # type: ignore[arg-type]
    assert await code_of(stub.ReportFailure(request)) == invalid
    assert await code_of(stub.GetRecovery(pb.GetRecoveryRequest())) == invalid
    missing = stub.GetRecovery(pb.GetRecoveryRequest(recovery_id="nope"))
    assert await code_of(missing) == grpc.StatusCode.NOT_FOUND
    assert await code_of(stub.ListRecoveries(pb.ListRecoveriesRequest(limit=-1))) == invalid
    assert await code_of(stub.GetBreaker(pb.GetBreakerRequest(target_id="agent-1"))) == invalid
    wrong_scope = pb.ResetBreakerRequest(scope=pb.BREAKER_SCOPE_BROWSER, target_id="agent-1")
    assert await code_of(stub.ResetBreaker(wrong_scope)) == invalid


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), raised.value.details() or ""


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # Timestamps out of protobuf's range: named, not a bare library message.
        ({"detected_at": Timestamp(seconds=10**13)}, "report.detected_at is not a valid timestamp"),
        ({"detected_at": Timestamp(seconds=1, nanos=-5)}, "report.detected_at is not a valid"),
        # In range, but nonsense for a failure detected now (T0 on the fake clock).
        ({"detected_at": Timestamp(seconds=int(T0) + 3600)}, "lies 3600 s in the future"),
        ({"detected_at": Timestamp(seconds=1)}, "report.detected_at is 1699999999 s old"),
        ({"agent_id": "agent 1"}, "report.agent_id 'agent 1' may not contain '/' or whitespace"),
        ({"browser_id": "b0/x"}, "report.browser_id 'b0/x' may not contain"),
        ({"model": "m" * 5000}, "report.model 'mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm'... (5000"),
        ({"fault_traceparent": "not-a-traceparent"}, "is not a W3C traceparent"),
    ],
)
async def test_nonsense_in_a_report_is_rejected_with_a_message_to_act_on(
    served: Served, fields: dict[str, Any], message: str
) -> None:
    request = pb.ReportFailureRequest(report=report(**fields))
    code, details = await status_of(served.stub.ReportFailure(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert len(details) < 300, details  # quotes a prefix, never the whole input
    assert served.harness.recoveries.list(10) == []


async def test_a_report_within_the_clock_skew_and_age_is_taken(served: Served) -> None:
    for stamp in (int(T0) + 30, int(T0) - 1800):
        request = pb.ReportFailureRequest(
            report=report(
                detected_at=Timestamp(seconds=stamp),
                fault_traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                shard_index=stamp % 7,
            )
        )
        response = await served.stub.ReportFailure(request)
        await served.harness.recoveries.wait(response.recovery_id)


async def test_unknown_ids_are_not_found_and_quoted_short(served: Served) -> None:
    code, details = await status_of(
        served.stub.GetRecovery(pb.GetRecoveryRequest(recovery_id="r" * 1000))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert "no recovery 'rrrr" in details and "(1000 chars)" in details, details
    assert len(details) < 300
    # Resetting a breaker recovery never saw is a mistyped id, not a success.
    code, details = await status_of(
        served.stub.ResetBreaker(
            pb.ResetBreakerRequest(scope=pb.BREAKER_SCOPE_AGENT, target_id="agent-typo")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith("no breaker for agent 'agent-typo'"), details
    code, details = await status_of(
        served.stub.GetBreaker(
            pb.GetBreakerRequest(scope=pb.BREAKER_SCOPE_BROWSER, target_id="a/" + "b" * 900)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "too long" in details and len(details) < 300, details


async def test_report_get_list_and_breakers_over_grpc(served: Served) -> None:
    stub = served.stub
    # The fault-injector may ask about any target, seen or not.
    unseen = await stub.GetBreaker(
        pb.GetBreakerRequest(scope=pb.BREAKER_SCOPE_BROWSER, target_id="agent-9/b2")
    )
    assert unseen.breaker.state == common_pb2.BREAKER_STATE_CLOSED
    assert unseen.breaker.target_id == "agent-9/b2"

    first = await stub.ReportFailure(
        pb.ReportFailureRequest(report=report(), strategy=common_pb2.RECOVERY_STRATEGY_SIMPLE)
    )
    assert not first.deduplicated
    done = await served.harness.recoveries.wait(first.recovery_id)
    got = (await stub.GetRecovery(pb.GetRecoveryRequest(recovery_id=done.recovery_id))).recovery
    assert got.state == pb.RECOVERY_STATE_SUCCEEDED
    assert got.strategy == common_pb2.RECOVERY_STRATEGY_SIMPLE
    assert got.report.fault_id == "fault-1"
    assert got.report.fault_intensity == common_pb2.INTENSITY_MODERATE
    assert got.report.detected_at.seconds == int(T0)
    assert [p.name for p in got.phases] == ["detect", "plan", "replace", "replace", "verify"]
    assert got.phases[2].level == pb.ESCALATION_LEVEL_REPLACE_ON_STANDBY
    assert got.highest_level == pb.ESCALATION_LEVEL_REPLACE_ON_STANDBY
    assert got.started_at.seconds == int(T0)
    assert got.duration.ToNanoseconds() == round(done.duration_s * 1e9)  # type: ignore[operator]
    assert got.trace_id == done.trace_id

    for shard in (0, 2, 3):
        response = await stub.ReportFailure(
            pb.ReportFailureRequest(report=report(shard_index=shard))
        )
        await served.harness.recoveries.wait(response.recovery_id)
    listed = (await stub.ListRecoveries(pb.ListRecoveriesRequest())).recoveries
    assert [r.report.shard_index for r in listed] == [3, 2, 0]  # the default limit is 3
    two = (await stub.ListRecoveries(pb.ListRecoveriesRequest(limit=2))).recoveries
    assert len(two) == 2

    breakers = (await stub.ListBreakers(pb.ListBreakersRequest())).breakers
    assert [(b.scope, b.target_id) for b in breakers] == [
        (pb.BREAKER_SCOPE_AGENT, "agent-1"),
        (pb.BREAKER_SCOPE_BROWSER, "agent-1/b0"),
    ]
    # Open one by hand, then reset it over gRPC; the reset is a recorded transition.
    key = BreakerKey.agent("agent-1")
    for _ in range(5):
        served.harness.breakers.record(key, False, "test")
    agent = await stub.GetBreaker(
        pb.GetBreakerRequest(scope=pb.BREAKER_SCOPE_AGENT, target_id="agent-1")
    )
    assert agent.breaker.state == common_pb2.BREAKER_STATE_OPEN
    assert agent.breaker.next_probe_at.seconds > 0
    reset = await stub.ResetBreaker(
        pb.ResetBreakerRequest(scope=pb.BREAKER_SCOPE_AGENT, target_id="agent-1")
    )
    assert reset.breaker.state == common_pb2.BREAKER_STATE_CLOSED
    last = served.harness.breakers.transitions()[-1]
    assert (last.to_state, last.reason) == (BreakerState.CLOSED, "reset by hand")


async def test_a_second_report_of_a_running_recovery_is_deduplicated(served: Served) -> None:
    served.harness.actuator.gate = asyncio.Event()
    request = pb.ReportFailureRequest(report=report())
    first = await served.stub.ReportFailure(request)
    second = await served.stub.ReportFailure(request)
    assert (second.recovery_id, second.deduplicated) == (first.recovery_id, True)
    served.harness.actuator.gate.set()


async def test_watch_streams_existing_then_changes_and_ends_on_drain(served: Served) -> None:
    stub, recoveries = served.stub, served.harness.recoveries
    record, _ = recoveries.report(failure())
    await recoveries.wait(record.recovery_id)

    call = stub.WatchRecoveries(pb.WatchRecoveriesRequest(include_existing=True))
    async with asyncio.timeout(10):
        existing = await call.read()
        assert existing.recovery.recovery_id == record.recovery_id
        assert existing.recovery.state == pb.RECOVERY_STATE_SUCCEEDED

        response = await stub.ReportFailure(pb.ReportFailureRequest(report=report(shard_index=3)))
        states = []
        while not states or states[-1] == pb.RECOVERY_STATE_RUNNING:
            change = await call.read()
            assert change.recovery.recovery_id == response.recovery_id
            states.append(change.recovery.state)
        assert states[-1] == pb.RECOVERY_STATE_SUCCEEDED

        served.lifecycle.draining.set()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE


# ----------------------------------------------------------------------------- actuator


@dataclass
class FakeClient:
    """Stands in for webshard.aio.Client: a placement and scripted inference answers."""

    placement_proto: coordinator_pb2.Placement | None = None
    answers: list[InferResult | Exception] = field(default_factory=list)
    inferred: list[str] = field(default_factory=list)
    pins: list[Any] = field(default_factory=list)
    moved: coordinator_pb2.ReplaceShardResponse = field(
        default_factory=coordinator_pb2.ReplaceShardResponse
    )
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    checks: list[coordinator_pb2.VerifyShardResponse | Exception] = field(default_factory=list)
    verified: list[tuple[Any, ...]] = field(default_factory=list)

    async def placement(self, model: str, *, timeout: float | None = None) -> Any:
        if self.placement_proto is None:
            raise NotFoundError(f"{model} is not deployed")
        return self.placement_proto

    async def infer(
        self, model: str, *, pins: Any = None, timeout: float | None = None, **kw: Any
    ) -> InferResult:
        self.inferred.append(model)
        self.pins.append(pins)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def replace_shard(self, *args: Any, avoid: Any = (), timeout: float | None = None) -> Any:
        self.calls.append(("replace", *args, list(avoid)))
        return self.moved

    async def verify_shard(self, *args: Any, timeout: float | None = None) -> Any:
        self.verified.append(args)
        check = self.checks.pop(0)
        if isinstance(check, Exception):
            raise check
        return check

    async def restart_browser(self, *args: Any, timeout: float | None = None) -> Any:
        self.calls.append(("restart", *args))
        return coordinator_pb2.RestartBrowserResponse(
            browser_id="b7", moved_shards=2, from_standby=True
        )

    async def reconnect_agent(self, *args: Any, wait_s: float, timeout: float | None = None) -> str:
        self.calls.append(("reconnect", *args, wait_s))
        return "activation stream to agent-1 reopened"

    async def pause_model(self, model: str, *, max_pause_s: float, timeout: float | None) -> str:
        self.calls.append(("pause", model, max_pause_s))
        return "barrier-1"

    async def resume_model(self, *args: Any, timeout: float | None = None) -> Any:
        self.calls.append(("resume", *args))
        return coordinator_pb2.ResumeModelResponse(held_requests=3)

    async def close(self) -> None:
        pass


def answer(value: float) -> InferResult:
    hops = [
        ShardHop(0, "agent-2", "b0", "wasm", 1.0, 2.0, 1),
        ShardHop(1, "agent-3", "b1", "wasm", 1.0, 2.0, 2),
    ]
    return InferResult("req", {"embedding": np.array([value, 1.0], np.float32)}, hops, 4.0, True)


def coordinator_placement() -> coordinator_pb2.Placement:
    replica = coordinator_pb2.ShardReplica
    return coordinator_pb2.Placement(
        model="minilm-l6",
        recovery_strategy=common_pb2.RECOVERY_STRATEGY_PROGRESSIVE,
        shards=[
            coordinator_pb2.ShardPlacement(
                shard=common_pb2.ShardSpec(index=0),
                replicas=[replica(agent_id="agent-1", browser_id="b0", healthy=False)],
            ),
            coordinator_pb2.ShardPlacement(
                shard=common_pb2.ShardSpec(index=1),
                replicas=[
                    replica(agent_id="agent-1", browser_id="b0", healthy=False),
                    replica(agent_id="agent-3", browser_id="b1", healthy=True),
                ],
            ),
        ],
    )


async def test_coordinator_actuator_verifies_with_an_inference() -> None:
    client = FakeClient(answers=[answer(0.5), answer(float("nan")), UnavailableError("no leader")])
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    target = Target("agent-1", "b0", "minilm-l6", 1)
    passed = await actuator.verify(target)
    assert passed.served_by == (("agent-2", "b0"), ("agent-3", "b1"))
    assert (
        passed.detail == "minilm-l6 answered in 4.0 ms; shards 0@agent-2/b0, 1@agent-3/b1 (2 tries)"
    )
    with pytest.raises(ActionFailed, match="non-finite values in embedding") as nan:
        await actuator.verify(target)
    assert nan.value.failed_on == (("agent-2", "b0"), ("agent-3", "b1"))
    with pytest.raises(ActionFailed, match="minilm-l6 did not answer: UNAVAILABLE: no leader"):
        await actuator.verify(target)
    assert (await actuator.verify(Target("agent-1"))).detail.startswith("the report names no model")


async def test_coordinator_actuator_acts_through_the_coordinator() -> None:
    client = FakeClient(
        placement_proto=coordinator_placement(), answers=[answer(0.5), UnavailableError("offline")]
    )
    actuator = CoordinatorActuator(
        [],
        client=client,  # type: ignore[arg-type]
        reconnect_wait_s=1.5,
        avoid=lambda: [("agent-2", "")],  # a recovery under way there, say
    )
    target = Target("agent-1", "b0", "minilm-l6", 1)
    # Retrying in place probes the failed replica: the shard pinned to it.
    assert (await actuator.retry_in_place(target)).served_by == (("agent-1", "b0"),)
    with pytest.raises(ActionFailed, match="shard 1 on agent-1/b0 still fails") as failed:
        await actuator.retry_in_place(target)
    assert failed.value.failed_on == (("agent-1", "b0"),)
    assert client.pins == [{1: "agent-1/b0"}, {1: "agent-1/b0"}]

    client.moved = coordinator_pb2.ReplaceShardResponse(
        replica=coordinator_pb2.ShardReplica(agent_id="agent-3", browser_id="b2"),
        from_standby=True,
    )
    moved = await actuator.replace_on_standby(target)
    assert moved.detail == "shard 1 of minilm-l6 moved to agent-3/b2 (a warm standby)"
    client.moved = coordinator_pb2.ReplaceShardResponse()
    assert "had already moved off agent-1/b0" in (await actuator.replace_on_standby(target)).detail
    with pytest.raises(ActionUnavailable):
        await actuator.replace_on_standby(Target("agent-1", "b0"))

    restarted = await actuator.restart_browser(target)
    assert restarted.detail == ("agent-1/b0 replaced by b7 (a warm standby), 2 shard(s) reloaded")
    assert "reopened" in (await actuator.reconnect(target)).detail
    await actuator.barrier(target)
    assert "3 request(s) had waited" in (await actuator.resume(target)).detail
    with pytest.raises(ActionUnavailable, match="workload controller"):
        await actuator.restart_agent(target)
    assert client.calls == [
        ("replace", "minilm-l6", 1, "agent-1", "b0", [("agent-2", "")]),
        ("replace", "minilm-l6", 1, "agent-1", "b0", [("agent-2", "")]),
        ("restart", "agent-1", "b0"),
        ("reconnect", "agent-1", "b0", 1.5),
        ("pause", "minilm-l6", 10.0),
        ("resume", "minilm-l6", "barrier-1"),
    ]


async def test_verify_fails_while_the_failed_browser_holds_an_unhealthy_replica() -> None:
    client = FakeClient(placement_proto=coordinator_placement(), answers=[answer(0.5)] * 3)
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    # Both shards have an unhealthy replica on agent-1/b0: the model answering is not enough.
    # A shard's own failure checks that shard; a browser's, every shard there.
    with pytest.raises(ActionFailed, match=r"shard\(s\) 0 on agent-1/b0 are still unhealthy"):
        await actuator.verify(Target("agent-1", "b0", "minilm-l6", 0))
    with pytest.raises(ActionFailed, match=r"shard\(s\) 0, 1 on agent-1/b0 are still unhealthy"):
        await actuator.verify(Target("agent-1", "b0", "minilm-l6"))
    assert (await actuator.verify(Target("agent-2", "b0", "minilm-l6", 0))).served_by


def check(
    where: str, shard: int, *, difference: float = 0.0
) -> coordinator_pb2.VerifyShardResponse:
    agent_id, browser_id = where.split("/")
    return coordinator_pb2.VerifyShardResponse(
        timing=common_pb2.ShardTiming(
            shard_index=shard,
            agent_id=agent_id,
            browser_id=browser_id,
            hop=Duration(nanos=2_500_000),
            compute=Duration(nanos=1_200_000),
        ),
        max_abs_difference=difference,
        tolerance=1e-3,
        passed=difference <= 1e-3,
    )


def moved_to(where: str) -> coordinator_pb2.ReplaceShardResponse:
    agent_id, browser_id = where.split("/")
    return coordinator_pb2.ReplaceShardResponse(
        replica=coordinator_pb2.ShardReplica(agent_id=agent_id, browser_id=browser_id),
        from_spare=True,
    )


async def test_verify_after_a_move_runs_one_hop_on_the_new_replica_only() -> None:
    client = FakeClient(answers=[answer(0.5)], checks=[check("agent-3/b2", 1, difference=2e-6)])
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    target = Target("agent-1", "b0", "minilm-l6", 1)
    client.moved = moved_to("agent-3/b2")
    await actuator.replace_on_standby(target)
    passed = await actuator.verify(target)
    assert client.verified == [("minilm-l6", 1, "agent-3", "b2")]
    assert client.inferred == []  # no whole inference
    assert passed.detail == (
        "minilm-l6: shard 1 on agent-3/b2 in 2.5 ms (compute 1.2 ms, max |difference| 2e-06) "
        "matched the kept activation(s)"
    )
    assert passed.served_by == (("agent-3", "b2"),)
    # The move was verified and forgotten: the next verify of the target is an inference.
    await actuator.verify(target)
    assert client.inferred == ["minilm-l6"] and len(client.verified) == 1


async def test_a_browser_wide_verify_checks_every_shard_moved_off_it() -> None:
    client = FakeClient(checks=[check("agent-2/b0", 0), check("agent-3/b2", 1)])
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    browser = Target("agent-1", "b0", "minilm-l6")
    for shard, where in ((1, "agent-3/b2"), (0, "agent-2/b0")):
        client.moved = moved_to(where)
        await actuator.replace_on_standby(browser.with_shard(shard))
    client.moved = moved_to("agent-4/b0")  # another browser's recovery: not this target's
    await actuator.replace_on_standby(Target("agent-1", "b1", "minilm-l6", 0))
    passed = await actuator.verify(browser)
    assert client.verified == [
        ("minilm-l6", 0, "agent-2", "b0"),
        ("minilm-l6", 1, "agent-3", "b2"),
    ]
    assert passed.served_by == (("agent-2", "b0"), ("agent-3", "b2"))
    assert client.inferred == []


async def test_verify_falls_back_to_a_whole_inference_when_no_hop_can_tell() -> None:
    client = FakeClient(
        answers=[answer(0.5)] * 4,
        checks=[
            FailedPreconditionError("no activation of shard 1 of minilm-l6 is kept"),
            UnimplementedError("Method not found!"),  # a coordinator older than VerifyShard
        ],
    )
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    target = Target("agent-1", "b0", "minilm-l6", 1)
    # Retried in place, reconnected or restarted: nothing moved, a whole inference.
    await actuator.retry_in_place(target)
    client.inferred.clear()
    assert "answered in 4.0 ms" in (await actuator.verify(target)).detail
    assert client.inferred == ["minilm-l6"] and client.verified == []
    # Moved, but the coordinator kept nothing to run the shard from.
    client.moved = moved_to("agent-3/b2")
    await actuator.replace_on_standby(target)
    assert "answered in 4.0 ms" in (await actuator.verify(target)).detail
    assert client.verified == [("minilm-l6", 1, "agent-3", "b2")]
    assert client.inferred == ["minilm-l6", "minilm-l6"]
    await actuator.replace_on_standby(target)
    assert "answered in 4.0 ms" in (await actuator.verify(target)).detail
    assert len(client.verified) == 2 and len(client.inferred) == 3


async def test_a_failed_hop_or_another_answer_fails_the_verify_on_the_new_replica() -> None:
    client = FakeClient(
        checks=[
            UnavailableError("the hop failed (UNAVAILABLE): socket closed"),
            check("agent-3/b2", 1, difference=0.25),
        ]
    )
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    target = Target("agent-1", "b0", "minilm-l6", 1)
    client.moved = moved_to("agent-3/b2")
    await actuator.replace_on_standby(target)
    with pytest.raises(ActionFailed, match="shard 1 of minilm-l6 failed on agent-3/b2") as hop:
        await actuator.verify(target)
    assert hop.value.failed_on == (("agent-3", "b2"),)
    await actuator.replace_on_standby(target)
    with pytest.raises(ActionFailed, match=r"answered differently .* 0\.25 > 0\.001") as wrong:
        await actuator.verify(target)
    assert wrong.value.failed_on == (("agent-3", "b2"),)
    assert client.inferred == []


async def test_the_one_hop_verify_still_checks_the_failed_browser_is_healthy_again() -> None:
    client = FakeClient(placement_proto=coordinator_placement(), checks=[check("agent-3/b2", 1)])
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    target = Target("agent-1", "b0", "minilm-l6", 1)
    client.moved = moved_to("agent-3/b2")
    await actuator.replace_on_standby(target)
    # The placement still has an unhealthy replica of shard 1 on agent-1/b0.
    with pytest.raises(ActionFailed, match=r"shard\(s\) 1 of minilm-l6 on agent-1/b0"):
        await actuator.verify(target)
    assert client.verified and client.inferred == []


async def test_moves_whose_verify_never_runs_are_not_kept_without_bound() -> None:
    client = FakeClient(answers=[answer(0.5)], checks=[check("agent-3/b2", 1)])
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    client.moved = moved_to("agent-3/b2")
    for shard in range(MAX_REMEMBERED_MOVES + 1):
        await actuator.replace_on_standby(Target("agent-1", "b0", "minilm-l6", shard))
    assert len(actuator._moves) == MAX_REMEMBERED_MOVES
    # The oldest went: its verify is an inference; the newest is still one hop.
    await actuator.verify(Target("agent-1", "b0", "minilm-l6", 0))
    assert client.inferred == ["minilm-l6"]
    await actuator.verify(Target("agent-1", "b0", "minilm-l6", MAX_REMEMBERED_MOVES))
    assert client.verified == [("minilm-l6", MAX_REMEMBERED_MOVES, "agent-3", "b2")]


def test_placement_from_proto_keeps_the_strategy_and_the_replicas() -> None:
    placement = placement_from_proto(coordinator_placement())
    assert placement.strategy == Strategy.PROGRESSIVE
    assert placement.shards_on(Target("agent-1", "b0")) == [0, 1]


async def test_an_undeployed_model_has_no_placement() -> None:
    actuator = CoordinatorActuator([], client=FakeClient())  # type: ignore[arg-type]
    assert await actuator.placement("minilm-l6") is None


# ----------------------------------------------------------------------------- settings


def test_settings_reach_the_knobs_and_bad_values_stop_startup() -> None:
    settings = load_settings(
        RecoverySettings,
        [],
        env={
            "WEBSHARD_DEFAULT_STRATEGY": "adaptive",
            "WEBSHARD_BREAKERS_ENABLED": "off",
            "WEBSHARD_BREAKER_OPEN_S": "5",
            "WEBSHARD_BREAKER_HALF_OPEN_PROBES": "1",
        },
    )
    breaker = settings.breaker_config()
    assert (breaker.enabled, breaker.open_duration_s, breaker.half_open_probes) == (False, 5.0, 1)
    assert settings.recoveries_config().default_strategy == Strategy.ADAPTIVE
    with pytest.raises(SettingsError, match="unknown recovery strategy 'fastest'"):
        load_settings(RecoverySettings, ["--default-strategy", "fastest"], env={})
    with pytest.raises(SettingsError, match="minimum calls"):
        load_settings(RecoverySettings, ["--breaker-minimum-calls", "50"], env={})
    probes = load_settings(
        RecoverySettings, ["--breaker-probes", "off", "--breaker-probe-interval-s", "2.5"], env={}
    ).breaker_config()
    assert (probes.active_probes, probes.probe_interval_s) == (False, 2.5)
    with pytest.raises(SettingsError, match=r"probe interval 0\.0 s"):
        load_settings(RecoverySettings, ["--breaker-probe-interval-s", "0"], env={})
    with pytest.raises(SettingsError, match=r"probe timeout -1\.0 s"):
        load_settings(RecoverySettings, ["--breaker-probe-timeout-s", "-1"], env={})


async def test_redundancy_restored_is_stamped_once_the_spares_are_back() -> None:
    spare = Replica("agent-2", "b1")
    before = dataclasses.replace(PLACEMENT, spares={1: (spare,)})
    placements = FakePlacements({"minilm-l6": before})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    clock = FakeClock()
    recoveries = Recoveries(
        actuator=FakeActuator(clock),
        placements=placements,
        breakers=Breakers(BreakerConfig(), clock),
        chooser=AdaptiveChooser(min_trials=1),
        config=RecoveriesConfig(redundancy_wait_s=30, redundancy_check_s=0.01),
        clock=clock,
        tracer_provider=provider,
    )
    try:
        # The spare took over: shard 1 serves, but has no spare until a new one loads.
        placements.placements["minilm-l6"] = dataclasses.replace(PLACEMENT, spares={})
        record, _ = recoveries.report(failure(FailureKind.SHARD_ERROR), Strategy.SIMPLE)
        done = await recoveries.wait(record.recovery_id)
        assert done.state == RecoveryState.SUCCEEDED and done.redundancy_restored_at is None
        clock.advance(2.0)  # the new spare is loaded, warmed and committed
        placements.placements["minilm-l6"] = before

        def restored_at() -> float | None:
            now = recoveries.get(record.recovery_id)
            return now.redundancy_restored_at if now is not None else None

        await until(lambda: restored_at() is not None, "redundancy to be restored")
        restored = recoveries.get(record.recovery_id)
        assert restored is not None and done.finished_at is not None
        assert restored.redundancy_restored_at == done.finished_at + 2.0
        message = recovery_to_proto(restored)
        assert message.redundancy_restored.ToMilliseconds() == round(
            (restored.redundancy_restored_at - restored.started_at) * 1000
        )
        [span] = [s for s in exporter.get_finished_spans() if s.name == "restore-redundancy"]
        [root] = [s for s in exporter.get_finished_spans() if s.name == "recovery"]
        assert span.parent is not None and span.parent.span_id == root.context.span_id
    finally:
        await recoveries.close()


async def test_redundancy_that_never_comes_back_stays_unstamped() -> None:
    clock = FakeClock()
    # Planned against a placement whose shard 1 had two replicas; it never regains them.
    lacking = dataclasses.replace(PLACEMENT, replicas={**PLACEMENT.replicas, 1: ()})
    reads = iter([PLACEMENT])

    class Shrunk(FakePlacements):
        async def placement(self, model: str) -> ModelPlacement | None:
            return next(reads, lacking)

    recoveries = Recoveries(
        actuator=FakeActuator(clock),
        placements=Shrunk(),
        breakers=Breakers(BreakerConfig(), clock),
        chooser=AdaptiveChooser(min_trials=1),
        config=RecoveriesConfig(redundancy_wait_s=0.05, redundancy_check_s=0.01),
        clock=clock,
    )
    try:
        record, _ = recoveries.report(failure(FailureKind.SHARD_ERROR), Strategy.SIMPLE)
        assert (await recoveries.wait(record.recovery_id)).state == RecoveryState.SUCCEEDED
        await until(lambda: not recoveries._tasks, "the redundancy watch to give up")
        after = recoveries.get(record.recovery_id)
        assert after is not None and after.redundancy_restored_at is None
    finally:
        await recoveries.close()
