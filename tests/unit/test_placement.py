"""Which runtime holds each replica of each shard at deploy time."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from webshard.common.v1 import common_pb2

from services.coordinator.placement import (
    Candidate,
    Load,
    PlacementError,
    Slot,
    choose_takeover,
    crowded_spare,
    place,
    place_spares,
    spare_slot,
    swap_roles,
)

BROWSER = common_pb2.RUNTIME_BROWSER
WASM = common_pb2.EXECUTION_PROVIDER_WASM


def candidate(
    where: str, *, standby: bool = False, free: int = 1 << 30, engine: str = "chromium"
) -> Candidate:
    agent, browser = where.split("/")
    return Candidate(agent, browser, BROWSER, [WASM], True, free, standby, engine)


def slots(placement: list[list[Slot]]) -> list[list[str]]:
    return [[f"{s.agent_id}/{s.browser_id}" for s in shard] for shard in placement]


def test_replicas_go_to_distinct_agents_and_shards_spread() -> None:
    candidates = [candidate(f"agent-{a}/b0") for a in range(3)]
    placed = slots(
        place([10, 10, 10], replicas=2, runtime=BROWSER, provider=0, candidates=candidates)
    )
    for shard in placed:
        assert len({s.split("/")[0] for s in shard}) == 2
    assert {s for shard in placed for s in shard} == {c.agent_id + "/b0" for c in candidates}


def test_a_deploy_keeps_to_its_engines_and_spreads_over_them() -> None:
    engines = {"agent-0": "chromium", "agent-1": "chromium", "agent-2": "firefox"}
    candidates = [candidate(f"{a}/b0", engine=e) for a, e in engines.items()]
    only = slots(
        place(
            [10, 10],
            replicas=1,
            runtime=BROWSER,
            provider=0,
            candidates=candidates,
            engines=["firefox"],
        )
    )
    assert only == [["agent-2/b0"], ["agent-2/b0"]]
    # Over both: each shard's two copies on two engines, consecutive shards alternating.
    both = place(
        [10, 10, 10],
        replicas=2,
        runtime=BROWSER,
        provider=0,
        candidates=candidates,
        engines=["chromium", "firefox"],
    )
    for shard in both:
        assert {engines[s.agent_id] for s in shard} == {"chromium", "firefox"}
    spread = place(
        [10, 10],
        replicas=1,
        runtime=BROWSER,
        provider=0,
        candidates=candidates,
        engines=["chromium", "firefox"],
    )
    assert [engines[s.agent_id] for [s] in spread] in (
        ["chromium", "firefox"],
        ["firefox", "chromium"],
    )
    spares = place_spares(
        [10, 10],
        spread,
        spares=1,
        runtime=BROWSER,
        provider=0,
        candidates=candidates,
        engines=["chromium"],
    )
    assert all(engines[s.agent_id] == "chromium" for shard in spares for s in shard)
    with pytest.raises(
        PlacementError,
        match=r"no healthy agent offers a ready browser of engine "
        r"firefox \(the fleet's engines: chromium\)",
    ):
        place(
            [10],
            replicas=1,
            runtime=BROWSER,
            provider=0,
            candidates=candidates[:2],
            engines=["firefox"],
        )


def test_standbys_stay_free_while_ready_browsers_spread_the_replicas() -> None:
    candidates = [
        candidate("agent-0/b0"),
        candidate("agent-0/b1", standby=True),
        candidate("agent-1/b0"),
        candidate("agent-1/b1", standby=True),
    ]
    placed = slots(place([10, 10], replicas=2, runtime=BROWSER, provider=0, candidates=candidates))
    assert placed == [["agent-0/b0", "agent-1/b0"], ["agent-1/b0", "agent-0/b0"]]


def test_a_standby_is_taken_to_put_a_replica_on_another_agent() -> None:
    """An agent whose browsers all crashed has only standbys; the replicas still spread."""
    candidates = [
        candidate("agent-0/b0"),
        candidate("agent-0/b1"),
        candidate("agent-1/b2", standby=True),
        candidate("agent-1/b3", standby=True),
    ]
    placed = slots(place([10, 10], replicas=2, runtime=BROWSER, provider=0, candidates=candidates))
    for shard in placed:
        assert {s.split("/")[0] for s in shard} == {"agent-0", "agent-1"}
    # The standby taken by the first shard serves the second too: one standby used.
    assert {s for shard in placed for s in shard if s.startswith("agent-1")} == {"agent-1/b2"}


def test_too_few_runtimes_is_an_error_that_says_so() -> None:
    with pytest.raises(PlacementError, match="3 replicas per shard need 3 distinct runtimes"):
        place(
            [10],
            replicas=3,
            runtime=BROWSER,
            provider=0,
            candidates=[candidate("agent-0/b0"), candidate("agent-1/b0", standby=True)],
        )


def test_a_shard_too_big_for_every_agent_is_resource_exhausted() -> None:
    with pytest.raises(PlacementError) as raised:
        place(
            [100], replicas=1, runtime=BROWSER, provider=0, candidates=[candidate("a/b", free=50)]
        )
    assert raised.value.code == "RESOURCE_EXHAUSTED"


# Hot spares.


def both(
    sizes: list[int], candidates: list[Candidate], *, replicas: int = 1, spares: int | None
) -> tuple[list[list[Slot]], list[list[Slot]]]:
    serving = place(sizes, replicas=replicas, runtime=BROWSER, provider=0, candidates=candidates)
    chosen = place_spares(
        sizes, serving, spares=spares, runtime=BROWSER, provider=0, candidates=candidates
    )
    return serving, chosen


def test_a_spare_goes_beside_its_replicas_on_another_agent() -> None:
    candidates = [candidate(f"agent-{a}/b{b}") for a in range(3) for b in range(2)]
    serving, spares = both([10, 10, 10], candidates, replicas=1, spares=None)
    for replicas, extra in zip(serving, spares, strict=True):
        assert len(extra) == 1
        assert extra[0].agent_id not in {r.agent_id for r in replicas}


def test_the_default_spare_is_best_effort_and_leaves_standbys_alone() -> None:
    lone = [candidate("agent-0/b0"), candidate("agent-0/b1", standby=True)]
    serving, spares = both([10, 10], lone, spares=None)
    assert spares == [[], []]
    # No memory left for a spare: still no error, no spare.
    tight = [candidate("agent-0/b0", free=15), candidate("agent-1/b0", free=10)]
    serving, spares = both([10, 10], tight, spares=None)
    assert [len(s) for s in serving] == [1, 1] and spares == [[], []]


def test_asking_for_no_spares_places_none() -> None:
    candidates = [candidate(f"agent-{a}/b0") for a in range(3)]
    assert both([10], candidates, spares=0)[1] == [[]]


@pytest.mark.parametrize("asked", [-5, 99])
def test_an_impossible_spare_count_is_invalid_and_names_the_free_runtimes(asked: int) -> None:
    candidates = [candidate(f"agent-{a}/b0") for a in range(3)]
    with pytest.raises(PlacementError, match="2 runtimes are free") as raised:
        both([10], candidates, replicas=1, spares=asked)
    assert raised.value.code == "INVALID_ARGUMENT"


def test_explicit_spares_without_memory_are_resource_exhausted() -> None:
    candidates = [candidate("agent-0/b0", free=100), candidate("agent-1/b0", free=5)]
    with pytest.raises(PlacementError) as raised:
        both([10], candidates, spares=1)
    assert raised.value.code == "RESOURCE_EXHAUSTED"


def test_a_takeover_picks_a_healthy_spare_off_the_failed_agent() -> None:
    failed = Slot("agent-0", "b0")
    spares = [Slot("agent-0", "b1"), Slot("agent-1", "b0"), Slot("agent-2", "b0")]
    # Off the failed agent first, then off the agents serving the shard's other replicas.
    serving = [failed, Slot("agent-1", "b1")]
    assert choose_takeover(spares, failed=failed, serving=serving, unhealthy=()) == Slot(
        "agent-2", "b0"
    )
    # Unhealthy runtimes and whole agents are never chosen.
    assert choose_takeover(
        spares, failed=failed, serving=[failed], unhealthy={("agent-1", "b0"), ("agent-2", "")}
    ) == Slot("agent-0", "b1")
    # A whole agent failed: nothing on it is promoted.
    assert (
        choose_takeover(
            [Slot("agent-0", "b1")], failed=Slot("agent-0", ""), serving=[failed], unhealthy=()
        )
        is None
    )
    # The failed browser's own spare (impossible by placement, but never trusted).
    assert choose_takeover([failed], failed=failed, serving=[failed], unhealthy=()) is None


def test_a_new_spare_avoids_unhealthy_runtimes_and_the_shards_agents() -> None:
    candidates = [candidate(f"agent-{a}/b{b}") for a in range(3) for b in range(2)]
    holding = [Slot("agent-0", "b0")]
    load = Load.of([(Slot("agent-1", "b0"), 10)])
    # Off the shard's agent, then the idle runtime of the agent with most memory left.
    assert spare_slot(10, holding=holding, candidates=candidates, load=load) == Slot(
        "agent-2", "b0"
    )
    assert spare_slot(
        10, holding=holding, candidates=candidates, load=load, unhealthy={("agent-2", "")}
    ) == Slot("agent-1", "b1")
    assert spare_slot(
        10,
        holding=holding,
        candidates=candidates,
        load=load,
        unhealthy={("agent-2", ""), ("agent-1", "b1")},
    ) == Slot("agent-1", "b0")
    everything = [Slot(c.agent_id, c.browser_id) for c in candidates]
    assert spare_slot(10, holding=everything, candidates=candidates, load=load) is None


@dataclass
class SimShard:
    serving: list[Slot]
    spares: list[Slot]


@pytest.mark.parametrize("seed", range(40))
def test_simulated_failures_keep_every_shard_served(seed: int) -> None:
    """Random fleets, shards, replicas and spares, then random failures (permanent:
    the runtime or agent is gone; and transient: a fault in force, which makes a
    runtime untrusted for takeovers and new spares). Recovery runs as the coordinator
    does: a takeover when a spare may, else a load, else the failed replica stays;
    a new spare follows a takeover. Checked after every step: no two copies of a shard
    on one runtime, no takeover onto an unhealthy runtime, and a shard serves from a
    healthy replica whenever it has any healthy copy."""
    rng = random.Random(seed)
    agents = rng.randint(1, 5)
    candidates = [
        candidate(f"agent-{a}/b{b}", free=rng.choice([40, 80, 1 << 30]))
        for a in range(agents)
        for b in range(rng.randint(1, 3))
    ]
    sizes = [rng.randint(5, 20) for _ in range(rng.randint(1, 4))]
    replicas = rng.randint(1, min(2, len(candidates)))
    try:
        serving, spares = both(sizes, candidates, replicas=replicas, spares=None)
    except PlacementError:
        return  # too little memory for the replicas themselves: a refused deploy
    shards = [SimShard(list(s), list(p)) for s, p in zip(serving, spares, strict=True)]
    dead: set[tuple[str, str]] = set()

    def gone(slot: Slot) -> bool:
        return slot.key in dead or (slot.agent_id, "") in dead

    for _step in range(12):
        if rng.random() < 0.3:
            victim = rng.choice(candidates)
            dead.add((victim.agent_id, ""))
        else:
            victim = rng.choice(candidates)
            dead.add((victim.agent_id, victim.browser_id))
        faulty = {
            (c.agent_id, c.browser_id) for c in candidates if rng.random() < 0.15
        }  # a fault in force this step
        unhealthy = dead | faulty
        load = Load.of(
            (slot, size)
            for shard, size in zip(shards, sizes, strict=True)
            for slot in [*shard.serving, *shard.spares]
            if not gone(slot)
        )
        for shard, size in zip(shards, sizes, strict=True):
            shard.spares = [s for s in shard.spares if not gone(s)]  # a dead spare is dropped
            for failed in [r for r in shard.serving if gone(r)]:
                spare = choose_takeover(
                    shard.spares, failed=failed, serving=shard.serving, unhealthy=unhealthy
                )
                if spare is not None:
                    assert spare.key not in unhealthy and (spare.agent_id, "") not in unhealthy
                    shard.spares.remove(spare)
                    shard.serving[shard.serving.index(failed)] = spare
                    fresh = spare_slot(
                        size,
                        holding=[*shard.serving, *shard.spares],
                        candidates=candidates,
                        load=load,
                        unhealthy=unhealthy,
                    )
                    if fresh is not None:
                        shard.spares.append(fresh)
                        load.add(fresh, size)
                    continue
                moved = spare_slot(
                    size,
                    holding=[*shard.serving, *shard.spares],
                    candidates=candidates,
                    load=load,
                    unhealthy=unhealthy,
                )
                if moved is not None:  # the load path
                    shard.serving[shard.serving.index(failed)] = moved
                    load.add(moved, size)
            copies = [s.key for s in [*shard.serving, *shard.spares]]
            assert len(copies) == len(set(copies)), "two copies of a shard on one runtime"
            assert shard.serving, "a shard lost every serving replica"
            healthy_copy = any(not gone(s) and s.key not in faulty for s in shard.spares)
            if healthy_copy or any(not gone(s) for s in shard.serving):
                assert any(not gone(s) for s in shard.serving), (
                    "a shard with a healthy spare serves only from dead replicas"
                )
            # Spreading, as the coordinator's background round does.
            agents_before = len({s.agent_id for s in [*shard.serving, *shard.spares]})
            pair = swap_roles(shard.serving, shard.spares, unhealthy)
            if pair is not None:
                replica, spare = pair
                assert spare.key not in unhealthy and (spare.agent_id, "") not in unhealthy
                shard.serving[shard.serving.index(replica)] = spare
                shard.spares[shard.spares.index(spare)] = replica
            elif (crowded := crowded_spare(shard.serving, shard.spares)) is not None:
                holding = [*shard.serving, *shard.spares]
                elsewhere = spare_slot(
                    size, holding=holding, candidates=candidates, load=load, unhealthy=unhealthy
                )
                if elsewhere is not None and elsewhere.agent_id not in {
                    s.agent_id for s in holding
                }:
                    shard.spares[shard.spares.index(crowded)] = elsewhere
                    load.add(elsewhere, size)
                    assert len({s.agent_id for s in [*shard.serving, *shard.spares]}) > (
                        agents_before
                    ), "a move that spreads nothing"
            copies = [s.key for s in [*shard.serving, *shard.spares]]
            assert len(copies) == len(set(copies)), "spreading put two copies on one runtime"


def test_a_crowded_shard_swaps_roles_then_moves_its_spare() -> None:
    a0, a0b, a1, a2 = Slot("a0", "b0"), Slot("a0", "b1"), Slot("a1", "b0"), Slot("a2", "b0")
    # Two replicas on a0, a spare on a2: the spare serves in place of one of them.
    assert swap_roles([a0, a0b], [a2], unhealthy=()) == (a0b, a2)
    # Not onto an untrusted spare, nor one on an agent a replica uses.
    assert swap_roles([a0, a0b], [a2], unhealthy={("a2", "")}) is None
    assert swap_roles([a0, a2], [a0b], unhealthy=()) is None
    # A spare beside a replica is crowded; one on an agent of its own is not.
    assert crowded_spare([a0, a2], [a0b]) == a0b
    assert crowded_spare([a0, a2], [a1]) is None
    assert crowded_spare([a0], []) is None
