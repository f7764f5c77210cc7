"""Where ReplaceShard puts a replica, and what it does when the destination fails too.

The registry and the placement are real; the agent links are fakes that answer
LoadShard, so no agent runs.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as pb

from services.common.server import Lifecycle
from services.coordinator import deployments as deployments_module
from services.coordinator.cluster_state import ClusterState
from services.coordinator.deployments import (
    MAX_REPLACE_TRIES,
    RECENT_FAILURE_S,
    DeployError,
    Deployment,
    Deployments,
    Replacement,
)
from services.coordinator.links import HopError
from services.coordinator.pipeline import InferError, Pin, Pipeline, Replica, Stage
from services.coordinator.registry import AgentRegistry
from services.coordinator.servicer import CoordinatorServicer
from services.coordinator.settings import CoordinatorSettings

READY = common_pb2.BROWSER_STATE_READY
STANDBY = common_pb2.BROWSER_STATE_STANDBY


class FakeLink:
    def __init__(self, agent_id: str, address: str, dead: set[str]) -> None:
        self.agent_id = agent_id
        self.address = address
        self.dead = dead
        self.loads: list[str] = []
        self.unloads: list[str] = []

    async def load(self, spec: common_pb2.ShardSpec, path: Path, **kw: Any) -> Any:
        browser = kw["browser_id"]
        self.loads.append(browser)
        if f"{self.agent_id}/{browser}" in self.dead:
            raise HopError(
                self.agent_id, grpc.StatusCode.NOT_FOUND, f"this agent has no browser {browser!r}"
            )
        return agent_pb.LoadShardResponse(
            browser_id=browser,
            shard=common_pb2.LoadedShard(handle=f"h-{browser}", execution_provider=1),
        )

    async def unload(self, handle: str, **kw: Any) -> None:
        self.unloads.append(handle)


def browser(browser_id: str, state: int) -> common_pb2.BrowserInfo:
    return common_pb2.BrowserInfo(
        browser_id=browser_id,
        state=state,
        runtime=common_pb2.RUNTIME_BROWSER,  # type: ignore[arg-type]
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NullReporter:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, **fields: Any) -> None:
        self.reports.append(fields)


def rig(dead: set[str], clock: Clock | None = None) -> tuple[Deployments, dict[str, FakeLink]]:
    registry = AgentRegistry(heartbeat_timeout_s=60)
    registry.register("agent-0", "a0:1", 1 << 30, [browser("b0", READY), browser("b1", READY)])
    registry.register("agent-1", "a1:1", 1 << 30, [browser("b0", READY), browser("b1", STANDBY)])
    registry.register("agent-2", "a2:1", 1 << 30, [browser("b0", READY), browser("b1", STANDBY)])
    deployments = Deployments(
        registry,
        None,
        reporter=NullReporter(),  # type: ignore[arg-type]
        replace_wait_s=0,
        clock=clock or Clock(),
    )
    links = {a: FakeLink(a, f"a{a[-1]}:1", dead) for a in ("agent-0", "agent-1", "agent-2")}
    deployments._links.update(links)  # type: ignore[arg-type]

    async def paths(placement: pb.Placement) -> dict[int, Path]:
        return {0: Path("shard-0.onnx")}

    deployments._shard_paths = paths  # type: ignore[method-assign]
    placement = pb.Placement(model="minilm-l6", version=1)
    shard = placement.shards.add()
    shard.shard.index = 0
    shard.replicas.add(agent_id="agent-0", browser_id="b0", handle="old", healthy=False)
    shard.replicas.add(agent_id="agent-1", browser_id="b0", handle="kept", healthy=True)
    stage = Stage(
        index=0,
        input_names=[],
        output_names=[],
        replicas=[
            Replica(r.agent_id, r.browser_id, r.handle, 1, r.healthy) for r in shard.replicas
        ],
    )
    deployments.models["minilm-l6"] = Deployment(
        placement=placement,
        pipeline=Pipeline("minilm-l6", [stage], run_hop=None, on_failure=None),  # type: ignore[arg-type]
        input_names=[],
    )
    return deployments, links


async def test_an_idle_browser_on_another_agent_comes_first_then_a_standby() -> None:
    deployments, _ = rig(dead=set())
    replacement = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert replacement is not None
    assert (replacement.replica.agent_id, replacement.replica.browser_id) == ("agent-2", "b0")
    assert not replacement.from_standby
    placement = deployments.placement_after(replacement)
    assert placement is not None
    [shard] = placement.shards
    assert [r.handle for r in shard.replicas] == ["kept", "h-b0"]

    deployments._registry.update_browsers("agent-0", [browser("b0", READY)])
    deployments._registry.update_browsers("agent-2", [browser("b1", STANDBY)])
    replacement = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert replacement is not None
    assert (replacement.replica.agent_id, replacement.replica.browser_id) == ("agent-2", "b1")
    assert replacement.from_standby


async def test_the_agent_holding_the_other_replica_is_the_last_resort() -> None:
    """Losing one agent must not take both replicas of a shard with it."""
    deployments, _ = rig(dead=set())
    deployments._registry.update_browsers("agent-0", [browser("b0", READY)])
    deployments._registry.update_browsers("agent-2", [])
    replacement = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert replacement is not None
    assert (replacement.replica.agent_id, replacement.replica.browser_id) == ("agent-1", "b1")


async def test_a_destination_that_died_too_is_passed_over_for_the_next() -> None:
    """Two faults at once: the first choice is gone by the time it is asked to load."""
    deployments, links = rig(dead={"agent-2/b0"})
    replacement = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert replacement is not None
    assert links["agent-2"].loads == ["b0"]
    assert (replacement.replica.agent_id, replacement.replica.browser_id) == ("agent-0", "b1")


async def test_it_gives_up_after_a_few_destinations() -> None:
    deployments, links = rig(dead={"agent-2/b0", "agent-0/b1", "agent-2/b1"})
    with pytest.raises(HopError) as raised:
        await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert sum(len(link.loads) for link in links.values()) == MAX_REPLACE_TRIES
    assert links["agent-1"].loads == []  # the fourth choice was never tried


async def test_nowhere_to_go_is_resource_exhausted() -> None:
    deployments, _ = rig(dead=set())
    deployments._registry.update_browsers("agent-0", [browser("b0", READY)])
    deployments._registry.update_browsers("agent-1", [browser("b0", READY)])
    deployments._registry.update_browsers("agent-2", [])
    with pytest.raises(DeployError) as raised:
        await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_replacements_loaded_at_once_commit_one_after_the_other() -> None:
    """Loads run outside the write lock: each commit starts from the placement the one
    before it committed, and a replica moved meanwhile is not moved twice."""
    deployments, _ = rig(dead=set())
    first = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    again = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert first is not None and again is not None
    placement = deployments.placement_after(first)
    assert placement is not None
    deployments.models["minilm-l6"].placement = placement  # what the commit applies
    assert deployments.placement_after(again) is None
    deployments.models.clear()
    assert deployments.placement_after(first) is None


def with_spare(deployments: Deployments, where: str, *, healthy: bool = True) -> None:
    agent_id, browser_id = where.split("/")
    deployment = deployments.models["minilm-l6"]
    deployment.placement.spares = 1
    deployment.placement.shards[0].spares.add(
        agent_id=agent_id, browser_id=browser_id, handle="spare", healthy=True, spare=True
    )
    deployment.pipeline.stages[0].spares.append(Replica(agent_id, browser_id, "spare", 1, healthy))


def copies(placement: pb.Placement) -> tuple[list[str], list[str]]:
    [shard] = placement.shards
    return (
        [f"{r.agent_id}/{r.browser_id}" for r in shard.replicas],
        [f"{r.agent_id}/{r.browser_id}" for r in shard.spares],
    )


def test_a_healthy_spare_takes_over_without_a_load() -> None:
    deployments, links = rig(dead=set())
    with_spare(deployments, "agent-2/b0")
    takeover = deployments.takeover("minilm-l6", 0, "agent-0", "b0")
    assert takeover is not None and takeover.promoted is not None
    assert (takeover.promoted.agent_id, takeover.promoted.handle) == ("agent-2", "spare")
    assert not takeover.promoted.spare
    assert takeover.replaced.handle == "old"
    # The failed replica's place in the order goes to the spare; no spare is left.
    assert copies(takeover.placement) == (["agent-2/b0", "agent-1/b0"], [])
    assert all(not link.loads for link in links.values())
    # Nothing changes until the placement is committed.
    assert copies(deployments.placement("minilm-l6"))[1] == ["agent-2/b0"]


def test_a_spare_on_an_avoided_agent_takes_over_only_when_no_other_may() -> None:
    deployments, _ = rig(dead=set())
    with_spare(deployments, "agent-2/b0")
    # Its browser avoided (a recovery under way there, its breaker open): never.
    assert deployments.takeover("minilm-l6", 0, "agent-0", "b0", avoid=[("agent-2", "b0")]) is None
    # Its whole agent avoided (the agent's breaker open), and no other spare: it serves.
    takeover = deployments.takeover("minilm-l6", 0, "agent-0", "b0", avoid=[("agent-2", "")])
    assert takeover is not None and takeover.promoted is not None
    assert takeover.promoted.agent_id == "agent-2"

    # Another spare outside the avoided agent comes first.
    deployments, _ = rig(dead=set())
    with_spare(deployments, "agent-2/b0")
    with_spare(deployments, "agent-0/b1")
    takeover = deployments.takeover("minilm-l6", 0, "agent-1", "b0", avoid=[("agent-2", "")])
    assert takeover is not None and takeover.promoted is not None
    assert (takeover.promoted.agent_id, takeover.promoted.browser_id) == ("agent-0", "b1")


async def test_an_unhealthy_spare_is_passed_over_and_the_load_avoids_its_runtime() -> None:
    deployments, _ = rig(dead=set())
    with_spare(deployments, "agent-2/b0", healthy=False)
    assert deployments.takeover("minilm-l6", 0, "agent-0", "b0") is None
    replacement = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert replacement is not None
    assert (replacement.replica.agent_id, replacement.replica.browser_id) != ("agent-2", "b0")


def test_a_spare_on_the_failed_agent_is_not_promoted_but_a_failed_spare_is_dropped() -> None:
    deployments, _ = rig(dead=set())
    with_spare(deployments, "agent-0/b1")
    assert deployments.takeover("minilm-l6", 0, "agent-0", "") is None  # the whole agent
    takeover = deployments.takeover("minilm-l6", 0, "agent-1", "b0")
    assert takeover is not None and takeover.promoted is not None
    assert copies(takeover.placement) == (["agent-0/b0", "agent-0/b1"], [])
    # A failure on the browser holding only the spare: the spare goes, nothing is promoted.
    fresh, _ = rig(dead=set())
    with_spare(fresh, "agent-2/b0")
    dropped = fresh.takeover("minilm-l6", 0, "agent-2", "b0")
    assert dropped is not None and dropped.promoted is None
    assert copies(dropped.placement) == (["agent-0/b0", "agent-1/b0"], [])


class Proposals:
    """A leader's replicator that commits every command it is given, after a moment."""

    is_leader = True

    def __init__(self) -> None:
        self.placements: list[pb.Placement] = []

    async def propose(self, command: bytes, timeout: float) -> None:
        await asyncio.sleep(0.01)
        body = json.loads(command)
        self.placements.append(pb.Placement.FromString(base64.b64decode(body["placement"])))


