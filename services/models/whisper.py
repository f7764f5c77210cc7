"""whisper-tiny-enc: the Whisper audio encoder with whisper-tiny's widths and seeded weights.

Architecture as Hugging Face's WhisperEncoder: a log-mel spectrogram [batch, 80, frames]
goes through two Conv1d layers (kernel 3, the second with stride 2, exact GELU after
each; run as ONNX Conv on 1-D data), gets fixed sinusoidal positions added, then
pre-LN blocks (the key projection has no bias, as in Whisper) and a final LayerNorm.

Whisper itself takes 3000 frames (30 s); this configuration takes 200 frames (2 s)
and so has 100 positions, which keeps the graph and its activations small. Widths are
whisper-tiny's (4 layers, hidden 384, 6 heads, FFN 1536); the weights are seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray

from services.models import graph as G
from services.models.graph import F32, Dim, GraphBuilder
from services.models.spec import (
    BETWEEN_BLOCKS,
    BETWEEN_COMPONENTS,
    INSIDE_BLOCK,
    CutPoint,
    ModelInfo,
    TensorSpec,
)
from services.models.vit import encoder_weights, pre_ln_block

SEED = 3_000_017


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """The shape of a Whisper encoder."""

    mels: int = 80
    frames: int = 200
    hidden: int = 384
    layers: int = 4
    heads: int = 6
    ffn: int = 1536
    eps: float = 1e-5

    @property
    def positions(self) -> int:
        """Frames after the stride-2 convolution."""
        return self.frames // 2


CONFIG = WhisperEncoderConfig()
DESCRIPTION = (
    "Whisper audio encoder, architecture-faithful with whisper-tiny's widths and SEEDED "
    "weights (not trained): log-mel input [batch, 80, 200] (200 frames = 2 s instead of "
    "Whisper's 3000), Conv1d stem (kernel 3, then kernel 3 stride 2, GELU), sinusoidal "
    "positions, 4 pre-LN layers, hidden 384, 6 heads, FFN 1536, final LayerNorm."
)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> NDArray[np.float32]:
    """Whisper's fixed position table: [sin | cos] of geometric timescales."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def cut_points(config: WhisperEncoderConfig) -> tuple[CutPoint, ...]:
    """Conv stem | blocks (attention | FFN halves); the final norm stays with the last block."""
    points = [CutPoint("stem.output", BETWEEN_COMPONENTS, "stem | encoder")]
    for i in range(config.layers):
        points.append(
            CutPoint(
                f"encoder.layer.{i}.attention.output", INSIDE_BLOCK, f"block {i}: attention | ffn"
            )
        )
        if i < config.layers - 1:
            points.append(
                CutPoint(f"encoder.layer.{i}.output", BETWEEN_BLOCKS, f"block {i} | block {i + 1}")
            )
    return tuple(points)


def info(name: str, version: str) -> ModelInfo:
    """The catalogue entry."""
    c = CONFIG
    return ModelInfo(
        name=name,
        family="whisper-encoder",
        description=DESCRIPTION,
        real_weights=False,
        version=version,
        inputs=(TensorSpec("input_features", "float32", ("batch", c.mels, c.frames)),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", c.positions, c.hidden)),),
        cut_points=cut_points(c),
    )


def build(info: ModelInfo) -> onnx.ModelProto:
    """The whisper-tiny-enc graph with its seeded weights."""
    c = CONFIG
    w = G.SeededWeights(SEED)
    weights = {
        "stem.conv1.weight": w.normal(c.hidden, c.mels, 3),
        "stem.conv1.bias": w.normal(c.hidden),
        "stem.conv2.weight": w.normal(c.hidden, c.hidden, 3),
        "stem.conv2.bias": w.normal(c.hidden),
        "stem.position": sinusoids(c.positions, c.hidden),
    }
    weights.update(encoder_weights(w, "encoder", c.layers, c.hidden, c.ffn, k_bias=False))
    weights["encoder.norm.weight"] = w.gain(c.hidden)
    weights["encoder.norm.bias"] = w.normal(c.hidden)
    g = GraphBuilder(info.name)
    for name, array in weights.items():
        g.weight(name, array)

    features = g.input("input_features", F32, ["batch", c.mels, c.frames])
    act: list[Dim] = ["batch", c.positions, c.hidden]
    s = "stem"
    x = g.op(
        "Conv",
        [features, "stem.conv1.weight", "stem.conv1.bias"],
        scope=s,
        kernel_shape=[3],
        pads=[1, 1],
    )
    x = G.gelu(g, x, scope=s)
    x = g.op(
        "Conv",
        [x, "stem.conv2.weight", "stem.conv2.bias"],
        scope=s,
        kernel_shape=[3],
        pads=[1, 1],
        strides=[2],
    )
    x = G.gelu(g, x, scope=s)
    x = g.op("Transpose", [x], scope=s, perm=[0, 2, 1])
    x = g.op("Add", [x, "stem.position"], scope=s, out="stem.output")
    g.annotate(x, F32, act)
    for i in range(c.layers):
        p = f"encoder.layer.{i}"
        x = pre_ln_block(g, x, p, heads=c.heads, hidden=c.hidden, eps=c.eps, k_bias=False)
        g.annotate(f"{p}.attention.output", F32, act)
        g.annotate(x, F32, act)
    G.layer_norm(
        g,
        x,
        "encoder.norm.weight",
        "encoder.norm.bias",
        c.eps,
        scope="encoder",
        out="last_hidden_state",
    )
    g.output("last_hidden_state", F32, act)
    return g.build(
        doc=info.description,
        metadata={"webshard.model": info.name, "webshard.version": info.version},
    )
