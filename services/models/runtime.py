"""The CPU reference: onnxruntime with one fixed, single-threaded configuration."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

# Anything that maps feeds to outputs by name: a native session, a sharded pipeline, a
# browser behind an agent.
ModelFn = Callable[[Mapping[str, NDArray[Any]]], Mapping[str, NDArray[Any]]]

ModelSource = bytes | str | Path


def session_options() -> Any:
    """onnxruntime settings for reference runs.

    One thread and sequential execution make results repeatable from run to run. Only
    the basic graph optimisations run, so the operators executed are the ones in the
    file, as in the browser, rather than CPU-specific fused kernels.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return options


def open_session(model: ModelSource) -> Any:
    """An onnxruntime CPU session for ONNX bytes or a file, with ``session_options``."""
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])


def run_session(session: Any, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    """Run ``session`` on ``feeds``; every output, by name."""
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, dict(feeds))
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def session_fn(session: Any) -> ModelFn:
    """``session`` as a feeds -> outputs callable."""

    def run(feeds: Mapping[str, NDArray[Any]]) -> Mapping[str, NDArray[Any]]:
        return run_session(session, feeds)

    return run


def run_native(model: ModelSource, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    """Run an ONNX model (bytes or path) once on the CPU reference configuration."""
    return run_session(open_session(model), feeds)


def reference_session(name: str, cache_dir: str | Path | None = None) -> Any:
    """A reference session for catalogue model ``name``, built and cached on first use."""
    from services.models.cache import model_path

    return open_session(model_path(name, cache_dir))
