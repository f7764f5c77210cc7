"""webshard's model library: ONNX graphs built from weights, and their cutting into shards.

Only ``minilm-l6`` carries real weights (all-MiniLM-L6-v2); the other models are
architecture-faithful small configurations with seeded weights. See ``catalogue``.
Importing this package imports no webshard service.
"""

from services.models.cache import default_cache_dir, model_path
from services.models.catalogue import build_model, list_models, model_info
from services.models.decoder import generate
from services.models.inputs import example_inputs, prepare_inputs
from services.models.runtime import ModelFn, open_session, reference_session, run_native
from services.models.sharding import (
    NativeRunner,
    Shard,
    ShardRunner,
    choose_cut_points,
    cut_model,
    pipeline_fn,
    run_pipeline,
)
from services.models.spec import (
    ATTENTION_FEEDFORWARD,
    COMPONENT,
    LAYER,
    STRATEGIES,
    CutPoint,
    ModelInfo,
    TensorSpec,
    UnknownModel,
)

__all__ = [
    "ATTENTION_FEEDFORWARD",
    "COMPONENT",
    "LAYER",
    "STRATEGIES",
    "CutPoint",
    "ModelFn",
    "ModelInfo",
    "NativeRunner",
    "Shard",
    "ShardRunner",
    "TensorSpec",
    "UnknownModel",
    "build_model",
    "choose_cut_points",
    "cut_model",
    "default_cache_dir",
    "example_inputs",
    "generate",
    "list_models",
    "model_info",
    "model_path",
    "open_session",
    "pipeline_fn",
    "prepare_inputs",
    "reference_session",
    "run_native",
    "run_pipeline",
]
