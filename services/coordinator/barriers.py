"""Barriers on models: new requests wait while recovery moves a group of shards.

A barrier is held on the replica that took it (the leader): requests already
running go on, requests that arrive wait until it lifts, then run from the
start of their chain with the shards in their new places. A barrier lifts by
itself after its ``max_pause`` (a recovery that dies cannot hold a model
forever), and a request never waits past its own deadline. Not replicated: a
leader change lifts every barrier.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

MAX_PAUSE_S = 60.0
"""The longest a barrier may hold a model: a recovery moves a group of shards in
seconds, and a longer pause would stall the model's callers past any sane deadline
(an event loop timer of 10^15 s would also hold the model for good)."""


class BarrierError(Exception):
    """A barrier request that cannot be granted."""


@dataclass
class _Barrier:
    barrier_id: str
    taken_at: float
    lifted: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    expiry: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class Lifted:
    """What a barrier held, once lifted."""

    paused_s: float
    held_requests: int


class ModelBarriers:
    """At most one barrier per model."""

    def __init__(self) -> None:
        self._barriers: dict[str, _Barrier] = {}

    def pause(self, model: str, max_pause_s: float) -> str:
        """Hold new requests for ``model``; return the barrier's id.

        A model already held keeps its barrier; the caller gets that barrier's id and
        its expiry moves to ``max_pause_s`` from now. BarrierError unless
        ``0 < max_pause_s <= MAX_PAUSE_S``.
        """
        # "not <" also refuses NaN, which compares false with everything.
        if not 0 < max_pause_s <= MAX_PAUSE_S:
            raise BarrierError(
                f"max pause {max_pause_s:g} s is out of range: it must be positive "
                f"and at most {MAX_PAUSE_S:g} s"
            )
        barrier = self._barriers.get(model)
        if barrier is None:
            barrier = _Barrier(uuid.uuid4().hex, time.monotonic())
            self._barriers[model] = barrier
        if barrier.expiry is not None:
            barrier.expiry.cancel()
        barrier.expiry = asyncio.get_running_loop().call_later(
            max_pause_s, self.resume, model, barrier.barrier_id
        )
        return barrier.barrier_id

    def resume(self, model: str, barrier_id: str = "") -> Lifted | None:
        """Lift the barrier on ``model`` (only ``barrier_id`` when given); None when none held."""
        barrier = self._barriers.get(model)
        if barrier is None or (barrier_id and barrier.barrier_id != barrier_id):
            return None
        del self._barriers[model]
        if barrier.expiry is not None:
            barrier.expiry.cancel()
        barrier.lifted.set()
        return Lifted(time.monotonic() - barrier.taken_at, barrier.held)

    def held(self, model: str) -> bool:
        """True while a barrier holds ``model``."""
        return model in self._barriers

    async def wait(self, model: str, deadline: float) -> None:
        """Return once no barrier holds ``model``; TimeoutError past ``deadline`` (monotonic)."""
        while (barrier := self._barriers.get(model)) is not None:
            barrier.held += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{model} was held behind a recovery barrier past the deadline")
            async with asyncio.timeout(remaining):
                await barrier.lifted.wait()