class Context:
    def time_remaining(self) -> float:
        return 10.0


async def test_takeovers_waiting_together_are_committed_in_one_write() -> None:
    """Takeovers that wait for the write lock together (the shards of one failed browser)
    move to their spares in one commit, not one each; one that cannot be made gets its
    own answer."""
    deployments, _ = rig(dead=set())
    with_spare(deployments, "agent-2/b0")
    deployment = deployments.models["minilm-l6"]
    second = deployment.placement.shards.add()
    second.shard.index = 1
    second.replicas.add(agent_id="agent-0", browser_id="b0", handle="old-1", healthy=False)
    second.replicas.add(agent_id="agent-2", browser_id="b0", handle="kept-1", healthy=True)
    second.spares.add(agent_id="agent-1", browser_id="b0", handle="spare-1", spare=True)
    deployment.pipeline.stages.append(
        Stage(
            index=1,
            input_names=[],
            output_names=[],
            replicas=[
                Replica(r.agent_id, r.browser_id, r.handle, 1, r.healthy) for r in second.replicas
            ],
            spares=[Replica("agent-1", "b0", "spare-1", 1, True)],
        )
    )
    replicator = Proposals()
    coordinator = CoordinatorServicer(
        settings=CoordinatorSettings(),
        registry=deployments._registry,
        deployments=deployments,
        state=ClusterState(),
        replicator=replicator,  # type: ignore[arg-type]
        lifecycle=Lifecycle(),
    )

    def replace(shard: int, model: str = "minilm-l6") -> Any:
        request = pb.ReplaceShardRequest(
            model=model, shard_index=shard, agent_id="agent-0", browser_id="b0"
        )
        return coordinator.ReplaceShard(request, Context())  # type: ignore[arg-type]

    # They arrive while another write holds the lock (a commit in flight, say).
    async with coordinator._writes:
        waiting = asyncio.gather(
            replace(0), replace(1), replace(0, "vit-tiny"), return_exceptions=True
        )
        await asyncio.sleep(0.05)
    first, other, unknown = await waiting
    assert isinstance(first, pb.ReplaceShardResponse) and first.from_spare
    assert isinstance(other, pb.ReplaceShardResponse) and other.from_spare
    assert getattr(unknown, "code", None) == grpc.StatusCode.NOT_FOUND
    [committed] = replicator.placements
    assert [[f"{r.agent_id}/{r.browser_id}" for r in s.replicas] for s in committed.shards] == [
        ["agent-2/b0", "agent-1/b0"],
        ["agent-1/b0", "agent-2/b0"],
    ]
    assert [list(s.spares) for s in committed.shards] == [[], []]


