"""Every recovery is one OpenTelemetry trace across the services that took part.

A coordinator (one replica), two native browser agents and the recovery service
run as real gRPC servers in the test's own process and event loop, each built by
its ``services/<svc>/server.py`` ``make_app`` and served the way
``services.common.server.serve`` serves it (the same server options and
interceptors: OpenTelemetry's, the token check, the DomainError one; health
included). Being in one process, they
share one TracerProvider, whose in-memory exporter sees every service's spans;
trace context still crosses between them only over gRPC (metadata on unary calls,
the ``traceparent`` field of each RunShard activation), exactly as between
processes.

Which service made a span (``service_of``), without relying on the shared
provider's resource:

- a span from webshard's own tracers (the recovery's root and phases, the
  coordinator's hops, the agent's ``run_shard``) names its module in its
  instrumentation scope: ``services.<service>.<module>``;
- a gRPC server span (OpenTelemetry's server interceptor) is made by the service
  that serves the call: its ``rpc.service`` attribute (or, failing that, its name,
  the full method) names that service;
- a gRPC client span is made by the caller, in the caller's process: it belongs
  to the service of its parent span.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from webshard.aio import Client, RecoveryClient
from webshard.common.v1 import common_pb2
from webshard.recovery.v1 import recovery_pb2

from services.browser_agent import server as agent_server
from services.browser_agent.settings import AgentSettings
from services.common.server import SERVER_OPTIONS, Lifecycle, ServiceApp, server_interceptors
from services.common.settings import ServerSettings
from services.common.tracing import configure_tracing
from services.coordinator import server as coordinator_server
from services.coordinator.settings import CoordinatorSettings
from services.recovery import server as recovery_server
from services.recovery.settings import RecoverySettings
from tests.conftest import free_port, until

MODEL = "minilm-l6"
AGENTS = 3
"""Two hold the model's two replicas of each shard; the third is where a replica can move."""
GRPC_SCOPE = "opentelemetry.instrumentation.grpc"
INJECTION = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
"""The traceparent of the fault's injection, as the agent that applied it reports it."""
# The gRPC service each webshard service serves.
SERVED_BY = {
    "webshard.coordinator.v1.CoordinatorService": "coordinator",
    "webshard.coordinator.v1.RaftService": "coordinator",
    "webshard.browser_agent.v1.BrowserAgentService": "browser_agent",
    "webshard.recovery.v1.RecoveryService": "recovery",
}


# ----------------------------------------------------------------------------- tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """One in-memory exporter on the process's tracer provider, for this test only."""
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        # A provider is set once per process; an earlier test set it: add to it.
        provider.add_span_processor(processor)
    else:
        configure_tracing("test", extra_processors=[processor])
    yield exporter
    # The processor stays on the provider; a shut-down exporter keeps nothing more.
    exporter.shutdown()


def service_of(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> str:
    """The webshard service whose process made ``span`` (see the module's doc)."""
    scope = span.instrumentation_scope.name if span.instrumentation_scope else ""
    if scope.startswith("services."):
        return scope.split(".")[1]
    if scope == GRPC_SCOPE and span.kind == SpanKind.SERVER:
        served = str((span.attributes or {}).get("rpc.service", ""))
        if not served:
            served = span.name.lstrip("/").split("/")[0]
        return SERVED_BY.get(served, f"unknown server {served}")
    if scope == GRPC_SCOPE and span.kind == SpanKind.CLIENT and span.parent is not None:
        parent = by_id.get(span.parent.span_id)
        if parent is not None:
            return service_of(parent, by_id)
    return f"unknown ({scope}, {span.name})"


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    """The span's parents, nearest first, as far as the trace's spans reach."""
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


# ----------------------------------------------------------------------------- services


@dataclass
class Running:
    """One service served in this process."""

    name: str
    address: str
    server: grpc.aio.Server
    app: ServiceApp
    lifecycle: Lifecycle

    async def stop(self) -> None:
        """What serve does on SIGTERM, without the grace period."""
        self.lifecycle.draining.set()
        await self.server.stop(0.5)
        await self.app.stop()


async def start_service(
    name: str,
    make_app: Callable[[Any, Lifecycle], ServiceApp],
    settings: ServerSettings,
) -> Running:
    """Build the app with its make_app and serve it as services.common.server.serve does."""
    settings.validate()
    lifecycle = Lifecycle()
    app = make_app(settings, lifecycle)
    server = grpc.aio.server(
        options=SERVER_OPTIONS,
        # The interceptors serve uses: tracing, then DomainErrors to their status.
        interceptors=server_interceptors(),
    )
    app.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.host}:{settings.port}"
    assert server.add_insecure_port(address) == settings.port
    await server.start()
    await app.start()
    for service in ["", *app.service_names]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return Running(name, address, server, app, lifecycle)


