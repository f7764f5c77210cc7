"""What replicas answer around leader changes and fresh writes: no deploy fails because
agents are reattaching, no follower denies a model the leader has deployed."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import webshard
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as agent_grpc
from webshard.cli.local import LocalCluster
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc
from webshard.errors import InvalidArgumentError
from webshard.tensors import encode_tensor

from services.models import example_inputs
from tests.conftest import native_cluster, wait_for
from tests.integration.test_coordinator_replicas import leader, status

VIT_INPUTS = [encode_tensor(n, v) for n, v in example_inputs("vit-tiny").items()]


def test_a_deploy_right_after_a_leader_kill_waits_for_the_agents(tmp_path: Path) -> None:
    with (
        native_cluster(tmp_path / "cluster", 2) as cluster,
        webshard.Client(cluster.coordinators(), timeout=60) as client,
    ):
        victim = leader(cluster)
        assert victim is not None
        # The agents are slow to notice (stopped), so the new leader knows both
        # from the replicated state while neither has reattached yet.
        agents = [cluster.popen(f"agent-{i}").pid for i in range(2)]
        for pid in agents:
            os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(3.0, lambda: [os.kill(p, signal.SIGCONT) for p in agents])
        try:
            os.kill(cluster.popen(victim).pid, signal.SIGKILL)
            cluster.popen(victim).wait(timeout=10)
            resume.start()
            placement = client.deploy(
                "minilm-l6", sharding="layer", shards=2, replicas=2, runtime="native"
            )
        finally:
            resume.cancel()
            for pid in agents:
                os.kill(pid, signal.SIGCONT)
        assert all(len(s.replicas) == 2 for s in placement.shards)
        result = client.infer("minilm-l6", texts=["after the leader change"])
        assert result.outputs["sentence_embedding"].shape == (1, 384)


def test_followers_never_say_a_just_deployed_model_is_missing(tmp_path: Path) -> None:
    with (
        native_cluster(tmp_path / "cluster", 1) as cluster,
        webshard.Client(cluster.coordinators(), timeout=60) as client,
    ):
        chief = leader(cluster)
        followers = [
            cluster.address(f"coordinator-{i}") for i in range(3) if f"coordinator-{i}" != chief
        ]
        answers: list[str] = []
        for _ in range(10):
            client.deploy("vit-tiny", sharding="layer", shards=1, runtime="native")
            for follower in followers:
                # A raw call: a follower that has not applied the deploy yet must
                # send the caller to the leader, never answer NOT_FOUND.
                with grpc.insecure_channel(follower) as channel:
                    try:
                        pb_grpc.CoordinatorServiceStub(channel).Infer(
                            pb.InferRequest(model="vit-tiny", inputs=VIT_INPUTS), timeout=30
                        )
                        answers.append("OK")
                    except grpc.RpcError as err:
                        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                        assert dict(err.trailing_metadata() or ())["webshard-leader"]
                        answers.append(err.code().name)
            client.undeploy("vit-tiny")
        assert len(answers) == 20


def shard_runs(cluster: LocalCluster, agents: int) -> int:
    """Activations the agents' shards have answered, by the agents' own counters."""
    total = 0
    for i in range(agents):
        with grpc.insecure_channel(cluster.address(f"agent-{i}")) as channel:
            status = agent_grpc.BrowserAgentServiceStub(channel).GetStatus(
                agent_pb.GetStatusRequest(), timeout=10
            )
        total += sum(s.runs for b in status.browsers for s in b.shards)
    return total


def test_an_infer_retried_across_a_leader_kill_runs_once(tmp_path: Path) -> None:
    with (
        native_cluster(tmp_path / "cluster", 2) as cluster,
        webshard.Client(cluster.coordinators(), timeout=60) as client,
    ):
        client.deploy("minilm-l6", sharding="layer", shards=2, replicas=1, runtime="native")
        chief = leader(cluster)
        assert chief is not None
        warmed = shard_runs(cluster, 2)  # the spares' warm-up inferences
        first = client.infer("minilm-l6", texts=["asked once"], request_id="once-1")
        runs = shard_runs(cluster, 2)
        assert runs == warmed + 2  # one activation per shard

        def replicated() -> bool:
            # The answer's entry is applied on every replica (other entries, such as
            # the agents' status, may be committed before it).
            views = [status(cluster.address(f"coordinator-{i}")) for i in range(3)]
            return all(v is not None and v.replicas[0].answers_kept == 1 for v in views)

        wait_for(replicated, 30, "the answer to be replicated")
        os.kill(cluster.popen(chief).pid, signal.SIGKILL)
        cluster.popen(chief).wait(timeout=10)
        # The client lost the answer, say, and retries: the new leader answers it
        # from the replicated state without running the model again.
        again = client.infer("minilm-l6", texts=["asked once"], request_id="once-1")
        np.testing.assert_array_equal(
            again.outputs["sentence_embedding"], first.outputs["sentence_embedding"]
        )
        assert shard_runs(cluster, 2) == runs
        with pytest.raises(InvalidArgumentError, match="different request"):
            client.infer("minilm-l6", texts=["asked otherwise"], request_id="once-1")
