"""Checking ingested events and turning them into column batches for the store.

Events arrive as protobuf messages; DuckDB takes a batch fastest as one
dictionary of NumPy columns per table (one vectorised INSERT instead of a row at
a time), so ``EventBuffer`` collects each table's columns as Python lists and
``EventBuffer.take`` hands them over as arrays.

Conventions of the stored columns: times are UTC microseconds (NULL when the
event left them unset), durations are milliseconds, enum values are their short
lowercase names ("restart", "webgpu") as the SDK spells them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from google.protobuf.descriptor import EnumDescriptor
from webshard.common.v1 import common_pb2
from webshard.metrics.v1 import metrics_pb2 as pb

NULL_TIME = int(np.iinfo(np.int64).min)
"""The int64 that NumPy reads as NaT, which DuckDB stores as NULL."""

_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z, the smallest Timestamp protobuf allows
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the largest

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "faults": (
        "fault_id",
        "kind",
        "intensity",
        "state",
        "targets",
        "injected_at",
        "reverted_at",
        "detail",
        "run_id",
    ),
    "recoveries": (
        "recovery_id",
        "fault_id",
        "scenario",
        "strategy",
        "model",
        "execution_provider",
        "succeeded",
        "started_at",
        "duration_ms",
        "trace_id",
        "run_id",
        "breakers_enabled",
        "redundancy_restored_ms",
        "engine",
    ),
    "recovery_phases": (
        "recovery_id",
        "run_id",
        "started_at",
        "position",
        "name",
        "level",
        "duration_ms",
        "ok",
    ),
    "requests": (
        "request_id",
        "model",
        "started_at",
        "latency_ms",
        "ok",
        "correct",
        "checked",
        "recovered",
        "run_id",
        "execution_provider",
        "engines",
    ),
    "breaker_transitions": ("target_id", "from_state", "to_state", "changed_at", "reason"),
    "agent_samples": ("agent_id", "sampled_at", "browsers", "memory_used_bytes", "in_flight"),
    "spans": (
        "trace_id",
        "span_id",
        "parent_span_id",
        "name",
        "service",
        "started_at",
        "duration_ms",
        "attributes",
    ),
    "delivery_losses": ("service", "dropped", "first_dropped_at", "last_dropped_at", "reason"),
}
"""Every table's columns in insertion order (the store adds ``ingested_at``)."""

TIME_COLUMNS = frozenset(
    {
        "injected_at",
        "reverted_at",
        "started_at",
        "changed_at",
        "sampled_at",
        "first_dropped_at",
        "last_dropped_at",
    }
)
FLOAT_COLUMNS = frozenset({"duration_ms", "latency_ms"})
BOOL_COLUMNS = frozenset({"succeeded", "breakers_enabled", "ok", "correct", "checked", "recovered"})
INT_COLUMNS = frozenset({"position", "browsers", "memory_used_bytes", "in_flight", "dropped"})


class InvalidEvent(ValueError):
    """An event cannot be stored; the message says which one and why."""


def _short_names(descriptor: EnumDescriptor) -> dict[int, str]:
    """Enum number -> lowercase name without its prefix: RECOVERY_STRATEGY_SIMPLE -> "simple"."""
    names = [value.name for value in descriptor.values]
    prefix = names[0].removesuffix("UNSPECIFIED")
    return {value.number: value.name.removeprefix(prefix).lower() for value in descriptor.values}


_FAULT_KINDS = _short_names(common_pb2.FaultKind.DESCRIPTOR)
_INTENSITIES = _short_names(common_pb2.Intensity.DESCRIPTOR)
_STRATEGIES = _short_names(common_pb2.RecoveryStrategy.DESCRIPTOR)
_PROVIDERS = _short_names(common_pb2.ExecutionProvider.DESCRIPTOR)
_BREAKER_STATES = _short_names(common_pb2.BreakerState.DESCRIPTOR)


def _enum(names: dict[int, str], number: int) -> str:
    # A newer client may send a value this build does not know; keep its number.
    return names.get(number) or str(number)


