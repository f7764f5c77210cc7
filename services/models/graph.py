"""A small ONNX graph builder and the transformer pieces every model here is made of.

Graphs are built node by node in execution order. Sharding relies on that order:
a cut point is "after the node that produces tensor T", so every block is emitted
contiguously and computes its own helpers (mask bias, rotary tables, shapes) from
the block input or the original graph inputs, never from tensors of another block.
That keeps the only activation crossing a cut the named boundary tensor.

Only operators that onnxruntime-web (wasm and webgpu) runs at opset 17 are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 8 is the oldest IR that carries opset 17, so every runtime that runs opset 17 reads
# it; onnx's own default IR may be newer than onnxruntime-web accepts.
IR_VERSION = 8
# The most negative float32, as Hugging Face uses for masked attention scores.
MASK_MIN = float(np.finfo(np.float32).min)

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64

Dim = int | str


class GraphBuilder:
    """Collects nodes, initializers and I/O for one ONNX graph, in execution order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._counter = 0

    # -- names ---------------------------------------------------------------------------

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"tensor name {name!r} is used twice in graph {self.name!r}")
        self._names.add(name)
        return name

    def _auto(self, scope: str, op_type: str) -> str:
        self._counter += 1
        return f"{scope}/{op_type}_{self._counter}"

    # -- graph I/O and weights -----------------------------------------------------------

    def input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        """Declare a graph input."""
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[Dim]) -> None:
        """Declare an already produced tensor as a graph output."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def annotate(self, name: str, elem_type: int, shape: Sequence[Dim]) -> None:
        """Give a boundary tensor a typed shape with named dims, which shards inherit."""
        self.value_info.append(helper.make_tensor_value_info(name, elem_type, shape))

    def weight(self, name: str, array: NDArray[Any]) -> str:
        """Add a named initializer."""
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return self._claim(name)

    def const(self, values: Sequence[int] | Sequence[float] | NDArray[Any], dtype: Any) -> str:
        """A small shared constant (axes, shapes, scalars), deduplicated by value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            name = f"const/{array.dtype.name}_{len(self._constants)}"
            self.weight(name, array)
            self._constants[key] = name
        return self._constants[key]

    def i64(self, *values: int) -> str:
        """A 1-D int64 constant."""
        return self.const(list(values), np.int64)

    def f32(self, value: float) -> str:
        """A float32 scalar constant."""
        return self.const(np.array(value, dtype=np.float32), np.float32)

    # -- nodes ---------------------------------------------------------------------------

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        scope: str,
        out: str | None = None,
        **attrs: Any,
    ) -> str:
        """Append one single-output node; its output is ``out`` or an automatic name."""
        output = self._claim(out if out is not None else self._auto(scope, op_type))
        node_name = f"{scope}/{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=node_name, **attrs))
        return output

    def build(self, *, doc: str, metadata: dict[str, str]) -> onnx.ModelProto:
        """Assemble the model, checked, with inferred shapes for every intermediate tensor.

        The inferred value_info lets the extractor type every boundary tensor without
        re-inferring the whole model for each shard. Checking and inference run on a
        skeleton whose large weights are typed graph inputs instead of data: shapes never
        depend on weight values, and each pass serialises the whole model, which for
        bert-base is 440 MB. Small constants (axes, shapes) stay, since shape inference
        reads their values.
        """
        small = [t for t in self.initializers if _numel(t) <= _SMALL_CONSTANT]
        large = [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in self.initializers
            if _numel(t) > _SMALL_CONSTANT
        ]
        skeleton = self._model(self.inputs + large, small, self.value_info, doc, metadata)
        onnx.checker.check_model(skeleton, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)
        weights = {t.name for t in self.initializers}
        value_info = [v for v in inferred.graph.value_info if v.name not in weights]
        return self._model(self.inputs, self.initializers, value_info, doc, metadata)

    def _model(
        self,
        inputs: Sequence[onnx.ValueInfoProto],
        initializers: Sequence[onnx.TensorProto],
        value_info: Sequence[onnx.ValueInfoProto],
        doc: str,
        metadata: dict[str, str],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            inputs,
            self.outputs,
            initializer=initializers,
            value_info=value_info,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="webshard",
            ir_version=IR_VERSION,
            doc_string=doc,
        )
        helper.set_model_props(model, metadata)
        return model


