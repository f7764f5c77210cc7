"""Cutting catalogue models into shards, and running a chain of shards.

A cut is made right after the node that produces a cut point's tensor (see
``spec.CutPoint``); ``shard_count - 1`` cut points are chosen, spread as evenly as
possible over the ones the strategy allows, and each piece is extracted with onnx's
``onnx.utils.Extractor`` (the machinery behind ``onnx.utils.extract_model``).

Chaining rule. A shard's inputs are every tensor its nodes read that an earlier shard
produced (the boundary activations) plus every original graph input it reads (such
as ``attention_mask``, which every BERT block needs); its outputs are every tensor it
produces that a later shard reads, and the model outputs it produces. Inputs are
listed graph inputs first (in graph order), then boundary tensors in production
order. ``run_pipeline`` keeps every tensor produced so far (the original inputs and
all shard outputs) by name, feeds each shard the names it asks for, and returns the
last shard's outputs, which are the model's outputs. In a single chain of blocks a
shard reads only its predecessor's outputs; for clip-tiny the heads shard also reads
``image_embeds``, produced two shards earlier by the vision tower.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
from numpy.typing import NDArray

from services.models.cache import model_path, resolve_cache_dir, write_atomically
from services.models.catalogue import model_info
from services.models.runtime import ModelFn, open_session, run_session
from services.models.spec import STRATEGIES, CutPoint, ModelInfo

INDEX_FILE = "index.json"
INDEX_FORMAT = 1


@dataclass(frozen=True)
class Shard:
    """One contiguous piece of a model's graph, stored at ``path`` and named by its sha256."""

    model: str
    strategy: str
    index: int
    count: int
    sha256: str
    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    size_bytes: int


# Runs one shard: (shard, feeds by name) -> outputs by name. Native onnxruntime by
# default; an agent plugs in a browser here.
ShardRunner = Callable[[Shard, Mapping[str, NDArray[Any]]], Mapping[str, NDArray[Any]]]


