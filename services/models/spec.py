"""What a model in the catalogue looks like from outside: tensors, cut points, strategies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Sharding strategies, as DESIGN.md §4 names them.
LAYER = "layer"
ATTENTION_FEEDFORWARD = "attention_feedforward"
COMPONENT = "component"
STRATEGIES = (LAYER, ATTENTION_FEEDFORWARD, COMPONENT)

# Which strategies a cut at a given kind of place belongs to.
BETWEEN_BLOCKS = (LAYER, ATTENTION_FEEDFORWARD)
INSIDE_BLOCK = (ATTENTION_FEEDFORWARD,)
BETWEEN_COMPONENTS = (COMPONENT,)


class UnknownModel(KeyError):
    """A model name that is not in the catalogue; the message lists the known ones."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known models: {', '.join(self.known)}"


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, element type and shape (str dims are dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class CutPoint:
    """A place where the graph may be cut: right after ``tensor`` is produced.

    ``strategies`` are the sharding strategies allowed to cut here. Everything computed
    before the cut stays on the left; the activations that cross it are ``tensor`` plus,
    for multi-tower models, tower outputs produced earlier that a later part still needs.
    """

    tensor: str
    strategies: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class InputLimits:
    """What a model accepts beyond its inputs' names, types and shapes.

    Checked before any shard runs, so a request the model cannot take is the
    sender's error and never looks like a browser's failure.
    """

    max_dims: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Symbolic dimension -> the largest size the model takes (e.g. ``seq``: its positions)."""
    value_ranges: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """Integer input -> the values it may hold, ``[low, high)`` (token ids below the vocab)."""
    activation_dims: tuple[str, ...] = ()
    """The symbolic dimensions the widest tensor between shards grows with."""
    activation_width: int = 0
    """float32 values per element of ``activation_dims`` in that tensor (e.g. the hidden size)."""

    def activation_bytes(self, dims: Mapping[str, int]) -> int:
        """Bytes of the widest tensor a shard boundary carries for inputs of these dims."""
        if not self.activation_width:
            return 0
        size = 4 * self.activation_width
        for name in self.activation_dims:
            size *= dims.get(name, 1)
        return size


@dataclass(frozen=True)
class ModelInfo:
    """A catalogue entry: enough to plan a placement without building the graph."""

    name: str
    family: str
    description: str
    real_weights: bool
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cut_points: tuple[CutPoint, ...]
    limits: InputLimits = field(default_factory=InputLimits)

    @property
    def strategies(self) -> tuple[str, ...]:
        """The sharding strategies this model supports (those with at least one cut point)."""
        return tuple(s for s in STRATEGIES if self.cut_points_for(s))

    def cut_points_for(self, strategy: str) -> tuple[CutPoint, ...]:
        """The cut points ``strategy`` may use, in graph order."""
        return tuple(c for c in self.cut_points if strategy in c.strategies)

    def max_shards(self, strategy: str) -> int:
        """The most shards ``strategy`` can cut this model into."""
        return len(self.cut_points_for(strategy)) + 1
