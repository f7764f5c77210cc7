"""Active half-open probes: what a probe asks of a target, and the background prober
that runs them; the coordinator and the agents are fakes, time a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import NotFoundError, UnavailableError

from services.recovery.actuator import CoordinatorActuator
from services.recovery.breakers import (
    BreakerConfig,
    BreakerKey,
    Breakers,
    BreakerState,
    Cause,
    ProbeOutcome,
    ProbeResult,
)
from services.recovery.probes import (
    BreakerProber,
    ClusterProbes,
    ClusterView,
    HeldShard,
    InputUnavailable,
)
from tests.conftest import until
from tests.unit.test_recovery_breakers import T0, FakeClock

AGENT = BreakerKey.agent("agent-1")
BROWSER = BreakerKey.browser("agent-1", "b0")
IDLE_BROWSER = BreakerKey.browser("agent-1", "b1")

VIEW = ClusterView(
    shards=[
        HeldShard("clip-tiny", 0, "agent-1", "b0"),
        HeldShard("minilm-l6", 0, "agent-2", "b0"),
        HeldShard("minilm-l6", 1, "agent-1", "b0"),
    ],
    agents={"agent-1": "127.0.0.1:7001", "agent-2": "127.0.0.1:7002"},
)


@dataclass
class FakeCluster:
    """A coordinator: a cluster view, and pinned inferences answered in order."""

    view: ClusterView | Exception = VIEW
    answers: list[float | Exception] = field(default_factory=list)
    inferred: list[tuple[str, int, str]] = field(default_factory=list)

    async def cluster_status(self) -> ClusterView:
        if isinstance(self.view, Exception):
            raise self.view
        return self.view

    async def infer_pinned(self, model: str, shard_index: int, where: str) -> float:
        self.inferred.append((model, shard_index, where))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class AgentDown(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="connection refused",
        )


@dataclass
class FakeAgents:
    """Agents' GetStatus: browsers by state, or an agent that does not answer."""

    browsers: dict[str, int] = field(default_factory=dict)
    down: bool = False
    asked: list[str] = field(default_factory=list)

    async def status(self, address: str, timeout_s: float) -> agent_pb.GetStatusResponse:
        self.asked.append(address)
        if self.down:
            raise AgentDown()
        return agent_pb.GetStatusResponse(
            agent_id="agent-1",
            browsers=[
                common_pb2.BrowserInfo(browser_id=b, state=s)  # type: ignore[arg-type]
                for b, s in self.browsers.items()
            ],
        )


async def test_a_target_is_probed_with_an_inference_pinned_to_a_shard_it_holds() -> None:
    # clip-tiny's input cannot be built here: the probe says so and uses minilm's shard.
    cluster = FakeCluster(answers=[InputUnavailable("clip-tiny takes no text"), 3.25])
    probes = ClusterProbes(cluster, FakeAgents(), timeout_s=5)
    result = await probes.probe(BROWSER)
    assert result == ProbeResult(
        ProbeOutcome.PASSED, "probe of shard 1 of minilm-l6 on agent-1/b0 answered in 3.2 ms"
    )
    assert cluster.inferred == [("clip-tiny", 0, "agent-1/b0"), ("minilm-l6", 1, "agent-1/b0")]


async def test_a_pinned_inference_that_fails_fails_the_probe() -> None:
    cluster = FakeCluster(answers=[UnavailableError("agent-1/b0 is gone")])
    cluster.view = ClusterView(shards=[VIEW.shards[2]], agents=VIEW.agents)
    result = await ClusterProbes(cluster, FakeAgents(), timeout_s=5).probe(AGENT)
    assert result.outcome == ProbeOutcome.FAILED
    assert result.detail.startswith("probe of shard 1 of minilm-l6 on agent-1/b0 failed:")
    assert "agent-1/b0 is gone" in result.detail


async def test_a_shard_undeployed_since_the_status_does_not_count_against_the_target() -> None:
    cluster = FakeCluster(answers=[NotFoundError("minilm-l6 is not deployed")])
    cluster.view = ClusterView(shards=[VIEW.shards[2]], agents=VIEW.agents)
    agents = FakeAgents()
    result = await ClusterProbes(cluster, agents, timeout_s=5).probe(AGENT)
    # With no shard left to run, the agent's own status decides.
    assert result.outcome == ProbeOutcome.PASSED
    assert agents.asked == ["127.0.0.1:7001"]


