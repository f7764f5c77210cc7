"""decoder-tiny: a LLaMA-style causal language model with seeded weights, and greedy generation.

Architecture as LLaMA: token embedding, pre-norm blocks with RMSNorm, causal multi-head
self-attention with rotary position embeddings (rotate-half form, theta 10000, no
biases), a SwiGLU feed-forward (down(silu(gate(x)) * up(x))), a final RMSNorm and an
untied lm_head. Small configuration (vocab 512, 4 layers, hidden 256, 4 heads, FFN 688,
at most 128 positions, every head with its own key/value head) with seeded weights, so
generated text is meaningless but deterministic.

Its text side is byte-level (see ``tokenize``): 1..256 are UTF-8 bytes + 1, 257 begins
a text, 258 ends one; other ids exist only as model outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from services.models import graph as G
from services.models.graph import F32, I64, Dim, GraphBuilder
from services.models.runtime import ModelFn, open_session, session_fn
from services.models.spec import (
    BETWEEN_BLOCKS,
    BETWEEN_COMPONENTS,
    INSIDE_BLOCK,
    CutPoint,
    InputLimits,
    ModelInfo,
    TensorSpec,
)

SEED = 5_000_011
BOS_ID = 257
EOS_ID = 258
MAX_PROMPT_BYTES = 64


@dataclass(frozen=True)
class DecoderConfig:
    """The shape of a LLaMA-style decoder."""

    vocab: int = 512
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    ffn: int = 688
    max_positions: int = 128
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads


CONFIG = DecoderConfig()
DESCRIPTION = (
    "LLaMA-style causal decoder, architecture-faithful small configuration with SEEDED "
    "weights (not trained): vocab 512 (byte-level ids), 4 layers, hidden 256, 4 heads, "
    "RMSNorm, rotary position embeddings, SwiGLU FFN 688, untied lm_head, at most 128 "
    "positions; logits [batch, seq, 512]. Greedy generation reruns the graph per token."
)


def tokenize(texts: Sequence[str]) -> NDArray[np.int64]:
    """Byte-level prompts [len(texts), 1 + bytes]: begin-of-text then UTF-8 bytes + 1.

    The decoder has no padding mask, so the texts of one batch must encode to the same
    number of bytes, and a prompt must leave room to generate (at most 64 bytes).
    """
    rows = [[BOS_ID, *(b + 1 for b in text.encode("utf-8"))] for text in texts]
    lengths = sorted({len(r) for r in rows})
    if not rows or len(lengths) != 1:
        raise ValueError(
            "decoder-tiny has no padding mask: give one or more texts of the same UTF-8 "
            f"length (got byte lengths {[n - 1 for n in lengths]})"
        )
    if lengths[0] - 1 > MAX_PROMPT_BYTES:
        raise ValueError(f"a decoder-tiny prompt is at most {MAX_PROMPT_BYTES} bytes")
    return np.array(rows, dtype=np.int64)


def cut_points(config: DecoderConfig) -> tuple[CutPoint, ...]:
    """Embedding | blocks (attention | FFN halves) | final norm + lm_head."""
    points = [CutPoint("embeddings.output", BETWEEN_COMPONENTS, "embedding | decoder")]
    for i in range(config.layers):
        p = f"decoder.layer.{i}"
        points.append(
            CutPoint(f"{p}.attention.output", INSIDE_BLOCK, f"block {i}: attention | ffn")
        )
        last = i == config.layers - 1
        points.append(
            CutPoint(
                f"{p}.output",
                BETWEEN_COMPONENTS if last else BETWEEN_BLOCKS,
                "decoder | lm_head" if last else f"block {i} | block {i + 1}",
            )
        )
    return tuple(points)


def info(name: str, version: str) -> ModelInfo:
    """The catalogue entry."""
    c = CONFIG
    return ModelInfo(
        name=name,
        family="llama-decoder",
        description=DESCRIPTION,
        real_weights=False,
        version=version,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
        outputs=(TensorSpec("logits", "float32", ("batch", "seq", c.vocab)),),
        cut_points=cut_points(c),
        limits=InputLimits(
            max_dims={"seq": c.max_positions},
            value_ranges={"input_ids": (0, c.vocab)},
            activation_dims=("batch", "seq"),
            activation_width=max(c.hidden, c.vocab),  # the last shard's logits
        ),
    )


def _weights(c: DecoderConfig) -> dict[str, NDArray[np.float32]]:
    w = G.SeededWeights(SEED)
    h, f = c.hidden, c.ffn
    out = {"embeddings.token": w.normal(c.vocab, h)}
    for i in range(c.layers):
        p = f"decoder.layer.{i}"
        out[f"{p}.attention.norm.weight"] = w.gain(h)
        for part in ("q", "k", "v", "o"):
            out[f"{p}.attention.{part}.weight"] = w.normal(h, h)
        out[f"{p}.ffn.norm.weight"] = w.gain(h)
        out[f"{p}.ffn.gate.weight"] = w.normal(h, f)
        out[f"{p}.ffn.up.weight"] = w.normal(h, f)
        out[f"{p}.ffn.down.weight"] = w.normal(f, h)
    out["norm.weight"] = w.gain(h)
    out["lm_head.weight"] = w.normal(h, c.vocab)
    half = c.head_dim // 2
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / c.head_dim))
    out["rope.inv_freq"] = inv_freq.astype(np.float32)
    out["rope.positions"] = np.arange(c.max_positions, dtype=np.float32)
    causal = np.triu(np.full((c.max_positions, c.max_positions), G.MASK_MIN, np.float32), k=1)
    out["causal_bias"] = causal
    return out


def build(info: ModelInfo) -> onnx.ModelProto:
    """The decoder-tiny graph with its seeded weights."""
    c = CONFIG
    g = GraphBuilder(info.name)
    for name, array in _weights(c).items():
        g.weight(name, array)
    ids = g.input("input_ids", I64, ["batch", "seq"])
    act: list[Dim] = ["batch", "seq", c.hidden]
    x = g.op("Gather", ["embeddings.token", ids], scope="embeddings", out="embeddings.output")
    g.annotate(x, F32, act)
    for i in range(c.layers):
        p = f"decoder.layer.{i}"
        s = f"{p}.attention"
        # Rotary tables and the causal bias come from this block's own input length, so
        # a shard starting at any block needs only the hidden state.
        seq = G.seq_len(g, x, 1, scope=s)
        positions = G.take_prefix(g, "rope.positions", seq, [0], scope=s)
        positions = g.op("Unsqueeze", [positions, g.i64(-1)], scope=s)
        freqs = g.op("Mul", [positions, "rope.inv_freq"], scope=s)
        angles = g.op("Concat", [freqs, freqs], scope=s, axis=-1)
        rotary = (g.op("Cos", [angles], scope=s), g.op("Sin", [angles], scope=s))
        bias = G.take_prefix(g, "causal_bias", seq, [0, 1], scope=s)
        normed = G.rms_norm(g, x, f"{s}.norm.weight", c.eps, scope=s)
        a = G.attention(
            g,
            normed,
            prefix=s,
            heads=c.heads,
            hidden=c.hidden,
            scope=s,
            bias=bias,
            rotary=rotary,
            q_bias=False,
            k_bias=False,
            v_bias=False,
            o_bias=False,
        )
        x = g.op("Add", [x, a], scope=s, out=f"{s}.output")
        g.annotate(x, F32, act)
        s = f"{p}.ffn"
        normed = G.rms_norm(g, x, f"{s}.norm.weight", c.eps, scope=s)
        gate = G.silu(g, g.op("MatMul", [normed, f"{s}.gate.weight"], scope=s), scope=s)
        up = g.op("MatMul", [normed, f"{s}.up.weight"], scope=s)
        down = g.op("MatMul", [g.op("Mul", [gate, up], scope=s), f"{s}.down.weight"], scope=s)
        x = g.op("Add", [x, down], scope=s, out=f"{p}.output")
        g.annotate(x, F32, act)
    s = "lm_head"
    normed = G.rms_norm(g, x, "norm.weight", c.eps, scope=s)
    g.op("MatMul", [normed, "lm_head.weight"], scope=s, out="logits")
    g.output("logits", F32, ["batch", "seq", c.vocab])
    return g.build(
        doc=info.description,
        metadata={"webshard.model": info.name, "webshard.version": info.version},
    )


def generate(
    model: bytes | str | Path | ModelFn,
    input_ids: NDArray[np.integer[Any]],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
) -> NDArray[np.int64]:
    """Greedy decoding: append the argmax of the last position's logits, ``max_new_tokens`` times.

    ``model`` is decoder-tiny's ONNX (bytes or a path, run natively) or any callable that
    maps ``{"input_ids": ...}`` to ``{"logits": ...}``, such as a sharded pipeline
    (``sharding.pipeline_fn``). There is no KV cache: the whole sequence is rerun at
    every step, which keeps every shard stateless. Stops early once every row has
    produced ``eos_token_id``. Returns the prompt followed by the generated ids.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got shape {ids.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if ids.shape[1] + max_new_tokens > CONFIG.max_positions:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
            f"{CONFIG.max_positions} positions decoder-tiny has"
        )
    run = model if callable(model) else session_fn(open_session(model))
    finished = np.zeros(ids.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        logits = np.asarray(run({"input_ids": ids})["logits"])
        next_ids = logits[:, -1, :].argmax(axis=-1).astype(np.int64)
        ids = np.concatenate([ids, next_ids[:, None]], axis=1)
        if eos_token_id is not None:
            finished |= next_ids == eos_token_id
            if finished.all():
                break
    return ids
