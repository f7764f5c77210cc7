"""A request's feeds are checked against the model's contract before any shard runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from services.models import example_inputs, model_info, prepare_inputs
from services.models.validate import (
    MAX_TEXT_CHARS,
    InputError,
    InputTooLarge,
    check_feeds,
    check_texts,
)

LIMIT = 64 * 2**20


def minilm(**changes: NDArray[Any]) -> dict[str, NDArray[Any]]:
    return {**prepare_inputs("minilm-l6", ["The cat sits on the mat."]), **changes}


@pytest.mark.parametrize("model", ["minilm-l6", "vit-tiny", "clip-tiny", "decoder-tiny"])
def test_the_models_own_example_inputs_pass(model: str) -> None:
    check_feeds(model_info(model), example_inputs(model, batch=2), max_message_bytes=LIMIT)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        (minilm(attention_mask=np.ones((1, 7), np.int64)), "must agree"),
        ({k: np.ones((1, 600), np.int64) for k in minilm()}, "at most 512"),
        (minilm(input_ids=np.full((1, 9), 30522, np.int64)), r"input_ids values .* 30522"),
        (minilm(token_type_ids=np.full((1, 9), -1, np.int64)), "token_type_ids values"),
        (minilm(attention_mask=np.ones((1, 9), np.float32)), "must be int64"),
        (minilm(input_ids=np.ones((9,), np.int64)), "2 dimensions"),
        ({k: np.ones((0, 0), np.int64) for k in minilm()}, "empty dimension"),
        ({"input_ids": np.ones((1, 4), np.int64)}, "missing attention_mask"),
        ({**minilm(), "x" * 5000: np.ones(1)}, r"unknown 'xxx.*5,000 characters"),
    ],
)
def test_feeds_the_model_cannot_take_are_refused(feeds: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        check_feeds(model_info("minilm-l6"), feeds, max_message_bytes=LIMIT)


def test_non_finite_values_and_wrong_fixed_sizes_are_refused() -> None:
    vit = example_inputs("vit-tiny")
    pixels = vit["pixel_values"].copy()
    pixels[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        check_feeds(model_info("vit-tiny"), {"pixel_values": pixels}, max_message_bytes=LIMIT)
    with pytest.raises(InputError, match="dimension 2 must be"):
        check_feeds(
            model_info("vit-tiny"),
            {"pixel_values": vit["pixel_values"][:, :, :5]},
            max_message_bytes=LIMIT,
        )


def test_activations_larger_than_a_message_are_refused_as_too_large() -> None:
    # 360 texts of 128 tokens: minilm's hidden states are 360 x 128 x 384 float32, ~70 MB.
    feeds = {k: np.ones((360, 128), np.int64) for k in minilm()}
    with pytest.raises(InputTooLarge, match=r"67\.5 MiB"):
        check_feeds(model_info("minilm-l6"), feeds, max_message_bytes=LIMIT)
    check_feeds(model_info("minilm-l6"), feeds, max_message_bytes=128 * 2**20)


def test_texts_are_bounded_before_tokenizing() -> None:
    check_texts(["short"] * 10)
    with pytest.raises(InputTooLarge, match="characters"):
        check_texts(["x" * (MAX_TEXT_CHARS + 1)])
    with pytest.raises(InputTooLarge, match="texts in one request"):
        check_texts(["x"] * 5000)
