"""Cutting models into shards: sharded pipelines equal the full graph, the cache, the checks."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
import pytest
from numpy.typing import NDArray

from services import models as M
from services.models.sharding import NativeRunner

SMALL_MODELS = ("minilm-l6", "vit-tiny", "whisper-tiny-enc", "clip-tiny", "decoder-tiny")


def _cases() -> list[tuple[str, str, int]]:
    cases = []
    for name in SMALL_MODELS:
        info = M.model_info(name)
        for strategy in info.strategies:
            top = info.max_shards(strategy)
            cases += [(name, strategy, n) for n in sorted({2, (top + 1) // 2 + 1, top})]
    # bert-base is ~440 MB: a few cuts at seq 8 keep it quick.
    cases += [("bert-base", "layer", 2), ("bert-base", "attention_feedforward", 3)]
    cases += [("bert-base", "component", 3)]
    return cases


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("webshard-cache")


@pytest.fixture(scope="module")
def references(
    cache_dir: Path,
) -> dict[str, tuple[dict[str, NDArray[Any]], dict[str, NDArray[Any]]]]:
    """Per model: example feeds and the full graph's outputs on them."""
    out = {}
    for name in (*SMALL_MODELS, "bert-base"):
        seq = 8 if name == "bert-base" else 12
        feeds = M.example_inputs(name, batch=2, seq_len=seq, seed=7)
        out[name] = (feeds, M.run_native(M.model_path(name, cache_dir), feeds))
    return out


@pytest.mark.parametrize(("name", "strategy", "count"), _cases())
def test_sharded_pipeline_equals_the_full_graph(
    name: str,
    strategy: str,
    count: int,
    cache_dir: Path,
    references: Mapping[str, tuple[dict[str, NDArray[Any]], dict[str, NDArray[Any]]]],
) -> None:
    feeds, expected = references[name]
    shards = M.cut_model(name, strategy, count, cache_dir)
    assert [(s.index, s.count, s.strategy, s.model) for s in shards] == [
        (i, count, strategy, name) for i in range(count)
    ]
    got = M.run_pipeline(shards, feeds)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape
        assert float(np.abs(got[key] - value).max()) <= 1e-5


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_shards_exchange_only_cut_tensors_and_original_inputs(name: str, cache_dir: Path) -> None:
    info = M.model_info(name)
    graph_inputs = {t.name for t in info.inputs}
    for strategy in info.strategies:
        shards = M.cut_model(name, strategy, info.max_shards(strategy), cache_dir)
        cut_tensors = {c.tensor for c in info.cut_points_for(strategy)}
        assert set(shards[0].input_names) <= graph_inputs
        for shard in shards:
            assert set(shard.input_names) <= graph_inputs | cut_tensors
        for shard in shards[:-1]:
            assert set(shard.output_names) <= cut_tensors
        assert shards[-1].output_names == tuple(t.name for t in info.outputs)


def test_clip_heads_read_the_vision_tower_output_from_two_shards_back(cache_dir: Path) -> None:
    vision, text, heads = M.cut_model("clip-tiny", "component", 3, cache_dir)
    assert vision.input_names == ("pixel_values",)
    assert vision.output_names == ("image_embeds",)
    assert text.input_names == ("input_ids",)
    assert text.output_names == ("text_embeds",)
    assert heads.input_names == ("image_embeds", "text_embeds")
    assert heads.output_names == ("logits_per_image",)


def test_every_bert_block_shard_takes_the_attention_mask(cache_dir: Path) -> None:
    shards = M.cut_model("minilm-l6", "layer", 3, cache_dir)
    assert shards[0].input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert shards[0].output_names == ("encoder.layer.1.output",)
    assert shards[1].input_names == ("attention_mask", "encoder.layer.1.output")
    assert shards[1].output_names == ("encoder.layer.3.output",)
    assert shards[2].input_names == ("attention_mask", "encoder.layer.3.output")
    assert shards[2].output_names == ("sentence_embedding",)


def test_cut_points_are_spread_evenly() -> None:
    def tensors(name: str, strategy: str, count: int) -> list[str]:
        return [c.tensor for c in M.choose_cut_points(name, strategy, count)]

    assert tensors("minilm-l6", "layer", 1) == []
    assert tensors("minilm-l6", "layer", 3) == ["encoder.layer.1.output", "encoder.layer.3.output"]
    assert tensors("minilm-l6", "attention_feedforward", 2) == ["encoder.layer.2.output"]
    assert tensors("minilm-l6", "attention_feedforward", 4) == [
        "encoder.layer.1.attention.output",
        "encoder.layer.2.output",
        "encoder.layer.4.attention.output",
    ]
    assert tensors("minilm-l6", "component", 3) == ["embeddings.output", "encoder.layer.5.output"]
    assert tensors("clip-tiny", "component", 2) == ["text_embeds"]
    assert len(tensors("bert-base", "attention_feedforward", 24)) == 23


