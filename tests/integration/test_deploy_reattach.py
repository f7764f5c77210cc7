"""A deploy that lands while agents reattach to a new leader waits for them."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import webshard
from webshard.cli.local import LocalCluster

from tests.conftest import wait_for
from tests.integration.test_coordinator_replicas import leader


def test_a_deploy_right_after_a_leader_kill_waits_for_the_agents(tmp_path: Path) -> None:
    cluster = LocalCluster(
        agents=2,
        data_dir=tmp_path / "cluster",
        auto_ports=True,
        extra_args={"browser_agent": ["--browsers", "0"]},
    )
    cluster.start(timeout=120)
    try:
        with webshard.Client(cluster.coordinators(), timeout=60) as client:
            wait_for(lambda: len(client.list_agents()) == 2, 30, "both agents to attach")
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
    finally:
        cluster.stop()
