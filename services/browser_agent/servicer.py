"""The browser agent's gRPC servicer: shard load, run and unload, status, fault hooks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from webshard.browser_agent.v1 import browser_agent_pb2 as pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as pb_grpc
from webshard.tensors import decode_tensor, encode_tensor

from services.browser_agent.agent import ShardHost
from services.browser_agent.hooks import FaultHooks, HookError, HookRequest
from services.browser_agent.runtime import ShardRuntimeError
from services.browser_agent.session import CoordinatorSession
from services.browser_agent.settings import AgentSettings
from services.browser_agent.store import ShardStore, StoreError, check_sha256
from services.common.auth import fault_token, methods, require_token
from services.common.durations import duration
from services.common.server import Lifecycle
from services.common.tracing import extract_context, inject_traceparent

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["BrowserAgentService"].full_name
GUARDED_METHODS = methods(
    SERVICE,
    "LoadShard",
    # Activations are answered with outputs that feed the next shard: a forged one is a write.
    "RunShard",
    "UnloadShard",
    "RestartBrowser",
    "ReconnectBrowser",
)
"""The calls that need the cluster token when one is set (the fault hooks need the fault
token instead; GetStatus stays open)."""
Context = grpc.aio.ServicerContext[object, object]

DEFAULT_RECONNECT_WAIT_S = 2.0

_tracer = trace.get_tracer(__name__)


def status_code(error: ShardRuntimeError) -> grpc.StatusCode:
    """The gRPC status a runtime error maps to."""
    return grpc.StatusCode[error.code]


class BrowserAgentServicer(pb_grpc.BrowserAgentServiceServicer):
    """Loads and runs shards, reports status, performs fault hooks."""

    def __init__(
        self,
        settings: AgentSettings,
        session: CoordinatorSession,
        store: ShardStore,
        host: ShardHost,
        lifecycle: Lifecycle,
        *,
        hooks: FaultHooks,
    ) -> None:
        self._settings = settings
        self._session = session
        self._store = store
        self._host = host
        self._lifecycle = lifecycle
        self._hooks = hooks

    async def _authorize(self, context: Context, method: str) -> None:
        token = fault_token(self._settings.fault_token, self._settings.cluster_token)
        await require_token(context, token, method=method, service="browser agent")

    async def LoadShard(
        self, request_iterator: AsyncIterator[pb.LoadShardRequest], context: Context
    ) -> pb.LoadShardResponse:
        """Store the shard's bytes (or find them by hash) and load them into a runtime."""
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or not first.HasField("header"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a LoadShard stream must start with a header"
            )
        header = first.header
        spec = header.shard
        try:
            check_sha256(spec.sha256)
            target = await self._host.target(header.runtime, header.browser_id)
        except StoreError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ShardRuntimeError as exc:
            await context.abort(status_code(exc), str(exc))

        async def chunks() -> AsyncIterator[bytes]:
            async for message in messages:
                if not message.HasField("chunk"):
                    raise StoreError("a LoadShard stream takes one header, then only chunks")
                yield message.chunk

        cached = self._store.has(spec.sha256)
        if header.by_hash_only and not cached:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"shard {spec.sha256} is not in this agent's store; send its bytes",
            )
        try:
            if not cached:
                await self._store.put(spec.sha256, spec.size_bytes, chunks())
            entry = await self._host.load(
                spec, str(self._store.path(spec.sha256)), target, header.execution_provider
            )
        except StoreError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ShardRuntimeError as exc:
            await context.abort(status_code(exc), str(exc))
        log.info(
            "shard loaded",
            extra={
                "model": spec.model,
                "shard": spec.index,
                "sha256": spec.sha256,
                "browser_id": target.runtime_id,
                "ep_reason": entry.result.reason,
                "cached": cached,
            },
        )
        return pb.LoadShardResponse(
            shard=entry.to_proto(),
            browser_id=target.runtime_id,
            cached=cached,
            load_time=duration(entry.result.load_ms / 1000),
        )

    async def RunShard(
        self, request_iterator: AsyncIterator[pb.RunShardRequest], context: Context
    ) -> AsyncIterator[pb.RunShardResponse]:
        """Run each activation as it arrives; answer each one, failures included."""
        replies: asyncio.Queue[pb.RunShardResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: pb.RunShardRequest) -> None:
            # One span per activation, a child of the coordinator's hop (the stream is
            # shared by every request, so its own span belongs to no request's trace).
            with _tracer.start_as_current_span(
                "run_shard",
                context=extract_context(request.traceparent),
                kind=trace.SpanKind.SERVER,
                attributes={
                    "shard.handle": request.handle,
                    "request.id": request.request_id,
                    "agent.id": self._settings.agent_id,
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                if not await self._hooks.data_path.deliver():
                    # An injected partition: the activation is lost and gets no answer.
                    span.set_status(Status(StatusCode.ERROR, "lost to an injected partition"))
                    return
                reply = pb.RunShardResponse(
                    sequence=request.sequence, request_id=request.request_id
                )
                with contextlib.suppress(ShardRuntimeError):  # an unknown handle fails below
                    span.set_attribute(
                        "browser.id", self._host.entry(request.handle).runtime.runtime_id
                    )
                try:
                    inputs = {t.name: decode_tensor(t) for t in request.inputs}
                    entry, result = await self._host.run(request.handle, inputs)
                except ValueError as exc:
                    reply.error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    reply.error_message = str(exc)
                except ShardRuntimeError as exc:
                    reply.error_code = status_code(exc).value[0]
                    reply.error_message = str(exc)
                else:
                    reply.outputs.extend(encode_tensor(n, v) for n, v in result.outputs.items())
                    reply.compute.CopyFrom(duration(result.compute_ms / 1000))
                    reply.browser_id = entry.runtime.runtime_id
                    reply.execution_provider = entry.result.execution_provider  # type: ignore[assignment]
                if reply.error_code:
                    span.set_status(Status(StatusCode.ERROR, reply.error_message))
            await replies.put(reply)

        async def read() -> None:
            try:
                async for request in self._lifecycle.stream(request_iterator, context):
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
                # An injected partition loses the end of the stream too, while it lasts.
                await self._hooks.data_path.wait_open()
            finally:
                await replies.put(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # re-raises an abort from the drain
        finally:
            reader.cancel()
            for task in running:
                task.cancel()

    async def UnloadShard(
        self, request: pb.UnloadShardRequest, context: Context
    ) -> pb.UnloadShardResponse:
        """Release a loaded shard."""
        try:
            entry = await self._host.unload(request.handle)
        except ShardRuntimeError as exc:
            await context.abort(status_code(exc), str(exc))
        return pb.UnloadShardResponse(freed_bytes=entry.spec.size_bytes)

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        """The agent's runtimes, their shards and memory, its store and session."""
        return pb.GetStatusResponse(
            agent_id=self._settings.agent_id,
            browsers=self._hooks.mark(self._host.status()),
            memory_budget_bytes=self._settings.memory_budget_mb * 1024 * 1024,
            cached_shard_sha256=self._store.hashes(),
            coordinator_address=self._session.attached_to,
        )

    async def RestartBrowser(
        self, request: pb.RestartBrowserRequest, context: Context
    ) -> pb.RestartBrowserResponse:
        """Close a browser, put a standby (or a fresh launch) in its place, reload its shards."""
        try:
            restarted = await self._host.restart(
                request.browser_id, lambda sha256: str(self._store.path(sha256))
            )
        except ShardRuntimeError as exc:
            await context.abort(status_code(exc), f"restart of {request.browser_id}: {exc}")
        log.info(
            "browser restarted",
            extra={
                "browser_id": request.browser_id,
                "replacement": restarted.runtime.runtime_id,
                "from_standby": restarted.from_standby,
                "shards": len(restarted.reloaded),
            },
        )
        return pb.RestartBrowserResponse(
            browser_id=restarted.runtime.runtime_id,
            shards=[
                pb.ReloadedShard(previous_handle=handle, shard=entry.to_proto())
                for handle, entry in restarted.reloaded
            ],
            from_standby=restarted.from_standby,
        )

    async def ReconnectBrowser(
        self, request: pb.ReconnectBrowserRequest, context: Context
    ) -> pb.ReconnectBrowserResponse:
        """Wait until the browser's page is connected to the agent again."""
        timeout_s = request.timeout.ToNanoseconds() / 1e9 or DEFAULT_RECONNECT_WAIT_S
        try:
            waited = await self._host.wait_connected(request.browser_id, timeout_s)
        except ShardRuntimeError as exc:
            await context.abort(status_code(exc), str(exc))
        return pb.ReconnectBrowserResponse(waited=duration(waited))

    async def ApplyFaultHook(
        self, request: pb.ApplyFaultHookRequest, context: Context
    ) -> pb.ApplyFaultHookResponse:
        """Perform a fault hook for real and record it under the request's fault id.

        With a fault token configured the call must carry it, as calls to the
        fault-injector must: otherwise anyone who reaches the agent could break it.
        """
        await self._authorize(context, "ApplyFaultHook")
        hook = HookRequest(
            fault_id=request.fault_id,
            hook=request.hook,
            browser_id=request.browser_id,
            shard_handle=request.shard_handle,
            memory_bytes=request.memory_bytes,
            duration_s=request.duration.ToNanoseconds() / 1e9,
            delay_s=request.delay.ToNanoseconds() / 1e9,
            data_path_only=request.data_path_only,
            intensity=request.intensity,
            traceparent=inject_traceparent(),  # the injector's trace, carried in this call
        )
        try:
            result = await self._hooks.apply(hook)
        except HookError as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        response = pb.ApplyFaultHookResponse(
            browser_id=result.browser_id, detail=result.detail, revertible=result.revertible
        )
        if result.began_at:
            response.effect_began_at.FromNanoseconds(round(result.began_at * 1e9))
        return response

    async def RevertFaultHook(
        self, request: pb.RevertFaultHookRequest, context: Context
    ) -> pb.RevertFaultHookResponse:
        """Undo what a fault's hooks did; reverted is false when nothing was in force."""
        await self._authorize(context, "RevertFaultHook")
        if not request.fault_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fault_id must not be empty")
        try:
            reverted = await self._hooks.revert(request.fault_id)
        except (HookError, ShardRuntimeError) as exc:
            code = exc.code if isinstance(exc, HookError) else status_code(exc).name
            await context.abort(grpc.StatusCode[code], f"revert of {request.fault_id}: {exc}")
        return pb.RevertFaultHookResponse(reverted=reverted)
