"""clip-tiny: a two-tower CLIP with seeded weights.

Architecture as Hugging Face's CLIPModel: a ViT vision tower (Conv patches without
bias, CLS token, positions, a LayerNorm before the encoder, pre-LN blocks with
quick-GELU, a LayerNorm on the CLS token, a bias-free projection) and a text tower
(token + position embeddings, causal pre-LN blocks, final LayerNorm, pooling at the
end-of-text token, a bias-free projection); both embeddings are L2-normalised and
``logits_per_image = logit_scale * image @ text.T``.

Deliberate differences, all documented in the description:

- the text side uses a byte-level tokenizer (``tokenize``), not CLIP's BPE: id 0 pads,
  1..256 are UTF-8 bytes + 1, 257 starts and 258 ends a text; context 32 tokens;
- the end-of-text pooling selects the position where ``input_ids == 258``. CLIP takes
  the argmax of the ids, which is the same position because the end-of-text id is the
  largest and appears once per row, but ArgMax and per-row gathers are not on the
  operator list every onnxruntime-web backend runs;
- the logit scale is stored already exponentiated (CLIP's initial 1/0.07).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
from services.models.vit import (
    VitConfig,
    encoder_weights,
    patch_embeddings,
    pre_ln_block,
)
from services.models.vit import seeded_weights as vit_weights

SEED = 4_000_037
PAD_ID = 0
SOT_ID = 257
EOT_ID = 258


@dataclass(frozen=True)
class ClipTextConfig:
    """The shape of CLIP's text tower."""

    vocab: int = 259
    context: int = 32
    hidden: int = 128
    layers: int = 4
    heads: int = 2
    mlp: int = 512
    eps: float = 1e-5


@dataclass(frozen=True)
class ClipConfig:
    """Both towers and the shared embedding width."""

    vision: VitConfig = field(default_factory=lambda: VitConfig(eps=1e-5))
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    projection: int = 128
    logit_scale: float = 1.0 / 0.07


CONFIG = ClipConfig()
DESCRIPTION = (
    "CLIP two-tower image/text model, architecture-faithful small configuration with "
    "SEEDED weights (not trained): vision ViT 64x64 images, 16x16 patches, 4 layers, "
    "hidden 192, 3 heads; text tower 4 causal layers, hidden 128, 2 heads, context 32, "
    "byte-level tokenizer (not CLIP's BPE), pooled at the end-of-text token; projections "
    "to 128, L2 normalisation, logit scale 1/0.07 -> logits_per_image [n_images, n_texts]."
)


def tokenize(texts: Sequence[str], context: int = CONFIG.text.context) -> NDArray[np.int64]:
    """Byte-level ids [len(texts), longest]: start, UTF-8 bytes + 1 (truncated), end, padding."""
    rows = [[SOT_ID, *(b + 1 for b in t.encode("utf-8")[: context - 2]), EOT_ID] for t in texts]
    width = max((len(r) for r in rows), default=2)
    ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids


def cut_points(config: ClipConfig) -> tuple[CutPoint, ...]:
    """Vision blocks | vision tower | text blocks | text tower | heads."""
    points: list[CutPoint] = []
    for tower, layers, tail in (
        ("vision", config.vision.layers, "image_embeds"),
        ("text", config.text.layers, "text_embeds"),
    ):
        for i in range(layers):
            p = f"{tower}.encoder.layer.{i}"
            points.append(
                CutPoint(
                    f"{p}.attention.output", INSIDE_BLOCK, f"{tower} block {i}: attention | mlp"
                )
            )
            if i < layers - 1:
                points.append(
                    CutPoint(f"{p}.output", BETWEEN_BLOCKS, f"{tower} block {i} | block {i + 1}")
                )
        if tower == "vision":
            points.append(
                CutPoint(tail, (*BETWEEN_BLOCKS, *BETWEEN_COMPONENTS), "vision tower | text tower")
            )
        else:
            points.append(CutPoint(tail, BETWEEN_COMPONENTS, "text tower | heads"))
    return tuple(points)


def info(name: str, version: str) -> ModelInfo:
    """The catalogue entry."""
    c = CONFIG
    v = c.vision
    return ModelInfo(
        name=name,
        family="clip",
        description=DESCRIPTION,
        real_weights=False,
        version=version,
        inputs=(
            TensorSpec("pixel_values", "float32", ("n_images", v.channels, v.image, v.image)),
            TensorSpec("input_ids", "int64", ("n_texts", "seq")),
        ),
        outputs=(TensorSpec("logits_per_image", "float32", ("n_images", "n_texts")),),
        cut_points=cut_points(c),
        limits=InputLimits(
            max_dims={"seq": c.text.context},
            value_ranges={"input_ids": (0, c.text.vocab)},
        ),
    )


