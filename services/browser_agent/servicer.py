"""The browser agent's gRPC servicer."""

from __future__ import annotations

import grpc
from webshard.browser_agent.v1 import browser_agent_pb2 as pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as pb_grpc

from services.browser_agent.session import CoordinatorSession
from services.browser_agent.settings import AgentSettings
from services.common.server import unimplemented

SERVICE = pb.DESCRIPTOR.services_by_name["BrowserAgentService"].full_name


class BrowserAgentServicer(pb_grpc.BrowserAgentServiceServicer):
    """Loads and runs shards, reports status, performs fault hooks."""

    def __init__(self, settings: AgentSettings, session: CoordinatorSession) -> None:
        self._settings = settings
        self._session = session

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetStatusResponse:
        """The agent's identity, budget and session."""
        return pb.GetStatusResponse(
            agent_id=self._settings.agent_id,
            memory_budget_bytes=self._settings.memory_budget_mb * 1024 * 1024,
            coordinator_address=self._session.attached_to,
        )

    LoadShard = unimplemented(f"{SERVICE}/LoadShard", "shards in browsers")
    RunShard = unimplemented(f"{SERVICE}/RunShard", "shards in browsers")
    UnloadShard = unimplemented(f"{SERVICE}/UnloadShard", "shards in browsers")
    ApplyFaultHook = unimplemented(f"{SERVICE}/ApplyFaultHook", "fault hooks")
    RevertFaultHook = unimplemented(f"{SERVICE}/RevertFaultHook", "fault hooks")