def where(replacement: Replacement | None) -> str:
    assert replacement is not None
    return f"{replacement.replica.agent_id}/{replacement.replica.browser_id}"


async def test_no_replica_goes_where_a_fault_is_in_force() -> None:
    deployments, _ = rig(dead=set())
    faulty = browser("b0", READY)
    faulty.faults_in_force.append("fault-7")
    deployments._registry.update_browsers("agent-2", [faulty, browser("b1", STANDBY)])
    moved = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")
    assert where(moved) != "agent-2/b0"  # the first choice without the fault


async def test_a_runtime_that_failed_a_hop_just_now_is_passed_over_for_a_while() -> None:
    clock = Clock()
    deployments, _ = rig(dead=set(), clock=clock)
    stage = deployments.models["minilm-l6"].pipeline.stages[0]
    hop = HopError("agent-2", grpc.StatusCode.UNAVAILABLE, "socket closed")
    deployments.on_failure("minilm-l6", stage, Replica("agent-2", "b0", "h", 1, True), hop)
    assert ("agent-2", "b0") in deployments.unhealthy()
    assert where(await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")) != (
        "agent-2/b0"
    )
    clock.now += RECENT_FAILURE_S
    assert ("agent-2", "b0") not in deployments.unhealthy()
    assert where(await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0")) == (
        "agent-2/b0"
    )


