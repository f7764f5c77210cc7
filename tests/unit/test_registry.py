"""The agent registry tracks liveness from heartbeats and sessions."""

from __future__ import annotations

import pytest
from webshard.common.v1 import common_pb2

from services.coordinator.registry import AgentRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_heartbeats_keep_an_agent_healthy_and_silence_does_not() -> None:
    clock = Clock()
    registry = AgentRegistry(heartbeat_timeout_s=3.0, clock=clock)
    registry.register("agent-0", "127.0.0.1:1", 1 << 30, [])
    clock.now += 2.5
    registry.heartbeat("agent-0", in_flight=2, memory_used_bytes=5)
    clock.now += 2.5
    assert [r.agent_id for r in registry.agents()] == ["agent-0"]
    clock.now += 1.0
    assert registry.agents() == []
    [record] = registry.agents(include_unhealthy=True)
    info = registry.to_proto(record)
    assert not info.healthy
    assert info.in_flight == 2


def test_a_closed_session_marks_the_agent_unhealthy_unless_it_reregistered() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=3.0, clock=Clock())
    first = registry.register("agent-0", "127.0.0.1:1", 0, [])
    second = registry.register("agent-0", "127.0.0.1:1", 0, [])
    registry.disconnected("agent-0", first)
    assert [r.agent_id for r in registry.agents()] == ["agent-0"]
    registry.disconnected("agent-0", second)
    assert registry.agents() == []


def test_status_reports_replace_the_browser_list() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=3.0, clock=Clock())
    registry.register("agent-0", "127.0.0.1:1", 0, [common_pb2.BrowserInfo(browser_id="b0")])
    registry.update_browsers("agent-0", [common_pb2.BrowserInfo(browser_id="b1")])
    [record] = registry.agents()
    assert [b.browser_id for b in record.browsers] == ["b1"]


@pytest.mark.parametrize(("agent_id", "address"), [("", "h:1"), ("agent-0", "")])
def test_registration_needs_an_id_and_an_address(agent_id: str, address: str) -> None:
    registry = AgentRegistry(heartbeat_timeout_s=3.0)
    with pytest.raises(ValueError, match=r"agent_id|address"):
        registry.register(agent_id, address, 0, [])


def test_agents_known_but_not_attached_are_reattaching_for_a_while() -> None:
    clock = Clock()
    registry = AgentRegistry(heartbeat_timeout_s=3.0, clock=clock)
    # Learnt from the replicated state (a new leader): known, not attached here yet.
    registry.upsert("agent-0", "127.0.0.1:1", 1 << 30, [])
    session = registry.register("agent-1", "127.0.0.1:2", 1 << 30, [])
    assert registry.reattaching(within_s=10) == ["agent-0"]
    clock.now += 5
    registry.disconnected("agent-1", session)
    assert registry.reattaching(within_s=10) == ["agent-0", "agent-1"]
    clock.now += 6  # agent-0 has been away too long to count as on its way back
    assert registry.reattaching(within_s=10) == ["agent-1"]
    registry.register("agent-1", "127.0.0.1:2", 1 << 30, [])
    assert registry.reattaching(within_s=10) == []
