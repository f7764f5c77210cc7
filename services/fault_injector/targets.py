"""Target selectors resolved against a view of the cluster, counted as Chaos Mesh counts.

Candidates by target kind, and the ids that name them:

- agent: registered agents, by agent id (``agent-1``); only healthy ones unless named.
- browser: the agents' browsers (not the native runtime), by ``agent/browser``
  (``agent-1/browser-0``) or by browser id alone on any agent; ``model`` keeps the
  browsers holding a shard of that model.
- shard: each replica of each shard of the deployed models, by ``model/index``
  (``minilm-l6/1``); ``model`` keeps one model's.
- service: the agents, on the path between them and the coordinator.
- replica: coordinator replicas, by replica id.

A selector that names no ids picks only among healthy agents (and their browsers
and shards); one that names an agent that is not healthy now (its session is
down, say) still reaches it, as the agent may well be up.

Modes: one picks one candidate at random; all picks every one; fixed picks
``value`` at random (all when there are fewer); percent picks ``value`` percent,
rounded down, at least one.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence

from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as pb

from services.fault_injector.spec import FaultError

TargetKind = pb.TargetKind
Mode = pb.SelectorMode


@dataclasses.dataclass(frozen=True)
class Replica:
    """A coordinator replica as it described itself."""

    replica_id: str
    address: str
    role: int
    """coordinator_pb2.ReplicaRole."""
    term: int
    leader_id: str = ""
    """The leader this replica knows of."""


@dataclasses.dataclass
class ClusterView:
    """What selectors resolve against: agents, placements and replicas, as fetched."""

    agents: list[common_pb2.AgentInfo] = dataclasses.field(default_factory=list)
    placements: dict[str, coordinator_pb2.Placement] = dataclasses.field(default_factory=dict)
    replicas: list[Replica] = dataclasses.field(default_factory=list)

    def agent(self, agent_id: str) -> common_pb2.AgentInfo | None:
        """The agent with this id, if registered."""
        return next((a for a in self.agents if a.agent_id == agent_id), None)

    def leader(self) -> Replica | None:
        """The leader: the replica that says it leads in the highest term, else the one
        most replicas name."""
        leading = [r for r in self.replicas if r.role == coordinator_pb2.REPLICA_ROLE_LEADER]
        if leading:
            return max(leading, key=lambda r: r.term)
        votes: dict[str, int] = {}
        for replica in self.replicas:
            if replica.leader_id:
                votes[replica.leader_id] = votes.get(replica.leader_id, 0) + 1
        if not votes:
            return None
        named = max(votes, key=lambda rid: votes[rid])
        return next((r for r in self.replicas if r.replica_id == named), None)


@dataclasses.dataclass(frozen=True)
class Target:
    """One resolved target."""

    kind: int
    """pb.TargetKind of what was selected."""
    id: str
    """Its id as selectors name it."""
    agent_id: str = ""
    agent_address: str = ""
    browser_id: str = ""
    shard_handle: str = ""
    replica_id: str = ""
    replica_address: str = ""


def browsers_of(agent: common_pb2.AgentInfo) -> list[common_pb2.BrowserInfo]:
    """An agent's browsers (not its native runtime), by id."""
    return sorted(
        (b for b in agent.browsers if b.runtime != common_pb2.RUNTIME_NATIVE),
        key=lambda b: b.browser_id,
    )


def ready_browsers(agent: common_pb2.AgentInfo) -> list[common_pb2.BrowserInfo]:
    """An agent's browsers that are READY, by id."""
    return [b for b in browsers_of(agent) if b.state == common_pb2.BROWSER_STATE_READY]


def _kind_name(kind: int) -> str:
    return pb.TargetKind.Name(kind).removeprefix("TARGET_KIND_").lower()  # type: ignore[arg-type]


def _ids(selector: pb.TargetSelector) -> list[str]:
    return [i.strip() for i in selector.ids if i.strip()]


def _agents(view: ClusterView, everyone: bool) -> list[Target]:
    return [
        Target(TargetKind.TARGET_KIND_AGENT, a.agent_id, a.agent_id, a.address)
        for a in sorted(view.agents, key=lambda a: a.agent_id)
        if everyone or a.healthy
    ]


