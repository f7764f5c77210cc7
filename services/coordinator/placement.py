"""Shard placement: which runtime on which agent holds each replica of each shard.

Plain logic, no gRPC. A candidate is one runtime (a browser, or an agent's native
runtime) that could hold shards. Placement filters candidates by runtime kind,
pinned execution provider and free memory, then gives each shard its replicas on
distinct runtimes, preferring distinct agents, and spreads consecutive shards
over the agents so a layer-sharded model crosses machines. A warm standby is
taken only to put a replica on an agent no other replica of its shard uses (an
agent whose browsers all crashed has only standbys left), or when no ready
runtime is left; otherwise standbys stay free for recovery.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from webshard.common.v1 import common_pb2

EP = common_pb2.ExecutionProvider


class PlacementError(ValueError):
    """No placement satisfies the request; ``code`` is the gRPC status name."""

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Candidate:
    """One runtime that may hold shards."""

    agent_id: str
    browser_id: str
    runtime: int  # common_pb2.Runtime
    providers: Sequence[int]  # common_pb2.ExecutionProvider values it can use
    fallback_adapter: bool  # its WebGPU adapter is a software fallback
    free_bytes: int  # the agent's memory budget left
    standby: bool = False  # a warm standby, kept for recovery unless it spreads replicas


@dataclass
class Slot:
    """Where one replica of one shard goes."""

    agent_id: str
    browser_id: str


@dataclass
class _Load:
    bytes_by_agent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    shards_by_runtime: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))


def candidates_from(
    agents: Sequence[common_pb2.AgentInfo], used_bytes: dict[str, int]
) -> list[Candidate]:
    """Every ready runtime and warm standby of every healthy agent, with the agent's
    free memory."""
    out = []
    for agent in agents:
        if not agent.healthy:
            continue
        free = agent.memory_budget_bytes - used_bytes.get(agent.agent_id, 0)
        for browser in agent.browsers:
            if browser.state not in (
                common_pb2.BROWSER_STATE_READY,
                common_pb2.BROWSER_STATE_STANDBY,
            ):
                continue
            out.append(
                Candidate(
                    agent_id=agent.agent_id,
                    browser_id=browser.browser_id,
                    runtime=browser.runtime,
                    providers=list(browser.capabilities.execution_providers),
                    fallback_adapter=browser.capabilities.webgpu.is_fallback_adapter,
                    free_bytes=free,
                    standby=browser.state == common_pb2.BROWSER_STATE_STANDBY,
                )
            )
    return out


def place(
    shard_sizes: Sequence[int],
    *,
    replicas: int,
    runtime: int,
    provider: int,
    candidates: Sequence[Candidate],
) -> list[list[Slot]]:
    """Choose ``replicas`` runtimes for each shard; raise PlacementError when impossible."""
    if replicas < 1:
        raise PlacementError("replicas must be at least 1", "INVALID_ARGUMENT")
    usable = [c for c in candidates if runtime in (common_pb2.RUNTIME_UNSPECIFIED, c.runtime)]
    if not usable:
        kind = common_pb2.Runtime.Name(runtime)  # type: ignore[arg-type]
        raise PlacementError(f"no healthy agent offers a ready runtime of kind {kind}")
    if provider != EP.EXECUTION_PROVIDER_UNSPECIFIED:
        usable = [c for c in usable if provider in c.providers]
        if not usable:
            name = EP.Name(provider).removeprefix("EXECUTION_PROVIDER_").lower()  # type: ignore[arg-type]
            raise PlacementError(
                f"no healthy agent offers the {name} execution provider"
                + (" (WebNN is reported unavailable by every browser)" if name == "webnn" else "")
            )
    if replicas > len(usable):
        raise PlacementError(
            f"{replicas} replicas per shard need {replicas} distinct runtimes; "
            f"only {len(usable)} are ready (standbys included)"
        )
    free = {c.agent_id: c.free_bytes for c in usable}
    load = _Load()
    placement: list[list[Slot]] = []
    previous_agents: set[str] = set()
    for index, size in enumerate(shard_sizes):
        chosen: list[Candidate] = []
        for _ in range(replicas):
            fits = [
                c
                for c in usable
                if c not in chosen and free[c.agent_id] - load.bytes_by_agent[c.agent_id] >= size
            ]
            if not fits:
                raise PlacementError(
                    f"shard {index} ({size} bytes) does not fit: every ready runtime's agent "
                    "has less memory budget left than that",
                    "RESOURCE_EXHAUSTED",
                )
            chosen_agents = {c.agent_id for c in chosen}
            best = min(
                fits,
                key=lambda c: (
                    c.agent_id in chosen_agents,  # replicas on different agents first
                    # then ready runtimes before standbys this placement has not taken yet
                    c.standby and not load.shards_by_runtime[(c.agent_id, c.browser_id)],
                    c.agent_id in previous_agents,  # then away from the previous shard
                    load.shards_by_runtime[(c.agent_id, c.browser_id)],
                    load.bytes_by_agent[c.agent_id],
                    c.fallback_adapter,  # a real GPU adapter before a software one
                    c.agent_id,
                    c.browser_id,
                ),
            )
            chosen.append(best)
            load.bytes_by_agent[best.agent_id] += size
            load.shards_by_runtime[(best.agent_id, best.browser_id)] += 1
        previous_agents = {chosen[0].agent_id}
        placement.append([Slot(c.agent_id, c.browser_id) for c in chosen])
    return placement
