"""Deploy and infer through a local cluster whose agents run real headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import webshard
from webshard.cli.local import LocalCluster

from tests.conftest import browser_cluster
from tests.integration.test_inference import SENTENCES, cosine, reference_embeddings

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with browser_cluster(tmp_path_factory.mktemp("cluster"), agents=3) as local:
        yield local


def test_minilm_in_three_browsers_on_wasm_matches_native(cluster: LocalCluster) -> None:
    with webshard.Client(cluster.coordinators(), timeout=300) as client:
        placement = client.deploy(
            "minilm-l6", sharding="layer", shards=3, runtime="browser", ep="wasm"
        )
        assert {r.agent_id for s in placement.shards for r in s.replicas} == {
            "agent-0",
            "agent-1",
            "agent-2",
        }
        expected = reference_embeddings(SENTENCES)
        for sentence, reference in zip(SENTENCES, expected, strict=True):
            result = client.infer("minilm-l6", texts=[sentence])
            [embedding] = result.outputs["sentence_embedding"]
            assert cosine(embedding, reference) >= 0.99999
            assert [hop.execution_provider for hop in result.trail] == ["wasm"] * 3
            assert all(hop.browser_id.startswith("browser-") for hop in result.trail)
        batch = client.infer("minilm-l6", texts=SENTENCES[:4])
        assert np.all(cosine(batch.outputs["sentence_embedding"], expected[:4]) >= 0.99999)


def test_attention_feedforward_minilm_in_browsers_matches_native(cluster: LocalCluster) -> None:
    with webshard.Client(cluster.coordinators(), timeout=300) as client:
        client.deploy(
            "minilm-l6", sharding="attention_feedforward", shards=4, runtime="browser", ep="wasm"
        )
        expected = reference_embeddings(SENTENCES)
        for sentence, reference in zip(SENTENCES, expected, strict=True):
            result = client.infer("minilm-l6", texts=[sentence])
            assert cosine(result.outputs["sentence_embedding"][0], reference) >= 0.99999
            assert len(result.trail) == 4


def test_component_clip_in_browsers_matches_native(cluster: LocalCluster) -> None:
    from services.models import example_inputs, reference_session

    with webshard.Client(cluster.coordinators(), timeout=300) as client:
        client.deploy("clip-tiny", sharding="component", shards=3, runtime="browser", ep="wasm")
        for seed in range(3):
            inputs = example_inputs("clip-tiny", batch=2, seed=seed)
            [expected] = reference_session("clip-tiny").run(None, inputs)
            result = client.infer("clip-tiny", inputs=inputs)
            [got] = result.outputs.values()
            flat_cosine = cosine(got.ravel(), expected.ravel())
            assert flat_cosine >= 0.99999
            np.testing.assert_allclose(got, expected, atol=1e-4)
            assert [hop.execution_provider for hop in result.trail] == ["wasm"] * 3
