"""Recovery plans, their execution through a fake actuator, and adaptive's choice."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from webshard.common.v1 import common_pb2
from webshard.recovery.v1 import recovery_pb2

from services.recovery.breakers import BreakerConfig, BreakerKey, Breakers
from services.recovery.execution import (
    ActionFailed,
    ActionResult,
    ActionUnavailable,
    ExecutionResult,
    Executor,
    PhaseRecord,
)
from services.recovery.strategies import (
    IN_PLACE_BUDGET_S,
    Action,
    AdaptiveChooser,
    Failure,
    FailureKind,
    FailureSource,
    Level,
    ModelPlacement,
    Plan,
    Replica,
    Strategy,
    Target,
    failed_shards,
    make_plan,
    plan_coordinated,
    plan_progressive,
    plan_simple,
)
from tests.unit.test_recovery_breakers import T0, FakeClock

# Outcomes a FakeActuator can be scripted with.
OK, FAIL, UNAVAILABLE, HANG = "ok", "fail", "unavailable", "hang"


@dataclass
class FakeActuator:
    """Answers each action as scripted ("ok" when not), and charges it ``cost_s`` of clock.

    ``script`` maps an action to one outcome for every call, or to a list consumed a
    call at a time. A successful verify says it was served by the target's browser.
    """

    clock: FakeClock
    script: dict[Action, str | list[str]] = field(default_factory=dict)
    cost_s: float = 0.25
    gate: asyncio.Event | None = None
    """When set, every verify waits for it (to keep a recovery running)."""
    calls: list[tuple[str, Target]] = field(default_factory=list)

    def _outcome(self, action: Action) -> str:
        scripted = self.script.get(action, OK)
        if isinstance(scripted, list):
            return scripted.pop(0) if scripted else OK
        return scripted

    async def _act(self, action: Action, target: Target) -> ActionResult:
        self.calls.append((action.value, target))
        if action == Action.VERIFY and self.gate is not None:
            await self.gate.wait()
        self.clock.advance(self.cost_s)
        outcome = self._outcome(action)
        if outcome == HANG:
            await asyncio.Event().wait()
        if outcome == UNAVAILABLE:
            raise ActionUnavailable(f"{action.value} needs an RPC nobody wrote")
        if outcome == FAIL:
            raise ActionFailed(f"{action.value} failed on {target}")
        served = ((target.agent_id, target.browser_id),) if action == Action.VERIFY else ()
        return ActionResult(f"{action.value} done on {target}", served_by=served)

    async def retry_in_place(self, target: Target) -> ActionResult:
        return await self._act(Action.RETRY_IN_PLACE, target)

    async def reconnect(self, target: Target) -> ActionResult:
        return await self._act(Action.RECONNECT, target)

    async def replace_on_standby(self, target: Target) -> ActionResult:
        return await self._act(Action.REPLACE_ON_STANDBY, target)

    async def restart_browser(self, target: Target) -> ActionResult:
        return await self._act(Action.RESTART_BROWSER, target)

    async def restart_agent(self, target: Target) -> ActionResult:
        return await self._act(Action.RESTART_AGENT, target)

    async def barrier(self, target: Target) -> ActionResult:
        return await self._act(Action.BARRIER, target)

    async def resume(self, target: Target) -> ActionResult:
        return await self._act(Action.RESUME, target)

    async def verify(self, target: Target) -> ActionResult:
        return await self._act(Action.VERIFY, target)


def failure(
    kind: FailureKind = FailureKind.RENDERER_CRASH,
    *,
    browser_id: str = "b0",
    shard_index: int = 1,
    model: str = "minilm-l6",
    agent_id: str = "agent-1",
) -> Failure:
    return Failure(
        source=FailureSource.DATA_PATH,
        kind=kind,
        agent_id=agent_id,
        browser_id=browser_id,
        model=model,
        shard_index=shard_index,
        detected_at=T0,
    )


# minilm-l6 in four shards: 0 and 1 on agent-1/b0, 2 on agent-1/b1, 3 on agent-2/b0;
# every shard has a second replica on agent-3/b0.
PLACEMENT = ModelPlacement(
    model="minilm-l6",
    strategy=Strategy.COORDINATED,
    replicas={
        0: (Replica("agent-1", "b0"), Replica("agent-3", "b0")),
        1: (Replica("agent-1", "b0"), Replica("agent-3", "b0")),
        2: (Replica("agent-1", "b1"), Replica("agent-3", "b0")),
        3: (Replica("agent-2", "b0"), Replica("agent-3", "b0")),
    },
)


@dataclass
class Run:
    """One plan executed against a fake actuator, with what it reported."""

    result: ExecutionResult
    phases: list[PhaseRecord]
    evidence: list[tuple[str, str, bool]]
    actuator: FakeActuator

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.phases]


async def execute(
    plan: Plan,
    script: dict[Action, str | list[str]] | None = None,
    *,
    open_breakers: Sequence[BreakerKey] = (),
    timeout_s: float = 5.0,
    cost_s: float = 0.25,
) -> Run:
    clock = FakeClock()
    actuator = FakeActuator(clock, dict(script or {}), cost_s=cost_s)
    phases: list[PhaseRecord] = []
    evidence: list[tuple[str, str, bool]] = []
    executor = Executor(
        actuator=actuator,
        clock=clock,
        is_open=lambda key: key in open_breakers,
        on_phase=phases.append,
        on_evidence=lambda agent, browser, ok: evidence.append((agent, browser, ok)),
        tracer=trace.NoOpTracer(),
        action_timeout_s=timeout_s,
    )
    result = await executor.execute(plan, Context())
    return Run(result, phases, evidence, actuator)


# ----------------------------------------------------------------------------- plans


def test_failed_shards_follow_the_failure_domain() -> None:
    # A shard-local kind names its shard only...
    assert failed_shards(failure(FailureKind.SHARD_ERROR), PLACEMENT) == [1]
    # ...unless the whole browser is asked for (a coordinated move).
    assert failed_shards(failure(FailureKind.SHARD_ERROR), PLACEMENT, whole_domain=True) == [0, 1]
    # A crashed browser takes every shard placed on it.
    assert failed_shards(failure(FailureKind.RENDERER_CRASH), PLACEMENT) == [0, 1]
    # A vanished agent takes every shard on any of its browsers.
    assert failed_shards(failure(FailureKind.AGENT_GONE), PLACEMENT) == [0, 1, 2]
    # Without a placement, the report is all there is.
    assert failed_shards(failure(FailureKind.RENDERER_CRASH), None) == [1]
    assert failed_shards(failure(FailureKind.AGENT_GONE, shard_index=-1), None) == []


def test_simple_replaces_each_failed_shard_independently() -> None:
    plan = plan_simple(failure(FailureKind.RENDERER_CRASH), PLACEMENT)
    [rung] = plan.rungs
    assert (plan.strategy, rung.level, rung.independent) == (
        Strategy.SIMPLE,
        Level.REPLACE_ON_STANDBY,
        True,
    )
    assert [(s.action, s.target.shard_index) for s in rung.actions] == [
        (Action.REPLACE_ON_STANDBY, 0),
        (Action.REPLACE_ON_STANDBY, 1),
    ]
    assert (rung.setup, rung.teardown, rung.skip_if_open) == ((), (), ())
    assert rung.verify.action == Action.VERIFY


def test_progressive_climbs_every_level_and_guards_in_place_levels_with_breakers() -> None:
    plan = plan_progressive(failure(FailureKind.STREAM_BROKEN), PLACEMENT)
    assert [r.level for r in plan.rungs] == list(Level)
    browser, agent = BreakerKey.browser("agent-1", "b0"), BreakerKey.agent("agent-1")
    assert [r.skip_if_open for r in plan.rungs] == [
        (browser, agent),
        (browser, agent),
        (),
        (agent,),
        (),
    ]
    assert [s.name for r in plan.rungs for s in r.actions] == [
        "retry",
        "retry",
        "reconnect",
        "replace",
        "replace",
        "restart-browser",
        "restart-agent",
    ]
    # The in-place levels are short: past their budget the re-place is the faster way.
    assert [r.in_place for r in plan.rungs] == [True, True, False, False, False]
    # With no browser named there is no browser to restart.
    no_browser = plan_progressive(failure(FailureKind.AGENT_GONE, browser_id=""), None)
    assert Level.RESTART_BROWSER not in [r.level for r in no_browser.rungs]


def test_coordinated_moves_the_browsers_shards_together_behind_a_barrier() -> None:
    plan = plan_coordinated(failure(FailureKind.SHARD_ERROR), PLACEMENT)
    [rung] = plan.rungs
    assert [s.name for s in rung.setup] == ["barrier"]
    assert [s.target.shard_index for s in rung.actions] == [0, 1]
    assert [s.name for s in rung.teardown] == ["resume"]
    assert rung.setup[0].target.model == "minilm-l6"
    assert not rung.independent


# ----------------------------------------------------------------------------- execution


async def test_progressive_stops_at_the_first_level_whose_verify_passes() -> None:
    run = await execute(plan_progressive(failure(FailureKind.SHARD_ERROR), PLACEMENT))
    assert run.result.ok
    assert run.result.highest_level == Level.RETRY_IN_PLACE
    assert run.names == ["retry", "verify"]
    assert run.result.finished_at == T0 + 0.5  # two actions at 0.25 s each
    assert run.phases[1] == PhaseRecord(
        "verify",
        Level.RETRY_IN_PLACE,
        T0 + 0.25,
        0.25,
        True,
        "verify done on shard 1 of minilm-l6 on agent-1/b0",
    )
    # The passing verify is evidence that the browser works.
    assert run.evidence == [("agent-1", "b0", True)]


async def test_a_failing_level_escalates_to_the_next() -> None:
    run = await execute(
        plan_progressive(failure(FailureKind.SHARD_ERROR), PLACEMENT),
        {Action.RETRY_IN_PLACE: UNAVAILABLE, Action.RECONNECT: FAIL},
    )
    assert run.result.ok
    assert run.result.highest_level == Level.REPLACE_ON_STANDBY
    assert run.names == ["retry", "reconnect", "replace", "verify"]
    assert [p.ok for p in run.phases] == [False, False, True, True]
    assert run.phases[0].detail == "unavailable: retry needs an RPC nobody wrote"
    assert [p.level for p in run.phases] == [
        Level.RETRY_IN_PLACE,
        Level.RECONNECT,
        Level.REPLACE_ON_STANDBY,
        Level.REPLACE_ON_STANDBY,
    ]


async def test_a_failed_verify_escalates_too() -> None:
    run = await execute(
        plan_progressive(failure(FailureKind.SHARD_ERROR), PLACEMENT),
        {Action.VERIFY: [FAIL, OK]},
    )
    assert run.result.highest_level == Level.RECONNECT
    assert run.names == ["retry", "verify", "reconnect", "verify"]


async def test_an_open_breaker_skips_the_levels_it_guards() -> None:
    plan = plan_progressive(failure(FailureKind.SHARD_ERROR), PLACEMENT)
    run = await execute(plan, open_breakers=[BreakerKey.browser("agent-1", "b0")])
    assert run.names == ["retry", "reconnect", "replace", "verify"]
    skipped = run.phases[:2]
    assert all(not p.ok and p.duration_s == 0 for p in skipped)
    assert skipped[0].detail == "skipped: breaker agent-1/b0 is open"
    assert [c[0] for c in run.actuator.calls] == ["replace", "verify"]
    assert run.result.highest_level == Level.REPLACE_ON_STANDBY

    # With the agent's breaker open, restarting the browser is skipped as well.
    run = await execute(
        plan,
        {Action.REPLACE_ON_STANDBY: FAIL},
        open_breakers=[BreakerKey.agent("agent-1")],
    )
    assert [c[0] for c in run.actuator.calls] == ["replace", "restart-agent", "verify"]
    assert run.result.highest_level == Level.RESTART_AGENT
    assert [p.name for p in run.phases if p.detail.startswith("skipped")] == [
        "retry",
        "reconnect",
        "restart-browser",
    ]


async def test_when_every_level_fails_the_result_says_why() -> None:
    run = await execute(
        plan_progressive(failure(FailureKind.SHARD_ERROR), PLACEMENT),
        {action: UNAVAILABLE for action in Action if action != Action.VERIFY},
    )
    assert not run.result.ok
    assert run.result.highest_level == Level.RESTART_AGENT
    assert run.result.detail.startswith("every level failed: retry_in_place: retry ")
    assert "restart_agent: restart-agent minilm-l6 on agent-1: unavailable" in run.result.detail
    assert "verify" not in run.names


async def test_simple_tries_every_shard_even_after_one_failed() -> None:
    run = await execute(
        plan_simple(failure(FailureKind.RENDERER_CRASH), PLACEMENT),
        {Action.REPLACE_ON_STANDBY: [FAIL, OK]},
    )
    assert not run.result.ok
    assert [(c[0], c[1].shard_index) for c in run.actuator.calls] == [
        ("replace", 0),
        ("replace", 1),
    ]
    assert run.result.detail.startswith("every level failed: replace_on_standby: replace shard 0")


async def test_coordinated_releases_a_barrier_it_took_and_only_then() -> None:
    plan = plan_coordinated(failure(FailureKind.RENDERER_CRASH), PLACEMENT)
    run = await execute(plan)
    assert run.result.ok
    assert run.names == ["barrier", "replace", "replace", "resume", "verify"]

    # A shard that cannot move stops the group; the barrier is still released.
    run = await execute(plan, {Action.REPLACE_ON_STANDBY: FAIL})
    assert not run.result.ok
    assert run.names == ["barrier", "replace", "resume"]

    # No barrier, nothing moved and nothing to release.
    run = await execute(plan, {Action.BARRIER: UNAVAILABLE})
    assert not run.result.ok
    assert run.names == ["barrier"]


async def test_an_action_past_its_deadline_fails_its_phase() -> None:
    run = await execute(
        plan_progressive(failure(FailureKind.SHARD_ERROR), PLACEMENT),
        {Action.RETRY_IN_PLACE: HANG},
        timeout_s=0.01,
    )
    assert run.phases[0].detail == "no answer within 0.01 s"
    assert run.result.highest_level == Level.RECONNECT


async def test_an_in_place_level_that_hangs_costs_its_budget_not_the_action_timeout() -> None:
    run = await execute(
        plan_progressive(failure(FailureKind.SHARD_ERROR), PLACEMENT),
        {Action.RETRY_IN_PLACE: HANG, Action.RECONNECT: HANG},
        timeout_s=60,
    )
    assert [p.detail for p in run.phases[:2]] == [
        f"no answer within {IN_PLACE_BUDGET_S:g} s (the rung's time budget)"
    ] * 2
    assert run.result.ok and run.result.highest_level == Level.REPLACE_ON_STANDBY


async def test_a_step_after_the_budget_is_spent_is_not_tried() -> None:
    # The retry takes the whole budget: its verify is not run, and the next level is.
    run = await execute(
        plan_progressive(failure(FailureKind.SHARD_ERROR), PLACEMENT), cost_s=IN_PLACE_BUDGET_S
    )
    assert run.names[:3] == ["retry", "verify", "reconnect"]
    assert run.phases[1].detail == "not tried: the rung's time budget was spent"
    assert ("verify", failure(FailureKind.SHARD_ERROR).checked) not in run.actuator.calls[:2]


async def test_failed_on_evidence_reaches_the_breakers() -> None:
    clock = FakeClock()
    breakers = Breakers(BreakerConfig(consecutive_failures=1), clock)

    class Broken(FakeActuator):
        async def verify(self, target: Target) -> ActionResult:
            raise ActionFailed("NaN in the output", failed_on=[("agent-2", "b0")])

    executor = Executor(
        actuator=Broken(clock),
        clock=clock,
        is_open=breakers.is_open,
        on_phase=lambda phase: None,
        on_evidence=lambda a, b, ok: breakers.record_target(a, b, ok, "test"),
        tracer=trace.NoOpTracer(),
    )
    plan = plan_simple(failure(FailureKind.SHARD_ERROR), PLACEMENT)
    result = await executor.execute(plan, Context())
    assert not result.ok
    assert breakers.is_open(BreakerKey.browser("agent-2", "b0"))


# ----------------------------------------------------------------------------- adaptive


def history(
    chooser: AdaptiveChooser, kind: FailureKind, rows: list[tuple[Strategy, bool, float]]
) -> None:
    for strategy, ok, duration in rows:
        chooser.record(kind, strategy, ok, duration)


def test_adaptive_explores_each_strategy_before_it_exploits() -> None:
    chooser = AdaptiveChooser(min_trials=2, seed=7)
    kind = FailureKind.RENDERER_CRASH
    picks = []
    for _ in range(6):
        choice = chooser.choose(kind)
        assert choice.reason.startswith("exploring")
        picks.append(choice.strategy)
        chooser.record(kind, choice.strategy, True, 1.0)
    # Each candidate tried exactly min_trials times, in an order the seed decides.
    assert sorted(picks) == sorted(AdaptiveChooser.CANDIDATES * 2)
    assert not chooser.choose(kind).reason.startswith("exploring")

    # The same seed and the same history give the same choices.
    again = AdaptiveChooser(min_trials=2, seed=7)
    replay = []
    for _ in range(6):
        choice = again.choose(kind)
        replay.append(choice.strategy)
        again.record(kind, choice.strategy, True, 1.0)
    assert replay == picks


def test_adaptive_prefers_success_rate_then_median_duration_per_kind() -> None:
    chooser = AdaptiveChooser(min_trials=3)
    crash, gone = FailureKind.RENDERER_CRASH, FailureKind.AGENT_GONE
    history(
        chooser,
        crash,
        [
            # simple: 3/3, p50 2.0 s; progressive: 3/3, p50 0.8 s; coordinated: 2/3, fastest.
            (Strategy.SIMPLE, True, 1.0),
            (Strategy.SIMPLE, True, 2.0),
            (Strategy.SIMPLE, True, 3.0),
            (Strategy.PROGRESSIVE, True, 0.5),
            (Strategy.PROGRESSIVE, True, 0.8),
            (Strategy.PROGRESSIVE, True, 9.0),
            (Strategy.COORDINATED, True, 0.1),
            (Strategy.COORDINATED, True, 0.1),
            (Strategy.COORDINATED, False, 0.1),
        ],
    )
    choice = chooser.choose(crash)
    assert choice.strategy == Strategy.PROGRESSIVE
    assert choice.reason == "best on renderer_crash: 3/3 succeeded, p50 0.8 s"
    stats = chooser.stats(crash)
    assert stats[Strategy.COORDINATED].success_rate == pytest.approx(2 / 3)
    assert stats[Strategy.SIMPLE].p50_s == 2.0

    # Another kind has its own history: still exploring.
    assert chooser.choose(gone).reason.startswith("exploring")


def test_adaptive_forgets_beyond_its_history() -> None:
    chooser = AdaptiveChooser(min_trials=1, history=2)
    kind = FailureKind.DEVICE_LOST
    history(
        chooser,
        kind,
        [
            (Strategy.SIMPLE, True, 1.0),
            (Strategy.PROGRESSIVE, True, 2.0),
            (Strategy.COORDINATED, True, 3.0),
        ],
    )
    assert chooser.choose(kind).strategy == Strategy.SIMPLE
    history(chooser, kind, [(Strategy.SIMPLE, False, 1.0), (Strategy.SIMPLE, False, 1.0)])
    assert chooser.choose(kind).strategy == Strategy.PROGRESSIVE


def test_make_plan_for_adaptive_uses_the_choice_and_says_why() -> None:
    chooser = AdaptiveChooser(min_trials=1)
    kind = FailureKind.RENDERER_CRASH
    history(
        chooser,
        kind,
        [
            (Strategy.SIMPLE, False, 1.0),
            (Strategy.PROGRESSIVE, False, 1.0),
            (Strategy.COORDINATED, True, 4.0),
        ],
    )
    plan = make_plan(Strategy.ADAPTIVE, failure(kind), PLACEMENT, chooser)
    assert (plan.requested, plan.strategy) == (Strategy.ADAPTIVE, Strategy.COORDINATED)
    assert plan.describe().startswith("adaptive chose coordinated (best on renderer_crash")
    with pytest.raises(ValueError, match="needs a chooser"):
        make_plan(Strategy.ADAPTIVE, failure(kind), PLACEMENT)


def test_strategy_names_parse_and_enums_carry_the_contract_numbers() -> None:
    assert Strategy.parse(" Adaptive ") == Strategy.ADAPTIVE
    with pytest.raises(ValueError, match="choose one of simple, progressive"):
        Strategy.parse("clever")
    pairs = [
        (Strategy, common_pb2.RecoveryStrategy, "RECOVERY_STRATEGY_"),
        (Level, recovery_pb2.EscalationLevel, "ESCALATION_LEVEL_"),
        (FailureKind, recovery_pb2.FailureKind, "FAILURE_KIND_"),
        (FailureSource, recovery_pb2.FailureSource, "FAILURE_SOURCE_"),
    ]
    for enum_type, proto, prefix in pairs:
        assert {m.value: prefix + m.name for m in enum_type} == {
            v: proto.Name(v) for v in proto.values() if v
        }


@pytest.mark.parametrize("strategy", [Strategy.PROGRESSIVE, Strategy.ADAPTIVE])
def test_a_browser_over_its_memory_headroom_is_drained_not_retried_in_place(
    strategy: Strategy,
) -> None:
    plan = make_plan(
        strategy, failure(FailureKind.OUT_OF_MEMORY), PLACEMENT, AdaptiveChooser(seed=1)
    )
    assert plan.drain
    assert plan.rungs[0].level == Level.REPLACE_ON_STANDBY
    assert {r.level for r in plan.rungs}.isdisjoint({Level.RETRY_IN_PLACE, Level.RECONNECT})
    assert plan.describe().startswith("drain, ")
    crashed = make_plan(
        strategy, failure(FailureKind.RENDERER_CRASH), PLACEMENT, AdaptiveChooser(seed=1)
    )
    assert not crashed.drain and "drain" not in crashed.describe()


def test_redundancy_is_whole_when_every_shard_has_its_healthy_replicas_and_spares_back() -> None:
    spare = Replica("agent-2", "b1")
    before = dataclasses.replace(PLACEMENT, spares={1: (spare,)})
    assert before.redundancy_as(before)
    # The spare took over: shard 1 serves on two healthy replicas, with no spare left.
    assert not dataclasses.replace(PLACEMENT, spares={}).redundancy_as(before)
    # A spare is back, but one of shard 0's replicas is unhealthy.
    sick = {**PLACEMENT.replicas, 0: (Replica("agent-1", "b0", healthy=False), spare)}
    assert not dataclasses.replace(before, replicas=sick).redundancy_as(before)
    assert not dataclasses.replace(before, spares={1: (Replica("a", "b", False),)}).redundancy_as(
        before
    )


async def test_shards_re_placed_each_on_their_own_move_at_once() -> None:
    """A crashed browser's shards take over together: the second re-place does not wait
    for the first (in order, the first would wait for the second forever)."""
    clock = FakeClock()
    started: list[Target] = []
    both = asyncio.Event()

    class Together(FakeActuator):
        async def replace_on_standby(self, target: Target) -> ActionResult:
            started.append(target)
            if len(started) == 2:
                both.set()
            await both.wait()
            return await super().replace_on_standby(target)

    phases: list[PhaseRecord] = []
    executor = Executor(
        actuator=Together(clock),
        clock=clock,
        is_open=lambda key: False,
        on_phase=phases.append,
        on_evidence=lambda a, b, ok: None,
        tracer=trace.NoOpTracer(),
        action_timeout_s=5.0,
    )
    plan = plan_simple(failure(FailureKind.RENDERER_CRASH), PLACEMENT)
    result = await asyncio.wait_for(executor.execute(plan, Context()), 5)
    assert result.ok
    assert sorted(t.shard_index for t in started) == [0, 1]
    assert [p.name for p in phases].count("replace") == 2
