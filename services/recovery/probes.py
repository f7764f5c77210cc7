"""Active half-open probes: the I/O around the decisions ``breakers`` makes.

``BreakerProber`` runs in the background: when a breaker's open time ends it asks
``Breakers`` which probes are due, runs each (one per target at a time, under a
deadline, a bounded number at once) and hands the result back. What a result
means is the breaker's business, not this module's.

``ClusterProbes`` is how a target is probed in the running service: a real
inference of a shard the target holds, pinned to it through the coordinator's
``InferRequest.pins``; for a target that holds no shard, its agent's ``GetStatus``
(the agent answers, and for a browser: the browser is ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as agent_grpc
from webshard.common.v1 import common_pb2
from webshard.errors import InvalidArgumentError, NotFoundError, RPCError

from services.recovery.breakers import (
    BreakerKey,
    Breakers,
    BreakerScope,
    Clock,
    ProbeOutcome,
    ProbeResult,
    ProbeTicket,
)

log = logging.getLogger(__name__)

READY_STATES = frozenset({common_pb2.BROWSER_STATE_READY, common_pb2.BROWSER_STATE_STANDBY})
"""Browser states in which a browser can take work."""


class ProbeRunner(Protocol):
    """Probes one breaker's target."""

    async def probe(self, key: BreakerKey) -> ProbeResult:
        """Ask the target for a sign of life; what it found."""
        ...


class InputUnavailable(Exception):
    """No input can be built for a model (it takes no text and has no example inputs)."""


@dataclass(frozen=True, slots=True)
class HeldShard:
    """One shard replica a target holds."""

    model: str
    shard_index: int
    agent_id: str
    browser_id: str

    @property
    def where(self) -> str:
        """The replica as a pin names it: agent/browser."""
        return f"{self.agent_id}/{self.browser_id}" if self.browser_id else self.agent_id


class Cluster(Protocol):
    """What ``ClusterProbes`` needs from the coordinator (CoordinatorActuator has it)."""

    async def cluster_status(self) -> ClusterView:
        """The deployed shards and the registered agents."""
        ...

    async def infer_pinned(self, model: str, shard_index: int, where: str) -> float:
        """One inference with the shard pinned to ``where``; its total milliseconds.

        Raises RPCError when it fails, InputUnavailable when no input can be built.
        """
        ...


class AgentStatus(Protocol):
    """An agent's own status call."""

    async def status(self, address: str, timeout_s: float) -> agent_pb.GetStatusResponse:
        """The agent's GetStatus; grpc.aio.AioRpcError when it does not answer."""
        ...


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The parts of the coordinator's ClusterStatus a probe plans with."""

    shards: Sequence[HeldShard]
    """Every shard replica, in a stable order (model, shard, replica)."""
    agents: dict[str, str]
    """Registered agent id -> its gRPC address."""


def held_by(view: ClusterView, key: BreakerKey) -> list[HeldShard]:
    """The shard replicas on a breaker's target: on its browser, or anywhere on its agent."""
    agent_id, _, browser_id = key.target_id.partition("/")
    return [
        shard
        for shard in view.shards
        if shard.agent_id == agent_id
        and (key.scope == BreakerScope.AGENT or shard.browser_id == browser_id)
    ]