async def test_a_target_with_no_shard_is_probed_by_its_agents_status() -> None:
    agents = FakeAgents(
        browsers={"b1": common_pb2.BROWSER_STATE_STANDBY, "b2": common_pb2.BROWSER_STATE_FAILED}
    )
    cluster = FakeCluster(view=ClusterView(shards=[], agents=VIEW.agents))
    probes = ClusterProbes(cluster, agents, timeout_s=5)
    passed = await probes.probe(IDLE_BROWSER)
    assert passed.outcome == ProbeOutcome.PASSED
    assert passed.detail.endswith("holds no shard): browser b1 is standby")
    failed = await probes.probe(BreakerKey.browser("agent-1", "b2"))
    assert failed.outcome == ProbeOutcome.FAILED
    assert failed.detail.endswith("browser b2 is failed")
    gone = await probes.probe(BreakerKey.browser("agent-1", "b9"))
    assert gone.outcome == ProbeOutcome.SKIPPED
    assert "has no browser b9" in gone.detail
    assert (await probes.probe(AGENT)).outcome == ProbeOutcome.PASSED
    agents.down = True
    down = await probes.probe(AGENT)
    assert down.outcome == ProbeOutcome.FAILED
    assert down.detail.endswith("GetStatus answered UNAVAILABLE: connection refused")
    assert cluster.inferred == []


async def test_nothing_to_ask_leaves_the_probe_skipped_with_the_reason() -> None:
    cluster = FakeCluster(view=ClusterView(shards=[], agents={}))
    unregistered = await ClusterProbes(cluster, FakeAgents(), timeout_s=5).probe(AGENT)
    assert unregistered == ProbeResult(
        ProbeOutcome.SKIPPED,
        "agent-1 holds no shard and agent agent-1 is not registered with the coordinator; "
        "nothing to ask",
    )
    cluster.view = UnavailableError("no leader")
    no_status = await ClusterProbes(cluster, FakeAgents(), timeout_s=5).probe(AGENT)
    assert no_status.outcome == ProbeOutcome.SKIPPED
    assert no_status.detail == "cluster status unreadable: UNAVAILABLE: no leader"


async def test_the_actuator_reads_the_cluster_and_runs_pinned_inferences() -> None:
    replica = coordinator_pb2.ShardReplica
    status = coordinator_pb2.ClusterStatusResponse(
        agents=[common_pb2.AgentInfo(agent_id="agent-1", address="127.0.0.1:7001")],
        placements=[
            coordinator_pb2.Placement(
                model="minilm-l6",
                shards=[
                    coordinator_pb2.ShardPlacement(
                        shard=common_pb2.ShardSpec(index=1),
                        replicas=[replica(agent_id="agent-1", browser_id="b0")],
                    ),
                    coordinator_pb2.ShardPlacement(
                        shard=common_pb2.ShardSpec(index=0),
                        replicas=[replica(agent_id="agent-2", browser_id="b3")],
                    ),
                ],
            )
        ],
    )

    @dataclass
    class Client:
        pins: list[Any] = field(default_factory=list)

        async def cluster_status(self, *, timeout: float | None = None) -> Any:
            return status

        async def infer(self, model: str, *, pins: Any = None, **kw: Any) -> Any:
            self.pins.append(pins)
            if model == "whisper-nano":  # takes no text: a KeyError for its example inputs
                raise KeyError(model)
            return type("Result", (), {"total_ms": 4.5})()

    client = Client()
    actuator = CoordinatorActuator([], client=client)  # type: ignore[arg-type]
    view = await actuator.cluster_status()
    assert view == ClusterView(
        shards=[
            HeldShard("minilm-l6", 0, "agent-2", "b3"),
            HeldShard("minilm-l6", 1, "agent-1", "b0"),
        ],
        agents={"agent-1": "127.0.0.1:7001"},
    )
    assert await actuator.infer_pinned("minilm-l6", 1, "agent-1/b0") == 4.5
    assert client.pins == [{1: "agent-1/b0"}]
    with pytest.raises(InputUnavailable, match="whisper-nano takes no text"):
        await actuator.infer_pinned("whisper-nano", 0, "agent-1/b0")


# --------------------------------------------------------------------- the prober


@dataclass
class ScriptedRunner:
    """Probe results in order; each probe waits for ``gate`` when one is set."""

    results: list[ProbeResult]
    probed: list[BreakerKey] = field(default_factory=list)
    gate: asyncio.Event | None = None
    running: int = 0
    most_running: int = 0

    async def probe(self, key: BreakerKey) -> ProbeResult:
        self.probed.append(key)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return self.results.pop(0)
        finally:
            self.running -= 1