def _browsers(view: ClusterView, model: str, everyone: bool) -> list[Target]:
    holding: set[tuple[str, str]] | None = None
    if model:
        placement = view.placements.get(model)
        holding = {
            (r.agent_id, r.browser_id)
            for s in (placement.shards if placement else [])
            for r in s.replicas
        }
    found = []
    for agent in sorted(view.agents, key=lambda a: a.agent_id):
        if not (everyone or agent.healthy):
            continue
        for browser in browsers_of(agent):
            if holding is not None and (agent.agent_id, browser.browser_id) not in holding:
                continue
            found.append(
                Target(
                    TargetKind.TARGET_KIND_BROWSER,
                    f"{agent.agent_id}/{browser.browser_id}",
                    agent.agent_id,
                    agent.address,
                    browser_id=browser.browser_id,
                )
            )
    return found


def _shards(view: ClusterView, model: str, everyone: bool) -> list[Target]:
    addresses = {a.agent_id: a.address for a in view.agents if everyone or a.healthy}
    found = []
    for name in sorted(view.placements):
        if model and name != model:
            continue
        for shard in view.placements[name].shards:
            for replica in shard.replicas:
                if replica.agent_id not in addresses:
                    continue
                found.append(
                    Target(
                        TargetKind.TARGET_KIND_SHARD,
                        f"{name}/{shard.shard.index}",
                        replica.agent_id,
                        addresses[replica.agent_id],
                        browser_id=replica.browser_id,
                        shard_handle=replica.handle,
                    )
                )
    return found


def _replicas(view: ClusterView) -> list[Target]:
    return [
        Target(
            TargetKind.TARGET_KIND_REPLICA,
            r.replica_id,
            replica_id=r.replica_id,
            replica_address=r.address,
        )
        for r in sorted(view.replicas, key=lambda r: r.replica_id)
    ]


def _matches(target: Target, wanted: str) -> bool:
    if target.id == wanted:
        return True
    # A browser may be named by its id alone, on whichever agent has it.
    return target.kind == TargetKind.TARGET_KIND_BROWSER and target.browser_id == wanted


def candidates(selector: pb.TargetSelector, view: ClusterView) -> list[Target]:
    """Every target the selector's kind, ids and model match.

    Raises FaultError NOT_FOUND when an id names nothing in the cluster.
    """
    kind = selector.kind
    model = selector.model.strip()
    ids = _ids(selector)
    named = bool(ids) and kind != TargetKind.TARGET_KIND_SERVICE
    if kind == TargetKind.TARGET_KIND_AGENT:
        pool = _agents(view, named)
    elif kind == TargetKind.TARGET_KIND_BROWSER:
        pool = _browsers(view, model, named)
    elif kind == TargetKind.TARGET_KIND_SHARD:
        pool = _shards(view, model, named)
    elif kind == TargetKind.TARGET_KIND_SERVICE:
        # The agents' end of the path to the coordinator; the ids named the service.
        return _agents(view, False)
    elif kind == TargetKind.TARGET_KIND_REPLICA:
        pool = _replicas(view)
    else:
        raise FaultError("INVALID_ARGUMENT", f"unknown target kind {kind}")
    if not ids:
        return pool
    missing = [i for i in ids if not any(_matches(t, i) for t in pool)]
    if missing:
        known = ", ".join(sorted({t.id for t in pool})) or "none"
        raise FaultError(
            "NOT_FOUND",
            f"no {_kind_name(kind)} {', '.join(missing)} in the cluster"
            + (f" holding model {model}" if model else "")
            + f" (known: {known})",
        )
    return [t for t in pool if any(_matches(t, i) for i in ids)]


def count(mode: int, value: int, available: int) -> int:
    """How many of ``available`` candidates a mode hits."""
    if available == 0:
        return 0
    if mode == Mode.SELECTOR_MODE_ONE:
        return 1
    if mode == Mode.SELECTOR_MODE_FIXED:
        return min(value, available)
    if mode == Mode.SELECTOR_MODE_PERCENT:
        return max(1, math.floor(available * value / 100))
    return available


def pick(
    selector: pb.TargetSelector,
    matched: Sequence[Target],
    allowed: Sequence[Target],
    rng: random.Random,
) -> list[Target]:
    """The targets hit: ``count`` computed over every matched candidate, drawn from the
    ``allowed`` ones (those that are eligible and whose breakers let the fault through)."""
    wanted = count(selector.mode, selector.value, len(matched))
    if wanted >= len(allowed):
        return list(allowed)
    return sorted(rng.sample(list(allowed), wanted), key=lambda t: t.id)


def split(
    targets: Sequence[Target], reason: Callable[[Target], str | None]
) -> tuple[list[Target], list[tuple[Target, str]]]:
    """Targets for which ``reason`` is None, and the others with their reasons."""
    kept: list[Target] = []
    dropped: list[tuple[Target, str]] = []
    for target in targets:
        why = reason(target)
        if why is None:
            kept.append(target)
        else:
            dropped.append((target, why))
    return kept, dropped
