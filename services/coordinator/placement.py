"""Shard placement: which runtime on which agent holds each replica of each shard.

Plain logic, no gRPC. A candidate is one runtime (a browser, or an agent's native
runtime) that could hold shards. Placement filters candidates by runtime kind,
pinned execution provider and free memory, then gives each shard its replicas on
distinct runtimes, preferring distinct agents, and spreads consecutive shards
over the agents so a layer-sharded model crosses machines. A warm standby is
taken only to put a replica on an agent no other replica of its shard uses (an
agent whose browsers all crashed has only standbys left), or when no ready
runtime is left; otherwise standbys stay free for recovery.

Hot spares are placed after the replicas, one shard at a time: a spare goes on a
runtime that holds no replica or other spare of its shard, on an agent none of
them uses where one is left. A takeover (``choose_takeover``) promotes a healthy
spare off the failed browser or agent; ``spare_slot`` picks where the spare that
follows it is loaded.

A shard whose copies crowd onto one agent (where every other agent was faulty when
they were placed) is spread again once others are healthy: ``swap_roles`` lets a
spare on an agent of its own serve in place of a replica beside another, and
``crowded_spare`` names a spare worth loading again on an agent that holds no copy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from webshard.common.v1 import common_pb2

EP = common_pb2.ExecutionProvider

DEFAULT_SPARES = 1
"""Spares per shard when a deploy does not say: placed where the fleet has room."""


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
    engine: str = ""  # "chromium", "firefox" or "native"


@dataclass(frozen=True)
class Slot:
    """Where one copy (a replica or a spare) of one shard goes, or is."""

    agent_id: str
    browser_id: str

    @property
    def key(self) -> tuple[str, str]:
        """The runtime: (agent, browser)."""
        return (self.agent_id, self.browser_id)


@dataclass
class Load:
    """What a placement has put where so far: bytes per agent, shard copies per runtime."""

    bytes_by_agent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    shards_by_runtime: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, slot: Slot, size: int) -> None:
        """Count one shard copy of ``size`` bytes on ``slot``."""
        self.bytes_by_agent[slot.agent_id] += size
        self.shards_by_runtime[slot.key] += 1

    @classmethod
    def of(cls, copies: Iterable[tuple[Slot, int]]) -> Load:
        """The load of existing copies, each (where, size in bytes)."""
        load = cls()
        for slot, size in copies:
            load.add(slot, size)
        return load


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
                    engine=engine_of(browser),
                )
            )
    return out


def engine_of(browser: common_pb2.BrowserInfo) -> str:
    """A runtime's engine: its browser's, or ``native`` for the native runtime."""
    if browser.runtime == common_pb2.RUNTIME_NATIVE:
        return "native"
    return browser.capabilities.engine


def place(
    shard_sizes: Sequence[int],
    *,
    replicas: int,
    runtime: int,
    provider: int,
    candidates: Sequence[Candidate],
    engines: Collection[str] = (),
) -> list[list[Slot]]:
    """Choose ``replicas`` runtimes for each shard; raise PlacementError when impossible.

    ``engines`` (empty: any) keeps to browsers of those engines; each shard's copies
    go to different agents first, then to different engines, and each shard away
    from the agents and engines of the one before it.
    """
    if replicas < 1:
        raise PlacementError("replicas must be at least 1", "INVALID_ARGUMENT")
    usable = usable_candidates(candidates, runtime=runtime, provider=provider, engines=engines)
    if replicas > len(usable):
        raise PlacementError(
            f"{replicas} replicas per shard need {replicas} distinct runtimes; "
            f"only {len(usable)} are ready (standbys included)"
        )
    free = {c.agent_id: c.free_bytes for c in usable}
    load = Load()
    placement: list[list[Slot]] = []
    previous_agents: set[str] = set()
    previous_engines: set[str] = set()
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
            chosen_engines = {c.engine for c in chosen}
            best = min(
                fits,
                key=lambda c: (
                    c.agent_id in chosen_agents,  # replicas on different agents first
                    c.engine in chosen_engines,  # and engines
                    # then ready runtimes before standbys this placement has not taken yet
                    c.standby and not load.shards_by_runtime[(c.agent_id, c.browser_id)],
                    c.agent_id in previous_agents,  # then away from the previous shard
                    c.engine in previous_engines,
                    load.shards_by_runtime[(c.agent_id, c.browser_id)],
                    load.bytes_by_agent[c.agent_id],
                    c.fallback_adapter,  # a real GPU adapter before a software one
                    c.agent_id,
                    c.browser_id,
                ),
            )
            chosen.append(best)
            load.add(Slot(best.agent_id, best.browser_id), size)
        previous_agents = {chosen[0].agent_id}
        previous_engines = {chosen[0].engine}
        placement.append([Slot(c.agent_id, c.browser_id) for c in chosen])
    return placement


def usable_candidates(
    candidates: Sequence[Candidate],
    *,
    runtime: int,
    provider: int,
    engines: Collection[str] = (),
) -> list[Candidate]:
    """The candidates of the runtime kind, provider and engines (empty: any) asked for;
    PlacementError when none."""
    usable = [c for c in candidates if runtime in (common_pb2.RUNTIME_UNSPECIFIED, c.runtime)]
    if not usable:
        kind = common_pb2.Runtime.Name(runtime)  # type: ignore[arg-type]
        raise PlacementError(f"no healthy agent offers a ready runtime of kind {kind}")
    if engines:
        present = sorted({c.engine for c in usable})
        usable = [c for c in usable if c.engine in engines]
        if not usable:
            raise PlacementError(
                f"no healthy agent offers a ready browser of engine {' or '.join(engines)} "
                f"(the fleet's engines: {', '.join(present)})"
            )
    if provider != EP.EXECUTION_PROVIDER_UNSPECIFIED:
        usable = [c for c in usable if provider in c.providers]
        if not usable:
            name = EP.Name(provider).removeprefix("EXECUTION_PROVIDER_").lower()  # type: ignore[arg-type]
            raise PlacementError(
                f"no healthy agent offers the {name} execution provider"
                + (" (WebNN is reported unavailable by every browser)" if name == "webnn" else "")
            )
    return usable


def place_spares(
    shard_sizes: Sequence[int],
    serving: Sequence[Sequence[Slot]],
    *,
    spares: int | None,
    runtime: int,
    provider: int,
    candidates: Sequence[Candidate],
    engines: Collection[str] = (),
) -> list[list[Slot]]:
    """Choose each shard's hot spares, after its replicas (``serving``, as ``place`` chose),
    on browsers of ``engines`` (empty: any).

    ``spares`` None asks for the default, DEFAULT_SPARES where the fleet has room: a
    shard with no runtime (or memory) left gets fewer, and standbys are left for
    recovery. An explicit count is a promise: more than the runtimes free beside
    each shard's replicas is INVALID_ARGUMENT (naming how many are free), too little
    memory RESOURCE_EXHAUSTED; standbys may then be taken, last.
    """
    required = spares is not None
    wanted = DEFAULT_SPARES if spares is None else spares
    if wanted == 0:
        return [[] for _ in shard_sizes]
    usable = usable_candidates(candidates, runtime=runtime, provider=provider, engines=engines)
    replicas = max((len(s) for s in serving), default=0)
    free_runtimes = max(0, len(usable) - replicas)
    if wanted < 0:
        raise PlacementError(
            f"spares must be 0 or more (or -1 for the default), got {wanted}; "
            f"{free_runtimes} runtimes are free beside each shard's replicas",
            "INVALID_ARGUMENT",
        )
    if required and wanted > free_runtimes:
        raise PlacementError(
            f"{wanted} spares per shard need {wanted} runtimes beside the {replicas} "
            f"holding each shard's replicas; {free_runtimes} runtimes are free "
            f"({len(usable)} ready, standbys included)",
            "INVALID_ARGUMENT",
        )
    load = Load.of(
        (slot, size) for size, slots in zip(shard_sizes, serving, strict=True) for slot in slots
    )
    placed: list[list[Slot]] = []
    for index, (size, slots) in enumerate(zip(shard_sizes, serving, strict=True)):
        chosen: list[Slot] = []
        for _ in range(wanted):
            slot = spare_slot(
                size, holding=[*slots, *chosen], candidates=usable, load=load, take_standby=required
            )
            if slot is None:
                if required:
                    raise PlacementError(
                        f"shard {index} ({size} bytes): no runtime beside its replicas and "
                        f"spares has that much memory budget left for spare {len(chosen) + 1}",
                        "RESOURCE_EXHAUSTED",
                    )
                break
            chosen.append(slot)
            load.add(slot, size)
        placed.append(chosen)
    return placed


def spare_slot(
    size: int,
    *,
    holding: Collection[Slot],
    candidates: Sequence[Candidate],
    load: Load,
    unhealthy: Collection[tuple[str, str]] = (),
    take_standby: bool = True,
) -> Slot | None:
    """Where to load a spare of a shard of ``size`` bytes, or None when nowhere fits.

    ``holding`` are the shard's copies (replicas and spares): never on their runtimes,
    and on another agent than theirs where one is left. ``candidates`` carry each
    agent's free bytes before ``load``; ``unhealthy`` are runtimes (agent, browser) and
    whole agents (agent, "") to avoid. Then the runtime holding fewest shards, the
    agent with most memory left, a real GPU adapter.
    """
    taken = {s.key for s in holding}
    agents = {s.agent_id for s in holding}
    bad = set(unhealthy)
    fits = [
        c
        for c in candidates
        if (c.agent_id, c.browser_id) not in taken
        and (c.agent_id, c.browser_id) not in bad
        and (c.agent_id, "") not in bad
        and (take_standby or not c.standby)
        and c.free_bytes - load.bytes_by_agent[c.agent_id] >= size
    ]
    if not fits:
        return None
    best = min(
        fits,
        key=lambda c: (
            c.agent_id in agents,
            c.standby,
            load.shards_by_runtime[(c.agent_id, c.browser_id)],
            load.bytes_by_agent[c.agent_id] - c.free_bytes,
            c.fallback_adapter,
            c.agent_id,
            c.browser_id,
        ),
    )
    return Slot(best.agent_id, best.browser_id)


def choose_takeover(
    spares: Sequence[Slot],
    *,
    failed: Slot,
    serving: Sequence[Slot],
    unhealthy: Collection[tuple[str, str]],
) -> Slot | None:
    """The spare to promote in place of the replica on ``failed``, or None when none may.

    ``failed.browser_id`` empty means the whole agent failed. ``unhealthy`` are the
    runtimes (agent, browser) and whole agents (agent, "") not to trust now: failed,
    a fault in force, a recent failure. A spare there, on the failed browser, or on
    a failed agent is never chosen. Among the rest: one off the failed agent first,
    then one on an agent none of the shard's other replicas uses, then in order.
    """
    bad = set(unhealthy)
    others = {s.agent_id for s in serving if s.agent_id != failed.agent_id}

    def trusted(spare: Slot) -> bool:
        if spare.key in bad or (spare.agent_id, "") in bad:
            return False
        if spare.agent_id != failed.agent_id:
            return True
        return bool(failed.browser_id) and spare.browser_id != failed.browser_id

    ranked = [
        (spare.agent_id == failed.agent_id, spare.agent_id in others, i)
        for i, spare in enumerate(spares)
        if trusted(spare)
    ]
    return spares[min(ranked)[2]] if ranked else None


def swap_roles(
    serving: Sequence[Slot], spares: Sequence[Slot], unhealthy: Collection[tuple[str, str]]
) -> tuple[Slot, Slot] | None:
    """(replica, spare) to swap roles, or None: the replica shares its agent with another
    replica of the shard, and the spare, trusted, is on an agent no replica uses. The
    swap loads nothing: the spare is warm, and the replica stays loaded as a spare."""
    bad = set(unhealthy)
    agents = [s.agent_id for s in serving]
    crowded = next((s for s in reversed(serving) if agents.count(s.agent_id) > 1), None)
    if crowded is None:
        return None
    spare = next(
        (
            s
            for s in spares
            if s.agent_id not in agents and s.key not in bad and (s.agent_id, "") not in bad
        ),
        None,
    )
    return (crowded, spare) if spare is not None else None


def crowded_spare(serving: Sequence[Slot], spares: Sequence[Slot]) -> Slot | None:
    """A spare on an agent that holds another copy of its shard (a replica or a spare),
    or None: were that agent lost, the spare would go with the copy it should replace."""
    copies = [*serving, *spares]
    for spare in reversed(spares):
        if sum(c.agent_id == spare.agent_id for c in copies) > 1:
            return spare
    return None
