"""Feeds for the catalogue's models: deterministic examples and tokenized text."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer

from services.models import bert, clip, decoder, vit, whisper
from services.models.catalogue import model_info

TEXT_MODELS = ("minilm-l6", "bert-base", "clip-tiny", "decoder-tiny")
# all-MiniLM-L6-v2 was trained on at most 128 tokens, and its tokenizer.json says so;
# sentence-transformers' own config allows 256, which only matters for longer texts.
MINILM_MAX_TOKENS = 128
CLS_ID = 101
SEP_ID = 102


@functools.lru_cache(maxsize=4)
def minilm_tokenizer(max_length: int = MINILM_MAX_TOKENS) -> Tokenizer:
    """The package's WordPiece tokenizer: truncation to ``max_length``, padding to the longest."""
    tokenizer = Tokenizer.from_file(str(bert.minilm_model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    # tokenizer.json pads every row to 128; the longest row of the batch is enough.
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def prepare_inputs(
    name: str,
    texts: Sequence[str],
    *,
    pixel_values: NDArray[np.float32] | None = None,
    max_length: int = MINILM_MAX_TOKENS,
) -> dict[str, NDArray[Any]]:
    """Tokenize ``texts`` into the feeds of text model ``name``.

    - ``minilm-l6``, ``bert-base``: the package's WordPiece tokenizer (truncated to
      ``max_length`` tokens, padded to the longest text): input_ids, attention_mask,
      token_type_ids.
    - ``clip-tiny``: byte-level ids (``clip.tokenize``); ``pixel_values`` is added to the
      feeds when given.
    - ``decoder-tiny``: byte-level prompt ids (``decoder.tokenize``), for ``generate``.
    """
    model_info(name)
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if name in ("minilm-l6", "bert-base"):
        encodings = minilm_tokenizer(max_length).encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
    if name == "clip-tiny":
        feeds: dict[str, NDArray[Any]] = {"input_ids": clip.tokenize(texts)}
        if pixel_values is not None:
            feeds["pixel_values"] = np.asarray(pixel_values, dtype=np.float32)
        return feeds
    if name == "decoder-tiny":
        return {"input_ids": decoder.tokenize(texts)}
    raise ValueError(f"{name!r} takes no text; text models: {', '.join(TEXT_MODELS)}")


def example_inputs(
    name: str, *, batch: int = 1, seq_len: int = 32, seed: int = 0
) -> dict[str, NDArray[Any]]:
    """Deterministic random feeds for ``name``.

    ``seq_len`` is the token count for text models (BERT rows after the first are
    progressively shorter, with padding, to exercise the mask; clip-tiny's is capped at
    its context of 32); image and audio models have fixed input sizes and ignore it.
    """
    info = model_info(name)
    if batch < 1 or seq_len < 2:
        raise ValueError(f"batch must be >= 1 and seq_len >= 2, got {batch} and {seq_len}")
    rng = np.random.default_rng(seed)
    if info.family == "bert":
        limit = bert.MINILM_L6.max_positions
        _check_len(name, seq_len, limit)
        ids = rng.integers(1000, bert.MINILM_L6.vocab, size=(batch, seq_len), dtype=np.int64)
        mask = np.zeros((batch, seq_len), dtype=np.int64)
        for row in range(batch):
            length = max(2, seq_len - 3 * row)
            ids[row, 0], ids[row, length - 1] = CLS_ID, SEP_ID
            ids[row, length:] = 0
            mask[row, :length] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids),
        }
    if name == "vit-tiny":
        return {"pixel_values": _pixels(rng, batch, vit.CONFIG)}
    if name == "whisper-tiny-enc":
        c = whisper.CONFIG
        shape = (batch, c.mels, c.frames)
        return {"input_features": rng.standard_normal(shape).astype(np.float32)}
    if name == "clip-tiny":
        context = min(seq_len, clip.CONFIG.text.context)
        ids = np.full((batch, context), clip.PAD_ID, dtype=np.int64)
        for row in range(batch):
            length = max(2, context - 3 * row)
            ids[row, 0], ids[row, length - 1] = clip.SOT_ID, clip.EOT_ID
            ids[row, 1 : length - 1] = rng.integers(1, 257, size=length - 2)
        return {"pixel_values": _pixels(rng, batch, clip.CONFIG.vision), "input_ids": ids}
    if name == "decoder-tiny":
        _check_len(name, seq_len, decoder.CONFIG.max_positions)
        ids = rng.integers(1, decoder.CONFIG.vocab, size=(batch, seq_len), dtype=np.int64)
        ids[:, 0] = decoder.BOS_ID
        return {"input_ids": ids}
    raise AssertionError(f"no example inputs for {name!r}")


def _pixels(rng: np.random.Generator, batch: int, config: vit.VitConfig) -> NDArray[np.float32]:
    shape = (batch, config.channels, config.image, config.image)
    return rng.standard_normal(shape).astype(np.float32)


def _check_len(name: str, seq_len: int, limit: int) -> None:
    if seq_len > limit:
        raise ValueError(f"{name} takes at most {limit} tokens, got seq_len={seq_len}")
