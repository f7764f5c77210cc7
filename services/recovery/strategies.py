"""Recovery strategies: from a failure to an ordered recovery plan.

A plan is data. It is a ladder of rungs, each at one escalation level: the steps
that act at that level, then a verify. The executor (``execution``) climbs the
ladder until a rung's verify passes; a rung whose target's breaker is open is
skipped. The four strategies (DESIGN §7):

- ``simple`` re-places each failed shard on another replica, each on its own; one rung.
- ``progressive`` escalates: retry in place, reconnect, re-place on a warm
  standby, restart the browser, restart the agent.
- ``coordinated`` moves the shards of the failed browser (or agent) together
  behind a barrier on the model, then resumes requests from their last boundary
  activation; one rung.
- ``adaptive`` picks one of the three from recovery history (``AdaptiveChooser``).

Plain logic; no gRPC here. The enums carry the proto's numbers so the servicer
converts by value.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.recovery.breakers import BreakerKey


class Strategy(enum.IntEnum):
    """A recovery strategy; the numbers are webshard.common.v1.RecoveryStrategy's."""

    SIMPLE = 1
    PROGRESSIVE = 2
    COORDINATED = 3
    ADAPTIVE = 4

    @property
    def label(self) -> str:
        """The strategy's name in lowercase, as settings and spans spell it."""
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Strategy:
        """The strategy called ``name``; raise ValueError listing the names when none is."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            names = ", ".join(s.label for s in cls)
            raise ValueError(f"unknown recovery strategy {name!r}; choose one of {names}") from None


class Level(enum.IntEnum):
    """A step of the escalation ladder; the numbers are webshard.recovery.v1.EscalationLevel's."""

    RETRY_IN_PLACE = 1
    RECONNECT = 2
    REPLACE_ON_STANDBY = 3
    RESTART_BROWSER = 4
    RESTART_AGENT = 5


class FailureSource(enum.IntEnum):
    """Who detected a failure; the numbers are webshard.recovery.v1.FailureSource's."""

    DATA_PATH = 1
    HEARTBEAT = 2
    PAGE = 3
    AGENT = 4


class FailureKind(enum.IntEnum):
    """What failed; the numbers are webshard.recovery.v1.FailureKind's."""

    STREAM_BROKEN = 1
    AGENT_GONE = 2
    SHARD_ERROR = 3
    RENDERER_CRASH = 4
    DEVICE_LOST = 5
    OUT_OF_MEMORY = 6
    TIMEOUT = 7

    @property
    def label(self) -> str:
        """The kind in lowercase, as spans and logs show it."""
        return self.name.lower()


# Kinds that break one shard's hop and may leave the other shards of the browser
# intact; every other kind takes down the whole browser (or agent) with its shards.
SHARD_LOCAL_KINDS = frozenset({FailureKind.SHARD_ERROR, FailureKind.TIMEOUT})


@dataclass(frozen=True, slots=True)
class Target:
    """What an action acts on: an agent, maybe one of its browsers, maybe one shard."""

    agent_id: str
    browser_id: str = ""
    model: str = ""
    shard_index: int = -1
    """-1 when no shard is involved."""

    def with_shard(self, shard_index: int) -> Target:
        """The same agent and browser, one shard."""
        return Target(self.agent_id, self.browser_id, self.model, shard_index)

    @property
    def breaker_keys(self) -> tuple[BreakerKey, ...]:
        """The breakers that guard the target: its browser's (if named), then its agent's."""
        agent = BreakerKey.agent(self.agent_id)
        if self.browser_id:
            return (BreakerKey.browser(self.agent_id, self.browser_id), agent)
        return (agent,)

    def __str__(self) -> str:
        where = f"{self.agent_id}/{self.browser_id}" if self.browser_id else self.agent_id
        if self.model and self.shard_index >= 0:
            return f"shard {self.shard_index} of {self.model} on {where}"
        if self.model:
            return f"{self.model} on {where}"
        return where


