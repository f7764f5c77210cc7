"""The coordinator's gRPC servicers."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf.duration_pb2 import Duration
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc
from webshard.tensors import decode_tensor, encode_tensor

from services.common.server import Lifecycle, unimplemented
from services.coordinator.deployments import DeployError, Deployments
from services.coordinator.pipeline import InferError, RequestLedger
from services.coordinator.registry import AgentRegistry
from services.coordinator.settings import CoordinatorSettings
from services.models import prepare_inputs

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
SERVICE = pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
RAFT_SERVICE = pb.DESCRIPTOR.services_by_name["RaftService"].full_name


def prepare_request_inputs(
    request: pb.InferRequest, input_names: Sequence[str]
) -> list[common_pb2.Tensor]:
    """The request's input tensors, from texts or tensors, checked against the model's inputs."""
    if request.texts and request.inputs:
        raise InferError(grpc.StatusCode.INVALID_ARGUMENT, "send texts or input tensors, not both")
    if request.texts:
        try:
            arrays = prepare_inputs(request.model, texts=list(request.texts))
        except ValueError as exc:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return [encode_tensor(name, value) for name, value in arrays.items()]
    given = {t.name: t for t in request.inputs}
    missing = [n for n in input_names if n not in given]
    unknown = sorted(set(given) - set(input_names))
    if missing or unknown:
        raise InferError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{request.model} takes inputs {', '.join(input_names)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(unknown)}" if unknown else ""),
        )
    for tensor in request.inputs:
        try:
            decode_tensor(tensor)
        except ValueError as exc:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    return list(request.inputs)


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Agent sessions, the registry, deployment and inference."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        registry: AgentRegistry,
        deployments: Deployments,
        lifecycle: Lifecycle,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._deployments = deployments
        self._lifecycle = lifecycle
        self._ledger = RequestLedger()

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
        self._deployments.mark_agent(reg.agent_id, healthy=True)
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
            if not any(r.agent_id == reg.agent_id for r in self._registry.agents()):
                self._deployments.mark_agent(reg.agent_id, healthy=False)
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
            placements=[self._deployments.placement(m) for m in sorted(self._deployments.models)],
        )

    async def DeployModel(
        self, request: pb.DeployModelRequest, context: Context
    ) -> pb.DeployModelResponse:
        """Cut, place and load a model."""
        try:
            placement = await self._deployments.deploy(request)
        except DeployError as exc:
            await context.abort(exc.code, exc.message)
        return pb.DeployModelResponse(placement=placement)

    async def UndeployModel(
        self, request: pb.UndeployModelRequest, context: Context
    ) -> pb.UndeployModelResponse:
        """Remove a model and unload its shards."""
        try:
            unloaded = await self._deployments.undeploy(request.model)
        except DeployError as exc:
            await context.abort(exc.code, exc.message)
        return pb.UndeployModelResponse(unloaded_shards=unloaded)

    async def GetPlacement(
        self, request: pb.GetPlacementRequest, context: Context
    ) -> pb.GetPlacementResponse:
        """Where a deployed model's shards live."""
        try:
            return pb.GetPlacementResponse(placement=self._deployments.placement(request.model))
        except DeployError as exc:
            await context.abort(exc.code, exc.message)

    async def _infer(self, request: pb.InferRequest, timeout: float | None) -> pb.InferResponse:
        deployment = self._deployments.models.get(request.model)
        if deployment is None:
            self._deployments.placement(request.model)  # raises NOT_FOUND naming the deployed
        assert deployment is not None
        inputs = prepare_request_inputs(request, deployment.input_names)
        deadline = time.monotonic() + (timeout or self._settings.default_deadline_s)
        request_id = request.request_id or uuid.uuid4().hex
        return await self._ledger.answer(
            request_id, lambda: deployment.pipeline.run(request_id, inputs, deadline)
        )

    async def Infer(self, request: pb.InferRequest, context: Context) -> pb.InferResponse:
        """Run one request through the model's chain of shards."""
        try:
            return await self._infer(request, context.time_remaining())
        except (DeployError, InferError) as exc:
            await context.abort(exc.code, exc.message)

    async def InferStream(
        self, request_iterator: AsyncIterator[pb.InferStreamRequest], context: Context
    ) -> AsyncIterator[pb.InferStreamResponse]:
        """Run every request of the stream concurrently; answer each as it finishes."""
        answers: asyncio.Queue[pb.InferStreamResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self._settings.max_stream_in_flight)

        async def one(request: pb.InferRequest) -> None:
            try:
                response = await self._infer(request, context.time_remaining())
                await answers.put(
                    pb.InferStreamResponse(request_id=response.request_id, response=response)
                )
            except (DeployError, InferError) as exc:
                await answers.put(
                    pb.InferStreamResponse(
                        request_id=request.request_id,
                        error_code=exc.code.value[0],
                        error_message=exc.message,
                    )
                )
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for message in self._lifecycle.stream(request_iterator, context):
                    await slots.acquire()  # back-pressure: stop reading when full
                    task = asyncio.create_task(one(message.request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader
        finally:
            reader.cancel()
            for task in running:
                task.cancel()


class RaftServicer(pb_grpc.RaftServiceServicer):
    """Consensus messages between replicas."""

    RequestVote = unimplemented(f"{RAFT_SERVICE}/RequestVote", "replicated cluster state")
    AppendEntries = unimplemented(f"{RAFT_SERVICE}/AppendEntries", "replicated cluster state")
    InstallSnapshot = unimplemented(f"{RAFT_SERVICE}/InstallSnapshot", "replicated cluster state")