def time_us(stamp: Any, what: str) -> int:
    """A Timestamp as UTC microseconds; raises InvalidEvent when it is out of range."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        raise InvalidEvent(f"{what} is not a valid timestamp (seconds={seconds}, nanos={nanos})")
    return int(seconds * 1_000_000 + nanos // 1000)


# The checks below take where (the event's index) and what (the field) apart and
# format a message only on failure: ingestion runs them for every event.


def _time(message: Any, field: str, where: int, what: str) -> int:
    if not message.HasField(field):
        return NULL_TIME
    stamp = getattr(message, field)
    seconds, nanos = stamp.seconds, stamp.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        time_us(stamp, f"event {where}: {what}")  # raises, with the message
    return int(seconds * 1_000_000 + nanos // 1000)


def _duration_ms(duration: Any, where: int, what: str) -> float:
    seconds, nanos = duration.seconds, duration.nanos
    if seconds < 0 or nanos < 0:
        raise InvalidEvent(f"event {where}: {what} is negative ({seconds + nanos / 1e9} s)")
    if nanos >= 1_000_000_000:
        raise InvalidEvent(f"event {where}: {what} has nanos={nanos}, over a second")
    return float(seconds * 1000 + nanos / 1e6)


def _required(value: str, where: int, what: str) -> str:
    if not value:
        raise InvalidEvent(f"event {where}: {what} is empty")
    return value


def _non_negative(value: int, where: int, what: str) -> int:
    if value < 0:
        raise InvalidEvent(f"event {where}: {what} is negative ({value})")
    return value


Rows = dict[str, list[tuple[Any, ...]]]


def _rows(event: pb.Event, where: int) -> Iterable[tuple[str, tuple[Any, ...]]]:
    """The (table, row) pairs one event becomes; raises InvalidEvent."""
    kind = event.WhichOneof("event")
    if kind == "recovery":
        r = event.recovery
        recovery_id = _required(r.recovery_id, where, "recovery_id")
        started_at = _time(r, "started_at", where, "recovery started_at")
        yield (
            "recoveries",
            (
                recovery_id,
                r.fault_id,
                r.scenario,
                _enum(_STRATEGIES, r.strategy),
                r.model,
                _enum(_PROVIDERS, r.execution_provider),
                r.succeeded,
                started_at,
                _duration_ms(r.duration, where, "recovery duration"),
                r.trace_id,
                r.run_id,
                r.breakers_enabled,
                _duration_ms(r.redundancy_restored, where, "redundancy restored")
                if r.HasField("redundancy_restored")
                else None,
                r.engine,
            ),
        )
        for position, phase in enumerate(r.phases):
            yield (
                "recovery_phases",
                (
                    recovery_id,
                    r.run_id,
                    started_at,
                    position,
                    phase.name,
                    phase.level,
                    _duration_ms(phase.duration, where, "a phase's duration"),
                    phase.ok,
                ),
            )
    elif kind == "request":
        q = event.request
        yield (
            "requests",
            (
                _required(q.request_id, where, "request_id"),
                q.model,
                _time(q, "started_at", where, "request started_at"),
                _duration_ms(q.latency, where, "request latency"),
                q.ok,
                q.correct,
                q.checked,
                q.recovered,
                q.run_id,
                _enum(_PROVIDERS, q.execution_provider),
                q.engines,
            ),
        )
    elif kind == "fault":
        f = event.fault
        yield (
            "faults",
            (
                _required(f.fault_id, where, "fault_id"),
                _enum(_FAULT_KINDS, f.kind),
                _enum(_INTENSITIES, f.intensity),
                f.state,
                list(f.targets),
                _time(f, "injected_at", where, "fault injected_at"),
                _time(f, "reverted_at", where, "fault reverted_at"),
                f.detail,
                f.run_id,
            ),
        )
    elif kind == "breaker_transition":
        b = event.breaker_transition
        yield (
            "breaker_transitions",
            (
                _required(b.target_id, where, "breaker target_id"),
                _enum(_BREAKER_STATES, b.from_state),
                _enum(_BREAKER_STATES, b.to_state),
                _time(b, "at", where, "breaker transition at"),
                b.reason,
            ),
        )
    elif kind == "agent_sample":
        a = event.agent_sample
        yield (
            "agent_samples",
            (
                _required(a.agent_id, where, "agent_id"),
                _time(a, "at", where, "agent sample at"),
                _non_negative(a.browsers, where, "agent sample browsers"),
                _non_negative(a.memory_used_bytes, where, "agent sample memory_used_bytes"),
                _non_negative(a.in_flight, where, "agent sample in_flight"),
            ),
        )
    elif kind == "span":
        s = event.span
        yield (
            "spans",
            (
                _required(s.trace_id, where, "span trace_id"),
                _required(s.span_id, where, "span span_id"),
                s.parent_span_id,
                s.name,
                s.service,
                _time(s, "start", where, "span start"),
                _duration_ms(s.duration, where, "span duration"),
                json.dumps(dict(s.attributes), sort_keys=True),
            ),
        )
    elif kind == "delivery_loss":
        d = event.delivery_loss
        yield (
            "delivery_losses",
            (
                _required(d.service, where, "delivery loss service"),
                _non_negative(d.dropped, where, "delivery loss dropped"),
                _time(d, "first_dropped_at", where, "delivery loss first_dropped_at"),
                _time(d, "last_dropped_at", where, "delivery loss last_dropped_at"),
                d.reason,
            ),
        )
    else:
        raise InvalidEvent(f"event {where} has no event set (one of {', '.join(_EVENT_KINDS)})")


_EVENT_KINDS = tuple(field.name for field in pb.Event.DESCRIPTOR.oneofs_by_name["event"].fields)


class EventBuffer:
    """Events checked and waiting to be written, as rows per table.

    ``add`` takes a whole request's events or none of them, so a malformed
    request leaves the buffer as it was.
    """

    def __init__(self) -> None:
        self._rows: Rows = {table: [] for table in TABLE_COLUMNS}
        self.events = 0
        """Events held (a recovery with phases counts once)."""

    def add(self, events: Sequence[pb.Event], *, first_index: int = 0) -> None:
        """Check and keep ``events``; raises InvalidEvent naming the first bad one."""
        staged: list[tuple[str, tuple[Any, ...]]] = []
        for offset, event in enumerate(events):
            staged.extend(_rows(event, first_index + offset))
        for table, row in staged:
            self._rows[table].append(row)
        self.events += len(events)

    def take(self) -> tuple[int, dict[str, dict[str, np.ndarray[Any, Any]]]]:
        """Empty the buffer: (events, {table: {column: array}}) for non-empty tables."""
        batches = {table: columns(table, rows) for table, rows in self._rows.items() if rows}
        events = self.events
        self._rows = {table: [] for table in TABLE_COLUMNS}
        self.events = 0
        return events, batches


def columns(table: str, rows: list[tuple[Any, ...]]) -> dict[str, np.ndarray[Any, Any]]:
    """Rows of ``table`` as one typed NumPy array per column."""
    names = TABLE_COLUMNS[table]
    transposed = list(zip(*rows, strict=True))
    batch: dict[str, np.ndarray[Any, Any]] = {}
    for name, values in zip(names, transposed, strict=True):
        if name in TIME_COLUMNS:
            batch[name] = np.array(values, dtype=np.int64).view("datetime64[us]")
        elif name in FLOAT_COLUMNS:
            batch[name] = np.array(values, dtype=np.float64)
        elif name in BOOL_COLUMNS:
            batch[name] = np.array(values, dtype=np.bool_)
        elif name in INT_COLUMNS:
            batch[name] = np.array(values, dtype=np.int64)
        elif name != "targets":
            batch[name] = np.array(values, dtype=object)
        else:
            # Filled one by one: np.array would turn equal-length lists into a 2-D array.
            array = np.empty(len(values), dtype=object)
            for i, value in enumerate(values):
                array[i] = value
            batch[name] = array
    return batch