async def test_what_the_caller_asks_to_avoid_takes_neither_a_takeover_nor_a_load() -> None:
    deployments, _ = rig(dead=set())
    with_spare(deployments, "agent-2/b0")
    avoid = [("agent-2", "b0")]  # a recovery under way on agent-2/b0, say
    assert deployments.takeover("minilm-l6", 0, "agent-0", "b0", avoid=avoid) is None
    moved = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0", avoid=avoid)
    assert where(moved) != "agent-2/b0"
    whole = [("agent-2", "")]  # agent-2's breaker open: no load goes there
    moved = await deployments.prepare_replacement("minilm-l6", 0, "agent-0", "b0", avoid=whole)
    assert not where(moved).startswith("agent-2/")
    # Without it, the spare takes over.
    assert deployments.takeover("minilm-l6", 0, "agent-0", "b0") is not None


def test_a_lost_agent_that_held_only_a_spare_is_reported_for_that_shard() -> None:
    deployments, _ = rig(dead=set())
    with_spare(deployments, "agent-2/b0")
    deployments.agent_lost("agent-2")
    reporter = deployments._reporter
    assert isinstance(reporter, NullReporter)
    assert [(r["model"], r["shard_index"], r["browser_id"]) for r in reporter.reports] == [
        ("minilm-l6", 0, "b0")
    ]
    # Recovery's ReplaceShard for it drops the spare: nothing is promoted.
    dropped = deployments.takeover("minilm-l6", 0, "agent-2", "b0")
    assert dropped is not None and dropped.promoted is None


async def test_a_new_spare_that_cannot_be_committed_is_unloaded_and_tried_again() -> None:
    deployments, links = rig(dead=set())
    deployments.models["minilm-l6"].placement.spares = 1  # the shard wants one, has none
    unloaded: list[str] = []

    async def unload(handle: str, timeout: float) -> None:
        unloaded.append(handle)

    for link in links.values():
        link.unload = unload  # type: ignore[attr-defined]

    async def warm(*args: Any) -> None:
        return None  # the warm-up inference passed

    deployments._warm = warm  # type: ignore[assignment,method-assign]

    async def refused(build: Any) -> bool:
        return False  # say a replica moved onto the spare's runtime before the commit

    placement = deployments.models["minilm-l6"].placement
    assert not await deployments._replenish_once("minilm-l6", 0, refused, placement.deploy_id)
    assert len(unloaded) == 1  # the spare it could not commit
    # Once the shard has its spare (another try committed one), there is nothing to do.
    with_spare(deployments, "agent-2/b1")
    assert await deployments._replenish_once("minilm-l6", 0, refused, placement.deploy_id)


