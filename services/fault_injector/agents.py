"""Agent actions performed through the agents' ApplyFaultHook and RevertFaultHook.

The injector's fault token, when it has one, goes with every hook call: an agent
configured with the same token refuses hook calls without it.
"""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as agent_grpc

from services.common.auth import bearer_metadata
from services.common.durations import duration
from services.fault_injector.actions import AgentAction
from services.fault_injector.injector import ActionError, HookOutcome


class GrpcAgentHooks:
    """AgentHooks over gRPC, one channel per agent address."""

    def __init__(self, *, timeout_s: float = 30.0, token: str = "") -> None:
        self._timeout = timeout_s
        self._metadata = bearer_metadata(token)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> agent_grpc.BrowserAgentServiceAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            # The tracing interceptor carries the injection's trace into the agent.
            channel = grpc.aio.insecure_channel(
                address,
                interceptors=aio_client_interceptors(),  # type: ignore[no-untyped-call]
            )
            self._channels[address] = channel
        return agent_grpc.BrowserAgentServiceStub(channel)

    async def apply(
        self, action: AgentAction, fault_id: str, duration_s: float, intensity: int
    ) -> HookOutcome:
        """Have the agent perform the action; its detail and when its effect began,
        or ActionError."""
        request = agent_pb.ApplyFaultHookRequest(
            fault_id=fault_id,
            hook=action.hook,  # type: ignore[arg-type]
            browser_id=action.browser_id,
            shard_handle=action.shard_handle,
            memory_bytes=action.memory_bytes,
            duration=duration(duration_s),
            data_path_only=action.data_path_only,
            intensity=intensity,  # type: ignore[arg-type]
        )
        if action.delay_s:
            request.delay.CopyFrom(duration(action.delay_s))
        try:
            response = await self._stub(action.address).ApplyFaultHook(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise ActionError(
                f"{action.agent_id} answered {exc.code().name}: {exc.details()}"
            ) from exc
        began_at = None
        if response.HasField("effect_began_at"):  # an older agent does not say
            began_at = response.effect_began_at.ToNanoseconds() / 1e9
        return HookOutcome(response.detail or action.describe(), began_at)

    async def revert(self, agent_id: str, address: str, fault_id: str) -> bool:
        """Have the agent undo what it did for ``fault_id``."""
        try:
            response = await self._stub(address).RevertFaultHook(
                agent_pb.RevertFaultHookRequest(fault_id=fault_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise ActionError(f"{agent_id} answered {exc.code().name}: {exc.details()}") from exc
        return response.reverted

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
