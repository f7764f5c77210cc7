"""The fault book: every fault the injector has seen, its state, and who watches it.

Refused faults are kept beside the others so that a refusal is as visible as an
injection. Children of multiple_failures and cascade live inside their parent;
a watcher sees the top-level fault, children included, whenever any of it changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator, Iterable

from google.protobuf.timestamp_pb2 import Timestamp
from webshard.fault_injector.v1 import fault_injector_pb2 as pb

from services.fault_injector.actions import Action
from services.fault_injector.spec import Plan

State = pb.FaultState

TERMINAL = frozenset(
    {
        State.FAULT_STATE_REVERTED,
        State.FAULT_STATE_FAILED,
        State.FAULT_STATE_REFUSED,
        State.FAULT_STATE_DRY_RUN,
    }
)
"""States a fault never leaves."""

MAX_KEPT = 10_000
"""Faults kept; beyond it the oldest ended ones are forgotten."""

WATCH_BUFFER = 1_000
"""Changes a watcher may fall behind by before it is dropped (and must watch again)."""


def timestamp(seconds: float) -> Timestamp:
    """A Timestamp from seconds since the epoch."""
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


@dataclasses.dataclass(eq=False)
class FaultRecord:
    """One fault: its contract message, its plan, and what was done for it."""

    fault: pb.Fault
    """Kept up to date; ``children`` is filled in only by ``snapshot``."""
    plan: Plan | None = None
    parent: FaultRecord | None = None
    children: list[FaultRecord] = dataclasses.field(default_factory=list)
    applied: list[Action] = dataclasses.field(default_factory=list)
    """Actions that took effect, in order; revertible ones are undone at the end."""
    ended: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    """Set once the fault reached a state it never leaves."""
    reverting: bool = False
    """True once a revert has begun; a second revert waits for the first."""
    revert_reason: str = ""
    """Why it is being reverted (its duration ended, RevertFault, RevertAll, ...)."""
    timer: asyncio.Task[None] | None = None
    """The automatic revert, while pending."""
    schedule: asyncio.Task[None] | None = None
    """A cascade's later children, while some are still to come."""
    error: Exception | None = None
    """Why the fault was refused or failed before anything was injected."""

    @property
    def fault_id(self) -> str:
        """The fault's id."""
        return self.fault.fault_id

    @property
    def state(self) -> int:
        """Its FaultState."""
        return self.fault.state

    @property
    def root(self) -> FaultRecord:
        """The top-level fault this one belongs to."""
        record = self
        while record.parent is not None:
            record = record.parent
        return record

    def walk(self) -> Iterable[FaultRecord]:
        """This fault and all its descendants, parents first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def snapshot(self) -> pb.Fault:
        """The contract's view, with the children's current views inside."""
        fault = pb.Fault()
        fault.CopyFrom(self.fault)
        del fault.children[:]
        fault.children.extend(child.snapshot() for child in self.children)
        return fault


class FaultBook:
    """Faults by id, oldest first, and the watchers of their changes."""

    def __init__(self) -> None:
        self._faults: dict[str, FaultRecord] = {}
        self._index: dict[str, FaultRecord] = {}
        self._watchers: set[asyncio.Queue[pb.Fault | None]] = set()
        self._serial = itertools.count(1)

    def new_id(self) -> str:
        """A fresh fault id: short, unique, and ordered within this injector's life."""
        return f"f-{next(self._serial):04d}-{uuid.uuid4().hex[:8]}"

    def add(self, record: FaultRecord) -> None:
        """Keep a top-level fault (and index its children)."""
        self._faults[record.fault_id] = record
        self.index(record)
        self._forget_oldest()

    def index(self, record: FaultRecord) -> None:
        """Make a fault and its children findable by id."""
        for each in record.walk():
            self._index[each.fault_id] = each

    def get(self, fault_id: str) -> FaultRecord | None:
        """A fault (top-level or child) by id."""
        return self._index.get(fault_id)

    def faults(self, states: Iterable[int] = ()) -> list[FaultRecord]:
        """Top-level faults oldest first, only those in ``states`` when any are given."""
        wanted = set(states)
        return [r for r in self._faults.values() if not wanted or r.state in wanted]

    def publish(self, record: FaultRecord) -> None:
        """Tell every watcher the fault (as its top-level fault) changed."""
        snapshot = record.root.snapshot()
        for queue in list(self._watchers):
            if queue.qsize() >= WATCH_BUFFER:
                # A watcher that stopped reading is dropped rather than left to grow.
                self._watchers.discard(queue)
                queue.put_nowait(None)
                continue
            queue.put_nowait(snapshot)

    async def watch(self, *, include_existing: bool) -> AsyncIterator[pb.Fault]:
        """Every change from now on; first every known fault when ``include_existing``.

        Ends when the watcher falls too far behind; the caller then watches again.
        """
        queue: asyncio.Queue[pb.Fault | None] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            if include_existing:
                for record in list(self._faults.values()):
                    yield record.snapshot()
            while (fault := await queue.get()) is not None:
                yield fault
        finally:
            self._watchers.discard(queue)

    @property
    def watchers(self) -> int:
        """How many watches are open."""
        return len(self._watchers)

    def _forget_oldest(self) -> None:
        if len(self._faults) <= MAX_KEPT:
            return
        for fault_id, record in list(self._faults.items()):
            if len(self._faults) <= MAX_KEPT:
                return
            if record.state in TERMINAL:
                del self._faults[fault_id]
                for each in record.walk():
                    self._index.pop(each.fault_id, None)