async def test_a_new_spare_keeps_clear_of_what_recovery_avoids_while_it_can() -> None:
    async def warm(*args: Any) -> None:
        return None

    async def commit(build: Any) -> bool:
        return build() is not None

    async def spare_on(avoid: frozenset[tuple[str, str]]) -> list[str]:
        """Where a new spare of the shard is loaded, the recovery service avoiding ``avoid``."""
        deployments, links = rig(dead=set())
        placement = deployments.models["minilm-l6"].placement
        placement.spares = 1  # the shard wants one, has none
        deployments._warm = warm  # type: ignore[assignment,method-assign]
        assert await deployments._replenish_once("minilm-l6", 0, commit, placement.deploy_id, avoid)
        return [f"{agent}/{b}" for agent, link in links.items() for b in link.loads]

    # Left alone it goes to agent-2, the agent without a copy of the shard.
    assert await spare_on(frozenset()) == ["agent-2/b0"]
    # With agent-2's breaker open, elsewhere.
    [elsewhere] = await spare_on(frozenset({("agent-2", "")}))
    assert not elsewhere.startswith("agent-2/")
    # Everything avoided: an avoided runtime beats no spare.
    everywhere = frozenset({("agent-0", ""), ("agent-1", ""), ("agent-2", "")})
    assert await spare_on(everywhere) == ["agent-2/b0"]


def committed(deployments: Deployments) -> None:
    """As after the takeover's commit: the shard has no spare left."""
    deployment = deployments.models["minilm-l6"]
    deployment.placement.shards[0].spares.pop()
    deployment.pipeline.stages[0].spares.pop()