@dataclass
class Cluster:
    coordinator: str
    recovery: str
    services: Sequence[Running]


@pytest.fixture
async def cluster(tmp_path: Path, spans: InMemorySpanExporter) -> AsyncIterator[Cluster]:
    coordinator_port, recovery_port = free_port(), free_port()
    coordinator_address = f"127.0.0.1:{coordinator_port}"
    recovery_address = f"127.0.0.1:{recovery_port}"
    running: list[Running] = []
    try:
        running.append(
            await start_service(
                "coordinator",
                coordinator_server.make_app,
                CoordinatorSettings(
                    port=coordinator_port,
                    data_dir=str(tmp_path / "coordinator"),
                    replica_id="coordinator-0",
                    recovery=recovery_address,
                ),
            )
        )
        for index in range(AGENTS):
            running.append(
                await start_service(
                    f"agent-{index}",
                    agent_server.make_app,
                    AgentSettings(
                        port=free_port(),
                        data_dir=str(tmp_path / f"agent-{index}"),
                        agent_id=f"agent-{index}",
                        coordinators=[coordinator_address],
                        browsers=0,
                        native=True,
                    ),
                )
            )
        running.append(
            await start_service(
                "recovery",
                recovery_server.make_app,
                # The retry in place passes however busy the machine (no escalation).
                RecoverySettings(
                    port=recovery_port,
                    coordinators=[coordinator_address],
                    in_place_budget_s=30,
                ),
            )
        )
        yield Cluster(coordinator_address, recovery_address, running)
    finally:
        for service in reversed(running):
            await service.stop()


# ----------------------------------------------------------------------------- the test


@dataclass
class Traced:
    """A finished recovery and the spans of its trace."""

    recovery: recovery_pb2.Recovery
    replica: tuple[str, str]
    """The (agent, browser) the failure was reported on."""
    root: ReadableSpan
    spans: list[ReadableSpan]
    by_id: dict[int, ReadableSpan]

    def service(self, span: ReadableSpan) -> str:
        return service_of(span, self.by_id)

    def chain(self, span: ReadableSpan) -> list[ReadableSpan]:
        return ancestors(span, self.by_id)


async def recover(
    cluster: Cluster,
    exporter: InMemorySpanExporter,
    kind: recovery_pb2.FailureKind.ValueType,
    strategy: str,
) -> Traced:
    """Deploy the model, report a failure of shard 0's first replica, wait for the recovery."""
    async with (
        Client(cluster.coordinator, timeout=60) as coordinator,
        RecoveryClient(cluster.recovery, timeout=10) as recovery,
    ):

        async def registered() -> None:
            # Polled: registration is the agents' doing, with nothing here to await.
            while len(await coordinator.list_agents()) < AGENTS:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(registered(), 30)
        # No spares: the trace of a replica loaded by ReplaceShard is what is checked
        # (a spare's takeover loads nothing).
        placement = await coordinator.deploy(
            MODEL, sharding="layer", shards=2, replicas=2, runtime="native", spares=0
        )
        replica = placement.shards[0].replicas[0]
        reported = await recovery.report_failure(
            recovery_pb2.FailureReport(
                source=recovery_pb2.FAILURE_SOURCE_DATA_PATH,
                kind=kind,
                agent_id=replica.agent_id,
                browser_id=replica.browser_id,
                model=MODEL,
                shard_index=0,
                fault_id="fault-trace-1",
                fault_intensity=common_pb2.INTENSITY_SEVERE,
                fault_traceparent=INJECTION,
                message="reported by the test",
            ),
            strategy=strategy,
        )

        async def finished() -> recovery_pb2.Recovery:
            while True:
                done = await recovery.get_recovery(reported.recovery_id)
                if done.state != recovery_pb2.RECOVERY_STATE_RUNNING:
                    return done
                await asyncio.sleep(0.05)

        done = await asyncio.wait_for(finished(), 60)
    assert done.state == recovery_pb2.RECOVERY_STATE_SUCCEEDED, done.detail
    trace_id = int(done.trace_id, 16)

    def in_trace() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]

    await until(
        lambda: any(s.name == "recovery" for s in in_trace()), "the recovery's root span to end"
    )
    # Client spans end in done callbacks; let the loop run them.
    await asyncio.sleep(0.1)
    spans = in_trace()
    [root] = [s for s in spans if s.name == "recovery"]
    by_id = {s.context.span_id: s for s in spans}
    return Traced(done, (replica.agent_id, replica.browser_id), root, spans, by_id)


