"""vit-tiny: a ViT image classifier with seeded weights.

Architecture as Hugging Face's ViTForImageClassification: a 16x16 stride-16 Conv patch
embedding, a learned CLS token and position embedding, pre-LN blocks (multi-head
self-attention, exact-GELU MLP), a final LayerNorm and a linear head on the CLS token.
The configuration is small (64x64 images so 16 patches + CLS, 4 layers, hidden 192,
3 heads, 10 classes) and the weights are seeded, not trained.
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

SEED = 2_000_003


@dataclass(frozen=True)
class VitConfig:
    """The shape of a ViT classifier (also CLIP's vision tower, without the head)."""

    image: int = 64
    patch: int = 16
    channels: int = 3
    hidden: int = 192
    layers: int = 4
    heads: int = 3
    mlp: int = 768
    classes: int = 10
    eps: float = 1e-12

    @property
    def tokens(self) -> int:
        """Patches plus the CLS token."""
        return (self.image // self.patch) ** 2 + 1


CONFIG = VitConfig()
DESCRIPTION = (
    "ViT image classifier, architecture-faithful small configuration with SEEDED weights "
    "(not trained): 64x64x3 images, 16x16 patches (16 + CLS tokens), 4 pre-LN layers, "
    "hidden 192, 3 heads, MLP 768, exact GELU, 10-class head on the CLS token."
)


def cut_points(config: VitConfig) -> tuple[CutPoint, ...]:
    """Patch embedding | blocks (attention | MLP halves) | final norm + head."""
    points = [CutPoint("embeddings.output", BETWEEN_COMPONENTS, "embeddings | encoder")]
    for i in range(config.layers):
        points.append(
            CutPoint(
                f"encoder.layer.{i}.attention.output", INSIDE_BLOCK, f"block {i}: attention | mlp"
            )
        )
        if i < config.layers - 1:
            points.append(
                CutPoint(f"encoder.layer.{i}.output", BETWEEN_BLOCKS, f"block {i} | block {i + 1}")
            )
    points.append(CutPoint("encoder.output", BETWEEN_COMPONENTS, "encoder | head"))
    return tuple(points)


def info(name: str, version: str) -> ModelInfo:
    """The catalogue entry."""
    c = CONFIG
    return ModelInfo(
        name=name,
        family="vit",
        description=DESCRIPTION,
        real_weights=False,
        version=version,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", c.channels, c.image, c.image)),),
        outputs=(TensorSpec("logits", "float32", ("batch", c.classes)),),
        cut_points=cut_points(c),
    )


def seeded_weights(
    config: VitConfig, w: G.SeededWeights, prefix: str = "", *, patch_bias: bool = True
) -> dict[str, NDArray[np.float32]]:
    """Patch embedding, CLS, positions and pre-LN blocks for ``config``, names under ``prefix``."""
    h, m = config.hidden, config.mlp
    out = {
        f"{prefix}embeddings.patch.weight": w.normal(h, config.channels, config.patch, config.patch)
    }
    if patch_bias:
        out[f"{prefix}embeddings.patch.bias"] = w.normal(h)
    out[f"{prefix}embeddings.cls"] = w.normal(1, 1, h)
    out[f"{prefix}embeddings.position"] = w.normal(1, config.tokens, h)
    out.update(encoder_weights(w, f"{prefix}encoder", config.layers, h, m))
    return out


def encoder_weights(
    w: G.SeededWeights, prefix: str, layers: int, hidden: int, mlp: int, *, k_bias: bool = True
) -> dict[str, NDArray[np.float32]]:
    """Weights of pre-LN transformer blocks named ``{prefix}.layer.{i}.*``."""
    out: dict[str, NDArray[np.float32]] = {}
    for i in range(layers):
        p = f"{prefix}.layer.{i}"
        out[f"{p}.attention.norm.weight"] = w.gain(hidden)
        out[f"{p}.attention.norm.bias"] = w.normal(hidden)
        for part in ("q", "k", "v", "o"):
            out[f"{p}.attention.{part}.weight"] = w.normal(hidden, hidden)
            if part != "k" or k_bias:
                out[f"{p}.attention.{part}.bias"] = w.normal(hidden)
        out[f"{p}.ffn.norm.weight"] = w.gain(hidden)
        out[f"{p}.ffn.norm.bias"] = w.normal(hidden)
        out[f"{p}.ffn.up.weight"] = w.normal(hidden, mlp)
        out[f"{p}.ffn.up.bias"] = w.normal(mlp)
        out[f"{p}.ffn.down.weight"] = w.normal(mlp, hidden)
        out[f"{p}.ffn.down.bias"] = w.normal(hidden)
    return out


def patch_embeddings(
    g: GraphBuilder,
    pixels: str,
    config: VitConfig,
    prefix: str,
    *,
    patch_bias: bool = True,
    out: str | None = None,
) -> str:
    """Conv patches, flattened to tokens, with the CLS token in front and positions added."""
    s = f"{prefix}embeddings"
    conv_inputs = [pixels, f"{s}.patch.weight"] + ([f"{s}.patch.bias"] if patch_bias else [])
    patches = g.op(
        "Conv",
        conv_inputs,
        scope=s,
        kernel_shape=[config.patch, config.patch],
        strides=[config.patch, config.patch],
    )
    tokens = g.op("Reshape", [patches, g.i64(0, config.hidden, -1)], scope=s)
    tokens = g.op("Transpose", [tokens], scope=s, perm=[0, 2, 1])
    batch = G.seq_len(g, pixels, 0, scope=s)
    cls_shape = g.op("Concat", [batch, g.i64(1, config.hidden)], scope=s, axis=0)
    cls = g.op("Expand", [f"{s}.cls", cls_shape], scope=s)
    x = g.op("Concat", [cls, tokens], scope=s, axis=1)
    return g.op("Add", [x, f"{s}.position"], scope=s, out=out)


def pre_ln_block(
    g: GraphBuilder,
    x: str,
    prefix: str,
    *,
    heads: int,
    hidden: int,
    eps: float,
    activation: str = "gelu",
    bias: str | None = None,
    k_bias: bool = True,
) -> str:
    """One pre-LN block: x + attn(LN(x)), then h + mlp(LN(h)).

    The attention half's output is named ``{prefix}.attention.output`` and the block's
    ``{prefix}.output``: the cut points inside and after the block.
    """
    s = f"{prefix}.attention"
    normed = G.layer_norm(g, x, f"{s}.norm.weight", f"{s}.norm.bias", eps, scope=s)
    a = G.attention(
        g, normed, prefix=s, heads=heads, hidden=hidden, scope=s, bias=bias, k_bias=k_bias
    )
    h = g.op("Add", [x, a], scope=s, out=f"{s}.output")
    s = f"{prefix}.ffn"
    normed = G.layer_norm(g, h, f"{s}.norm.weight", f"{s}.norm.bias", eps, scope=s)
    up = G.linear(g, normed, f"{s}.up.weight", f"{s}.up.bias", scope=s)
    up = G.quick_gelu(g, up, scope=s) if activation == "quick_gelu" else G.gelu(g, up, scope=s)
    down = G.linear(g, up, f"{s}.down.weight", f"{s}.down.bias", scope=s)
    return g.op("Add", [h, down], scope=s, out=f"{prefix}.output")


def build(info: ModelInfo) -> onnx.ModelProto:
    """The vit-tiny graph with its seeded weights."""
    c = CONFIG
    w = G.SeededWeights(SEED)
    g = GraphBuilder(info.name)
    weights = seeded_weights(c, w)
    weights["norm.weight"] = w.gain(c.hidden)
    weights["norm.bias"] = w.normal(c.hidden)
    weights["head.weight"] = w.normal(c.hidden, c.classes)
    weights["head.bias"] = w.normal(c.classes)
    for name, array in weights.items():
        g.weight(name, array)

    pixels = g.input("pixel_values", F32, ["batch", c.channels, c.image, c.image])
    act: list[Dim] = ["batch", c.tokens, c.hidden]
    x = patch_embeddings(g, pixels, c, "", out="embeddings.output")
    g.annotate(x, F32, act)
    for i in range(c.layers):
        x = pre_ln_block(g, x, f"encoder.layer.{i}", heads=c.heads, hidden=c.hidden, eps=c.eps)
        g.annotate(f"encoder.layer.{i}.attention.output", F32, act)
        g.annotate(x, F32, act)
    s = "encoder"
    x = G.layer_norm(g, x, "norm.weight", "norm.bias", c.eps, scope=s, out="encoder.output")
    g.annotate(x, F32, act)
    s = "head"
    cls = g.op("Gather", [x, g.const(np.array(0, dtype=np.int64), np.int64)], scope=s, axis=1)
    logits = g.op("MatMul", [cls, "head.weight"], scope=s)
    g.op("Add", [logits, "head.bias"], scope=s, out="logits")
    g.output("logits", F32, ["batch", c.classes])
    return g.build(
        doc=info.description,
        metadata={"webshard.model": info.name, "webshard.version": info.version},
    )
