"""Hot spares on a local cluster of native agents: placed beside the replicas, never
routed to, taking over from a failed replica with a placement change, followed by a
new spare; spares=0 keeps recovery by loading; impossible counts are refused; the
replica that took over is verified with one hop from a kept boundary activation."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import webshard
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as agent_grpc
from webshard.cli.local import LocalCluster
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)

from tests.conftest import native_cluster, wait_for
from tests.integration.test_inference import cosine, reference_embeddings

MODEL = "minilm-l6"
SENTENCE = "A spare that takes no traffic is ready when it is needed."


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with native_cluster(tmp_path_factory.mktemp("cluster"), 3) as local:
        yield local


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[webshard.Client]:
    with webshard.Client(cluster.coordinators(), timeout=60) as sdk:
        yield sdk


def runtimes(replicas: object) -> set[tuple[str, str]]:
    return {(r.agent_id, r.browser_id) for r in replicas}  # type: ignore[attr-defined]


def correct(client: webshard.Client) -> bool:
    [expected] = reference_embeddings([SENTENCE])
    result = client.infer(MODEL, texts=[SENTENCE])
    return bool(cosine(result.outputs["sentence_embedding"][0], expected) >= 0.99999)


def test_spares_sit_beside_the_replicas_and_take_no_traffic(client: webshard.Client) -> None:
    placement = client.deploy(MODEL, shards=2, replicas=1, runtime="native", spares=1)
    assert placement.spares == 1
    for shard in placement.shards:
        [spare] = shard.spares
        assert spare.spare and spare.healthy
        assert runtimes([spare]).isdisjoint(runtimes(shard.replicas))
    serving = {s.shard.index: runtimes(s.replicas) for s in placement.shards}
    for _ in range(6):
        result = client.infer(MODEL, texts=[SENTENCE])
        for hop in result.trail:
            assert (hop.agent_id, hop.browser_id) in serving[hop.shard_index]


@pytest.mark.parametrize("asked", [-5, 99])
def test_an_impossible_spare_count_is_refused_and_nothing_changes(
    client: webshard.Client, asked: int
) -> None:
    before = client.placement(MODEL)
    with pytest.raises(InvalidArgumentError, match="2 runtimes are free"):
        client.deploy(MODEL, shards=2, replicas=1, runtime="native", spares=asked)
    after = client.placement(MODEL)
    assert after == before


def test_a_spare_takes_over_and_a_new_spare_follows(client: webshard.Client) -> None:
    before = client.placement(MODEL)
    shard = before.shards[1]
    [old] = shard.replicas
    [spare] = shard.spares
    moved = client.replace_shard(MODEL, 1, old.agent_id, old.browser_id)
    assert moved.from_spare and not moved.from_standby
    assert (moved.replica.agent_id, moved.replica.handle) == (spare.agent_id, spare.handle)
    assert [(r.agent_id, r.handle) for r in moved.placement.shards[1].replicas] == [
        (spare.agent_id, spare.handle)
    ]
    assert moved.spare_loading
    assert correct(client)

    def replenished() -> bool:
        shard = client.placement(MODEL).shards[1]
        return len(shard.spares) == 1 and runtimes(shard.spares).isdisjoint(
            runtimes(shard.replicas)
        )

    wait_for(replenished, 60, "a new spare for shard 1")
    result = client.infer(MODEL, texts=[SENTENCE])
    now = client.placement(MODEL)
    for hop in result.trail:
        assert (hop.agent_id, hop.browser_id) in runtimes(now.shards[hop.shard_index].replicas)


def test_without_spares_a_replacement_is_loaded(client: webshard.Client) -> None:
    placement = client.deploy(MODEL, shards=2, replicas=1, runtime="native", spares=0)
    assert placement.spares == 0
    assert all(not s.spares for s in placement.shards)
    [old] = placement.shards[0].replicas
    moved: coordinator_pb2.ReplaceShardResponse = client.replace_shard(
        MODEL, 0, old.agent_id, old.browser_id
    )
    assert not moved.from_spare and not moved.spare_loading
    assert moved.replica.agent_id != old.agent_id
    assert moved.replica.handle != old.handle
    assert all(not s.spares for s in moved.placement.shards)
    assert correct(client)


def hook(address: str, fault_id: str, *, revert: bool = False) -> None:
    """Put (or lift) a small RunShard delay on a whole agent: a fault in force there."""
    with grpc.insecure_channel(address) as channel:
        stub = agent_grpc.BrowserAgentServiceStub(channel)
        if revert:
            stub.RevertFaultHook(agent_pb.RevertFaultHookRequest(fault_id=fault_id), timeout=10)
            return
        request = agent_pb.ApplyFaultHookRequest(
            fault_id=fault_id, hook=agent_pb.FAULT_HOOK_DELAY, data_path_only=True
        )
        request.delay.FromMilliseconds(1)
        stub.ApplyFaultHook(request, timeout=10)


def test_no_replacement_lands_where_a_fault_is_in_force(
    cluster: LocalCluster, client: webshard.Client
) -> None:
    placement = client.deploy("vit-tiny", shards=1, replicas=1, runtime="native", spares=0)
    [old] = placement.shards[0].replicas
    agents = {a.agent_id: a.address for a in client.cluster_status().agents}
    others = sorted(a for a in agents if a != old.agent_id)

    def faults_seen(expected: dict[str, bool]) -> bool:
        seen = {a.agent_id: a for a in client.cluster_status().agents}
        return all(
            any(b.faults_in_force for b in seen[agent].browsers) == faulty
            for agent, faulty in expected.items()
        )

    for agent in others:
        hook(agents[agent], f"lag-{agent}")
    try:
        wait_for(lambda: faults_seen(dict.fromkeys(others, True)), 30, "the faults to be known")
        # Every other runtime has a fault in force: refused, and nothing moves.
        with pytest.raises(ResourceExhaustedError, match="no ready browser"):
            client.replace_shard("vit-tiny", 0, old.agent_id, old.browser_id)
        assert client.placement("vit-tiny") == placement
        # One fault ends: the replica goes there, not to the one still in force.
        hook(agents[others[0]], f"lag-{others[0]}", revert=True)
        wait_for(lambda: faults_seen({others[0]: False}), 30, "the fault's end to be known")
        moved = client.replace_shard("vit-tiny", 0, old.agent_id, old.browser_id)
        assert moved.replica.agent_id == others[0]
    finally:
        for agent in others:
            hook(agents[agent], f"lag-{agent}", revert=True)
    client.undeploy("vit-tiny")


def test_the_replica_that_took_over_is_verified_with_one_hop(client: webshard.Client) -> None:
    client.deploy(MODEL, shards=2, replicas=1, runtime="native", spares=1)
    assert correct(client)  # its boundary activations are kept on the leader
    [old] = client.placement(MODEL).shards[1].replicas
    moved = client.replace_shard(MODEL, 1, old.agent_id, old.browser_id)
    new = moved.replica
    check = client.verify_shard(MODEL, 1, new.agent_id, new.browser_id)
    assert check.passed, check
    assert check.max_abs_difference <= check.tolerance
    assert (check.timing.shard_index, check.timing.agent_id, check.timing.browser_id) == (
        1,
        new.agent_id,
        new.browser_id,
    )
    # What it was compared with came from the replica it replaced, before the move.
    assert (check.kept_from.agent_id, check.kept_from.browser_id) == (old.agent_id, old.browser_id)
    with pytest.raises(NotFoundError, match="no replica on"):
        client.verify_shard(MODEL, 1, "agent-99")
    with pytest.raises(InvalidArgumentError, match="shard_index >= 0"):
        client.verify_shard(MODEL, -1, new.agent_id)

    # A model no request has run through (no spares, so no warm-up either) has nothing kept.
    never_run = client.deploy("vit-tiny", shards=1, replicas=1, runtime="native", spares=0)
    [replica] = never_run.shards[0].replicas
    try:
        with pytest.raises(FailedPreconditionError, match="whole inference"):
            client.verify_shard("vit-tiny", 0, replica.agent_id, replica.browser_id)
    finally:
        client.undeploy("vit-tiny")