# Initializers up to this many elements are constants that shape inference may read.
_SMALL_CONSTANT = 64


def _numel(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


# -- layers --------------------------------------------------------------------------------


def linear(g: GraphBuilder, x: str, w: str, b: str | None, *, scope: str) -> str:
    """x @ w (+ b); w is stored [in, out]."""
    y = g.op("MatMul", [x, w], scope=scope)
    return g.op("Add", [y, b], scope=scope) if b is not None else y


def layer_norm(
    g: GraphBuilder,
    x: str,
    gamma: str,
    beta: str,
    eps: float,
    *,
    scope: str,
    out: str | None = None,
) -> str:
    """LayerNormalization over the last axis."""
    return g.op("LayerNormalization", [x, gamma, beta], scope=scope, out=out, axis=-1, epsilon=eps)


def rms_norm(g: GraphBuilder, x: str, gamma: str, eps: float, *, scope: str) -> str:
    """x / sqrt(mean(x^2) + eps) * gamma, as LLaMA normalises."""
    square = g.op("Mul", [x, x], scope=scope)
    mean = g.op("ReduceMean", [square], scope=scope, axes=[-1], keepdims=1)
    root = g.op("Sqrt", [g.op("Add", [mean, g.f32(eps)], scope=scope)], scope=scope)
    normed = g.op("Mul", [x, g.op("Reciprocal", [root], scope=scope)], scope=scope)
    return g.op("Mul", [normed, gamma], scope=scope)


def gelu(g: GraphBuilder, x: str, *, scope: str) -> str:
    """Exact GELU: 0.5 x (1 + erf(x / sqrt 2))."""
    scaled = g.op("Mul", [x, g.f32(1.0 / np.sqrt(2.0))], scope=scope)
    one_plus = g.op("Add", [g.op("Erf", [scaled], scope=scope), g.f32(1.0)], scope=scope)
    half_x = g.op("Mul", [x, g.f32(0.5)], scope=scope)
    return g.op("Mul", [half_x, one_plus], scope=scope)


def quick_gelu(g: GraphBuilder, x: str, *, scope: str) -> str:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    gate = g.op("Sigmoid", [g.op("Mul", [x, g.f32(1.702)], scope=scope)], scope=scope)
    return g.op("Mul", [x, gate], scope=scope)


def silu(g: GraphBuilder, x: str, *, scope: str) -> str:
    """x * sigmoid(x)."""
    return g.op("Mul", [x, g.op("Sigmoid", [x], scope=scope)], scope=scope)


def seq_len(g: GraphBuilder, x: str, axis: int, *, scope: str) -> str:
    """The length of ``x`` along ``axis`` as a 1-element int64 tensor (for Slice ends)."""
    shape = g.op("Shape", [x], scope=scope)
    return g.op("Slice", [shape, g.i64(axis), g.i64(axis + 1), g.i64(0)], scope=scope)


def take_prefix(
    g: GraphBuilder, table: str, length: str, axes: Sequence[int], *, scope: str
) -> str:
    """table[:length] along each of ``axes`` (positions without Range)."""
    starts = g.i64(*([0] * len(axes)))
    ends = length if len(axes) == 1 else g.op("Concat", [length] * len(axes), scope=scope, axis=0)
    return g.op("Slice", [table, starts, ends, g.i64(*axes)], scope=scope)


def split_heads(g: GraphBuilder, x: str, heads: int, head_dim: int, *, scope: str) -> str:
    """[B, S, H] -> [B, heads, S, head_dim]."""
    shaped = g.op("Reshape", [x, g.i64(0, 0, heads, head_dim)], scope=scope)
    return g.op("Transpose", [shaped], scope=scope, perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, x: str, hidden: int, *, scope: str) -> str:
    """[B, heads, S, head_dim] -> [B, S, H]."""
    moved = g.op("Transpose", [x], scope=scope, perm=[0, 2, 1, 3])
    return g.op("Reshape", [moved, g.i64(0, 0, hidden)], scope=scope)


def attention(
    g: GraphBuilder,
    x: str,
    *,
    prefix: str,
    heads: int,
    hidden: int,
    scope: str,
    bias: str | None = None,
    rotary: tuple[str, str] | None = None,
    q_bias: bool = True,
    k_bias: bool = True,
    v_bias: bool = True,
    o_bias: bool = True,
) -> str:
    """Multi-head self-attention over ``x`` [B, S, H] with weights named ``{prefix}.{q,k,v,o}.*``.

    ``bias`` is added to the scores (broadcast to [B, heads, S, S]): padding or causal
    masks. ``rotary`` is a (cos, sin) pair of [S, head_dim] tables applied to q and k.
    """
    head_dim = hidden // heads

    def proj(part: str, with_bias: bool) -> str:
        b = f"{prefix}.{part}.bias" if with_bias else None
        return linear(g, x, f"{prefix}.{part}.weight", b, scope=scope)

    q = split_heads(g, proj("q", q_bias), heads, head_dim, scope=scope)
    k = split_heads(g, proj("k", k_bias), heads, head_dim, scope=scope)
    v = split_heads(g, proj("v", v_bias), heads, head_dim, scope=scope)
    if rotary is not None:
        q = apply_rotary(g, q, rotary, head_dim, scope=scope)
        k = apply_rotary(g, k, rotary, head_dim, scope=scope)
    k_t = g.op("Transpose", [k], scope=scope, perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, k_t], scope=scope)
    scores = g.op("Mul", [scores, g.f32(1.0 / float(np.sqrt(head_dim)))], scope=scope)
    if bias is not None:
        scores = g.op("Add", [scores, bias], scope=scope)
    probs = g.op("Softmax", [scores], scope=scope, axis=-1)
    context = merge_heads(g, g.op("MatMul", [probs, v], scope=scope), hidden, scope=scope)
    o_b = f"{prefix}.o.bias" if o_bias else None
    return linear(g, context, f"{prefix}.o.weight", o_b, scope=scope)


