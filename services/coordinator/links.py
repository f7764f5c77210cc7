"""The coordinator's connections to agents: shard loads and multiplexed activation streams.

One ``AgentLink`` per agent holds one RunShard stream that every request's hop
to that agent shares; replies are matched to requests by sequence number. The
number of activations in flight on a link is bounded, which is the back-pressure
that keeps a slow agent from queueing unbounded work. A broken stream fails every
pending hop at once (so the pipeline can replay them elsewhere) and is reopened
by the next hop.

Trace context: the unary and client-streaming calls carry the caller's span in
their metadata (OpenTelemetry's client interceptors). The RunShard stream is shared
by every request, so it carries no trace itself: each activation's message carries
the ``traceparent`` of the span current when it was sent (the pipeline's hop span),
and the agent makes its ``run_shard`` span a child of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as agent_grpc
from webshard.common.v1 import common_pb2

from services.common.auth import bearer_metadata
from services.common.durations import duration
from services.common.tracing import client_interceptors, inject_traceparent

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Reconnect quickly to a restarted agent instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


_RunCall = grpc.aio.StreamStreamCall[agent_pb.RunShardRequest, agent_pb.RunShardResponse]


class HopError(Exception):
    """A hop to an agent failed; ``code`` is the gRPC status."""

    def __init__(self, agent_id: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"agent {agent_id}: {message}")
        self.agent_id = agent_id
        self.code = code
        self.message = message

    @property
    def retryable_elsewhere(self) -> bool:
        """True when another replica might succeed (the agent or its stream failed).

        A shard that rejects its input (INVALID_ARGUMENT) would reject it anywhere.
        """
        return self.code not in (grpc.StatusCode.INVALID_ARGUMENT,)


class AgentLink:
    """One agent: a channel, lazily a RunShard stream, and the hops waiting on it."""

    def __init__(
        self,
        agent_id: str,
        address: str,
        max_in_flight: int = 64,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        *,
        token: str = "",
    ) -> None:
        self.agent_id = agent_id
        self.address = address
        # The cluster token, on every call (the agent requires it of all but GetStatus).
        self._metadata = bearer_metadata(token)
        # ``interceptors`` (None: OpenTelemetry's) wrap the unary and client-streaming
        # calls; the default leaves the RunShard stream unwrapped (see the module's doc).
        if interceptors is None:
            interceptors = client_interceptors(stream_stream=False)
        self._channel = grpc.aio.insecure_channel(
            address, options=CHANNEL_OPTIONS, interceptors=interceptors or None
        )
        self._stub = agent_grpc.BrowserAgentServiceStub(self._channel)
        self._call: _RunCall | None = None
        self._reader: asyncio.Task[None] | None = None
        # sequence -> (the stream it was sent on, the hop waiting for its reply)
        self._pending: dict[int, tuple[_RunCall, asyncio.Future[agent_pb.RunShardResponse]]] = {}
        self._sequence = itertools.count(1)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()

    @property
    def stub(self) -> agent_grpc.BrowserAgentServiceStub:
        """The agent's stub, for unary calls."""
        return self._stub

    async def _stream(
        self,
    ) -> _RunCall:
        async with self._open_lock:
            if self._call is None or self._call.done():
                call = self._stub.RunShard(metadata=self._metadata)
                self._call = call
                self._reader = asyncio.create_task(self._read(call))
            return self._call

    async def _read(self, call: _RunCall) -> None:
        error = HopError(self.agent_id, grpc.StatusCode.UNAVAILABLE, "the RunShard stream ended")
        try:
            async for reply in call:
                _, future = self._pending.pop(reply.sequence, (call, None))
                if future is not None and not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = HopError(
                self.agent_id, exc.code(), f"the RunShard stream broke: {exc.details()}"
            )
        except asyncio.CancelledError:
            error = HopError(self.agent_id, grpc.StatusCode.CANCELLED, "the link was closed")
            raise
        finally:
            if self._call is call:
                self._call = None
            # Only hops sent on this stream wait on it; fail them all now.
            for sequence, (sent_on, future) in list(self._pending.items()):
                if sent_on is call:
                    del self._pending[sequence]
                    if not future.done():
                        future.set_exception(error)

    async def run(
        self, handle: str, request_id: str, inputs: Sequence[common_pb2.Tensor], timeout: float
    ) -> agent_pb.RunShardResponse:
        """Run one activation through the shard ``handle``; raise HopError on failure."""
        async with self._slots:
            call = await self._stream()
            sequence = next(self._sequence)
            future: asyncio.Future[agent_pb.RunShardResponse] = (
                asyncio.get_running_loop().create_future()
            )
            self._pending[sequence] = (call, future)
            try:
                async with self._write_lock:  # a stream takes one write at a time
                    await call.write(
                        agent_pb.RunShardRequest(
                            handle=handle,
                            request_id=request_id,
                            sequence=sequence,
                            inputs=inputs,
                            traceparent=inject_traceparent(),
                        )
                    )
                reply = await asyncio.wait_for(future, timeout)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                raise HopError(
                    self.agent_id, grpc.StatusCode.UNAVAILABLE, f"could not send: {exc}"
                ) from exc
            except TimeoutError:
                raise HopError(
                    self.agent_id,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no answer within {timeout:.3f} s",
                ) from None
            finally:
                self._pending.pop(sequence, None)
        if reply.error_code:
            raise HopError(self.agent_id, status_from_int(reply.error_code), reply.error_message)
        return reply

    async def load(
        self,
        spec: common_pb2.ShardSpec,
        path: Path,
        *,
        runtime: int,
        provider: int,
        browser_id: str,
        timeout: float,
    ) -> agent_pb.LoadShardResponse:
        """Load a shard on the agent: by hash when it has the bytes, else by upload."""
        header = agent_pb.LoadShardHeader(
            shard=spec,
            runtime=runtime,  # type: ignore[arg-type]
            execution_provider=provider,  # type: ignore[arg-type]
            browser_id=browser_id,
        )

        async def by_hash() -> AsyncIterator[agent_pb.LoadShardRequest]:
            by_hash_header = agent_pb.LoadShardHeader()
            by_hash_header.CopyFrom(header)
            by_hash_header.by_hash_only = True
            yield agent_pb.LoadShardRequest(header=by_hash_header)

        async def upload() -> AsyncIterator[agent_pb.LoadShardRequest]:
            yield agent_pb.LoadShardRequest(header=header)
            with path.open("rb") as shard:
                while chunk := await asyncio.to_thread(shard.read, CHUNK_BYTES):
                    yield agent_pb.LoadShardRequest(chunk=chunk)

        try:
            try:
                return await self._stub.LoadShard(
                    by_hash(), timeout=timeout, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or "store" not in (exc.details() or ""):
                    raise
            return await self._stub.LoadShard(upload(), timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise HopError(self.agent_id, exc.code(), exc.details() or "") from exc

    async def unload(self, handle: str, timeout: float) -> None:
        """Unload a shard (a handle already gone is no error); raise HopError when the
        agent could not."""
        try:
            await self._stub.UnloadShard(
                agent_pb.UnloadShardRequest(handle=handle),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise HopError(self.agent_id, exc.code(), exc.details() or "") from exc

    async def restart_browser(
        self, browser_id: str, timeout: float
    ) -> agent_pb.RestartBrowserResponse:
        """Have the agent replace a browser and reload its shards; raise HopError on failure."""
        try:
            return await self._stub.RestartBrowser(
                agent_pb.RestartBrowserRequest(browser_id=browser_id),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise HopError(self.agent_id, exc.code(), exc.details() or "") from exc

    async def reconnect(self, browser_id: str, wait_s: float) -> float:
        """Reopen the RunShard stream and wait for ``browser_id``'s page; the seconds waited."""
        async with self._open_lock:
            if self._call is not None:
                self._call.cancel()
                self._call = None
        if not browser_id:
            return 0.0
        try:
            reply = await self._stub.ReconnectBrowser(
                agent_pb.ReconnectBrowserRequest(browser_id=browser_id, timeout=duration(wait_s)),
                timeout=wait_s + 5,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise HopError(self.agent_id, exc.code(), exc.details() or "") from exc
        return reply.waited.ToNanoseconds() / 1e9

    async def close(self) -> None:
        """Close the stream and the channel."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._channel.close()


def status_from_int(value: int) -> grpc.StatusCode:
    """The status code with this number (UNKNOWN for a number gRPC does not define)."""
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)