@dataclass(frozen=True, slots=True)
class Failure:
    """One detected failure, as reported."""

    source: FailureSource
    kind: FailureKind
    agent_id: str
    browser_id: str = ""
    model: str = ""
    shard_index: int = -1
    """-1 when no shard is involved."""
    request_id: str = ""
    fault_id: str = ""
    """The injected fault that caused it, when known."""
    fault_intensity: str = ""
    """That fault's intensity (mild, moderate, severe), when known."""
    fault_traceparent: str = ""
    """The W3C traceparent of that fault's injection, when known."""
    message: str = ""
    detected_at: float | None = None
    """Seconds since the epoch; None when the reporter did not say."""

    @property
    def target(self) -> Target:
        """The agent, browser and shard that failed."""
        return Target(self.agent_id, self.browser_id, self.model, self.shard_index)

    @property
    def checked(self) -> Target:
        """What a verify checks: the failed shard when the failure was the shard's own,
        else everything of the model on the failed browser (or agent)."""
        if self.kind in SHARD_LOCAL_KINDS:
            return self.target
        return self.target.with_shard(-1)

    @property
    def dedupe_key(self) -> tuple[str, str, str, int]:
        """Reports with the same key describe the same failure while it is being recovered.

        A failure of a whole browser (or agent) is one failure whichever shard's
        report names it, so its key leaves the shard out (-1).
        """
        shard = self.shard_index if self.kind in SHARD_LOCAL_KINDS else -1
        return (self.agent_id, self.browser_id, self.model, shard)

    @property
    def domain_key(self) -> tuple[str, str, str, int]:
        """The key of a failure of the whole browser (or agent) this report lies in."""
        return (self.agent_id, self.browser_id, self.model, -1)


@dataclass(frozen=True, slots=True)
class Replica:
    """One copy of a shard."""

    agent_id: str
    browser_id: str
    healthy: bool = True

    def on(self, target: Target) -> bool:
        """Whether this replica lives on the target's browser (or anywhere on its agent)."""
        if self.agent_id != target.agent_id:
            return False
        return not target.browser_id or self.browser_id == target.browser_id


@dataclass(frozen=True)
class ModelPlacement:
    """Where a deployed model's shards live, as far as recovery needs to know."""

    model: str
    strategy: Strategy | None = None
    """The strategy the model was deployed with; None when it named none."""
    replicas: Mapping[int, Sequence[Replica]] = field(default_factory=dict)
    """Shard index -> its replicas, the preferred one first."""
    spares: Mapping[int, Sequence[Replica]] = field(default_factory=dict)
    """Shard index -> its hot spares."""

    def shards_on(self, target: Target) -> list[int]:
        """The shards with a replica on the target's browser (or agent), in chain order."""
        return sorted(i for i, copies in self.replicas.items() if any(r.on(target) for r in copies))

    def redundancy_as(self, before: ModelPlacement) -> bool:
        """Whether every shard is back to the healthy replicas and spares it had in
        ``before`` (the placement when the failure was planned for)."""
        for index, replicas in before.replicas.items():
            healthy = sum(r.healthy for r in self.replicas.get(index, ()))
            spares = sum(r.healthy for r in self.spares.get(index, ()))
            if healthy < len(replicas) or spares < len(before.spares.get(index, ())):
                return False
        return True


class Action(enum.Enum):
    """What a step asks the actuator to do; the value is the phase's name."""

    RETRY_IN_PLACE = "retry"
    RECONNECT = "reconnect"
    REPLACE_ON_STANDBY = "replace"
    RESTART_BROWSER = "restart-browser"
    RESTART_AGENT = "restart-agent"
    BARRIER = "barrier"
    RESUME = "resume"
    VERIFY = "verify"


@dataclass(frozen=True, slots=True)
class Step:
    """One action on one target."""

    action: Action
    target: Target

    @property
    def name(self) -> str:
        """The phase's name."""
        return self.action.value