def apply_rotary(
    g: GraphBuilder, x: str, rotary: tuple[str, str], head_dim: int, *, scope: str
) -> str:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] as in LLaMA."""
    cos, sin = rotary
    half = head_dim // 2
    axis = g.i64(-1)
    x1 = g.op("Slice", [x, g.i64(0), g.i64(half), axis], scope=scope)
    x2 = g.op("Slice", [x, g.i64(half), g.i64(head_dim), axis], scope=scope)
    rotated = g.op("Concat", [g.op("Neg", [x2], scope=scope), x1], scope=scope, axis=-1)
    return g.op(
        "Add",
        [g.op("Mul", [x, cos], scope=scope), g.op("Mul", [rotated, sin], scope=scope)],
        scope=scope,
    )


def l2_normalize(g: GraphBuilder, x: str, *, scope: str, out: str | None = None) -> str:
    """x / ||x|| over the last axis.

    torch's F.normalize divides by max(||x||, 1e-12); adding 1e-12 instead gives the same
    float32 result unless the norm is below ~1e-5, and needs no Max operator.
    """
    square = g.op("Mul", [x, x], scope=scope)
    total = g.op("ReduceSum", [square, g.i64(-1)], scope=scope, keepdims=1)
    norm = g.op("Add", [g.op("Sqrt", [total], scope=scope), g.f32(1e-12)], scope=scope)
    return g.op("Div", [x, norm], scope=scope, out=out)


# -- seeded weights ------------------------------------------------------------------------


class SeededWeights:
    """Deterministic stand-in weights: N(0, 0.02) matrices and biases, LayerNorm gains near 1.

    Biases and gains are random rather than 0 and 1 so that a graph that forgets one
    produces a different answer.
    """

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def normal(self, *shape: int, std: float = 0.02) -> NDArray[np.float32]:
        """N(0, std) float32."""
        return self._rng.normal(0.0, std, size=shape).astype(np.float32)

    def gain(self, size: int) -> NDArray[np.float32]:
        """A LayerNorm/RMSNorm gain: 1 + N(0, 0.02)."""
        return (1.0 + self._rng.normal(0.0, 0.02, size=size)).astype(np.float32)
