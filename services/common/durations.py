"""Seconds as a ``google.protobuf.Duration``, the one conversion every service needs."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration


def duration(seconds: float) -> Duration:
    """A Duration of ``seconds``, to the nearest nanosecond."""
    value = Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value
