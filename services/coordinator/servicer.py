"""The coordinator's gRPC servicers."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeAlias

import grpc
from google.protobuf.duration_pb2 import Duration
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc
from webshard.tensors import decode_tensor, encode_tensor

from services.common.auth import methods
from services.common.durations import duration
from services.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.common.server import MAX_MESSAGE_BYTES, Lifecycle
from services.coordinator.barriers import BarrierError, ModelBarriers
from services.coordinator.cluster_state import (
    ANSWERS_KEPT_S,
    AgentEntry,
    Answer,
    ClusterState,
    agent_command,
    answers_command,
    deploy_command,
    placement_command,
    undeploy_command,
)
from services.coordinator.consensus import NotLeaderError, Replicator
from services.coordinator.deployments import DeployError, Deployment, Deployments, Takeover
from services.coordinator.links import HopError
from services.coordinator.pipeline import InferError, Pin, RequestLedger
from services.coordinator.raft import (
    AppendEntriesResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    Message,
    RequestVoteResponse,
    wire,
)
from services.coordinator.registry import AgentRegistry
from services.coordinator.settings import CoordinatorSettings
from services.models import ModelInfo, model_info, prepare_inputs
from services.models.validate import InputError, InputTooLarge, check_feeds, check_texts

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
SERVICE = pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
DEFAULT_RECONNECT_WAIT_S = 2.0
DEFAULT_MAX_PAUSE_S = 10.0
UNAVAILABLE_RETRY_S = 0.2
"""A request every replica of some shard failed is run again after this long at most."""
RAFT_SERVICE = pb.DESCRIPTOR.services_by_name["RaftService"].full_name

GUARDED_METHODS = methods(
    SERVICE,
    # A session registers an agent: a forged one could draw shards to it.
    "AgentSession",
    "DeployModel",
    "UndeployModel",
    "ReplaceShard",
    # It runs a shard on an agent (and marks the copy unhealthy when the hop fails).
    "VerifyShard",
    "RestartBrowser",
    "ReconnectAgent",
    "PauseModel",
    "ResumeModel",
) | methods(
    # One forged AppendEntries (a higher term) deposes the leader.
    RAFT_SERVICE,
    "RequestVote",
    "AppendEntries",
    "InstallSnapshot",
)
"""The calls that need the cluster token when one is set; reads and inference stay open."""


MAX_ACTIVATION_BYTES = MAX_MESSAGE_BYTES - 1024 * 1024
"""The largest tensor a request may send or cause between shards: one message, less room
for the rest of the message."""

# A ReplaceShard waiting to take over: its request, its avoid list and its result.
_WaitingTakeover: TypeAlias = tuple[
    pb.ReplaceShardRequest,
    list[tuple[str, str]],
    asyncio.Future[tuple[Takeover, bool] | None],
]


def prepare_request(
    request: pb.InferRequest, info: ModelInfo, stages: int
) -> tuple[list[common_pb2.Tensor], dict[int, Pin], bytes]:
    """The request's input tensors, pins and fingerprint, checked against the model.

    CPU work (tokenizing, decoding, checking every value): run it off the event loop.
    Raises InferError: INVALID_ARGUMENT for inputs the model cannot take,
    RESOURCE_EXHAUSTED for inputs larger than a message between shards carries.
    """
    if request.texts and request.inputs:
        raise InferError(grpc.StatusCode.INVALID_ARGUMENT, "send texts or input tensors, not both")
    pins: dict[int, Pin] = {}
    for pin in request.pins:
        if not 0 <= pin.shard_index < stages or not pin.agent_id:
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a pin needs an agent_id and a shard_index in [0, {stages}) "
                f"({request.model} has {stages} shards); got shard_index {pin.shard_index}",
            )
        pins[pin.shard_index] = Pin(pin.agent_id, pin.browser_id)
    try:
        if request.texts:
            check_texts(request.texts)
            feeds = prepare_inputs(request.model, texts=list(request.texts))
            tensors = [encode_tensor(name, value) for name, value in feeds.items()]
        else:
            names = [t.name for t in request.inputs]
            if len(set(names)) != len(names):
                raise InputError("each input tensor may be sent once")
            feeds = {t.name: decode_tensor(t) for t in request.inputs}
            tensors = list(request.inputs)
        check_feeds(info, feeds, max_message_bytes=MAX_ACTIVATION_BYTES)
    except InputTooLarge as exc:
        raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
    except ValueError as exc:
        raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    return tensors, pins, request_fingerprint(request)


def request_fingerprint(request: pb.InferRequest) -> bytes:
    """What a request asks, apart from its id and deadline: a reused id must ask the same."""
    asked = pb.InferRequest()
    asked.CopyFrom(request)
    asked.ClearField("request_id")
    return hashlib.sha256(asked.SerializeToString(deterministic=True)).digest()


class AnswerRecorder:
    """Replicates Infer answers by request id, in batches, off the request path.

    An answer is sent to its client at once; within ``batch_s`` the leader commits it
    with the others that finished meanwhile (one log entry). A retry of the id that
    reaches a new leader after that is answered from the replicated state, not run
    twice; one that comes within the batch window of a leader's death may still run
    again (the same answer, twice the work).
    """

    def __init__(self, replicator: Replicator, timeout_s: float, batch_s: float = 0.02) -> None:
        self._replicator = replicator
        self._timeout_s = timeout_s
        self._batch_s = batch_s
        self._pending: dict[str, Answer] = {}
        self._flushing: asyncio.Task[None] | None = None

    def record(self, request_id: str, fingerprint: bytes, response: pb.InferResponse) -> None:
        """Queue an answer for replication (only the leader's answers are kept)."""
        if not self._replicator.is_leader:
            return
        self._pending[request_id] = Answer(
            fingerprint.hex(), response.SerializeToString(), time.time()
        )
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(self._batch_s)  # gather the answers finishing meanwhile
            batch, self._pending = self._pending, {}
            try:
                await self._replicator.propose(answers_command(batch), self._timeout_s)
            except (NotLeaderError, TimeoutError) as exc:
                log.info(
                    "answers not replicated; their ids may run again on another leader",
                    extra={"answers": len(batch), "error": repr(exc)},
                )


def kept_answer(state: ClusterState, request_id: str) -> tuple[bytes, pb.InferResponse] | None:
    """The replicated answer to ``request_id`` (its fingerprint and response), if any."""
    answer = state.answers.get(request_id)
    if answer is None:
        return None
    return bytes.fromhex(answer.fingerprint), pb.InferResponse.FromString(answer.response)


def not_leader(error: NotLeaderError) -> DomainError:
    """The status a call this replica cannot serve ends with: FAILED_PRECONDITION naming
    the leader in the ``webshard-leader`` trailer, or UNAVAILABLE with it empty while an
    election is under way (retry shortly)."""
    trailers = (("webshard-leader", error.leader_address or ""),)
    if error.leader_address:
        return FailedPrecondition(str(error), trailers)
    return Unavailable(str(error), trailers)


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Agent sessions, the registry, deployment and inference."""

    def __init__(
        self,
        *,
        settings: CoordinatorSettings,
        registry: AgentRegistry,
        deployments: Deployments,
        state: ClusterState,
        replicator: Replicator,
        lifecycle: Lifecycle,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._deployments = deployments
        self._state = state
        self._replicator = replicator
        self._lifecycle = lifecycle
        self._answers = AnswerRecorder(replicator, settings.propose_timeout_s)
        self._ledger = RequestLedger(
            ANSWERS_KEPT_S,
            replicated=functools.partial(kept_answer, state),
            record=self._answers.record,
        )
        self._writes = asyncio.Lock()  # deploys, undeploys and moves one at a time
        self._takeovers: list[_WaitingTakeover] = []  # waiting for the lock: made together
        self._barriers = ModelBarriers()

    def _lead(self) -> None:
        """Raise the not-leader status unless this replica leads."""
        if not self._replicator.is_leader:
            raise not_leader(self._replicator.not_leader())

    async def _leader_read(self) -> None:
        """Serve a read only as the leader, after a ReadIndex barrier."""
        try:
            await self._replicator.read_barrier(self._settings.propose_timeout_s)
        except NotLeaderError as exc:
            raise not_leader(exc) from exc
        except TimeoutError:
            raise Unavailable("leadership could not be confirmed in time; retry") from None

    async def _commit(self, command: bytes) -> None:
        """Replicate a command; raise the status the call ends with when it cannot be
        committed."""
        try:
            await self._replicator.propose(command, self._settings.propose_timeout_s)
        except NotLeaderError as exc:
            raise not_leader(exc) from exc
        except TimeoutError:
            raise Unavailable(
                "the write was not committed in time (no quorum?); retry with the same request id"
            ) from None

    async def AgentSession(
        self, request_iterator: AsyncIterator[pb.AgentSessionRequest], context: Context
    ) -> AsyncIterator[pb.AgentSessionResponse]:
        """Register the agent, then follow its heartbeats and status until the stream ends."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("message") != "registration":
            raise InvalidArgument("the first message of an agent session must be a registration")
        reg = first.registration
        if not self._replicator.is_leader:
            leader = self._replicator.not_leader()
            if leader.leader_address is None:
                raise Unavailable(str(leader))
            yield pb.AgentSessionResponse(
                reattach=pb.Reattach(leader_address=leader.leader_address, reason=str(leader))
            )
            return
        if not reg.agent_id or not reg.address:
            raise InvalidArgument("registration needs an agent_id and an address")
        entry = AgentEntry(reg.agent_id, reg.address, reg.memory_budget_bytes, list(reg.browsers))
        await self._commit(agent_command(entry))
        session = self._registry.attach(reg.agent_id)
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
                if not self._replicator.is_leader:
                    leader = self._replicator.not_leader()
                    yield pb.AgentSessionResponse(
                        reattach=pb.Reattach(
                            leader_address=leader.leader_address or "", reason=str(leader)
                        )
                    )
                    return
                kind = message.WhichOneof("message")
                if kind == "heartbeat":
                    self._registry.heartbeat(
                        reg.agent_id,
                        in_flight=message.heartbeat.in_flight,
                        memory_used_bytes=message.heartbeat.memory_used_bytes,
                    )
                elif kind == "status":
                    entry.browsers = list(message.status.browsers)
                    await self._commit(agent_command(entry))
                elif kind == "registration":
                    raise InvalidArgument(
                        "an agent session takes one registration; open a new session to re-register"
                    )
        finally:
            self._registry.disconnected(reg.agent_id, session)
            gone = not any(r.agent_id == reg.agent_id for r in self._registry.agents())
            # A session this leader ended (a drain, lost leadership) is not the agent failing.
            if gone and self._replicator.is_leader and not self._lifecycle.draining.is_set():
                self._deployments.agent_lost(reg.agent_id)
            log.info("agent session ended", extra={"agent_id": reg.agent_id})

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        """The registry's agents (served by the leader, linearizably)."""
        await self._leader_read()
        return pb.ListAgentsResponse(
            agents=[
                self._registry.to_proto(r)
                for r in self._registry.agents(include_unhealthy=request.include_unhealthy)
            ]
        )

    async def ClusterStatus(
        self, request: pb.ClusterStatusRequest, context: Context
    ) -> pb.ClusterStatusResponse:
        """This replica's own view, without a barrier: for diagnosis, and to find the leader."""
        me = pb.ReplicaInfo(
            replica_id=self._settings.replica_id,
            role=wire.role_to_proto(self._replicator.role),
            term=self._replicator.term,
            commit_index=self._replicator.commit_index,
            answers_kept=len(self._state.answers),
        )
        replicas = [me] + [
            pb.ReplicaInfo(replica_id=rid, address=addr)
            for rid, addr in sorted(self._settings.peer_addresses().items())
        ]
        return pb.ClusterStatusResponse(
            replica_id=self._settings.replica_id,
            leader_id=self._replicator.leader_id or "",
            replicas=replicas,
            agents=[
                self._registry.to_proto(r) for r in self._registry.agents(include_unhealthy=True)
            ],
            placements=[self._deployments.placement(m) for m in sorted(self._deployments.models)],
        )

    async def DeployModel(
        self, request: pb.DeployModelRequest, context: Context
    ) -> pb.DeployModelResponse:
        """Cut, place and load a model, then commit its placement."""
        self._lead()
        async with self._writes:
            if request.request_id:
                done = self._state.placement_for_deploy(request.request_id)
                if done is not None:
                    return pb.DeployModelResponse(placement=self._deployments.placement(done.model))
            placement = await self._prepare_deploy(request, context)
            previous = self._state.placements.get(request.model)
            try:
                await self._commit(deploy_command(placement))
            except BaseException:
                await self._deployments.release(placement)
                raise
            if previous is not None:
                await self._deployments.release(previous)
            log.info(
                "model deployed",
                extra={
                    "model": request.model,
                    "version": self._state.placements[request.model].version,
                },
            )
            return pb.DeployModelResponse(placement=self._deployments.placement(request.model))

    async def _prepare_deploy(
        self, request: pb.DeployModelRequest, context: Context
    ) -> pb.Placement:
        """Prepare a deploy; while too few agents are attached but others known to the
        cluster are reattaching (a leader change moves every session), wait for them
        within the call's deadline instead of failing."""
        deadline = time.monotonic() + (
            context.time_remaining() or self._settings.default_deadline_s
        )
        while True:
            try:
                return await self._deployments.prepare(request)
            except DeployError as exc:
                waiting = self._registry.reattaching(self._settings.reattach_wait_s)
                left = deadline - time.monotonic() - 1.0  # keep a second to load and commit
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION or not waiting or left <= 0:
                    raise
                log.info(
                    "deploy waits for agents reattaching",
                    extra={"model": request.model, "agents": waiting, "reason": exc.message},
                )
                await self._registry.changed.wait(min(left, self._settings.reattach_wait_s))

    async def UndeployModel(
        self, request: pb.UndeployModelRequest, context: Context
    ) -> pb.UndeployModelResponse:
        """Remove a model, then unload its shards."""
        self._lead()
        async with self._writes:
            placement = self._state.placements.get(request.model)
            if placement is None:
                raise NotFound(f"model {request.model!r} is not deployed")
            assert placement is not None
            await self._commit(undeploy_command(request.model))
            await self._deployments.release(placement)
        return pb.UndeployModelResponse(
            unloaded_shards=sum(len(s.replicas) for s in placement.shards)
        )

    async def GetPlacement(
        self, request: pb.GetPlacementRequest, context: Context
    ) -> pb.GetPlacementResponse:
        """Where a deployed model's shards live (served by the leader, linearizably)."""
        await self._leader_read()
        return pb.GetPlacementResponse(placement=self._deployments.placement(request.model))

    async def ReplaceShard(
        self, request: pb.ReplaceShardRequest, context: Context
    ) -> pb.ReplaceShardResponse:
        """Move a shard's replica off a failed browser: a hot spare takes over when one
        may (a placement change, no load; a new spare follows in the background),
        otherwise a replica is loaded elsewhere. Commit, then unload the old one."""
        self._lead()
        if not request.model or not request.agent_id or request.shard_index < 0:
            raise InvalidArgument(
                "ReplaceShard needs a model, a shard_index >= 0 and the failed agent_id"
            )
        if any(not r.agent_id for r in request.avoid):
            raise InvalidArgument("every runtime in avoid needs an agent_id")
        avoid = [(r.agent_id, r.browser_id) for r in request.avoid]
        taken_over = await self._take_over(request, avoid)
        if taken_over is not None:
            return taken_over
        # The load runs outside the write lock, so the shards of a failed browser move
        # at once; only the commit is one at a time.
        try:
            replacement = await self._deployments.prepare_replacement(
                request.model,
                request.shard_index,
                request.agent_id,
                request.browser_id,
                avoid=avoid,
            )
        except HopError as exc:
            raise DomainError(
                exc.code, f"loading the replacement on {exc.agent_id} failed: {exc.message}"
            ) from exc
        if replacement is None:  # moved already: a retry, or another recovery did it
            return pb.ReplaceShardResponse(placement=self._deployments.placement(request.model))
        # The new replica serves nobody unless committed; it is unloaded after the lock
        # is released, so an unload waiting on its agent holds up no other commit.
        try:
            async with self._writes:
                placement = self._deployments.placement_after(replacement)
                if placement is not None:
                    await self._commit(placement_command(placement))
        except BaseException:
            await self._deployments.unload(replacement.replica)
            raise
        if placement is None:  # moved meanwhile by another recovery, or undeployed
            await self._deployments.unload(replacement.replica)
            return pb.ReplaceShardResponse(placement=self._deployments.placement(request.model))
        self._deployments.unload_later(replacement.replaced)
        log.info(
            "shard replaced",
            extra={
                "model": request.model,
                "shard": request.shard_index,
                "from": f"{replacement.replaced.agent_id}/{replacement.replaced.browser_id}",
                "to": f"{replacement.replica.agent_id}/{replacement.replica.browser_id}",
                "from_standby": replacement.from_standby,
            },
        )
        return pb.ReplaceShardResponse(
            replica=replacement.replica,
            placement=self._deployments.placement(request.model),
            from_standby=replacement.from_standby,
        )

    async def _take_over(
        self, request: pb.ReplaceShardRequest, avoid: list[tuple[str, str]]
    ) -> pb.ReplaceShardResponse | None:
        """Swap the failed replica for a hot spare, committed; None when no spare may.

        Takeovers waiting for the write lock together (the shards of one failed
        browser) are made by whichever gets it first, in one commit a model."""
        waiting: asyncio.Future[tuple[Takeover, bool] | None]
        waiting = asyncio.get_running_loop().create_future()
        self._takeovers.append((request, avoid, waiting))
        async with self._writes:
            if self._takeovers:
                batch, self._takeovers = self._takeovers, []
                await self._take_over_all(batch)
        done = await waiting
        if done is None:
            return None
        takeover, loading = done
        return pb.ReplaceShardResponse(
            replica=takeover.promoted,
            placement=self._deployments.placement(request.model),
            from_spare=takeover.promoted is not None,
            spare_loading=loading,
        )

    async def _take_over_all(self, batch: list[_WaitingTakeover]) -> None:
        """Make and commit the takeovers of ``batch`` (under the write lock), then unload
        the failed copies and load new spares; each waiter gets its takeover, None, or
        the error that stopped it."""
        placements: dict[str, pb.Placement] = {}
        made: list[tuple[_WaitingTakeover, Takeover]] = []
        try:
            for waiter in batch:
                request, avoid, waiting = waiter
                try:
                    takeover = self._deployments.takeover(
                        request.model,
                        request.shard_index,
                        request.agent_id,
                        request.browser_id,
                        avoid=avoid,
                        base=placements.get(request.model),
                    )
                except Exception as exc:
                    waiting.set_exception(exc)
                    continue
                if takeover is None:
                    waiting.set_result(None)
                    continue
                placements[request.model] = takeover.placement
                made.append((waiter, takeover))
            for model, placement in placements.items():
                try:
                    await self._commit(placement_command(placement))
                except Exception as exc:
                    for (request, _, waiting), _ in made:
                        if request.model == model and not waiting.done():
                            waiting.set_exception(exc)
                    continue
                for (request, avoid, waiting), takeover in made:
                    if request.model == model and not waiting.done():
                        waiting.set_result((takeover, self._took_over(request, avoid, takeover)))
        finally:
            for _, _, waiting in batch:
                if not waiting.done():  # cancelled while committing
                    waiting.set_exception(Unavailable("the takeover was interrupted; retry"))

    def _took_over(
        self, request: pb.ReplaceShardRequest, avoid: list[tuple[str, str]], takeover: Takeover
    ) -> bool:
        """After a takeover's commit: unload the failed copy and load a new spare in the
        background; True when one is on its way."""
        self._deployments.unload_later(takeover.replaced)
        loading = self._deployments.replenish_later(
            request.model, request.shard_index, self.commit_in_background, avoid
        )
        promoted = takeover.promoted
        log.info(
            "spare took over" if promoted is not None else "failed spare dropped",
            extra={
                "model": request.model,
                "shard": request.shard_index,
                "from": f"{takeover.replaced.agent_id}/{takeover.replaced.browser_id}",
                "to": f"{promoted.agent_id}/{promoted.browser_id}" if promoted else "",
                "spare_loading": loading,
            },
        )
        return loading

    async def VerifyShard(
        self, request: pb.VerifyShardRequest, context: Context
    ) -> pb.VerifyShardResponse:
        """Run one shard once on one of its copies from its kept boundary activation and
        compare the answer with the kept outputs; a different answer is passed=false."""
        self._lead()
        if not request.model or request.shard_index < 0 or not request.agent_id:
            raise InvalidArgument(
                "VerifyShard needs a model, a shard_index >= 0 and the agent_id of the copy"
            )
        deadline = time.monotonic() + (
            context.time_remaining() or self._settings.default_deadline_s
        )
        check = await self._deployments.verify_shard(
            request.model, request.shard_index, Pin(request.agent_id, request.browser_id), deadline
        )
        log.info(
            "shard verified" if check.passed else "shard verify found another answer",
            extra={
                "model": request.model,
                "shard": request.shard_index,
                "on": f"{check.timing.agent_id}/{check.timing.browser_id}",
                "max_abs_difference": check.max_abs_difference,
                "tolerance": check.tolerance,
            },
        )
        return pb.VerifyShardResponse(
            timing=check.timing,
            max_abs_difference=check.max_abs_difference,
            tolerance=check.tolerance,
            passed=check.passed,
            kept_from=pb.RuntimeRef(agent_id=check.kept.agent_id, browser_id=check.kept.browser_id),
        )

    async def commit_in_background(self, build: Callable[[], pb.Placement | None]) -> bool:
        """Commit the placement ``build`` makes under the write lock (for work off the
        request path, such as a new spare); False when it makes none or this replica
        is no longer the leader. Raises TimeoutError when it was not committed in time."""
        async with self._writes:
            placement = build()
            if placement is None:
                return False
            try:
                await self._replicator.propose(
                    placement_command(placement), self._settings.propose_timeout_s
                )
            except NotLeaderError:
                return False  # the new leader's placement stands; nothing to retry here
            return True

    async def RestartBrowser(
        self, request: pb.RestartBrowserRequest, context: Context
    ) -> pb.RestartBrowserResponse:
        """Have the agent restart a browser, then commit the placements that follow it."""
        self._lead()
        if not request.agent_id or not request.browser_id:
            raise InvalidArgument("RestartBrowser needs an agent_id and a browser_id")
        async with self._writes:
            try:
                reply, placements = await self._deployments.restart_browser(
                    request.agent_id, request.browser_id, self._settings.propose_timeout_s + 60
                )
            except HopError as exc:
                raise DomainError(
                    exc.code, f"restarting {request.agent_id}/{request.browser_id}: {exc.message}"
                ) from exc
            for placement in placements:
                await self._commit(placement_command(placement))
        return pb.RestartBrowserResponse(
            browser_id=reply.browser_id,
            moved_shards=len(reply.shards),
            from_standby=reply.from_standby,
        )

    async def ReconnectAgent(
        self, request: pb.ReconnectAgentRequest, context: Context
    ) -> pb.ReconnectAgentResponse:
        """Reopen the activation stream to an agent; wait for a browser's page to connect."""
        self._lead()
        if not request.agent_id:
            raise InvalidArgument("ReconnectAgent needs an agent_id")
        wait_s = request.timeout.ToNanoseconds() / 1e9 or DEFAULT_RECONNECT_WAIT_S
        try:
            waited = await self._deployments.reconnect(request.agent_id, request.browser_id, wait_s)
        except HopError as exc:
            raise DomainError(exc.code, exc.message) from exc
        page = (
            f"; {request.browser_id}'s page connected after {waited * 1000:.0f} ms"
            if request.browser_id
            else ""
        )
        return pb.ReconnectAgentResponse(
            detail=f"activation stream to {request.agent_id} reopened{page}"
        )

    async def PauseModel(
        self, request: pb.PauseModelRequest, context: Context
    ) -> pb.PauseModelResponse:
        """Hold new requests for a model behind a barrier on this replica (the leader)."""
        self._lead()
        self._deployments.placement(request.model)  # NOT_FOUND unless deployed
        max_pause = request.max_pause.ToNanoseconds() / 1e9 or DEFAULT_MAX_PAUSE_S
        try:
            barrier_id = self._barriers.pause(request.model, max_pause)
        except BarrierError as exc:
            raise InvalidArgument(str(exc)) from exc
        return pb.PauseModelResponse(barrier_id=barrier_id)

    async def ResumeModel(
        self, request: pb.ResumeModelRequest, context: Context
    ) -> pb.ResumeModelResponse:
        """Lift a model's barrier; the requests it held run."""
        self._lead()
        if not self._barriers.held(request.model):
            self._deployments.placement(request.model)  # NOT_FOUND unless deployed
        lifted = self._barriers.resume(request.model, request.barrier_id)
        if lifted is None:
            return pb.ResumeModelResponse(already_lifted=True)
        return pb.ResumeModelResponse(
            paused=duration(lifted.paused_s), held_requests=lifted.held_requests
        )

    async def _infer(self, request: pb.InferRequest, timeout: float | None) -> pb.InferResponse:
        deployment = self._deployments.models.get(request.model)
        if deployment is None:
            if not self._replicator.is_leader:
                # A follower may not have applied a deploy the leader acknowledged yet:
                # only the leader may say a model is not deployed.
                raise self._replicator.not_leader()
            self._deployments.placement(request.model)  # raises NOT_FOUND naming the deployed
        assert deployment is not None
        deadline = time.monotonic() + (timeout or self._settings.default_deadline_s)
        inputs, pins, fingerprint = await asyncio.to_thread(
            prepare_request,
            request,
            model_info(request.model),
            len(deployment.pipeline.stages),
        )
        request_id = request.request_id or uuid.uuid4().hex
        if not pins and self._barriers.held(request.model):
            try:
                await self._barriers.wait(request.model, deadline)
            except TimeoutError as exc:
                raise InferError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from exc
            # The placement may have changed behind the barrier.
            deployment = self._deployments.models.get(request.model, deployment)
        serving: Deployment = deployment
        while True:
            try:
                return await self._ledger.answer(
                    request_id,
                    fingerprint,
                    functools.partial(serving.pipeline.run, request_id, inputs, deadline, pins),
                    keep=bool(request.request_id),
                )
            except InferError as exc:
                # Every replica of a shard failed: wait for recovery to move one (a new
                # placement) or for one to answer again, then run the request again.
                if pins or exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                serving = await self._next_deployment(request.model, serving, deadline, exc)

    async def _next_deployment(
        self, model: str, current: Deployment, deadline: float, error: InferError
    ) -> Deployment:
        """The model's deployment once its placement changed, or after a short pause."""
        retry_at = min(deadline, time.monotonic() + UNAVAILABLE_RETRY_S)
        while time.monotonic() < retry_at:
            latest = self._deployments.models.get(model)
            if latest is None:
                raise error
            if latest is not current:
                return latest
            await self._deployments.changed.wait(retry_at - time.monotonic())
        if time.monotonic() >= deadline:
            raise error
        return self._deployments.models.get(model, current)

    async def Infer(self, request: pb.InferRequest, context: Context) -> pb.InferResponse:
        """Run one request through the model's chain of shards."""
        try:
            return await self._infer(request, context.time_remaining())
        except NotLeaderError as exc:
            raise not_leader(exc) from exc

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
            except (DomainError, NotLeaderError) as exc:
                error = not_leader(exc) if isinstance(exc, NotLeaderError) else exc
                await answers.put(
                    pb.InferStreamResponse(
                        request_id=request.request_id,
                        error_code=error.code.value[0],
                        error_message=error.message,
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
    """Consensus messages between replicas, handed to the Raft loop."""

    def __init__(self, replicator: Replicator) -> None:
        self._replicator = replicator

    @staticmethod
    def _refusal(exc: wire.WireError) -> DomainError:
        # Checked before anything reaches the core: a sender that is not a
        # configured member, or a term the cluster could never step past.
        if isinstance(exc, wire.NotAMember):
            return PermissionDenied(str(exc))
        return InvalidArgument(str(exc))

    async def _deliver(self, message: Message) -> Message:
        reply = await self._replicator.deliver(message)
        if reply is None:
            # The core chose not to answer (a vote request within a leader's
            # lease, a message from a stale term): to the sender, a lost message.
            raise Unavailable("message not answered")
        assert reply is not None
        return reply

    async def RequestVote(
        self, request: pb.RequestVoteRequest, context: Context
    ) -> pb.RequestVoteResponse:
        """Step a (pre-)vote request."""
        try:
            message = wire.request_vote_from_proto(
                request,
                recipient=self._replicator.replica_id,
                ref=self._replicator.new_ref(),
                members=self._replicator.members,
            )
        except wire.WireError as exc:
            raise self._refusal(exc) from exc
        reply = await self._deliver(message)
        assert isinstance(reply, RequestVoteResponse)
        return wire.vote_response_to_proto(reply)

    async def AppendEntries(
        self, request: pb.AppendEntriesRequest, context: Context
    ) -> pb.AppendEntriesResponse:
        """Step an append (or heartbeat)."""
        try:
            message = wire.append_entries_from_proto(
                request,
                recipient=self._replicator.replica_id,
                ref=self._replicator.new_ref(),
                members=self._replicator.members,
            )
        except wire.WireError as exc:
            raise self._refusal(exc) from exc
        reply = await self._deliver(message)
        assert isinstance(reply, AppendEntriesResponse)
        return wire.append_response_to_proto(reply)

    async def InstallSnapshot(
        self, request_iterator: AsyncIterator[pb.InstallSnapshotRequest], context: Context
    ) -> pb.InstallSnapshotResponse:
        """Assemble a snapshot from its chunks and step it."""
        assembler = wire.SnapshotAssembler(
            recipient=self._replicator.replica_id,
            ref=self._replicator.new_ref(),
            members=self._replicator.members,
        )
        message: InstallSnapshot | None = None
        try:
            async for chunk in request_iterator:
                message = assembler.add(chunk)
        except wire.WireError as exc:
            raise self._refusal(exc) from exc
        if message is None:
            raise InvalidArgument("the snapshot stream ended early")
        assert message is not None
        reply = await self._deliver(message)
        assert isinstance(reply, InstallSnapshotResponse)
        return wire.snapshot_response_to_proto(reply)
