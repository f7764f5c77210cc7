"""Selector resolution against a fake cluster view, and the actions each intensity takes.

``cluster_view`` is shared with the injector's tests.
"""

from __future__ import annotations

import random

import pytest
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as pb

from services.fault_injector.actions import (
    AgentAction,
    LeaderAction,
    LeaderMode,
    breaker_keys,
    ineligible,
    plan_actions,
)
from services.fault_injector.spec import FaultError
from services.fault_injector.targets import ClusterView, Replica, Target, candidates, count, pick

K = common_pb2.FaultKind
Level = common_pb2.Intensity
T = pb.TargetKind
M = pb.SelectorMode
H = agent_pb.FaultHook
EP = common_pb2.ExecutionProvider
READY, FAILED = common_pb2.BROWSER_STATE_READY, common_pb2.BROWSER_STATE_FAILED
MIB = 1024 * 1024


def browser(
    browser_id: str, state: int = READY, shards: tuple[tuple[str, int], ...] = ()
) -> common_pb2.BrowserInfo:
    """A browser holding shards given as (handle, execution provider)."""
    return common_pb2.BrowserInfo(
        browser_id=browser_id,
        state=state,
        runtime=common_pb2.RUNTIME_BROWSER,
        shards=[common_pb2.LoadedShard(handle=h, execution_provider=ep) for h, ep in shards],
    )


def cluster_view(agents: int = 3, *, healthy: bool = True) -> ClusterView:
    """``agents`` agents with a native runtime and two browsers each; minilm-l6 in two
    shards, shard 0 on agent-0/browser-0 (webgpu) and on agent-1/browser-0 (wasm), shard 1
    on agent-2/browser-1; three replicas with coordinator-1 leading."""
    view = ClusterView()
    for n in range(agents):
        shards = {
            0: {"browser-0": (("h0", EP.EXECUTION_PROVIDER_WEBGPU),)},
            1: {"browser-0": (("h1", EP.EXECUTION_PROVIDER_WASM),)},
            2: {"browser-1": (("h2", EP.EXECUTION_PROVIDER_WASM),)},
        }.get(n, {})
        view.agents.append(
            common_pb2.AgentInfo(
                agent_id=f"agent-{n}",
                address=f"127.0.0.1:{6000 + n}",
                healthy=healthy,
                memory_budget_bytes=4096 * MIB,
                browsers=[
                    common_pb2.BrowserInfo(browser_id="native", runtime=common_pb2.RUNTIME_NATIVE),
                    browser("browser-0", shards=shards.get("browser-0", ())),
                    browser("browser-1", shards=shards.get("browser-1", ())),
                ],
            )
        )

    def replica(agent: int, handle: str) -> coordinator_pb2.ShardReplica:
        browser_id = "browser-1" if agent == 2 else "browser-0"
        return coordinator_pb2.ShardReplica(
            agent_id=f"agent-{agent}", browser_id=browser_id, handle=handle, healthy=True
        )

    view.placements["minilm-l6"] = coordinator_pb2.Placement(
        model="minilm-l6",
        shards=[
            coordinator_pb2.ShardPlacement(
                shard=common_pb2.ShardSpec(model="minilm-l6", index=0),
                replicas=[replica(0, "h0"), replica(1, "h1")],
            ),
            coordinator_pb2.ShardPlacement(
                shard=common_pb2.ShardSpec(model="minilm-l6", index=1),
                replicas=[replica(2, "h2")],
            ),
        ],
    )
    view.replicas = [
        Replica(
            "coordinator-0",
            "127.0.0.1:7000",
            coordinator_pb2.REPLICA_ROLE_FOLLOWER,
            3,
            "coordinator-1",
        ),
        Replica(
            "coordinator-1",
            "127.0.0.1:7001",
            coordinator_pb2.REPLICA_ROLE_LEADER,
            3,
            "coordinator-1",
        ),
        Replica(
            "coordinator-2",
            "127.0.0.1:7002",
            coordinator_pb2.REPLICA_ROLE_FOLLOWER,
            3,
            "coordinator-1",
        ),
    ]
    return view


