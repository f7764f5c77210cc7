"""A local cluster started with a cluster token (native runtime): the token's holders
deploy, infer and recover as before; calls that change state without it change nothing."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import grpc
import pytest
import webshard
from webshard.cli.local import LocalCluster
from webshard.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from webshard.errors import PermissionDeniedError, UnauthenticatedError
from webshard.recovery.v1 import recovery_pb2

from tests.conftest import wait_for

TOKEN = "integration-cluster-token"
TEXT = ["the token holders answer"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        agents=3,
        data_dir=tmp_path_factory.mktemp("cluster"),
        auto_ports=True,
        extra_args={"browser_agent": ["--browsers", "0"]},
        cluster_token=TOKEN,
    )
    local.start(timeout=120)
    try:
        # Agents register through AgentSession, which needs the token.
        with webshard.Client(local.coordinators(), timeout=60) as reader:
            wait_for(lambda: len(reader.list_agents()) == 3, 60, "three agents to register")
        yield local
    finally:
        local.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[webshard.Client]:
    with webshard.Client(cluster.coordinators(), token=TOKEN, timeout=120) as client:
        yield client


def test_the_token_holder_deploys_and_infers_and_others_only_read(
    cluster: LocalCluster, client: webshard.Client
) -> None:
    placement = client.deploy("minilm-l6", sharding="layer", shards=2, runtime="native")
    assert len(placement.shards) == 2
    assert client.infer("minilm-l6", texts=TEXT).outputs["sentence_embedding"].shape[0] == 1
    with webshard.Client(cluster.coordinators(), timeout=30) as anonymous:
        # Reads and inference stay open.
        assert anonymous.placement("minilm-l6").version == placement.version
        assert anonymous.infer("minilm-l6", texts=TEXT).outputs
        with pytest.raises(UnauthenticatedError, match="WEBSHARD_CLUSTER_TOKEN"):
            anonymous.undeploy("minilm-l6")
    forger = webshard.Client(cluster.coordinators(), token="wrong", timeout=30)
    with forger, pytest.raises(PermissionDeniedError):
        forger.undeploy("minilm-l6")
    assert client.placement("minilm-l6").version == placement.version


def test_replace_shard_without_the_token_is_refused_and_changes_nothing(
    cluster: LocalCluster, client: webshard.Client
) -> None:
    placement = client.deploy("minilm-l6", sharding="layer", shards=2, runtime="native")
    holder = placement.shards[0].replicas[0].agent_id
    other = next(a.agent_id for a in client.list_agents() if a.agent_id != holder)
    anonymous = webshard.Client(cluster.coordinators(), timeout=30)
    with anonymous, pytest.raises(UnauthenticatedError):
        anonymous.replace_shard("minilm-l6", 0, other)
    after = client.placement("minilm-l6")
    assert after.version == placement.version
    assert [r.agent_id for r in after.shards[0].replicas] == [holder]


def _status(address: str) -> coordinator_pb2.ClusterStatusResponse:
    with webshard.Client(address, timeout=10) as one:
        return one.cluster_status()


def test_a_forged_append_entries_is_refused_and_the_leader_stays(
    cluster: LocalCluster, client: webshard.Client
) -> None:
    before = client.cluster_status()
    leader = before.leader_id
    assert leader
    term = next(r.term for r in before.replicas if r.replica_id == leader)
    follower = next(c for c in cluster.coordinators() if _status(c).replica_id not in ("", leader))

    async def forge() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(follower) as channel:
            stub = coordinator_pb2_grpc.RaftServiceStub(channel)
            try:
                # A far higher term: a follower that took it would depose the leader.
                await stub.AppendEntries(
                    coordinator_pb2.AppendEntriesRequest(
                        term=term + 1000, leader_id="forger", leader_commit=0
                    ),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    assert asyncio.run(forge()) is grpc.StatusCode.UNAUTHENTICATED
    after = _status(follower)
    assert after.leader_id == leader
    assert all(r.term < term + 1000 for r in after.replicas)
    # The real leader still leads: a write goes through.
    client.deploy("minilm-l6", sharding="layer", shards=2, runtime="native")
    assert client.cluster_status().leader_id == leader


def test_recovery_still_recovers_a_killed_agent(
    cluster: LocalCluster, client: webshard.Client
) -> None:
    placement = client.deploy("minilm-l6", sharding="layer", shards=3, replicas=2, runtime="native")
    victim = client.infer("minilm-l6", texts=TEXT).trail[1].agent_id
    os.kill(cluster.popen(victim).pid, signal.SIGKILL)
    cluster.popen(victim).wait(timeout=10)

    result = client.infer("minilm-l6", texts=TEXT)
    assert result.trail[1].agent_id in {r.agent_id for r in placement.shards[1].replicas}
    assert result.trail[1].agent_id != victim

    # The coordinator's report (ReportFailure needs the token) started a recovery, and
    # recovery's own calls to the coordinator (its verify included) carried it.
    with webshard.RecoveryClient(cluster.address("recovery"), timeout=30) as recovery:

        def recovered() -> bool:
            return any(
                r.report.agent_id == victim and r.state == recovery_pb2.RECOVERY_STATE_SUCCEEDED
                for r in recovery.list_recoveries()
            )

        wait_for(recovered, 60, f"a successful recovery from the loss of {victim}")
    cluster.restart(victim)
