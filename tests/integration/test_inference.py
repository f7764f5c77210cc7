"""Deploy and infer through a local cluster of real processes (native runtime).

The same paths with real browsers live in tests/e2e/test_inference_browser.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import webshard
from webshard.cli.local import LocalCluster
from webshard.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RPCError,
)
from webshard.recovery.v1 import recovery_pb2

from services.models import prepare_inputs, reference_session
from tests.conftest import wait_for

SENTENCES = [
    "The cat sits on the mat.",
    "A fleet of browsers runs the model.",
    "Recovery must be measured, not assumed.",
    "WebGPU exposes the GPU to web pages.",
    "Shards are cut at block boundaries.",
    "The coordinator keeps boundary activations.",
    "Circuit breakers stop cascading failures.",
    "DuckDB stores every recovery.",
    "Headless Chromium hosts the shards.",
    "Each request has an idempotent id.",
    "Leader election uses randomized timeouts.",
    "Latency is reported as p50 and p95.",
    "A browser crash costs a reroute.",
    "Tokens are embedded, then attended.",
    "Mean pooling averages the token vectors.",
    "The embedding is normalised to unit length.",
    "Faults are injected on purpose.",
    "Every figure comes from a real run.",
    "Standby browsers are launched in advance.",
    "Memory pressure is real allocation.",
]


def reference_embeddings(texts: list[str]) -> np.ndarray:
    session = reference_session("minilm-l6")
    feeds = prepare_inputs("minilm-l6", texts)
    return np.asarray(session.run(["sentence_embedding"], feeds)[0])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    data_dir = tmp_path_factory.mktemp("cluster")
    local = LocalCluster(
        agents=3,
        data_dir=data_dir,
        auto_ports=True,
        extra_args={"browser_agent": ["--browsers", "0"]},
    )
    local.start(timeout=120)
    client = webshard.Client(local.coordinators(), timeout=60)
    wait_for(lambda: len(client.list_agents()) == 3, 30, "three agents to register")
    client.close()
    yield local
    local.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[webshard.Client]:
    with webshard.Client(cluster.coordinators(), timeout=120) as sdk:
        yield sdk


@pytest.mark.parametrize(("sharding", "shards"), [("layer", 3), ("attention_feedforward", 4)])
def test_sharded_minilm_matches_the_full_graph(
    client: webshard.Client, sharding: str, shards: int
) -> None:
    placement = client.deploy("minilm-l6", sharding=sharding, shards=shards, runtime="native")
    assert len(placement.shards) == shards
    agents = {r.agent_id for s in placement.shards for r in s.replicas}
    assert len(agents) == min(shards, 3)  # consecutive shards spread over the agents

    expected = reference_embeddings(SENTENCES)
    for sentence, reference in zip(SENTENCES, expected, strict=True):
        result = client.infer("minilm-l6", texts=[sentence])
        [embedding] = result.outputs["sentence_embedding"]
        assert cosine(embedding, reference) >= 0.99999
        assert [hop.shard_index for hop in result.trail] == list(range(shards))
        assert all(hop.execution_provider == "cpu" and hop.agent_id for hop in result.trail)


def test_component_sharding_of_clip(client: webshard.Client) -> None:
    from services.models import example_inputs

    client.deploy("clip-tiny", sharding="component", shards=3, runtime="native")
    inputs = example_inputs("clip-tiny", batch=2, seed=3)
    expected = reference_session("clip-tiny").run(None, inputs)
    result = client.infer("clip-tiny", inputs=inputs)
    [name] = result.outputs
    got = result.outputs[name]
    np.testing.assert_allclose(got, expected[0], atol=1e-5)
    assert len(result.trail) == 3


def test_fifty_concurrent_requests_all_answer_correctly(client: webshard.Client) -> None:
    client.deploy("minilm-l6", sharding="layer", shards=3, runtime="native")
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(50)]
    expected = reference_embeddings(SENTENCES)

    def one(i: int) -> float:
        result = client.infer("minilm-l6", texts=[texts[i]])
        return float(cosine(result.outputs["sentence_embedding"][0], expected[i % len(SENTENCES)]))

    with ThreadPoolExecutor(max_workers=50) as pool:
        cosines = list(pool.map(one, range(50)))
    assert min(cosines) >= 0.99999


def test_a_retried_request_id_is_answered_once(client: webshard.Client) -> None:
    client.deploy("minilm-l6", sharding="layer", shards=2, runtime="native")
    first = client.infer("minilm-l6", texts=["same id"], request_id="fixed-id-1")
    second = client.infer("minilm-l6", texts=["same id"], request_id="fixed-id-1")
    assert second.total_ms == first.total_ms  # the stored answer, not a second run
    np.testing.assert_array_equal(
        first.outputs["sentence_embedding"], second.outputs["sentence_embedding"]
    )


def test_bad_requests_get_clear_errors_and_change_nothing(client: webshard.Client) -> None:
    client.deploy("minilm-l6", sharding="layer", shards=2, runtime="native")
    before_agents = [a.agent_id for a in client.list_agents()]
    before = client.placement("minilm-l6")

    with pytest.raises(NotFoundError, match=r"unknown model|known"):
        client.deploy("gpt-17", sharding="layer", shards=2)
    with pytest.raises(InvalidArgumentError, match="shard"):
        client.deploy("minilm-l6", sharding="layer", shards=40, runtime="native")
    with pytest.raises(RPCError) as no_ep:
        client.deploy("minilm-l6", sharding="layer", shards=2, ep="webnn")
    assert no_ep.value.code.name == "FAILED_PRECONDITION"
    assert "webnn" in no_ep.value.message
    with pytest.raises(RPCError) as too_many_replicas:
        client.deploy("minilm-l6", sharding="layer", shards=2, replicas=9, runtime="native")
    assert too_many_replicas.value.code.name == "FAILED_PRECONDITION"
    with pytest.raises(InvalidArgumentError, match="takes inputs"):
        client.infer("minilm-l6", inputs={"input_ids": np.ones((1, 4), np.int64)})
    with pytest.raises(NotFoundError, match="not deployed"):
        client.infer("vit-tiny", texts=["x"])
    with pytest.raises(NotFoundError, match="no agent 'agent-99'"):
        client.replace_shard("minilm-l6", 0, "agent-99")
    with pytest.raises(NotFoundError, match="no agent 'agent-99'"):
        client.restart_browser("agent-99", "browser-0")
    with pytest.raises(NotFoundError, match="not deployed"):
        client.resume_model("gpt-17")

    assert [a.agent_id for a in client.list_agents()] == before_agents
    assert client.placement("minilm-l6") == before


def test_poison_requests_are_the_senders_error_and_start_no_recovery(
    cluster: LocalCluster, client: webshard.Client
) -> None:
    client.deploy("minilm-l6", sharding="layer", shards=2, replicas=2, runtime="native")
    good = prepare_inputs("minilm-l6", ["The cat sits on the mat."])
    with webshard.RecoveryClient(cluster.address("recovery"), timeout=30) as recovery:
        before = len(recovery.list_recoveries())
        poison: list[tuple[str, dict[str, np.ndarray] | None, list[str] | None]] = [
            # the mask's shape disagrees with the ids'
            ("must agree", {**good, "attention_mask": np.ones((1, 7), np.int64)}, None),
            # more tokens than the model has positions
            (
                "at most 512",
                {k: np.ones((1, 600), np.int64) for k in good},
                None,
            ),
            ("input_ids values", {**good, "input_ids": good["input_ids"] + 10**6}, None),
            ("empty dimension", {k: np.ones((0, 0), np.int64) for k in good}, None),
            ("float32", {**good, "attention_mask": good["attention_mask"].astype("f4")}, None),
        ]
        for match, inputs, texts in poison:
            with pytest.raises(InvalidArgumentError, match=match):
                client.infer("minilm-l6", inputs=inputs, texts=texts, timeout=10)
        # 360 texts of 128 tokens: an activation of ~70 MB, over a message's limit
        with pytest.raises(ResourceExhaustedError, match="MiB"):
            client.infer("minilm-l6", texts=["word " * 200] * 360, timeout=10)
        with pytest.raises(ResourceExhaustedError, match="characters"):
            client.infer("minilm-l6", texts=["x" * 5_000_000], timeout=10)

        # A reused request id that asks something else is refused, never answered
        # with the first request's answer.
        client.infer("minilm-l6", texts=["first"], request_id="reused-id")
        with pytest.raises(InvalidArgumentError, match="different request"):
            client.infer("minilm-l6", texts=["second"], request_id="reused-id")
        with pytest.raises(InvalidArgumentError, match="shard_index"):
            client.infer("minilm-l6", texts=["x"], pins={999: "agent-0"})

        # Correct requests still answer, and nothing was counted against an agent.
        expected = reference_embeddings(["still fine"])[0]
        result = client.infer("minilm-l6", texts=["still fine"])
        assert cosine(result.outputs["sentence_embedding"][0], expected) >= 0.99999
        assert len(recovery.list_recoveries()) == before


def test_a_killed_agent_is_replaced_by_the_next_replica(
    cluster: LocalCluster, client: webshard.Client
) -> None:
    placement = client.deploy("minilm-l6", sharding="layer", shards=3, replicas=2, runtime="native")
    expected = reference_embeddings(["before the kill"])
    first = client.infer("minilm-l6", texts=["before the kill"])
    victim = first.trail[1].agent_id
    os.kill(cluster.popen(victim).pid, signal.SIGKILL)
    cluster.popen(victim).wait(timeout=10)

    result = client.infer("minilm-l6", texts=["before the kill"])
    assert cosine(result.outputs["sentence_embedding"][0], expected[0]) >= 0.99999
    answered = result.trail[1].agent_id
    assert answered != victim
    replicas = {r.agent_id for r in placement.shards[1].replicas}
    assert answered in replicas
    assert victim not in {hop.agent_id for hop in result.trail}

    # The coordinator handed the failure to recovery, which verified the model answers.
    with webshard.RecoveryClient(cluster.address("recovery"), timeout=30) as recovery:

        def recovered() -> bool:
            return any(
                r.report.agent_id == victim and r.state == recovery_pb2.RECOVERY_STATE_SUCCEEDED
                for r in recovery.list_recoveries()
            )

        wait_for(recovered, 30, f"a successful recovery from the loss of {victim}")

    cluster.restart(victim)


def test_the_cli_deploys_and_infers(cluster: LocalCluster) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "webshard")
    target = ",".join(cluster.coordinators())
    deployed = subprocess.run(
        [
            cli,
            "deploy",
            "minilm-l6",
            "--shards",
            "2",
            "--sharding",
            "layer",
            "--runtime",
            "native",
            "--target",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stderr
    assert "minilm-l6: 2 shard(s)" in deployed.stdout
    answered = subprocess.run(
        [
            cli,
            "infer",
            "minilm-l6",
            "--text",
            "The cat sits on the mat.",
            "--json",
            "--target",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert answered.returncode == 0, answered.stderr
    doc = json.loads(answered.stdout)
    [embedding] = doc["outputs"]["sentence_embedding"]
    assert cosine(np.array(embedding), reference_embeddings([SENTENCES[0]])[0]) >= 0.99999
    assert [hop["shard_index"] for hop in doc["trail"]] == [0, 1]
    assert all(hop["agent_id"] and hop["execution_provider"] == "cpu" for hop in doc["trail"])

    refused = subprocess.run(
        [cli, "deploy", "no-such-model", "--target", target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "NOT_FOUND" in refused.stderr