@dataclass(frozen=True)
class Rung:
    """One escalation level of a plan.

    The executor runs ``setup`` (stopping at the first failure), then ``actions``,
    then ``teardown`` when every setup step succeeded (a barrier taken is always
    released), then ``verify`` when all of them succeeded.
    """

    level: Level
    actions: tuple[Step, ...]
    verify: Step
    setup: tuple[Step, ...] = ()
    teardown: tuple[Step, ...] = ()
    independent: bool = False
    """True runs the actions at once, each whatever the others do (shards re-placed each
    on their own); False runs them in order and stops at the first failure (a group
    that must move together)."""
    skip_if_open: tuple[BreakerKey, ...] = ()
    """The rung is skipped when any of these breakers is OPEN."""
    in_place: bool = False
    """The rung tries the failed target itself (retry, reconnect): the whole rung, its
    verify included, gets the executor's in-place budget, not an action timeout per
    step, so a target that does not answer costs little before the re-place."""


@dataclass(frozen=True)
class Plan:
    """An ordered recovery plan."""

    requested: Strategy
    """The strategy asked for (ADAPTIVE included)."""
    strategy: Strategy
    """The strategy that made the rungs (never ADAPTIVE)."""
    rungs: tuple[Rung, ...]
    reason: str = ""
    """Why this strategy, when adaptive chose it."""
    drain: bool = False
    """The failed browser still serves but is over its memory headroom: its shards
    move off it before it is lost (no in-place level keeps them there)."""

    def describe(self) -> str:
        """One line for the plan phase: the strategy and the ladder."""
        ladder = " -> ".join(r.level.name.lower() for r in self.rungs)
        head = self.strategy.label
        if self.requested != self.strategy:
            head = f"{self.requested.label} chose {self.strategy.label} ({self.reason})"
        if self.drain:
            head = f"drain, {head}"
        return f"{head}: {ladder}"


def failed_shards(
    failure: Failure, placement: ModelPlacement | None, *, whole_domain: bool = False
) -> list[int]:
    """The shards a failure took down.

    A shard-local kind (shard error, timeout) names one shard. Any other kind takes
    the browser, or the agent when the agent is gone or no browser is named, so
    every shard placed there failed with it. ``whole_domain`` counts the whole
    browser (or agent) even for a shard-local kind: its shards share one session.
    """
    shards = {failure.shard_index} if failure.shard_index >= 0 else set()
    if failure.kind in SHARD_LOCAL_KINDS and shards and not whole_domain:
        return sorted(shards)
    if placement is not None:
        domain = failure.target
        if failure.kind == FailureKind.AGENT_GONE:
            domain = Target(failure.agent_id, "", failure.model)
        shards.update(placement.shards_on(domain))
    return sorted(shards)


def _per_shard(action: Action, target: Target, shards: Sequence[int]) -> tuple[Step, ...]:
    if not shards:
        return (Step(action, target),)
    return tuple(Step(action, target.with_shard(i)) for i in shards)


def plan_simple(failure: Failure, placement: ModelPlacement | None) -> Plan:
    """Re-place each failed shard on another replica, each on its own; then verify."""
    target = failure.target
    rung = Rung(
        level=Level.REPLACE_ON_STANDBY,
        actions=_per_shard(Action.REPLACE_ON_STANDBY, target, failed_shards(failure, placement)),
        verify=Step(Action.VERIFY, failure.checked),
        independent=True,
    )
    return Plan(Strategy.SIMPLE, Strategy.SIMPLE, (rung,))


IN_PLACE_BUDGET_S = 0.5
"""What each in-place rung (retry, reconnect) may take by default, verify included: a
shard's run takes milliseconds, and a page that reconnects does so at once, so more
than this means the re-place (a hot spare's takeover) is the faster way."""