def test_too_many_or_too_few_shards_name_the_allowed_range(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="between 1 and 6"):
        M.cut_model("minilm-l6", "layer", 7, cache_dir)
    with pytest.raises(ValueError, match="between 1 and 12"):
        M.cut_model("minilm-l6", "attention_feedforward", 0, cache_dir)
    with pytest.raises(ValueError, match="between 1 and 2"):
        M.cut_model("whisper-tiny-enc", "component", 3, cache_dir)


def test_an_unsupported_strategy_lists_the_supported_ones(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="supported: layer, attention_feedforward, component"):
        M.cut_model("vit-tiny", "tensor_parallel", 2, cache_dir)


def test_a_second_cut_reuses_the_cached_shards(tmp_path: Path) -> None:
    first = M.cut_model("vit-tiny", "attention_feedforward", 4, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = M.cut_model("vit-tiny", "attention_feedforward", 4, tmp_path)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert again == first
    assert after == before
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(
        [f"{s.sha256}.onnx" for s in first] + ["index.json"]
    )


def test_a_missing_shard_file_is_cut_again(tmp_path: Path) -> None:
    shards = M.cut_model("decoder-tiny", "layer", 2, tmp_path)
    shards[1].path.unlink()
    again = M.cut_model("decoder-tiny", "layer", 2, tmp_path)
    assert again == shards
    assert shards[1].path.is_file()


def test_shards_are_what_onnx_extract_model_cuts(cache_dir: Path, tmp_path: Path) -> None:
    shards = M.cut_model("whisper-tiny-enc", "attention_feedforward", 3, cache_dir)
    for shard in shards:
        out = tmp_path / f"{shard.index}.onnx"
        onnx.utils.extract_model(
            str(M.model_path("whisper-tiny-enc", cache_dir)),
            str(out),
            list(shard.input_names),
            list(shard.output_names),
            check_model=False,
            infer_shapes=False,
        )
        assert out.read_bytes() == shard.path.read_bytes()


def test_shards_are_content_addressed(tmp_path: Path, cache_dir: Path) -> None:
    shards = M.cut_model("decoder-tiny", "component", 3, cache_dir)
    for shard in shards:
        data = shard.path.read_bytes()
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
        assert shard.path == cache_dir / "shards" / f"{shard.sha256}.onnx"
        assert shard.size_bytes == len(data)
    # The builders are deterministic, so another cache gets byte-identical shards.
    elsewhere = M.cut_model("decoder-tiny", "component", 3, tmp_path)
    assert [s.sha256 for s in elsewhere] == [s.sha256 for s in shards]


def test_run_pipeline_takes_any_runner_and_feeds_only_what_each_shard_asks_for(
    cache_dir: Path,
) -> None:
    shards = M.cut_model("clip-tiny", "component", 3, cache_dir)
    feeds = M.example_inputs("clip-tiny", batch=2)
    native = NativeRunner()
    seen: list[tuple[int, list[str]]] = []

    def recording(shard: M.Shard, shard_feeds: Mapping[str, NDArray[Any]]) -> Mapping[str, Any]:
        seen.append((shard.index, sorted(shard_feeds)))
        return native(shard, shard_feeds)

    out = M.run_pipeline(shards, feeds, recording)
    assert seen == [
        (0, ["pixel_values"]),
        (1, ["input_ids"]),
        (2, ["image_embeds", "text_embeds"]),
    ]
    assert out["logits_per_image"].shape == (2, 2)


def test_run_pipeline_rejects_partial_or_reordered_chains(cache_dir: Path) -> None:
    shards = M.cut_model("decoder-tiny", "layer", 2, cache_dir)
    feeds = M.example_inputs("decoder-tiny")
    with pytest.raises(ValueError, match="one whole cut in order"):
        M.run_pipeline(shards[::-1], feeds)
    with pytest.raises(ValueError, match="one whole cut in order"):
        M.run_pipeline(shards[1:], feeds)
    with pytest.raises(ValueError, match="needs"):
        M.run_pipeline(shards, {})
    with pytest.raises(ValueError, match="did not produce"):
        M.run_pipeline(shards, feeds, lambda shard, shard_feeds: {})


def test_greedy_generation_through_shards_matches_the_full_graph(cache_dir: Path) -> None:
    prompt = M.example_inputs("decoder-tiny", batch=2, seq_len=6, seed=11)["input_ids"]
    full = M.generate(M.model_path("decoder-tiny", cache_dir), prompt, max_new_tokens=8)
    for strategy in ("layer", "attention_feedforward", "component"):
        count = M.model_info("decoder-tiny").max_shards(strategy)
        shards = M.cut_model("decoder-tiny", strategy, count, cache_dir)
        sharded = M.generate(M.pipeline_fn(shards), prompt, max_new_tokens=8)
        np.testing.assert_array_equal(sharded, full)
    assert full.shape == (2, 14)