def selector(
    kind: int, *ids: str, mode: int = M.SELECTOR_MODE_ALL, **fields: object
) -> pb.TargetSelector:
    return pb.TargetSelector(kind=kind, ids=list(ids), mode=mode, **fields)


def ids(targets: list[Target]) -> list[str]:
    return [t.id for t in targets]


def test_agents_are_the_healthy_ones_unless_named() -> None:
    view = cluster_view()
    assert ids(candidates(selector(T.TARGET_KIND_AGENT), view)) == ["agent-0", "agent-1", "agent-2"]
    view.agents[1].healthy = False
    assert ids(candidates(selector(T.TARGET_KIND_AGENT), view)) == ["agent-0", "agent-2"]
    # Named, an agent whose session is down is still reached.
    assert ids(candidates(selector(T.TARGET_KIND_AGENT, "agent-1"), view)) == ["agent-1"]
    with pytest.raises(FaultError) as missing:
        candidates(selector(T.TARGET_KIND_AGENT, "agent-7"), view)
    assert missing.value.code == "NOT_FOUND"
    assert "agent-7" in missing.value.reason


def test_browsers_by_full_or_bare_id_and_by_model_never_the_native_runtime() -> None:
    view = cluster_view()
    everything = ids(candidates(selector(T.TARGET_KIND_BROWSER), view))
    assert len(everything) == 6 and not any("native" in i for i in everything)
    assert ids(candidates(selector(T.TARGET_KIND_BROWSER, "agent-2/browser-1"), view)) == [
        "agent-2/browser-1"
    ]
    assert ids(candidates(selector(T.TARGET_KIND_BROWSER, "browser-1"), view)) == [
        "agent-0/browser-1",
        "agent-1/browser-1",
        "agent-2/browser-1",
    ]
    assert ids(candidates(selector(T.TARGET_KIND_BROWSER, model="minilm-l6"), view)) == [
        "agent-0/browser-0",
        "agent-1/browser-0",
        "agent-2/browser-1",
    ]
    with pytest.raises(FaultError, match="no browser agent-9/browser-0"):
        candidates(selector(T.TARGET_KIND_BROWSER, "agent-9/browser-0"), view)


def test_shards_are_replicas_named_model_slash_index() -> None:
    view = cluster_view()
    zero = candidates(selector(T.TARGET_KIND_SHARD, "minilm-l6/0"), view)
    assert [(t.id, t.agent_id, t.shard_handle) for t in zero] == [
        ("minilm-l6/0", "agent-0", "h0"),
        ("minilm-l6/0", "agent-1", "h1"),
    ]
    assert len(candidates(selector(T.TARGET_KIND_SHARD, model="minilm-l6"), view)) == 3
    with pytest.raises(FaultError) as missing:
        candidates(selector(T.TARGET_KIND_SHARD, "minilm-l6/7"), view)
    assert missing.value.code == "NOT_FOUND"


def test_a_service_selector_picks_the_agents_and_the_leader_is_found() -> None:
    view = cluster_view()
    assert ids(candidates(selector(T.TARGET_KIND_SERVICE, "browser-agent"), view)) == [
        "agent-0",
        "agent-1",
        "agent-2",
    ]
    leader = view.leader()
    assert leader is not None and leader.replica_id == "coordinator-1"
    # With no replica saying it leads, the leader most of them name is taken.
    view.replicas = [
        Replica(r.replica_id, r.address, coordinator_pb2.REPLICA_ROLE_FOLLOWER, 3, "coordinator-2")
        for r in view.replicas
    ]
    leader = view.leader()
    assert leader is not None and leader.replica_id == "coordinator-2"