def plan_progressive(failure: Failure, placement: ModelPlacement | None) -> Plan:
    """Escalate from retrying in place to restarting the agent, one level at a time.

    The in-place levels (retry, reconnect) are time-boxed (``Rung.in_place``), so a
    target that does not answer costs little before the re-place; they are skipped
    while the browser's or the agent's breaker is open: the target is not to be
    trusted. Restarting the
    browser is skipped while the agent's breaker is open: the agent is the problem.
    Re-placing and restarting the agent move away from the target, so no breaker
    skips them.
    """
    target = failure.target
    # Reconnects and restarts act on the browser or the agent, not on one shard.
    browser = Target(failure.agent_id, failure.browser_id, failure.model)
    agent = Target(failure.agent_id, "", failure.model)
    shards = failed_shards(failure, placement)
    verify = Step(Action.VERIFY, failure.checked)
    agent_key = BreakerKey.agent(failure.agent_id)
    rungs = [
        Rung(
            Level.RETRY_IN_PLACE,
            _per_shard(Action.RETRY_IN_PLACE, target, shards),
            verify,
            skip_if_open=target.breaker_keys,
            in_place=True,
        ),
        Rung(
            Level.RECONNECT,
            (Step(Action.RECONNECT, browser),),
            verify,
            skip_if_open=target.breaker_keys,
            in_place=True,
        ),
        Rung(
            Level.REPLACE_ON_STANDBY,
            _per_shard(Action.REPLACE_ON_STANDBY, target, shards),
            verify,
            independent=True,
        ),
    ]
    if failure.browser_id:
        rungs.append(
            Rung(
                Level.RESTART_BROWSER,
                (Step(Action.RESTART_BROWSER, browser),),
                verify,
                skip_if_open=(agent_key,),
            )
        )
    rungs.append(Rung(Level.RESTART_AGENT, (Step(Action.RESTART_AGENT, agent),), verify))
    return Plan(Strategy.PROGRESSIVE, Strategy.PROGRESSIVE, tuple(rungs))


def plan_coordinated(failure: Failure, placement: ModelPlacement | None) -> Plan:
    """Move the shards of the failed browser (or agent) together behind a barrier.

    The barrier pauses new requests for the model; the group is re-placed in chain
    order, stopping at the first shard that cannot move; the resume lets requests
    continue from their last boundary activation, and always follows a barrier
    that was taken.
    """
    target = failure.target
    model = Target(failure.agent_id, failure.browser_id, failure.model)
    group = failed_shards(failure, placement, whole_domain=True)
    rung = Rung(
        level=Level.REPLACE_ON_STANDBY,
        setup=(Step(Action.BARRIER, model),),
        actions=_per_shard(Action.REPLACE_ON_STANDBY, target, group),
        teardown=(Step(Action.RESUME, model),),
        verify=Step(Action.VERIFY, failure.checked),
    )
    return Plan(Strategy.COORDINATED, Strategy.COORDINATED, (rung,))


PLANNERS = {
    Strategy.SIMPLE: plan_simple,
    Strategy.PROGRESSIVE: plan_progressive,
    Strategy.COORDINATED: plan_coordinated,
}
"""The planner of each concrete strategy."""


def make_plan(
    strategy: Strategy,
    failure: Failure,
    placement: ModelPlacement | None,
    chooser: AdaptiveChooser | None = None,
) -> Plan:
    """The plan of ``strategy`` for ``failure``; ADAPTIVE asks ``chooser`` which one.

    An out-of-memory report (the browser is over its memory headroom, still
    serving) makes the plan a drain: the levels that keep the shards in place go.
    """
    if strategy != Strategy.ADAPTIVE:
        plan = PLANNERS[strategy](failure, placement)
    elif chooser is None:
        raise ValueError("the adaptive strategy needs a chooser")
    else:
        choice = chooser.choose(failure.kind)
        chosen = PLANNERS[choice.strategy](failure, placement)
        plan = Plan(Strategy.ADAPTIVE, chosen.strategy, chosen.rungs, choice.reason)
    if failure.kind != FailureKind.OUT_OF_MEMORY:
        return plan
    # A browser over its memory headroom still answers, so a retry in place would
    # pass and leave its shards there until it is lost: drain it instead.
    moving = tuple(r for r in plan.rungs if r.level >= Level.REPLACE_ON_STANDBY)
    return dataclasses.replace(plan, rungs=moving, drain=True)


