"""One model sharded over a mixed fleet: a Chromium agent and a Firefox agent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import webshard
from webshard.cli.local import LocalCluster

from tests.conftest import NEEDS_FIREFOX, browser_cluster
from tests.integration.test_inference import cosine, reference_embeddings

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "minilm_reference.json"

pytestmark = [pytest.mark.browser, NEEDS_FIREFOX]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with browser_cluster(
        tmp_path_factory.mktemp("cluster"), agents=2, engines=("chromium", "firefox")
    ) as local:
        yield local


def test_minilm_over_chromium_and_firefox_matches_native_and_the_fixture(
    cluster: LocalCluster,
) -> None:
    reference = json.loads(FIXTURE.read_text())
    sentences = reference["sentences"]
    with webshard.Client(cluster.coordinators(), timeout=300) as client:
        engines = {
            a.agent_id: {b.capabilities.engine for b in a.browsers} for a in client.list_agents()
        }
        assert engines == {"agent-0": {"chromium"}, "agent-1": {"firefox"}}
        client.deploy("minilm-l6", sharding="layer", shards=2, runtime="browser", ep="wasm")
        native = reference_embeddings(sentences)
        for sentence, expected, published in zip(
            sentences, native, reference["embeddings"], strict=True
        ):
            result = client.infer("minilm-l6", texts=[sentence])
            [embedding] = result.outputs["sentence_embedding"]
            np.testing.assert_allclose(embedding, expected, rtol=0, atol=1e-4)
            assert cosine(embedding, np.asarray(published, np.float32)) >= 0.99999
            # One shard ran in each engine, and the trail says which.
            assert {(h.agent_id, h.engine) for h in result.trail} == {
                ("agent-0", "chromium"),
                ("agent-1", "firefox"),
            }
            assert [hop.execution_provider for hop in result.trail] == ["wasm", "wasm"]


def test_a_deploy_can_keep_to_one_engine_and_an_unknown_one_is_refused(
    cluster: LocalCluster,
) -> None:
    with webshard.Client(cluster.coordinators(), timeout=300) as client:
        placement = client.deploy(
            "minilm-l6", shards=2, runtime="browser", ep="wasm", spares=0, engines=["firefox"]
        )
        assert list(placement.engines) == ["firefox"]
        assert {(r.agent_id, r.engine) for s in placement.shards for r in s.replicas} == {
            ("agent-1", "firefox")
        }
        result = client.infer("minilm-l6", texts=["Only Firefox runs this one."])
        assert {hop.engine for hop in result.trail} == {"firefox"}
        with pytest.raises(webshard.InvalidArgumentError, match="unknown browser engine 'safari'"):
            client.deploy("minilm-l6", shards=2, runtime="browser", engines=["safari"])
        # Nothing already deployed changed.
        assert client.placement("minilm-l6").deploy_id == placement.deploy_id
