"""The shared server plumbing: Lifecycle.stream, which ends request streams on drain, and
the start of a server on a port another one holds."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.server import SERVER_OPTIONS, BasicApp, Lifecycle, serve
from services.common.settings import ServerSettings


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


async def test_a_second_service_on_a_taken_port_cannot_listen_and_exits_2(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gRPC sets SO_REUSEPORT by default: without turning it off, a second service binds
    the same port and the kernel shares connections between the two."""
    first = grpc.aio.server(options=SERVER_OPTIONS)
    port = first.add_insecure_port("127.0.0.1:0")
    await first.start()
    started = asyncio.Event()
    settings = ServerSettings(host="127.0.0.1", port=port)
    app = BasicApp(service_names=[], registrations=[])
    try:
        second = asyncio.ensure_future(
            serve(
                settings=settings,
                default_port=port,
                make_app=lambda lifecycle: app,
                started=lambda address: started.set(),
            )
        )
        serving = asyncio.ensure_future(started.wait())
        await asyncio.wait({second, serving}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():  # it listens on the taken port: stop it, then fail
            os.kill(os.getpid(), signal.SIGTERM)
            await second
            pytest.fail(f"a second server started on the taken port {port}")
        serving.cancel()
        assert second.result() == 2
        assert "cannot listen" in caplog.text
    finally:
        await first.stop(0)