class ClusterProbes:
    """Probes targets through the coordinator and, failing a shard, the agent itself."""

    def __init__(self, cluster: Cluster, agents: AgentStatus, *, timeout_s: float) -> None:
        self._cluster = cluster
        self._agents = agents
        self._timeout_s = timeout_s

    async def probe(self, key: BreakerKey) -> ProbeResult:
        """A pinned inference of a shard the target holds; else its agent's status."""
        try:
            view = await self._cluster.cluster_status()
        except RPCError as exc:
            # The coordinator's trouble says nothing about the target.
            return ProbeResult(ProbeOutcome.SKIPPED, f"cluster status unreadable: {exc}")
        skipped: list[str] = []
        for shard in held_by(view, key):
            if shard.model in skipped:
                continue
            what = f"probe of shard {shard.shard_index} of {shard.model} on {shard.where}"
            try:
                total_ms = await self._cluster.infer_pinned(
                    shard.model, shard.shard_index, shard.where
                )
            except InputUnavailable:
                log.info(
                    "probe skips a model whose input cannot be built",
                    extra={"breaker": key.target_id, "model": shard.model},
                )
                skipped.append(shard.model)
                continue
            except (NotFoundError, InvalidArgumentError) as exc:
                # Undeployed or moved since the status was read: not the target's fault.
                log.info(
                    "probe target changed under it",
                    extra={"breaker": key.target_id, "model": shard.model, "error": str(exc)},
                )
                continue
            except RPCError as exc:
                return ProbeResult(ProbeOutcome.FAILED, f"{what} failed: {exc}")
            return ProbeResult(ProbeOutcome.PASSED, f"{what} answered in {total_ms:.1f} ms")
        return await self._ping(key, view, skipped)

    async def _ping(self, key: BreakerKey, view: ClusterView, skipped: list[str]) -> ProbeResult:
        agent_id, _, browser_id = key.target_id.partition("/")
        holds = (
            f"holds shards only of {', '.join(skipped)}, whose input cannot be built"
            if skipped
            else "holds no shard"
        )
        address = view.agents.get(agent_id)
        if not address:
            return ProbeResult(
                ProbeOutcome.SKIPPED,
                f"{key.target_id} {holds} and agent {agent_id} is not registered with the "
                "coordinator; nothing to ask",
            )
        what = f"probe of agent {agent_id} at {address} ({key.target_id} {holds})"
        try:
            status = await self._agents.status(address, self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            return ProbeResult(
                ProbeOutcome.FAILED,
                f"{what}: GetStatus answered {exc.code().name}: {exc.details()}",
            )
        if key.scope == BreakerScope.AGENT:
            return ProbeResult(ProbeOutcome.PASSED, f"{what}: GetStatus answered")
        browser = next((b for b in status.browsers if b.browser_id == browser_id), None)
        if browser is None:
            return ProbeResult(
                ProbeOutcome.SKIPPED,
                f"{what}: the agent has no browser {browser_id} (replaced or closed)",
            )
        state = common_pb2.BrowserState.Name(browser.state).removeprefix("BROWSER_STATE_").lower()
        outcome = ProbeOutcome.PASSED if browser.state in READY_STATES else ProbeOutcome.FAILED
        return ProbeResult(outcome, f"{what}: browser {browser_id} is {state}")


class GrpcAgentStatus:
    """AgentStatus over gRPC, one channel per agent address."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def status(self, address: str, timeout_s: float) -> agent_pb.GetStatusResponse:
        """The agent's GetStatus."""
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        stub = agent_grpc.BrowserAgentServiceStub(channel)
        return await stub.GetStatus(agent_pb.GetStatusRequest(), timeout=timeout_s)

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


class BreakerProber:
    """Runs the probes the breakers ask for, in the background.

    Args:
        breakers: decides when a probe is due and what its result means.
        runner: probes one target.
        clock: the breakers' clock.
        timeout_s: the deadline of one probe; one that runs past it failed.
        max_concurrent: probes running at once, over all targets.
        max_wait_s: the longest the loop sleeps without looking (a wall clock may jump).
    """

    def __init__(
        self,
        breakers: Breakers,
        runner: ProbeRunner,
        clock: Clock,
        *,
        timeout_s: float,
        max_concurrent: int = 4,
        max_wait_s: float = 1.0,
    ) -> None:
        self._breakers = breakers
        self._runner = runner
        self._clock = clock
        self._timeout_s = timeout_s
        self._max_concurrent = max_concurrent
        self._max_wait_s = max_wait_s
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._unlisten = breakers.add_listener(lambda _: self._wake.set())

    def start(self) -> None:
        """Start looking for due probes."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="breaker-prober")

    async def close(self) -> None:
        """Stop looking and cancel the probes running; their breakers stay as they are."""
        self._unlisten()
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop_task = None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            free = self._max_concurrent - len(self._running)
            for ticket in self._breakers.start_due_probes(limit=max(free, 0)):
                task = asyncio.create_task(self._run(ticket), name=f"probe {ticket.key}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            await self._sleep()

    async def _sleep(self) -> None:
        wait = self._max_wait_s
        if len(self._running) < self._max_concurrent:
            due = self._breakers.next_probe_at()
            if due is not None:
                wait = min(wait, max(due - self._clock(), 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def _run(self, ticket: ProbeTicket) -> None:
        key = ticket.key
        try:
            result = await asyncio.wait_for(self._runner.probe(key), timeout=self._timeout_s)
        except TimeoutError:
            result = ProbeResult(
                ProbeOutcome.FAILED, f"probe of {key} had no answer within {self._timeout_s:g} s"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a probe must not stop the prober
            log.exception("probe raised", extra={"breaker": key.target_id})
            result = ProbeResult(ProbeOutcome.SKIPPED, f"probe of {key} raised {exc!r}")
        applied = self._breakers.finish_probe(ticket, result)
        log.log(
            logging.WARNING if result.outcome == ProbeOutcome.SKIPPED else logging.INFO,
            "breaker probe",
            extra={
                "breaker": key.target_id,
                "scope": key.scope.name.lower(),
                "outcome": result.outcome.value,
                "detail": result.detail,
                "applied": applied,
                "state": self._breakers.get(key).state.label,
            },
        )
        self._wake.set()