def _weights(c: ClipConfig) -> dict[str, NDArray[np.float32]]:
    w = G.SeededWeights(SEED)
    v, t = c.vision, c.text
    # The vision tower is ViT's without the patch bias, named under "vision.".
    out = vit_weights(v, w, "vision.", patch_bias=False)
    out["vision.pre_norm.weight"] = w.gain(v.hidden)
    out["vision.pre_norm.bias"] = w.normal(v.hidden)
    out["vision.post_norm.weight"] = w.gain(v.hidden)
    out["vision.post_norm.bias"] = w.normal(v.hidden)
    out["vision.projection"] = w.normal(v.hidden, c.projection)
    out["text.embeddings.token"] = w.normal(t.vocab, t.hidden)
    out["text.embeddings.position"] = w.normal(t.context, t.hidden)
    out.update(encoder_weights(w, "text.encoder", t.layers, t.hidden, t.mlp))
    out["text.final_norm.weight"] = w.gain(t.hidden)
    out["text.final_norm.bias"] = w.normal(t.hidden)
    out["text.projection"] = w.normal(t.hidden, c.projection)
    causal = np.triu(np.full((t.context, t.context), G.MASK_MIN, dtype=np.float32), k=1)
    out["text.causal_bias"] = causal
    out["logit_scale"] = np.array(c.logit_scale, dtype=np.float32)
    return out


def build(info: ModelInfo) -> onnx.ModelProto:
    """The clip-tiny graph with its seeded weights."""
    c = CONFIG
    v, t = c.vision, c.text
    g = GraphBuilder(info.name)
    for name, array in _weights(c).items():
        g.weight(name, array)
    pixels = g.input("pixel_values", F32, ["n_images", v.channels, v.image, v.image])
    ids = g.input("input_ids", I64, ["n_texts", "seq"])

    # Vision tower.
    x = patch_embeddings(g, pixels, v, "vision.", patch_bias=False)
    x = G.layer_norm(
        g, x, "vision.pre_norm.weight", "vision.pre_norm.bias", v.eps, scope="vision.embeddings"
    )
    act: list[Dim] = ["n_images", v.tokens, v.hidden]
    for i in range(v.layers):
        p = f"vision.encoder.layer.{i}"
        x = pre_ln_block(
            g, x, p, heads=v.heads, hidden=v.hidden, eps=v.eps, activation="quick_gelu"
        )
        g.annotate(f"{p}.attention.output", F32, act)
        g.annotate(x, F32, act)
    s = "vision.head"
    cls = g.op("Gather", [x, g.const(np.array(0, dtype=np.int64), np.int64)], scope=s, axis=1)
    cls = G.layer_norm(g, cls, "vision.post_norm.weight", "vision.post_norm.bias", v.eps, scope=s)
    image = g.op("MatMul", [cls, "vision.projection"], scope=s, out="image_embeds")
    g.annotate(image, F32, ["n_images", c.projection])

    # Text tower.
    s = "text.embeddings"
    seq = G.seq_len(g, ids, 1, scope=s)
    x = g.op("Gather", ["text.embeddings.token", ids], scope=s)
    x = g.op("Add", [x, G.take_prefix(g, "text.embeddings.position", seq, [0], scope=s)], scope=s)
    act = ["n_texts", "seq", t.hidden]
    for i in range(t.layers):
        p = f"text.encoder.layer.{i}"
        # The causal bias is sliced per block from the block input's length, so a shard
        # starting inside the text tower needs nothing but its hidden state.
        block_seq = G.seq_len(g, x, 1, scope=f"{p}.attention")
        bias = G.take_prefix(g, "text.causal_bias", block_seq, [0, 1], scope=f"{p}.attention")
        x = pre_ln_block(
            g, x, p, heads=t.heads, hidden=t.hidden, eps=t.eps, activation="quick_gelu", bias=bias
        )
        g.annotate(f"{p}.attention.output", F32, act)
        g.annotate(x, F32, act)
    s = "text.head"
    x = G.layer_norm(g, x, "text.final_norm.weight", "text.final_norm.bias", t.eps, scope=s)
    is_eot = g.op("Equal", [ids, g.const(np.array(EOT_ID, dtype=np.int64), np.int64)], scope=s)
    pick = g.op("Unsqueeze", [g.op("Cast", [is_eot], scope=s, to=F32), g.i64(-1)], scope=s)
    pooled = g.op("ReduceSum", [g.op("Mul", [x, pick], scope=s), g.i64(1)], scope=s, keepdims=0)
    text = g.op("MatMul", [pooled, "text.projection"], scope=s, out="text_embeds")
    g.annotate(text, F32, ["n_texts", c.projection])

    # Heads.
    s = "head"
    image_n = G.l2_normalize(g, image, scope=s)
    text_n = G.l2_normalize(g, text, scope=s)
    similarity = g.op(
        "MatMul", [image_n, g.op("Transpose", [text_n], scope=s, perm=[1, 0])], scope=s
    )
    g.op("Mul", [similarity, "logit_scale"], scope=s, out="logits_per_image")
    g.output("logits_per_image", F32, ["n_images", "n_texts"])
    return g.build(
        doc=info.description,
        metadata={"webshard.model": info.name, "webshard.version": info.version},
    )
