"""The replicated cluster state: Infer answers kept for retries, bounded the same way everywhere."""

from __future__ import annotations

import pytest

from services.coordinator import cluster_state
from services.coordinator.cluster_state import Answer, ClusterState, answers_command


def test_answers_are_kept_by_their_recorded_time_and_survive_a_snapshot() -> None:
    state = ClusterState()
    state.apply(answers_command({"a": Answer("aa", b"first", 1000.0)}))
    state.apply(answers_command({"b": Answer("bb", b"second", 1100.0)}))
    # A retried record of an id keeps the first answer.
    state.apply(answers_command({"a": Answer("cc", b"other", 1150.0)}))
    assert state.answers["a"] == Answer("aa", b"first", 1000.0)

    copy = ClusterState()
    copy.restore(state.snapshot())
    assert copy.answers == state.answers and copy.answer_bytes == state.answer_bytes

    # Expiry follows the recorded times, not a replica's clock: both drop "a" alike.
    late = answers_command({"c": Answer("dd", b"third", 1000.0 + cluster_state.ANSWERS_KEPT_S + 1)})
    state.apply(late)
    copy.apply(late)
    assert list(state.answers) == list(copy.answers) == ["b", "c"]


def test_answers_are_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_state, "ANSWER_BYTES_KEPT", 10)
    state = ClusterState()
    for i in range(5):
        state.apply(answers_command({f"r{i}": Answer("ff", b"1234", float(i))}))
    assert list(state.answers) == ["r3", "r4"] and state.answer_bytes == 8
