"""The coordinator's recovery actions on a local cluster of native agents: a shard
pinned to one replica, a replica moved elsewhere, a model held behind a barrier.

Recovery's actuator calls exactly these; with browsers they are exercised by
tests/e2e/test_fault_matrix.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import webshard
from webshard.cli.local import LocalCluster
from webshard.errors import InvalidArgumentError, NotFoundError, RPCError

from tests.conftest import wait_for
from tests.integration.test_inference import cosine, reference_embeddings

SENTENCE = "Recovery must be measured, not assumed."


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webshard.Client]:
    local = LocalCluster(
        agents=3,
        data_dir=tmp_path_factory.mktemp("cluster"),
        auto_ports=True,
        extra_args={"browser_agent": ["--browsers", "0"]},
    )
    local.start(timeout=120)
    try:
        with webshard.Client(local.coordinators(), timeout=60) as sdk:
            wait_for(lambda: len(sdk.list_agents()) == 3, 30, "three agents to register")
            # No spares: these are the load path and pins on replicas (see test_spares.py).
            sdk.deploy(
                "minilm-l6", sharding="layer", shards=2, replicas=1, runtime="native", spares=0
            )
            yield sdk
    finally:
        local.stop()


def correct(client: webshard.Client, **kwargs: object) -> bool:
    [expected] = reference_embeddings([SENTENCE])
    result = client.infer("minilm-l6", texts=[SENTENCE], **kwargs)  # type: ignore[arg-type]
    return bool(cosine(result.outputs["sentence_embedding"][0], expected) >= 0.99999)


def test_a_pinned_shard_runs_on_its_replica_or_not_at_all(client: webshard.Client) -> None:
    placement = client.placement("minilm-l6")
    [replica] = placement.shards[0].replicas
    assert correct(client, pins={0: f"{replica.agent_id}/{replica.browser_id}"})
    elsewhere = next(a.agent_id for a in client.list_agents() if a.agent_id != replica.agent_id)
    with pytest.raises(NotFoundError, match=f"shard 0 of minilm-l6 has no replica on {elsewhere}"):
        client.infer("minilm-l6", texts=[SENTENCE], pins={0: elsewhere})


def test_a_replica_moves_off_its_agent_and_answers_stay_correct(client: webshard.Client) -> None:
    before = client.placement("minilm-l6")
    [old] = before.shards[1].replicas
    moved = client.replace_shard("minilm-l6", 1, old.agent_id, old.browser_id)
    assert moved.replica.agent_id != old.agent_id
    assert [(r.agent_id, r.handle) for r in moved.placement.shards[1].replicas] == [
        (moved.replica.agent_id, moved.replica.handle)
    ]
    assert moved.placement.version == before.version + 1
    assert correct(client)
    # Asking again finds nothing left to move: the current placement, unchanged.
    again = client.replace_shard("minilm-l6", 1, old.agent_id, old.browser_id)
    assert not again.HasField("replica")
    assert again.placement.version == moved.placement.version


def test_a_barrier_holds_new_requests_until_resumed(client: webshard.Client) -> None:
    barrier = client.pause_model("minilm-l6", max_pause_s=30)
    answered = threading.Event()

    def request() -> None:
        assert correct(client)
        answered.set()

    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(2.0)  # time for the request to reach the coordinator, even on a busy machine
    assert not answered.is_set()
    resumed = client.resume_model("minilm-l6", barrier)
    worker.join(30)
    assert answered.is_set()
    assert resumed.held_requests == 1
    assert resumed.paused.ToMilliseconds() >= 2000
    assert client.resume_model("minilm-l6").already_lifted


def test_a_barrier_lifts_by_itself(client: webshard.Client) -> None:
    client.pause_model("minilm-l6", max_pause_s=0.3)
    started = time.monotonic()
    assert correct(client)
    assert time.monotonic() - started < 10
    assert client.resume_model("minilm-l6").already_lifted


def test_bad_recovery_requests_get_clear_errors(client: webshard.Client) -> None:
    with pytest.raises(NotFoundError, match="'vit-huge' is not deployed"):
        client.replace_shard("vit-huge", 0, "agent-0")
    with pytest.raises(InvalidArgumentError, match="shard_index >= 0"):
        client.replace_shard("minilm-l6", -1, "agent-0")
    with pytest.raises(NotFoundError, match="minilm-l6 has no shard 7"):
        client.replace_shard("minilm-l6", 7, "agent-0")
    with pytest.raises(NotFoundError):
        client.pause_model("vit-huge")
    with pytest.raises(RPCError):
        client.restart_browser("agent-0", "browser-9")
    assert correct(client)
