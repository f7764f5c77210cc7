"""The coordinator's gRPC servicers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.duration_pb2 import Duration
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

from services.common.server import Lifecycle, unimplemented
from services.coordinator.registry import AgentRegistry
from services.coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
SERVICE = pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
RAFT_SERVICE = pb.DESCRIPTOR.services_by_name["RaftService"].full_name


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Agent sessions, the registry, deployment and inference."""

    def __init__(
        self, settings: CoordinatorSettings, registry: AgentRegistry, lifecycle: Lifecycle
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._lifecycle = lifecycle

    async def AgentSession(
        self, request_iterator: AsyncIterator[pb.AgentSessionRequest], context: Context
    ) -> AsyncIterator[pb.AgentSessionResponse]:
        """Register the agent, then follow its heartbeats and status until the stream ends."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("message") != "registration":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message of an agent session must be a registration",
            )
        reg = first.registration
        try:
            session = self._registry.register(
                reg.agent_id, reg.address, reg.memory_budget_bytes, reg.browsers
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("agent registered", extra={"agent_id": reg.agent_id, "agent_address": reg.address})
        interval = Duration()
        interval.FromMilliseconds(int(self._settings.heartbeat_interval_s * 1000))
        yield pb.AgentSessionResponse(
            accepted=pb.SessionAccepted(
                coordinator_id=self._settings.replica_id, heartbeat_interval=interval
            )
        )
        try:
            async for message in self._lifecycle.stream(request_iterator, context):
                kind = message.WhichOneof("message")
                if kind == "heartbeat":
                    self._registry.heartbeat(
                        reg.agent_id,
                        in_flight=message.heartbeat.in_flight,
                        memory_used_bytes=message.heartbeat.memory_used_bytes,
                    )
                elif kind == "status":
                    self._registry.update_browsers(reg.agent_id, message.status.browsers)
                elif kind == "registration":
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "an agent session takes one registration; "
                        "open a new session to re-register",
                    )
        finally:
            self._registry.disconnected(reg.agent_id, session)
            log.info("agent session ended", extra={"agent_id": reg.agent_id})

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        """The registry's agents."""
        return pb.ListAgentsResponse(
            agents=[
                self._registry.to_proto(r)
                for r in self._registry.agents(include_unhealthy=request.include_unhealthy)
            ]
        )

    async def ClusterStatus(
        self, request: pb.ClusterStatusRequest, context: Context
    ) -> pb.ClusterStatusResponse:
        """This replica's view: the configured replicas and the agents registered here."""
        replicas = [pb.ReplicaInfo(replica_id=self._settings.replica_id)]
        replicas += [
            pb.ReplicaInfo(replica_id=rid, address=addr)
            for rid, addr in sorted(self._settings.peer_addresses().items())
        ]
        return pb.ClusterStatusResponse(
            replica_id=self._settings.replica_id,
            replicas=replicas,
            agents=[
                self._registry.to_proto(r) for r in self._registry.agents(include_unhealthy=True)
            ],
        )

    DeployModel = unimplemented(f"{SERVICE}/DeployModel", "model deployment")
    UndeployModel = unimplemented(f"{SERVICE}/UndeployModel", "model deployment")
    GetPlacement = unimplemented(f"{SERVICE}/GetPlacement", "model deployment")
    Infer = unimplemented(f"{SERVICE}/Infer", "the inference path")
    InferStream = unimplemented(f"{SERVICE}/InferStream", "the inference path")


class RaftServicer(pb_grpc.RaftServiceServicer):
    """Consensus messages between replicas."""

    RequestVote = unimplemented(f"{RAFT_SERVICE}/RequestVote", "replicated cluster state")
    AppendEntries = unimplemented(f"{RAFT_SERVICE}/AppendEntries", "replicated cluster state")
    InstallSnapshot = unimplemented(f"{RAFT_SERVICE}/InstallSnapshot", "replicated cluster state")
