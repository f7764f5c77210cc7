"""Waiting on a change is an event: a Pulse wakes the waiters of the moment it fires."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from webshard.common.v1 import common_pb2

from services.common.pulse import Pulse
from services.coordinator.registry import AgentRegistry


async def test_a_firing_wakes_every_current_waiter() -> None:
    pulse = Pulse()
    waiters = [asyncio.create_task(pulse.wait(60)) for _ in range(3)]
    await asyncio.sleep(0)  # let them start waiting
    pulse.fire()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)


async def test_a_waiter_that_comes_after_a_firing_waits_for_the_next() -> None:
    pulse = Pulse()
    pulse.fire()
    late = asyncio.create_task(pulse.wait(60))
    await asyncio.sleep(0)
    done, _ = await asyncio.wait([late], timeout=0.05)
    assert not done
    pulse.fire()
    await asyncio.wait_for(late, 5)


async def test_a_wait_ends_at_its_timeout_without_a_firing() -> None:
    await asyncio.wait_for(Pulse().wait(0.01), 5)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_registry_fires_on_every_change_placement_can_use() -> None:
    clock = Clock()
    registry = AgentRegistry(heartbeat_timeout_s=3.0, clock=clock)
    fired: list[str] = []

    async def expect(what: str, change: Callable[[], object]) -> None:
        waiter = asyncio.create_task(registry.changed.wait(60))
        await asyncio.sleep(0)
        change()
        await asyncio.wait_for(waiter, 5)
        fired.append(what)

    browser = common_pb2.BrowserInfo(browser_id="b-0", state=common_pb2.BROWSER_STATE_READY)
    await expect("learnt", lambda: registry.upsert("agent-0", "127.0.0.1:1", 0, []))
    await expect("attached", lambda: registry.attach("agent-0"))
    await expect("browsers", lambda: registry.update_browsers("agent-0", [browser]))
    clock.now += 10  # silent past its heartbeat timeout
    await expect(
        "heard again",
        lambda: registry.heartbeat("agent-0", in_flight=0, memory_used_bytes=0),
    )
    await expect("detached", lambda: registry.disconnected("agent-0", 1))
    assert fired == ["learnt", "attached", "browsers", "heard again", "detached"]
