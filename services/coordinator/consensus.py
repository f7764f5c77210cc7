"""Drives the Raft core over gRPC: ticks, persistence, messages, proposals, reads.

One asyncio task owns the ``Node`` (it is not thread-safe and must see its
Readys in order). Everything else talks to that task through a queue:

- the tick timer puts a tick every ``tick_s``;
- RaftService calls put the request they received, tagged with a ``ref``; the
  core's reply carries the same ``ref`` and becomes the call's response (a
  request the core answers with nothing, such as a vote request inside a
  leader's lease, ends the call with UNAVAILABLE, which the sender treats as a
  lost message);
- requests the core sends go out as RaftService calls in background tasks, and
  their responses are stepped back in;
- proposals resolve when their entry is applied; linearizable reads use
  ReadIndex (the leader confirms it still leads with a heartbeat round, then
  the read waits until that index is applied): no clock assumptions, at the
  price of one round trip per read.

Each Ready is persisted with fsync (in a worker thread) before its messages are
sent, so no vote or acknowledgement is ever sent that the disk does not hold; a
Ready with nothing to persist (a heartbeat, its reply) skips the thread.

Elections stay rare on a saturated machine:

- the loop takes every event that is waiting at once and steps messages before
  ticks, so a heartbeat that arrived while the loop was busy resets the
  election timer before the timer is advanced; the whole batch shares one
  fsync, so proposals queued behind a slow disk do not hold up heartbeats;
- ``TickClock`` does not charge this process's own stalls to the leader: a tick
  that fires much later than scheduled is not counted (see there);
- every change of role is logged by the core with its cause, and stalls are
  logged here (at most every ``STALL_LOG_EVERY_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

from services.common.auth import bearer_interceptors
from services.coordinator.raft import (
    AppendEntries,
    AppendEntriesResponse,
    Config,
    FileStorage,
    InstallSnapshot,
    InstallSnapshotResponse,
    Message,
    Node,
    NotLeader,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Role,
    persist,
    wire,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

Response = RequestVoteResponse | AppendEntriesResponse | InstallSnapshotResponse

MAX_BATCH = 512
"""Events the loop takes from its queue at once (one Ready, one fsync for all of them)."""

STALL_LOG_EVERY_S = 10.0
"""At most one "loop stalled" warning per this many seconds."""


class TickClock:
    """Turns the ticker's wake-ups into Raft ticks without charging our own stalls to the leader.

    Ticks are due at a fixed rate. A wake-up more than a whole tick later than
    due means this process did not run for a while (CPU starvation, a long GC,
    a blocked loop); meanwhile the leader's heartbeats wait unread in the
    sockets. Counting that time would start an election the leader did
    nothing to deserve. So such a wake-up yields no tick and the schedule
    restarts from it: the next tick comes a whole tick later, once the backlog
    has been read. Never twice in a row, though: a process that is stalled all
    the time still ticks at every other wake-up, so a dead leader is still
    replaced, only later.
    """

    def __init__(self, tick_s: float, now: float) -> None:
        """Start with the first tick due one tick after ``now`` (seconds, monotonic)."""
        if tick_s <= 0:
            raise ValueError("tick_s must be positive")
        self._tick_s = tick_s
        self._due = now + tick_s
        self._skipped = False
        self.stalls = 0
        """Wake-ups that yielded no tick."""
        self.longest_stall_s = 0.0
        """The latest any such wake-up came, past its due time."""

    def delay(self, now: float) -> float:
        """How long to sleep before the next tick is due."""
        return max(0.0, self._due - now)

    def wake(self, now: float) -> int:
        """The ticks to deliver on waking at ``now``: 1, or 0 after a stall."""
        late = now - self._due
        if late > self._tick_s and not self._skipped:
            self._skipped = True
            self.stalls += 1
            self.longest_stall_s = max(self.longest_stall_s, late)
            self._due = now + self._tick_s
            return 0
        self._skipped = False
        # Fixed rate: a wake-up a little late is followed by a shorter sleep.
        self._due = max(self._due + self._tick_s, now)
        return 1


class NotLeaderError(Exception):
    """This replica cannot take the write; ``leader_address`` is where to send it (if known)."""

    def __init__(self, leader_id: str | None, leader_address: str | None) -> None:
        where = (
            f"the leader is {leader_id} at {leader_address}"
            if leader_address
            else ("no leader is elected yet; retry shortly")
        )
        super().__init__(f"this coordinator replica is not the leader: {where}")
        self.leader_id = leader_id
        self.leader_address = leader_address


@dataclass
class _Proposal:
    term: int
    future: asyncio.Future[None]


@dataclass
class StateMachine:
    """What the replicated log drives: apply a command, take and restore snapshots."""

    apply: Callable[[bytes], None]
    snapshot: Callable[[], bytes]
    restore: Callable[[bytes], None]


class Replicator:
    """A coordinator replica's Raft node, its storage and its connections to peers."""

    def __init__(
        self,
        *,
        replica_id: str,
        peers: dict[str, str],
        address: str,
        storage: FileStorage,
        state: StateMachine,
        config: Config,
        tick_s: float,
        snapshot_every: int = 1000,
        rpc_timeout_s: float = 1.0,
        token: str = "",
    ) -> None:
        self.replica_id = replica_id
        self._token = token  # the cluster token: peers require it of every Raft call
        self._addresses = {**peers, replica_id: address}
        self._storage = storage
        self._state = state
        self._tick_s = tick_s
        self._snapshot_every = snapshot_every
        self._rpc_timeout = rpc_timeout_s
        persisted = storage.load()
        if persisted.snapshot is not None:
            state.restore(persisted.snapshot.data)
        if not config.tick_s:
            config = dataclasses.replace(config, tick_s=tick_s)  # durations in log lines
        self._node = Node(
            replica_id, list(peers), storage, config, random.Random(hash(replica_id) ^ id(self))
        )
        # Everything the loop does arrives here: (kind, payload, future to answer).
        self._events: asyncio.Queue[tuple[str, object, asyncio.Future[object] | None]] = (
            asyncio.Queue()
        )
        self._refs = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[object]] = {}
        self._proposals: dict[int, _Proposal] = {}
        self._reads: dict[bytes, asyncio.Future[None]] = {}
        self._read_ids = itertools.count(1)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._applied_since_snapshot = 0
        self.leader_changed = asyncio.Event()

    # ------------------------------------------------------------------ status

    @property
    def role(self) -> Role:
        """This replica's role now."""
        return self._node.role

    @property
    def is_leader(self) -> bool:
        """True while this replica leads."""
        return self._node.role is Role.LEADER

    @property
    def term(self) -> int:
        """The current term."""
        return self._node.term

    @property
    def commit_index(self) -> int:
        """The highest committed index this replica knows."""
        return self._node.commit_index

    @property
    def leader_id(self) -> str | None:
        """The leader as this replica knows it."""
        return self._node.leader_id

    @property
    def members(self) -> frozenset[str]:
        """Every configured replica id, this one included."""
        return frozenset(self._addresses)

    def address_of(self, replica_id: str | None) -> str | None:
        """A replica's gRPC address."""
        return self._addresses.get(replica_id) if replica_id else None

    def not_leader(self) -> NotLeaderError:
        """The error a follower answers a write with."""
        return NotLeaderError(self.leader_id, self.address_of(self.leader_id))

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Start the loop and the tick timer."""
        self._spawn(self._loop())
        self._spawn(self._ticker())

    async def stop(self) -> None:
        """Stop the loop, fail what waits on it, close the channels and the storage."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiting in self._waiting.values():
            waiting.cancel()
        for read in self._reads.values():
            read.cancel()
        for proposal in self._proposals.values():
            if not proposal.future.done():
                proposal.future.set_exception(self.not_leader())
        for channel in self._channels.values():
            await channel.close()
        self._storage.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        clock = TickClock(self._tick_s, loop.time())
        logged_at = loop.time()
        logged_stalls = 0
        while True:
            await asyncio.sleep(clock.delay(loop.time()))
            if clock.wake(loop.time()):
                self._events.put_nowait(("tick", None, None))
            elif loop.time() - logged_at >= STALL_LOG_EVERY_S or logged_stalls == 0:
                log.warning(
                    "raft loop stalled: a tick came more than a tick late; the stall is not "
                    "counted against the leader",
                    extra={
                        "stalls": clock.stalls - logged_stalls,
                        "longest_stall_ms": round(clock.longest_stall_s * 1000, 1),
                        "tick_ms": round(self._tick_s * 1000, 1),
                    },
                )
                logged_at = loop.time()
                logged_stalls = clock.stalls
                clock.longest_stall_s = 0.0

    # ------------------------------------------------------------------ client side

    async def propose(self, command: bytes, timeout: float) -> None:
        """Replicate ``command``; return once it is committed and applied here."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(("propose", command, future))
        applied = await asyncio.wait_for(future, timeout)
        await asyncio.wait_for(applied, timeout)  # type: ignore[arg-type]

    async def read_barrier(self, timeout: float) -> None:
        """Wait until this replica, as leader, has applied everything committed before now."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(("read", None, future))
        applied = await asyncio.wait_for(future, timeout)
        await asyncio.wait_for(applied, timeout)  # type: ignore[arg-type]

    async def deliver(self, message: Message) -> Message | None:
        """Step a message from a peer; return the core's reply to it, if any."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(("step", message, future))
        reply = await future
        return reply  # type: ignore[return-value]

    def new_ref(self) -> int:
        """A reference that ties an incoming request to the reply it will get."""
        return next(self._refs)

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        node = self._node
        while True:
            batch = [await self._events.get()]
            while len(batch) < MAX_BATCH and not self._events.empty():
                batch.append(self._events.get_nowait())
            # Messages first, ticks last (a stable sort): a heartbeat that queued
            # behind a busy loop resets the election timer before ticks advance it.
            batch.sort(key=lambda event: event[0] == "tick")
            steps: list[tuple[int, asyncio.Future[object]]] = []
            for kind, payload, future in batch:
                if kind == "step" and future is not None:
                    steps.append((payload.ref, future))  # type: ignore[attr-defined]
                self._step_event(kind, payload, future)
            try:
                while node.has_ready():
                    await self._handle(node.ready())
            except (ValueError, NotLeader) as exc:
                log.warning("raft message rejected", extra={"error": str(exc)})
            finally:
                for ref, future in steps:
                    if not future.done():
                        # The core answered nothing (for example a vote request during
                        # a leader's lease): the call ends as if the message was lost.
                        self._waiting.pop(ref, None)
                        future.set_result(None)

    def _step_event(
        self, kind: str, payload: object, future: asyncio.Future[object] | None
    ) -> None:
        """Hand one event to the core; what it produces comes out in the next Ready."""
        node = self._node
        try:
            if kind == "tick":
                node.tick()
            elif kind == "step-reply":
                node.step(payload)  # type: ignore[arg-type]
            elif kind == "unreachable":
                node.report_unreachable(payload)  # type: ignore[arg-type]
            elif kind == "step":
                assert future is not None
                self._waiting[payload.ref] = future  # type: ignore[attr-defined]
                node.step(payload)  # type: ignore[arg-type]
            elif kind == "propose":
                assert future is not None
                try:
                    index = node.propose(payload)  # type: ignore[arg-type]
                except NotLeader:
                    future.set_exception(self.not_leader())
                else:
                    applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self._proposals[index] = _Proposal(node.term, applied)
                    future.set_result(applied)
            elif kind == "read":
                assert future is not None
                if not self.is_leader:
                    future.set_exception(self.not_leader())
                else:
                    context = str(next(self._read_ids)).encode()
                    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self._reads[context] = done
                    node.read_index(context)
                    future.set_result(done)
        except (ValueError, NotLeader) as exc:
            # A malformed or inapplicable message; the sender gets no reply.
            log.warning("raft message rejected", extra={"error": str(exc)})

    async def _handle(self, ready: Ready) -> None:
        node = self._node
        was_leader = self.leader_id
        if ready.entries or ready.hard_state is not None or ready.snapshot_to_persist is not None:
            await asyncio.to_thread(persist, self._storage, ready)
        for message in ready.messages:
            waiting = (
                self._waiting.pop(message.ref, None) if isinstance(message, Response) else None
            )
            if waiting is not None:
                if not waiting.done():
                    waiting.set_result(message)
            elif isinstance(message, (RequestVote, AppendEntries, InstallSnapshot)):
                self._spawn(self._send(message))
        if ready.snapshot is not None:
            self._state.restore(ready.snapshot.data)
        for entry in ready.committed_entries:
            if entry.command:
                try:
                    self._state.apply(entry.command)
                except Exception:
                    # A command that fails to apply fails the same way on every
                    # replica; the log stays consistent.
                    log.exception(
                        "a replicated command failed to apply", extra={"index": entry.index}
                    )
            proposal = self._proposals.pop(entry.index, None)
            if proposal is not None and not proposal.future.done():
                if proposal.term == entry.term:
                    proposal.future.set_result(None)
                else:
                    proposal.future.set_exception(self.not_leader())
            self._applied_since_snapshot += 1
        for read in ready.read_states:
            done = self._reads.pop(read.context, None)
            if done is not None and not done.done():
                done.set_result(None)  # applied above: reads resolve after the entries
        for context in ready.dropped_reads:
            done = self._reads.pop(context, None)
            if done is not None and not done.done():
                done.set_exception(self.not_leader())
        node.advance(ready)
        # A proposal whose index was overwritten by another leader never applies.
        if not self.is_leader:
            for index, proposal in list(self._proposals.items()):
                if not proposal.future.done():
                    proposal.future.set_exception(self.not_leader())
                del self._proposals[index]
        if self._applied_since_snapshot >= self._snapshot_every:
            self._applied_since_snapshot = 0
            node.compact(node.applied_index, self._state.snapshot())
        if self.leader_id != was_leader:
            log.info(
                "leader changed",
                extra={"leader": self.leader_id, "term": self.term, "role": self.role.name},
            )
            self.leader_changed.set()
            self.leader_changed = asyncio.Event()

    # ------------------------------------------------------------------ transport

    def _stub(self, peer: str) -> pb_grpc.RaftServiceAsyncStub:
        channel = self._channels.get(peer)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                self._addresses[peer],
                interceptors=[
                    *aio_client_interceptors(),  # type: ignore[no-untyped-call]
                    *bearer_interceptors(self._token),
                ],
                options=[
                    ("grpc.initial_reconnect_backoff_ms", 50),
                    ("grpc.max_reconnect_backoff_ms", 500),
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ],
            )
            self._channels[peer] = channel
        return pb_grpc.RaftServiceStub(channel)

    async def _send(self, message: Message) -> None:
        stub = self._stub(message.recipient)
        reply: Message
        try:
            if isinstance(message, RequestVote):
                vote = await stub.RequestVote(
                    wire.request_vote_to_proto(message), timeout=self._rpc_timeout
                )
                reply = wire.vote_response_from_proto(vote, request=message)
            elif isinstance(message, AppendEntries):
                append = await stub.AppendEntries(
                    wire.append_entries_to_proto(message), timeout=self._rpc_timeout
                )
                reply = wire.append_response_from_proto(append, request=message)
            elif isinstance(message, InstallSnapshot):
                chunks = list(wire.snapshot_chunks(message))

                async def stream() -> AsyncIterator[pb.InstallSnapshotRequest]:
                    for chunk in chunks:
                        yield chunk

                installed = await stub.InstallSnapshot(stream(), timeout=self._rpc_timeout * 10)
                reply = wire.snapshot_response_from_proto(installed, request=message)
            else:
                return
        except grpc.aio.AioRpcError:
            # Lost message: Raft retries on its own schedule.
            if not isinstance(message, RequestVote):
                self._events.put_nowait(("unreachable", message.recipient, None))
            return
        except wire.WireError as exc:
            # A reply no replica of ours could have sent: treat it as lost.
            log.warning("raft reply refused", extra={"peer": message.recipient, "error": str(exc)})
            return
        self._events.put_nowait(("step-reply", reply, None))