def check_root_and_phases(traced: Traced, strategy: str, kind: str) -> None:
    """The root holds the failure and its outcome; every phase is a child of it, in order."""
    root, done = traced.root, traced.recovery
    assert root.parent is None
    attributes = dict(root.attributes or {})
    assert attributes["recovery.id"] == done.recovery_id
    assert attributes["fault.id"] == "fault-trace-1"
    assert attributes["fault.intensity"] == "severe"
    # It links to the fault's injection, in the injector's trace.
    assert INJECTION.split("-")[1] in [format(link.context.trace_id, "032x") for link in root.links]
    assert attributes["fault.kind"] == kind
    assert attributes["recovery.strategy"] == strategy
    assert (attributes["agent.id"], attributes["browser.id"]) == traced.replica
    assert attributes["model.name"] == MODEL
    assert attributes["shard.index"] == 0
    assert attributes["recovery.outcome"] == "succeeded"
    # The root's other children are recovery's calls outside any phase (the placement
    # lookup before planning).
    phase_spans = sorted(
        (
            s
            for s in traced.spans
            if "recovery.phase" in (s.attributes or {})
            and s.parent is not None
            and s.parent.span_id == root.context.span_id
        ),
        key=lambda s: s.start_time or 0,
    )
    assert [s.name for s in phase_spans] == [p.name for p in done.phases]
    assert {"detect", "plan", "verify"} <= {p.name for p in done.phases}


async def test_a_recovery_is_one_trace_across_recovery_coordinator_and_agent(
    cluster: Cluster, spans: InMemorySpanExporter
) -> None:
    traced = await recover(cluster, spans, recovery_pb2.FAILURE_KIND_STREAM_BROKEN, "progressive")

    # One trace, made by the three services that took part.
    services = {traced.service(s) for s in traced.spans}
    assert {"recovery", "coordinator", "browser_agent"} <= services, services
    assert not [s for s in services if s.startswith("unknown")], services
    check_root_and_phases(traced, "progressive", "stream_broken")

    # The agent's work hangs off the coordinator's hops (over the shared RunShard
    # stream), which hang off a phase's call:
    # run_shard -> hop -> the coordinator's Infer -> recovery's client call -> phase -> root.
    runs = [s for s in traced.spans if s.name == "run_shard"]
    assert runs
    for run in runs:
        assert traced.service(run) == "browser_agent"
        chain = traced.chain(run)
        hop = chain[0]
        assert (hop.name, traced.service(hop)) == ("hop", "coordinator")
        assert chain[-1] is traced.root
        assert any(s.name == "/webshard.coordinator.v1.CoordinatorService/Infer" for s in chain)
        assert any("recovery.phase" in (s.attributes or {}) for s in chain)
        run_attributes, hop_attributes = run.attributes or {}, hop.attributes or {}
        assert run_attributes["request.id"] == hop_attributes["request.id"]
        assert run_attributes["agent.id"] == hop_attributes["agent.id"]
        assert run_attributes["browser.id"] == hop_attributes["browser.id"]
        assert run_attributes["shard.handle"]
    # The retry probed the failed replica: a pinned hop ran there.
    assert any(
        (s.attributes or {}).get("hop.pinned")
        and (s.attributes or {})["agent.id"] == traced.replica[0]
        for s in traced.spans
        if s.name == "hop"
    )


async def test_a_replica_moved_by_recovery_loads_within_the_recovery_trace(
    cluster: Cluster, spans: InMemorySpanExporter
) -> None:
    traced = await recover(cluster, spans, recovery_pb2.FAILURE_KIND_SHARD_ERROR, "simple")
    check_root_and_phases(traced, "simple", "shard_error")

    # ReplaceShard loaded the shard on the third agent over a client-streaming call
    # (by hash, then with the bytes) whose metadata carried the trace: the agent's
    # LoadShard is in the trace, under the coordinator's ReplaceShard, under the phase.
    loads = [
        s
        for s in traced.spans
        if s.name == "/webshard.browser_agent.v1.BrowserAgentService/LoadShard"
        and s.kind == SpanKind.SERVER
    ]
    assert loads
    for load in loads:
        assert traced.service(load) == "browser_agent"
        chain = traced.chain(load)
        assert chain[-1] is traced.root
        assert [traced.service(s) for s in chain[:2]] == ["coordinator", "coordinator"]
        assert chain[1].name == "/webshard.coordinator.v1.CoordinatorService/ReplaceShard"
        assert any((s.attributes or {}).get("recovery.phase") == "replace" for s in chain)