# ----------------------------------------------------------------------------- adaptive


@dataclass(frozen=True, slots=True)
class StrategyStats:
    """How one strategy fared on one failure kind."""

    trials: int
    successes: int
    p50_s: float | None
    """Median duration of its successful recoveries; None without any."""

    @property
    def success_rate(self) -> float:
        """Successes over trials; 0 without trials."""
        return self.successes / self.trials if self.trials else 0.0


@dataclass(frozen=True, slots=True)
class Choice:
    """Adaptive's pick and why."""

    strategy: Strategy
    reason: str


class AdaptiveChooser:
    """Picks a concrete strategy per failure kind from how each has done before.

    Until every candidate has been tried ``min_trials`` times on a kind, it explores:
    the least-tried candidate, ties broken by the seeded rng. After that it picks
    the best success rate, then the lowest median duration, then the order of
    ``CANDIDATES``. Only the last ``history`` outcomes per kind and strategy count,
    so a strategy that stopped working loses its lead. Deterministic given its
    history and seed.
    """

    CANDIDATES = (Strategy.SIMPLE, Strategy.PROGRESSIVE, Strategy.COORDINATED)

    def __init__(self, *, min_trials: int = 3, history: int = 50, seed: int = 0) -> None:
        if min_trials < 1 or history < min_trials:
            raise ValueError(
                f"adaptive needs min_trials >= 1 and history >= min_trials, "
                f"got {min_trials} and {history}"
            )
        self._min_trials = min_trials
        self._history = history
        self._rng = random.Random(seed)
        self._outcomes: dict[tuple[FailureKind, Strategy], deque[tuple[bool, float]]] = {}

    def record(self, kind: FailureKind, strategy: Strategy, ok: bool, duration_s: float) -> None:
        """Remember one finished recovery of ``kind`` by a concrete ``strategy``."""
        if strategy not in self.CANDIDATES:
            raise ValueError(f"adaptive records concrete strategies, not {strategy.label}")
        outcomes = self._outcomes.setdefault((kind, strategy), deque(maxlen=self._history))
        outcomes.append((ok, duration_s))

    def stats(self, kind: FailureKind) -> dict[Strategy, StrategyStats]:
        """Each candidate's record on ``kind``."""
        result = {}
        for strategy in self.CANDIDATES:
            outcomes = self._outcomes.get((kind, strategy), ())
            durations = [d for ok, d in outcomes if ok]
            result[strategy] = StrategyStats(
                trials=len(outcomes),
                successes=len(durations),
                p50_s=statistics.median(durations) if durations else None,
            )
        return result

    def choose(self, kind: FailureKind) -> Choice:
        """The strategy to use for the next failure of ``kind``."""
        stats = self.stats(kind)
        fewest = min(s.trials for s in stats.values())
        if fewest < self._min_trials:
            least = [st for st in self.CANDIDATES if stats[st].trials == fewest]
            pick = least[0] if len(least) == 1 else self._rng.choice(least)
            return Choice(
                pick,
                f"exploring: {fewest} of {self._min_trials} trials on {kind.label}",
            )

        def rank(strategy: Strategy) -> tuple[float, float, int]:
            s = stats[strategy]
            p50 = s.p50_s if s.p50_s is not None else float("inf")
            return (-s.success_rate, p50, self.CANDIDATES.index(strategy))

        pick = min(self.CANDIDATES, key=rank)
        best = stats[pick]
        p50 = f"{best.p50_s:.3g} s" if best.p50_s is not None else "n/a"
        return Choice(
            pick,
            f"best on {kind.label}: {best.successes}/{best.trials} succeeded, p50 {p50}",
        )