@pytest.mark.parametrize(
    ("mode", "value", "available", "expected"),
    [
        (M.SELECTOR_MODE_ONE, 0, 5, 1),
        (M.SELECTOR_MODE_ALL, 0, 5, 5),
        (M.SELECTOR_MODE_FIXED, 2, 5, 2),
        (M.SELECTOR_MODE_FIXED, 9, 5, 5),
        (M.SELECTOR_MODE_PERCENT, 50, 5, 2),
        (M.SELECTOR_MODE_PERCENT, 10, 5, 1),
        (M.SELECTOR_MODE_PERCENT, 100, 5, 5),
        (M.SELECTOR_MODE_ONE, 0, 0, 0),
    ],
)
def test_modes_count_as_chaos_mesh_does(
    mode: int, value: int, available: int, expected: int
) -> None:
    assert count(mode, value, available) == expected


def test_pick_counts_over_the_matched_and_draws_from_the_allowed() -> None:
    view = cluster_view()
    matched = candidates(selector(T.TARGET_KIND_AGENT), view)
    rng = random.Random(7)
    one = pick(selector(T.TARGET_KIND_AGENT, mode=M.SELECTOR_MODE_ONE), matched, matched, rng)
    assert len(one) == 1 and one[0] in matched
    fixed = selector(T.TARGET_KIND_AGENT, mode=M.SELECTOR_MODE_FIXED, value=2)
    assert len(pick(fixed, matched, matched, rng)) == 2
    # Two are wanted, but a breaker left only one allowed: that one is hit.
    assert ids(pick(fixed, matched, matched[2:], rng)) == ["agent-2"]


def target(view: ClusterView, kind: int, *names: str) -> list[Target]:
    return candidates(selector(kind, *names), view)


def test_browser_crash_by_intensity() -> None:
    view = cluster_view()
    agent0 = target(view, T.TARGET_KIND_AGENT, "agent-0")

    def hooks(intensity: int) -> list[tuple[int, str]]:
        actions = plan_actions(
            K.FAULT_KIND_BROWSER_CRASH, intensity, agent0, view, memory_cap_bytes=MIB
        )
        return [(a.hook, a.browser_id) for a in actions if isinstance(a, AgentAction)]

    assert hooks(Level.INTENSITY_MILD) == [(H.FAULT_HOOK_CRASH_PAGE, "browser-0")]
    assert hooks(Level.INTENSITY_MODERATE) == [(H.FAULT_HOOK_KILL_BROWSER, "browser-0")]
    assert hooks(Level.INTENSITY_SEVERE) == [
        (H.FAULT_HOOK_KILL_BROWSER, "browser-0"),
        (H.FAULT_HOOK_KILL_BROWSER, "browser-1"),
    ]


def test_memory_pressure_takes_its_share_of_the_budget_or_the_cap() -> None:
    view = cluster_view()
    browser1 = target(view, T.TARGET_KIND_BROWSER, "agent-1/browser-1")
    sizes = {
        intensity: plan_actions(
            K.FAULT_KIND_MEMORY_PRESSURE, intensity, browser1, view, memory_cap_bytes=100 * MIB
        )[0]
        for intensity in (Level.INTENSITY_MILD, Level.INTENSITY_MODERATE, Level.INTENSITY_SEVERE)
    }
    assert [a.memory_bytes for a in sizes.values()] == [25 * MIB, 50 * MIB, 90 * MIB]
    assert all(a.browser_id == "browser-1" for a in sizes.values())
    view.agents[1].memory_budget_bytes = 40 * MIB  # a budget under the cap wins
    [small] = plan_actions(
        K.FAULT_KIND_MEMORY_PRESSURE,
        Level.INTENSITY_MILD,
        browser1,
        view,
        memory_cap_bytes=100 * MIB,
    )
    assert small.memory_bytes == 10 * MIB


