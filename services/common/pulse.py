"""A notification that wakes everyone waiting when something changes: waiting on a
condition is an event, never a sleep loop."""

from __future__ import annotations

import asyncio
import contextlib


class Pulse:
    """Wakes everyone waiting at the moment it fires.

    A waiter checks its condition, then waits; there is no await between the two,
    so no firing is missed. Later waiters wait for the next firing.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        """Wake the current waiters."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return at the next firing, or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), max(0.0, timeout))
