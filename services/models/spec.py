"""What a model in the catalogue looks like from outside: tensors, cut points, strategies."""

from __future__ import annotations

from dataclasses import dataclass

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
