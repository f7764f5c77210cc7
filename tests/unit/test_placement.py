"""Which runtime holds each replica of each shard at deploy time."""

from __future__ import annotations

import pytest
from webshard.common.v1 import common_pb2

from services.coordinator.placement import Candidate, PlacementError, place

BROWSER = common_pb2.RUNTIME_BROWSER
WASM = common_pb2.EXECUTION_PROVIDER_WASM


def candidate(where: str, *, standby: bool = False, free: int = 1 << 30) -> Candidate:
    agent, browser = where.split("/")
    return Candidate(agent, browser, BROWSER, [WASM], True, free, standby)


def slots(placement: list[list[object]]) -> list[list[str]]:
    return [[f"{s.agent_id}/{s.browser_id}" for s in shard] for shard in placement]  # type: ignore[attr-defined]


def test_replicas_go_to_distinct_agents_and_shards_spread() -> None:
    candidates = [candidate(f"agent-{a}/b0") for a in range(3)]
    placed = slots(
        place([10, 10, 10], replicas=2, runtime=BROWSER, provider=0, candidates=candidates)
    )
    for shard in placed:
        assert len({s.split("/")[0] for s in shard}) == 2
    assert {s for shard in placed for s in shard} == {c.agent_id + "/b0" for c in candidates}


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