PASS = ProbeResult(ProbeOutcome.PASSED, "probe of shard 1 of minilm-l6 on agent-1 answered")
FAIL = ProbeResult(ProbeOutcome.FAILED, "probe of shard 1 of minilm-l6 on agent-1 failed")


@dataclass
class Probing:
    clock: FakeClock
    breakers: Breakers
    runner: ScriptedRunner
    prober: BreakerProber


@pytest.fixture
async def probing() -> AsyncIterator[Probing]:
    clock = FakeClock()
    breakers = Breakers(
        BreakerConfig(consecutive_failures=1, open_duration_s=10, half_open_probes=2), clock
    )
    runner = ScriptedRunner([])
    # The fake clock does not wake the prober; a short look-again keeps it watching.
    prober = BreakerProber(
        breakers, runner, clock, timeout_s=0.5, max_concurrent=2, max_wait_s=0.005
    )
    prober.start()
    yield Probing(clock, breakers, runner, prober)
    await prober.close()


def state(probing: Probing, key: BreakerKey = AGENT) -> BreakerState:
    return probing.breakers.get(key).state


async def test_the_prober_closes_a_breaker_whose_probes_answer(probing: Probing) -> None:
    probing.runner.results = [PASS, PASS]
    probing.breakers.record(AGENT, False, "gone")
    assert state(probing) == BreakerState.OPEN
    probing.clock.advance(10)
    await until(lambda: state(probing) == BreakerState.HALF_OPEN, "the breaker to half-open")
    # The second probe is due one interval after the first passed.
    await until(lambda: probing.breakers.next_probe_at() == T0 + 11, "the first probe's result")
    assert probing.runner.probed == [AGENT]
    assert state(probing) == BreakerState.HALF_OPEN
    probing.clock.advance(1)
    await until(lambda: state(probing) == BreakerState.CLOSED, "the probes to close it")
    assert probing.runner.probed == [AGENT, AGENT]
    causes = [(t.to_state, t.cause) for t in probing.breakers.transitions()]
    assert causes == [
        (BreakerState.OPEN, Cause.TRAFFIC),
        (BreakerState.HALF_OPEN, Cause.OPEN_DURATION),
        (BreakerState.CLOSED, Cause.PROBE),
    ]


async def test_the_prober_reopens_a_breaker_whose_probe_fails(probing: Probing) -> None:
    probing.runner.results = [FAIL]
    probing.breakers.record(AGENT, False, "gone")
    probing.clock.advance(10)
    await until(lambda: len(probing.runner.probed) == 1, "the probe")
    await until(lambda: state(probing) == BreakerState.OPEN, "the probe to reopen it")
    last = probing.breakers.transitions()[-1]
    assert (last.cause, last.at) == (Cause.PROBE, T0 + 10)
    assert probing.breakers.get(AGENT).next_probe_at == T0 + 20


async def test_a_probe_past_its_deadline_fails(probing: Probing) -> None:
    probing.runner.gate = asyncio.Event()  # never set: the probe hangs
    probing.breakers.record(AGENT, False, "gone")
    probing.clock.advance(10)
    await until(
        lambda: state(probing) == BreakerState.OPEN and bool(probing.runner.probed), "timeout"
    )
    last = probing.breakers.transitions()[-1]
    assert last.cause == Cause.PROBE
    assert last.reason == "a half-open probe failed: probe of agent-1 had no answer within 0.5 s"


async def test_probes_run_one_per_target_and_a_bounded_number_at_once(probing: Probing) -> None:
    gate = asyncio.Event()
    probing.runner.gate = gate
    probing.runner.results = [PASS] * 3
    targets = [BreakerKey.agent(f"agent-{i}") for i in range(3)]
    for key in targets:
        probing.breakers.record(key, False, "gone")
    probing.clock.advance(10)
    await until(lambda: probing.runner.running == 2, "two probes running")
    # Each target is being probed or waiting for room; none is probed twice meanwhile.
    assert len(probing.runner.probed) == len(set(probing.runner.probed)) == 2
    gate.set()
    await until(lambda: len(probing.runner.probed) == 3, "the third probe")
    assert probing.runner.most_running == 2
    assert sorted(probing.runner.probed, key=str) == targets