def test_connection_lost_component_failure_latency_partition_and_leader_loss() -> None:
    view = cluster_view()
    shard0 = [
        t for t in target(view, T.TARGET_KIND_SHARD, "minilm-l6/0") if t.agent_id == "agent-0"
    ]
    agent1 = target(view, T.TARGET_KIND_AGENT, "agent-1")

    def plan(kind: int, intensity: int, targets: list[Target]) -> list[AgentAction | LeaderAction]:
        return plan_actions(kind, intensity, targets, view, memory_cap_bytes=MIB)

    cut, offline = H.FAULT_HOOK_CUT_SESSION, H.FAULT_HOOK_OFFLINE
    assert [a.hook for a in plan(K.FAULT_KIND_CONNECTION_LOST, Level.INTENSITY_MILD, shard0)] == [
        cut
    ]
    assert [a.hook for a in plan(K.FAULT_KIND_CONNECTION_LOST, Level.INTENSITY_SEVERE, shard0)] == [
        cut,
        offline,
    ]
    # Shard 0 on agent-0 runs on webgpu: moderate loses the device, severe adds a failed session.
    mild = plan(K.FAULT_KIND_COMPONENT_FAILURE, Level.INTENSITY_MILD, shard0)
    assert [(a.hook, a.shard_handle, a.target_id) for a in mild] == [
        (H.FAULT_HOOK_FAIL_SESSION, "h0", "minilm-l6/0")
    ]
    severe = plan(K.FAULT_KIND_COMPONENT_FAILURE, Level.INTENSITY_SEVERE, shard0)
    assert [a.hook for a in severe] == [H.FAULT_HOOK_FAIL_SESSION, H.FAULT_HOOK_LOSE_DEVICE]
    # On agent-1 the shard runs on wasm: moderate fails every session of its browser instead.
    [every] = plan(K.FAULT_KIND_COMPONENT_FAILURE, Level.INTENSITY_MODERATE, agent1)
    assert (every.hook, every.browser_id, every.shard_handle) == (
        H.FAULT_HOOK_FAIL_SESSION,
        "browser-0",
        "",
    )
    [delay] = plan(K.FAULT_KIND_LATENCY, Level.INTENSITY_MODERATE, agent1)
    assert (delay.hook, delay.delay_s) == (H.FAULT_HOOK_DELAY, 0.5)
    [grey] = plan(K.FAULT_KIND_PARTITION, Level.INTENSITY_MILD, agent1)
    assert grey.data_path_only
    severe_partition = plan(K.FAULT_KIND_PARTITION, Level.INTENSITY_SEVERE, agent1)
    assert [a.hook for a in severe_partition] == [H.FAULT_HOOK_DROP, offline, offline]
    leader = candidates(selector(T.TARGET_KIND_REPLICA, "coordinator-1"), view)
    modes = [
        plan(K.FAULT_KIND_LEADER_LOSS, intensity, leader)[0].mode
        for intensity in (Level.INTENSITY_MILD, Level.INTENSITY_MODERATE, Level.INTENSITY_SEVERE)
    ]
    assert modes == [LeaderMode.STOP, LeaderMode.KILL, LeaderMode.KILL_FOR_GOOD]


def test_eligibility_and_breaker_keys() -> None:
    view = cluster_view()
    agent2 = target(view, T.TARGET_KIND_AGENT, "agent-2")[0]
    # agent-2's first ready browser holds no shard, so a component failure cannot act there.
    assert "holds no shard" in (
        ineligible(K.FAULT_KIND_COMPONENT_FAILURE, Level.INTENSITY_MILD, agent2, view) or ""
    )
    view.agents[0].browsers[1].state = FAILED
    failed = target(view, T.TARGET_KIND_BROWSER, "agent-0/browser-0")[0]
    assert "FAILED" in (
        ineligible(K.FAULT_KIND_BROWSER_CRASH, Level.INTENSITY_MILD, failed, view) or ""
    )
    # A cut session needs no browser at all.
    assert ineligible(K.FAULT_KIND_CONNECTION_LOST, Level.INTENSITY_MILD, failed, view) is None
    assert breaker_keys(failed, view) == [("agent", "agent-0"), ("browser", "agent-0/browser-0")]
