"""The agent's session with the coordinator: register, heartbeat, follow the leader.

The session runs for the agent's whole life. When a stream breaks, or a replica
tells the agent to reattach elsewhere, it reconnects with a capped exponential
backoff, trying the replica it was pointed at first and then every known one.

Fault hooks act on it through ``cut`` (the stream breaks as a lost connection
would) and ``link`` (latency on every message, or a partition that cuts the
stream and keeps it from reopening).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

from services.browser_agent.hooks import Link
from services.common.auth import bearer_metadata
from services.common.pulse import Pulse

log = logging.getLogger(__name__)


class CoordinatorSession:
    """Keeps one agent session open with some coordinator replica."""

    def __init__(
        self,
        *,
        agent_id: str,
        address: str,
        coordinators: list[str],
        memory_budget_bytes: int,
        browsers: Callable[[], list[common_pb2.BrowserInfo]],
        max_backoff_s: float,
        token: str = "",
    ) -> None:
        self._agent_id = agent_id
        # The cluster token: a coordinator that has one requires it of the session.
        self._metadata = bearer_metadata(token)
        self._address = address
        self._coordinators = list(coordinators)
        self._budget = memory_budget_bytes
        self._browsers = browsers
        self._max_backoff = max_backoff_s
        self._next: str | None = None
        self.attached_to = ""
        self.attached = asyncio.Event()
        self.link = Link()
        """Conditions fault hooks put on the session's traffic."""
        self._status_due = Pulse()
        self._call: (
            grpc.aio.StreamStreamCall[pb.AgentSessionRequest, pb.AgentSessionResponse] | None
        ) = None
        self._cut = False

    def cut(self) -> bool:
        """Break the open session stream now, as a lost connection would.

        The session reconnects by itself, to the same replica first. Returns False
        when no stream was open.
        """
        call = self._call
        if call is None or call.done():
            return False
        self._cut = True
        call.cancel()
        return True

    async def run(self) -> None:
        """Keep a session open until cancelled."""
        backoff = 0.05
        index = 0
        while True:
            # A partition refuses new sessions as it drops the traffic of the open one.
            await self.link.wait_open()
            target = self._next or self._coordinators[index % len(self._coordinators)]
            self._next = None
            index += 1
            try:
                await self._session(target)
                backoff = 0.05
            except grpc.aio.AioRpcError as exc:
                log.info(
                    "coordinator session ended",
                    extra={
                        "coordinator": target,
                        "code": exc.code().name,
                        "details": exc.details(),
                    },
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._cut or (task is not None and task.cancelling()):
                    raise
                # cut() cancelled the call, not this task: reconnect at once, to the same replica.
                log.info(
                    "coordinator session cut (by a fault hook, or its heartbeats failed)",
                    extra={"coordinator": target},
                )
                self._next = target
            finally:
                self._call = None
                self._cut = False
                self.attached.clear()
                self.attached_to = ""
            if self._next is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    async def _session(self, target: str) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            call = pb_grpc.CoordinatorServiceStub(channel).AgentSession(metadata=self._metadata)
            self._call = call
            browsers = self._browsers()
            await call.write(
                pb.AgentSessionRequest(
                    registration=pb.AgentRegistration(
                        agent_id=self._agent_id,
                        address=self._address,
                        browsers=browsers,
                        memory_budget_bytes=self._budget,
                    )
                )
            )
            first = await call.read()
            if isinstance(first, pb.AgentSessionResponse) and first.HasField("reattach"):
                # A follower points at the leader: go there at once.
                self._next = first.reattach.leader_address or None
                log.info(
                    "reattaching",
                    extra={"leader": first.reattach.leader_address, "from": target},
                )
                return
            if not isinstance(first, pb.AgentSessionResponse) or not first.HasField("accepted"):
                code = await call.code()
                log.warning(
                    "coordinator ended the session before accepting it",
                    extra={
                        "coordinator": target,
                        "code": code.name,
                        "details": await call.details(),
                    },
                )
                return
            interval = first.accepted.heartbeat_interval.ToTimedelta().total_seconds() or 1.0
            self.attached_to = target
            self.attached.set()
            log.info("attached to coordinator", extra={"coordinator": target})
            heartbeats = asyncio.create_task(self._heartbeat(call, interval, browsers))

            def end_session_if_heartbeats_fail(task: asyncio.Task[None]) -> None:
                # A session without heartbeats looks dead to the coordinator while
                # this side waits on it forever: end it, so the agent reconnects.
                if not task.cancelled() and task.exception() is not None:
                    log.error(
                        "heartbeats failed; reopening the session",
                        extra={"error": repr(task.exception())},
                    )
                    self.cut()

            heartbeats.add_done_callback(end_session_if_heartbeats_fail)
            try:
                while True:
                    message = await call.read()
                    if not isinstance(message, pb.AgentSessionResponse):
                        return  # the coordinator closed the stream
                    await self.link.hold()
                    if message.HasField("reattach"):
                        self._next = message.reattach.leader_address or None
                        log.info("reattaching", extra={"leader": message.reattach.leader_address})
                        return
            finally:
                heartbeats.cancel()
                call.cancel()

    async def _heartbeat(
        self,
        call: grpc.aio.StreamStreamCall[pb.AgentSessionRequest, pb.AgentSessionResponse],
        interval: float,
        registered: list[common_pb2.BrowserInfo],
    ) -> None:
        """Heartbeat every ``interval``; send the browser list when it changed, at once
        when ``report_status`` asks."""
        sequence = 0
        reported = _status_key(registered)
        beat_at = time.monotonic()
        while True:
            browsers = self._browsers()
            beat = time.monotonic() >= beat_at
            key = _status_key(browsers)
            if beat or key != reported:
                # Injected latency holds each message; heartbeats then come that much
                # apart more.
                await self.link.hold()
            if beat:
                sequence += 1
                sent = Timestamp()
                sent.FromNanoseconds(time.time_ns())
                await call.write(
                    pb.AgentSessionRequest(
                        heartbeat=pb.AgentHeartbeat(
                            sequence=sequence,
                            sent_at=sent,
                            memory_used_bytes=sum(b.memory_bytes for b in browsers),
                        )
                    )
                )
                beat_at = time.monotonic() + interval
            if key != reported:
                await call.write(
                    pb.AgentSessionRequest(status=pb.AgentStatusReport(browsers=browsers))
                )
                reported = key
            await self._status_due.wait(beat_at - time.monotonic())

    def report_status(self) -> None:
        """Send the browser list now if it changed (a fault took effect, a browser failed),
        not at the next heartbeat."""
        self._status_due.fire()


def _status_key(
    browsers: list[common_pb2.BrowserInfo],
) -> list[tuple[str, int, int, tuple[str, ...]]]:
    # Memory moves all the time; a status report is due when a browser appears,
    # disappears, changes state, gains or loses shards, or a fault starts or ends there.
    return [(b.browser_id, b.state, len(b.shards), tuple(b.faults_in_force)) for b in browsers]