async def test_a_new_spare_loads_only_once_the_replica_that_took_over_is_verified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A load beside the recovery's verify would slow the verify by seconds (the page
    creating a session answers nothing meanwhile): the refill waits for it."""

    async def warm(*args: Any) -> None:
        return None

    async def commit(build: Any) -> bool:
        return build() is not None

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    deployments, links = rig(dead=set())
    deployments._warm = warm  # type: ignore[assignment,method-assign]
    with_spare(deployments, "agent-2/b0")
    takeover = deployments.takeover("minilm-l6", 0, "agent-0", "b0")
    assert takeover is not None and takeover.promoted is not None
    committed(deployments)
    placement = deployments.models["minilm-l6"].placement
    refill = asyncio.create_task(
        deployments._replenish_once("minilm-l6", 0, commit, placement.deploy_id)
    )
    await settle()
    assert all(not link.loads for link in links.values())  # waiting for the verify
    with pytest.raises(InferError):  # the rig's pipeline cannot run it: the verify ends unpassed
        await deployments.verify_shard("minilm-l6", 0, Pin("agent-2", "b0"), time.monotonic() + 5)
    assert await asyncio.wait_for(refill, 5)
    assert sum(len(link.loads) for link in links.values()) == 1

    # No verify comes (a whole inference verified it): the load goes ahead after the grace.
    monkeypatch.setattr(deployments_module, "MOVE_VERIFY_GRACE_S", 0.05)
    deployments, links = rig(dead=set())
    deployments._warm = warm  # type: ignore[assignment,method-assign]
    with_spare(deployments, "agent-2/b0")
    assert deployments.takeover("minilm-l6", 0, "agent-0", "b0") is not None
    committed(deployments)
    placement = deployments.models["minilm-l6"].placement
    assert await asyncio.wait_for(
        deployments._replenish_once("minilm-l6", 0, commit, placement.deploy_id), 5
    )
    assert sum(len(link.loads) for link in links.values()) == 1


def applying(deployments: Deployments) -> Any:
    """A commit that applies what it built at once, as the log would; spare warm-ups pass."""

    async def warm(*args: Any) -> None:
        return None

    async def commit(build: Any) -> bool:
        placement = build()
        if placement is None:
            return False
        deployments.apply_placement("minilm-l6", placement)
        return True

    deployments._warm = warm  # type: ignore[assignment,method-assign]
    return commit


async def test_a_crowded_shard_spreads_over_agents_once_they_are_trusted() -> None:
    """Placed while the other agents were untrusted, both replicas of the shard sit on
    agent-0: were it lost, the shard would be. Spreading swaps roles with the spare on
    an agent of its own (nothing loaded), then moves the crowded spare to an agent that
    holds no copy, but not while that agent has just failed."""
    clock = Clock()
    deployments, links = rig(dead=set(), clock=clock)
    unloaded: list[str] = []

    async def unload(handle: str, timeout: float) -> None:
        unloaded.append(handle)

    for link in links.values():
        link.unload = unload  # type: ignore[attr-defined]

    commit = applying(deployments)
    crowded = pb.Placement(model="minilm-l6", version=1, spares=1, deploy_id="d1")
    shard = crowded.shards.add()
    shard.shard.index = 0
    shard.replicas.add(agent_id="agent-0", browser_id="b0", handle="r0", healthy=True)
    shard.replicas.add(agent_id="agent-0", browser_id="b1", handle="r1", healthy=True)
    shard.spares.add(agent_id="agent-2", browser_id="b0", handle="s2", healthy=True, spare=True)
    deployments.apply_placement("minilm-l6", crowded)

    await deployments.spread(commit)
    placement = deployments.models["minilm-l6"].placement
    assert copies(placement) == (["agent-0/b0", "agent-2/b0"], ["agent-0/b1"])
    assert [r.spare for r in placement.shards[0].replicas] == [False, False]
    assert all(not link.loads for link in links.values())  # a swap loads nothing

    # agent-1, the only agent without a copy, failed a moment ago: the spare stays.
    deployments._failed_at[("agent-1", "b0")] = clock.now
    deployments._failed_at[("agent-1", "b1")] = clock.now
    await deployments.spread(commit)
    assert copies(deployments.models["minilm-l6"].placement)[1] == ["agent-0/b1"]
    assert all(not link.loads for link in links.values())

    clock.now += RECENT_FAILURE_S + 1
    await deployments.spread(commit)
    assert copies(deployments.models["minilm-l6"].placement) == (
        ["agent-0/b0", "agent-2/b0"],
        ["agent-1/b0"],
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert unloaded == ["r1"]  # the crowded spare, once its successor was committed

    await deployments.spread(commit)  # spread as far as it goes: nothing more to do
    assert sum(len(link.loads) for link in links.values()) == 1


async def test_refills_at_once_spread_over_equally_good_runtimes() -> None:
    """A browser held copies of several shards: their new spares load at the same time.
    Each sees where the others are loading, so they do not all pile onto one runtime
    (whose verifies would then run one after another in one page)."""
    deployments, links = rig(dead=set())
    deployments._registry.register(
        "agent-2", "a2:1", 1 << 30, [browser("b0", STANDBY), browser("b1", STANDBY)]
    )

    async def paths(placement: pb.Placement) -> dict[int, Path]:
        return {0: Path("shard-0.onnx"), 1: Path("shard-1.onnx")}

    deployments._shard_paths = paths  # type: ignore[method-assign]
    loading = asyncio.Event()
    real_load = FakeLink.load

    async def slow_load(self: FakeLink, spec: Any, path: Path, **kw: Any) -> Any:
        answer = await real_load(self, spec, path, **kw)
        await loading.wait()  # both refills have chosen before either finishes
        return answer

    for link in links.values():
        link.load = functools.partial(slow_load, link)  # type: ignore[method-assign]

    commit = applying(deployments)
    placement = pb.Placement(model="minilm-l6", version=1, spares=1, deploy_id="d1")
    for index in (0, 1):
        shard = placement.shards.add()
        shard.shard.index = index
        shard.replicas.add(agent_id="agent-0", browser_id="b0", handle=f"a{index}", healthy=True)
        shard.replicas.add(agent_id="agent-1", browser_id="b0", handle=f"b{index}", healthy=True)
    deployments.apply_placement("minilm-l6", placement)

    refills = [
        asyncio.create_task(deployments._replenish_once("minilm-l6", index, commit, "d1"))
        for index in (0, 1)
    ]
    for _ in range(20):
        await asyncio.sleep(0)
    loading.set()
    assert await asyncio.gather(*refills) == [True, True]
    assert sorted(links["agent-2"].loads) == ["b0", "b1"]
