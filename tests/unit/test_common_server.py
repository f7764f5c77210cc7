"""The shared server plumbing: Lifecycle.stream, which ends request streams on drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.common.server import Lifecycle


async def test_a_stream_closed_by_its_consumer_leaves_no_read_behind() -> None:
    """A pending read of the request stream is cancelled with the stream, not left to
    finish later with an exception nobody retrieves."""
    ended = asyncio.Event()

    async def requests() -> AsyncIterator[int]:
        yield 1
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()
        yield 2  # pragma: no cover

    stream = Lifecycle().stream(requests(), context=None)  # type: ignore[arg-type]
    assert await anext(stream) == 1
    reading = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    await stream.aclose()
    await asyncio.wait_for(ended.wait(), 1)
