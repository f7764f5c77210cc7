"""An idle connection outlives client keepalive pings: the servers' ping policy lets
a client ping as often as every 5 s without being told GOAWAY too_many_pings.

(gRPC's default policy allows an idle client one ping in 5 minutes and closes the
connection on the third ping too soon.)
"""

from __future__ import annotations

import asyncio
import time

import grpc

from services.common.server import SERVER_OPTIONS


async def test_an_idle_connection_survives_pings_every_five_seconds() -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.keepalive_time_ms", 5_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        ) as channel:
            assert await channel.unary_unary("/test.Echo/Echo")(b"hi") == b"hi"
            # No calls for four pings; a GOAWAY would take the channel out of READY.
            ready = grpc.ChannelConnectivity.READY
            until = time.monotonic() + 22
            while (left := until - time.monotonic()) > 0:
                assert channel.get_state() == ready
                try:
                    await asyncio.wait_for(channel.wait_for_state_change(ready), left)
                except TimeoutError:
                    break
            assert channel.get_state() == ready
    finally:
        await server.stop(None)
