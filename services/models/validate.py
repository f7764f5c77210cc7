"""Checking a request's feeds against a model's contract before any shard runs.

A request the model cannot take (a mask whose shape disagrees with its ids, more
tokens than the model has positions, a token id past the vocabulary, NaN) is the
sender's error: it is refused here, at once, and never reaches a browser, where it
would look like the browser failing. Plain numpy; no gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.models.spec import ModelInfo

MAX_TEXTS = 1024
"""Texts in one request."""
MAX_TEXT_CHARS = 100_000
"""Characters in one text: the tokenizers keep at most a few hundred tokens of it, and a
longer text only costs the coordinator time."""


class InputError(ValueError):
    """Feeds the model cannot take; the message says what to change."""


class InputTooLarge(InputError):
    """Feeds whose tensors (or the activations they cause) exceed what a message carries."""


def check_texts(texts: Sequence[str]) -> None:
    """Refuse text batches that are empty-but-present or larger than any model takes."""
    if len(texts) > MAX_TEXTS:
        raise InputTooLarge(f"{len(texts)} texts in one request; at most {MAX_TEXTS}")
    for i, text in enumerate(texts):
        if len(text) > MAX_TEXT_CHARS:
            raise InputTooLarge(
                f"texts[{i}] is {len(text):,} characters long; at most {MAX_TEXT_CHARS:,}"
            )


def check_feeds(
    info: ModelInfo, feeds: Mapping[str, NDArray[Any]], *, max_message_bytes: int
) -> None:
    """Raise InputError unless ``feeds`` are what ``info`` takes.

    Checks names, element types, ranks, fixed sizes, that every symbolic dimension
    has one size across the inputs (and at least 1, at most the model's limit),
    integer values in range, floats finite, and that no tensor crossing a shard
    boundary outgrows ``max_message_bytes`` (InputTooLarge).
    """
    expected = [spec.name for spec in info.inputs]
    missing = [name for name in expected if name not in feeds]
    unknown = sorted(set(feeds) - set(expected))
    if missing or unknown:
        raise InputError(
            f"{info.name} takes inputs {', '.join(expected)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(_short(u) for u in unknown)}" if unknown else "")
        )
    dims: dict[str, tuple[int, str]] = {}  # symbolic dim -> (size, the input that set it)
    for spec in info.inputs:
        array = feeds[spec.name]
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(f"{spec.name} must be {spec.dtype}, not {array.dtype}")
        if array.ndim != len(spec.shape):
            raise InputError(
                f"{spec.name} must have {len(spec.shape)} dimensions "
                f"{_shape(spec.shape)}, got shape {list(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise InputError(
                        f"{spec.name} dimension {axis} must be {want} "
                        f"{_shape(spec.shape)}, got shape {list(array.shape)}"
                    )
                continue
            if got < 1:
                raise InputError(f"{spec.name} has an empty dimension {want!r}: nothing to run")
            limit = info.limits.max_dims.get(want)
            if limit is not None and got > limit:
                raise InputError(
                    f"{spec.name} has {want} = {got}; {info.name} takes at most {limit}"
                )
            seen = dims.setdefault(want, (got, spec.name))
            if seen[0] != got:
                raise InputError(
                    f"{spec.name} has shape {list(array.shape)} but {seen[1]} gives "
                    f"{want} = {seen[0]}: they must agree"
                )
        _check_values(spec.name, array, info.limits.value_ranges.get(spec.name))
    sizes = {name: size for name, (size, _) in dims.items()}
    total = sum(feeds[name].nbytes for name in expected)
    widest = max(total, info.limits.activation_bytes(sizes))
    if widest > max_message_bytes:
        raise InputTooLarge(
            f"this request needs messages of {widest / 2**20:.1f} MiB between shards; "
            f"at most {max_message_bytes / 2**20:.0f} MiB: send fewer or shorter inputs"
        )


def _check_values(name: str, array: NDArray[Any], bounds: tuple[int, int] | None) -> None:
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InputError(f"{name} holds NaN or infinite values")
        return
    if bounds is None or array.size == 0:
        return
    low, high = bounds
    smallest, largest = int(array.min()), int(array.max())
    if smallest < low or largest >= high:
        bad = smallest if smallest < low else largest
        raise InputError(f"{name} values must be in [{low}, {high}); got {bad}")


def _shape(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _short(text: str, limit: int = 64) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text):,} characters)"