@dataclass(frozen=True)
class ShardPlan:
    """The boundary of one shard before it is extracted."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


class NativeRunner:
    """Runs shards with onnxruntime's CPU reference configuration, keeping one session per shard."""

    def __init__(self) -> None:
        self._sessions: dict[str, Any] = {}

    def __call__(self, shard: Shard, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Run ``shard`` on ``feeds``."""
        session = self._sessions.get(shard.sha256)
        if session is None:
            session = self._sessions[shard.sha256] = open_session(shard.path)
        return run_session(session, feeds)


def choose_cut_points(name: str, strategy: str, shard_count: int) -> tuple[CutPoint, ...]:
    """The ``shard_count - 1`` cut points ``cut_model`` uses, spread evenly over the allowed ones.

    With ``m`` allowed cut points the model is ``m + 1`` units; cut ``i`` goes after unit
    ``round(i * (m + 1) / shard_count)``. Raises ValueError for an unsupported strategy
    or a shard count out of range, with what is allowed.
    """
    info = model_info(name)
    _validate(info, strategy, shard_count)
    allowed = info.cut_points_for(strategy)
    units = len(allowed) + 1
    # Integer round-half-up of i * units / shard_count; consecutive picks differ by at
    # least one unit because shard_count <= units.
    picks = [(2 * i * units + shard_count) // (2 * shard_count) for i in range(1, shard_count)]
    return tuple(allowed[p - 1] for p in picks)


def _validate(info: ModelInfo, strategy: str, shard_count: int) -> None:
    supported = info.strategies
    if strategy not in supported:
        what = "unknown strategy" if strategy not in STRATEGIES else "unsupported strategy"
        raise ValueError(
            f"{what} {strategy!r} for model {info.name!r}; supported: {', '.join(supported)}"
        )
    most = info.max_shards(strategy)
    if isinstance(shard_count, bool) or not isinstance(shard_count, int):
        raise ValueError(f"shard_count must be an int, got {shard_count!r}")
    if not 1 <= shard_count <= most:
        raise ValueError(
            f"shard_count for {info.name!r} with strategy {strategy!r} must be between 1 and "
            f"{most}, got {shard_count}"
        )


def plan_shards(graph: onnx.GraphProto, cut_tensors: Sequence[str]) -> list[ShardPlan]:
    """Apply the chaining rule: each shard's inputs and outputs when ``graph`` is cut after
    the producers of ``cut_tensors`` (which must be produced in graph order)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    initializers = {t.name for t in graph.initializer}
    graph_inputs = [v.name for v in graph.input if v.name not in initializers]
    input_order = {name: i for i, name in enumerate(graph_inputs)}
    output_order = {v.name: i for i, v in enumerate(graph.output)}

    missing = [t for t in cut_tensors if t not in producer]
    if missing:
        raise ValueError(f"cut tensors not produced by any node: {missing}")
    ends = [producer[t] for t in cut_tensors] + [len(nodes) - 1]
    if any(b <= a for a, b in itertools.pairwise(ends)):
        raise ValueError(f"cut tensors must be produced in graph order, got {list(cut_tensors)}")

    def segment(node_index: int) -> int:
        return bisect.bisect_left(ends, node_index)

    count = len(ends)
    inputs: list[set[str]] = [set() for _ in range(count)]
    outputs: list[set[str]] = [set() for _ in range(count)]
    for i, node in enumerate(nodes):
        here = segment(i)
        for name in node.input:
            if not name or name in initializers:
                continue
            if name in input_order:
                inputs[here].add(name)
                continue
            there = segment(producer[name])
            if there < here:
                inputs[here].add(name)
                outputs[there].add(name)
    for name in output_order:
        outputs[segment(producer[name])].add(name)

    def input_key(name: str) -> tuple[int, int]:
        return (0, input_order[name]) if name in input_order else (1, producer[name])

    def output_key(name: str) -> tuple[int, int]:
        return (1, output_order[name]) if name in output_order else (0, producer[name])

    return [
        ShardPlan(tuple(sorted(i, key=input_key)), tuple(sorted(o, key=output_key)))
        for i, o in zip(inputs, outputs, strict=True)
    ]


def cut_model(
    name: str, strategy: str, shard_count: int, cache_dir: str | Path | None = None
) -> list[Shard]:
    """Cut catalogue model ``name`` into ``shard_count`` shards with ``strategy``.

    Shards are written content-addressed to ``<cache_dir>/shards/<sha256>.onnx`` and
    recorded in ``<cache_dir>/shards/index.json`` under the model, strategy, count and
    builder version, so the same cut again reuses the files. The full model is built
    (or reused) at ``<cache_dir>/models/<name>-<version>.onnx`` first.
    """
    info = model_info(name)
    cuts = choose_cut_points(name, strategy, shard_count)
    root = resolve_cache_dir(cache_dir)
    shard_dir = root / "shards"
    key = f"{name}/{strategy}/{shard_count}/{info.version}"

    cached = _read_index(shard_dir).get(key)
    if cached is not None:
        shards = _shards_from_record(cached, name, strategy, shard_dir)
        if shards is not None:
            return shards

    full = model_path(name, root)
    model = onnx.load(str(full))
    plans = plan_shards(model.graph, [c.tensor for c in cuts])
    # onnx.utils.extract_model(path, ...) is Extractor plus a fresh load of the whole
    # model per call; loading once per cut keeps bert-base's 24-shard cut to seconds.
    # The full model was checked and shape-inferred when it was built, so that is not
    # repeated either; each shard is checked on its own.
    extractor = onnx.utils.Extractor(model)
    records = [_extract(extractor, plan, shard_dir) for plan in plans]
    record = {
        "model": name,
        "strategy": strategy,
        "count": shard_count,
        "builder_version": info.version,
        "cut_points": [c.tensor for c in cuts],
        "shards": records,
    }
    _update_index(shard_dir, key, record)
    shards = _shards_from_record(record, name, strategy, shard_dir)
    if shards is None:
        raise RuntimeError(f"shards of {key} vanished from {shard_dir} while being written")
    return shards


def _extract(extractor: onnx.utils.Extractor, plan: ShardPlan, shard_dir: Path) -> dict[str, Any]:
    shard = extractor.extract_model(list(plan.input_names), list(plan.output_names))
    onnx.checker.check_model(shard)
    data = shard.SerializeToString()
    digest = hashlib.sha256(data).hexdigest()
    path = shard_dir / f"{digest}.onnx"
    if not (path.is_file() and path.stat().st_size == len(data)):
        write_atomically(path, data)
    return {
        "sha256": digest,
        "input_names": list(plan.input_names),
        "output_names": list(plan.output_names),
        "size_bytes": len(data),
    }


def _read_index(shard_dir: Path) -> dict[str, Any]:
    try:
        index = json.loads((shard_dir / INDEX_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return {}
    cuts = index.get("cuts")
    return cuts if isinstance(cuts, dict) else {}


def _update_index(shard_dir: Path, key: str, record: dict[str, Any]) -> None:
    # Re-read just before writing so cuts recorded meanwhile by another process survive.
    cuts = _read_index(shard_dir)
    cuts[key] = record
    text = json.dumps({"format": INDEX_FORMAT, "cuts": cuts}, indent=1, sort_keys=True)
    write_atomically(shard_dir / INDEX_FILE, text.encode())


def _shards_from_record(
    record: Mapping[str, Any], name: str, strategy: str, shard_dir: Path
) -> list[Shard] | None:
    """Shards of an index record, or None if any file is missing or has the wrong size."""
    try:
        return _shards_or_none(record, name, strategy, shard_dir)
    except (KeyError, TypeError):
        # A record this version cannot read is a cache miss, not an error.
        return None


def _shards_or_none(
    record: Mapping[str, Any], name: str, strategy: str, shard_dir: Path
) -> list[Shard] | None:
    entries = record["shards"]
    shards = []
    for i, entry in enumerate(entries):
        path = shard_dir / f"{entry['sha256']}.onnx"
        if not path.is_file() or path.stat().st_size != entry["size_bytes"]:
            return None
        shards.append(
            Shard(
                model=name,
                strategy=strategy,
                index=i,
                count=len(entries),
                sha256=entry["sha256"],
                path=path,
                input_names=tuple(entry["input_names"]),
                output_names=tuple(entry["output_names"]),
                size_bytes=entry["size_bytes"],
            )
        )
    return shards


def run_pipeline(
    shards: Sequence[Shard],
    inputs: Mapping[str, NDArray[Any]],
    runner: ShardRunner | None = None,
) -> dict[str, NDArray[Any]]:
    """Run ``shards`` in order on ``inputs`` (the model's feeds) with the chaining rule.

    ``runner(shard, feeds)`` runs one shard; the default is a ``NativeRunner``. Returns
    the last shard's outputs: the model's outputs.
    """
    if not shards:
        raise ValueError("run_pipeline needs at least one shard")
    first = shards[0]
    for position, shard in enumerate(shards):
        same_cut = (shard.model, shard.strategy, shard.count) == (
            first.model,
            first.strategy,
            first.count,
        )
        if not same_cut or shard.index != position or shard.count != len(shards):
            raise ValueError(
                "shards must be one whole cut in order: got "
                f"{[(s.model, s.strategy, s.index, s.count) for s in shards]}"
            )
    run = runner if runner is not None else NativeRunner()
    tensors: dict[str, NDArray[Any]] = dict(inputs)
    for shard in shards:
        missing = [n for n in shard.input_names if n not in tensors]
        if missing:
            raise ValueError(f"shard {shard.index} of {shard.model} needs {missing}, not fed")
        produced = run(shard, {n: tensors[n] for n in shard.input_names})
        absent = [n for n in shard.output_names if n not in produced]
        if absent:
            raise ValueError(f"shard {shard.index} of {shard.model} did not produce {absent}")
        tensors.update({n: np.asarray(produced[n]) for n in shard.output_names})
    return {n: tensors[n] for n in shards[-1].output_names}


def pipeline_fn(shards: Sequence[Shard], runner: ShardRunner | None = None) -> ModelFn:
    """``shards`` as one feeds -> outputs callable (e.g. for ``decoder.generate``).

    One runner serves every call, so native sessions are opened once.
    """
    run = runner if runner is not None else NativeRunner()
    chain = list(shards)

    def call(feeds: Mapping[str, NDArray[Any]]) -> Mapping[str, NDArray[Any]]:
        return run_pipeline(chain, feeds, run)

    return call
