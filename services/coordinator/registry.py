"""The agent registry: what the coordinator knows of each agent, from its session.

Plain logic with an injectable clock; no gRPC here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from webshard.common.v1 import common_pb2

from services.common.pulse import Pulse


@dataclass
class AgentRecord:
    """One agent as registered, with its liveness."""

    agent_id: str
    address: str
    memory_budget_bytes: int
    browsers: list[common_pb2.BrowserInfo] = field(default_factory=list)
    last_heartbeat: float = 0.0
    connected: bool = True
    in_flight: int = 0
    memory_used_bytes: int = 0
    session: int = 0
    detached_at: float = 0.0
    """When its session here ended, or (never attached here) when this replica learnt of it."""


class AgentRegistry:
    """Agents by id. An agent is healthy while its session is open and its heartbeats arrive."""

    def __init__(
        self, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._timeout = heartbeat_timeout_s
        self._clock = clock
        self._agents: dict[str, AgentRecord] = {}
        self._sessions = 0
        self.changed = Pulse()
        """Fires when an agent is learnt of, attaches, detaches, reports its browsers or
        heartbeats again after falling silent: what placement can use has changed."""

    def upsert(
        self,
        agent_id: str,
        address: str,
        memory_budget_bytes: int,
        browsers: Iterable[common_pb2.BrowserInfo],
    ) -> None:
        """Record what the cluster knows of an agent; its session state is kept."""
        if not agent_id:
            raise ValueError("registration needs an agent_id")
        if not address:
            raise ValueError(f"agent {agent_id!r} registered without an address")
        record = self._agents.get(agent_id)
        if record is None:
            self._agents[agent_id] = AgentRecord(
                agent_id=agent_id,
                address=address,
                memory_budget_bytes=memory_budget_bytes,
                browsers=list(browsers),
                connected=False,
                detached_at=self._clock(),
            )
        else:
            record.address = address
            record.memory_budget_bytes = memory_budget_bytes
            record.browsers = list(browsers)
        self.changed.fire()

    def attach(self, agent_id: str) -> int:
        """Note that the agent's session opened here; return the session's number."""
        record = self._agents[agent_id]
        self._sessions += 1
        record.session = self._sessions
        record.connected = True
        record.last_heartbeat = self._clock()
        self.changed.fire()
        return self._sessions

    def register(
        self,
        agent_id: str,
        address: str,
        memory_budget_bytes: int,
        browsers: Iterable[common_pb2.BrowserInfo],
    ) -> int:
        """Record a (re-)registration with an open session; return the session's number."""
        self.upsert(agent_id, address, memory_budget_bytes, browsers)
        return self.attach(agent_id)

    def get(self, agent_id: str) -> AgentRecord | None:
        """The agent's record, healthy or not."""
        return self._agents.get(agent_id)

    def heartbeat(self, agent_id: str, *, in_flight: int, memory_used_bytes: int) -> None:
        """Note a heartbeat."""
        record = self._agents[agent_id]
        silent = not self.healthy(record)
        record.last_heartbeat = self._clock()
        record.in_flight = in_flight
        record.memory_used_bytes = memory_used_bytes
        if silent:
            self.changed.fire()

    def update_browsers(self, agent_id: str, browsers: Iterable[common_pb2.BrowserInfo]) -> None:
        """Replace an agent's browser list from a status report."""
        self._agents[agent_id].browsers = list(browsers)
        self.changed.fire()

    def disconnected(self, agent_id: str, session: int) -> None:
        """Note that a session ended, unless the agent has since opened a newer one."""
        record = self._agents.get(agent_id)
        if record is not None and record.session == session:
            record.connected = False
            record.detached_at = self._clock()
            self.changed.fire()

    def reattaching(self, within_s: float) -> list[str]:
        """Agents known to the cluster whose session is not open here but ended (or who
        became known here) within ``within_s``: after a leader change, or a session cut
        short, such an agent is on its way back."""
        now = self._clock()
        return sorted(
            r.agent_id
            for r in self._agents.values()
            if not r.connected and now - r.detached_at <= within_s
        )

    def healthy(self, record: AgentRecord) -> bool:
        """True while the session is open and the last heartbeat is recent."""
        return record.connected and self._clock() - record.last_heartbeat <= self._timeout

    def agents(self, *, include_unhealthy: bool = False) -> list[AgentRecord]:
        """The agents, sorted by id."""
        records = sorted(self._agents.values(), key=lambda r: r.agent_id)
        return [r for r in records if include_unhealthy or self.healthy(r)]

    def to_proto(self, record: AgentRecord, now_wall: float | None = None) -> common_pb2.AgentInfo:
        """The contract's view of an agent."""
        wall = time.time() if now_wall is None else now_wall
        seen = Timestamp()
        seen.FromNanoseconds(int((wall - (self._clock() - record.last_heartbeat)) * 1e9))
        return common_pb2.AgentInfo(
            agent_id=record.agent_id,
            address=record.address,
            browsers=record.browsers,
            healthy=self.healthy(record),
            last_heartbeat_at=seen,
            memory_budget_bytes=record.memory_budget_bytes,
            memory_used_bytes=record.memory_used_bytes,
            in_flight=record.in_flight,
        )
