"""The injector's core with fake collaborators and a clock advanced by hand.

No network and no sleeping: the cluster view, breakers, agent hooks and the
leader's workload are fakes, and time moves only when a test moves it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence

import pytest
from opentelemetry.sdk.trace import TracerProvider
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.common.v1 import common_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as pb

from services.fault_injector.actions import AgentAction, LeaderAction, LeaderMode
from services.fault_injector.injector import (
    ActionError,
    BreakerStates,
    FaultInjector,
    HookOutcome,
    ViewRequest,
    view_request,
)
from services.fault_injector.spec import FaultError, Limits, Refusal, validate
from services.fault_injector.targets import ClusterView
from tests.conftest import until
from tests.unit.test_fault_targets import cluster_view

K = common_pb2.FaultKind
Level = common_pb2.Intensity
T = pb.TargetKind
M = pb.SelectorMode
S = pb.FaultState
H = agent_pb.FaultHook
START = 1_700_000_000.0


class FakeClock:
    """A clock that moves only when ``advance`` is awaited."""

    def __init__(self) -> None:
        self.t = START
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + max(0.0, seconds), future))
        await future

    async def advance(self, seconds: float) -> None:
        self.t += seconds
        for entry in list(self._sleepers):
            when, future = entry
            if when <= self.t:
                self._sleepers.remove(entry)
                if not future.done():
                    future.set_result(None)
        for _ in range(50):  # let the woken tasks run to their next wait
            await asyncio.sleep(0)


class FakeCluster:
    def __init__(self, view: ClusterView) -> None:
        self.current = view
        self.error: FaultError | None = None
        self.requests: list[ViewRequest] = []

    async def view(self, request: ViewRequest) -> ClusterView:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return self.current


class FakeBreakers:
    def __init__(self) -> None:
        self.states_by_key: dict[tuple[str, str], int] = {}
        self.note = ""

    async def states(self, keys: Sequence[tuple[str, str]]) -> BreakerStates:
        return BreakerStates(
            {k: v for k, v in self.states_by_key.items() if k in keys}, note=self.note
        )


class FakeHooks:
    """Agents' hooks: each effect begins when the hook acts, stamped on the clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.applied: list[tuple[AgentAction, str, float]] = []
        self.reverted: list[tuple[str, str]] = []
        self.failing: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.slow: Callable[[], None] | None = None
        """Called before the effect begins (the call on its way to the agent)."""
        self.after: Callable[[AgentAction], None] | None = None
        """Called after the effect began (the agent slow to answer)."""
        self.stamps = True
        """False: an agent that does not say when its effect began."""
        self.held: dict[str, asyncio.Event] = {}
        """Agents whose answer waits on the event after their effect began."""

    async def apply(
        self, action: AgentAction, fault_id: str, duration_s: float, intensity: int
    ) -> HookOutcome:
        if self.gate is not None:
            await self.gate.wait()
        if self.slow is not None:
            self.slow()
        if action.agent_id in self.failing:
            raise ActionError(f"{action.agent_id} answered UNAVAILABLE: gone")
        began = self.clock.now()
        self.applied.append((action, fault_id, duration_s))
        if self.after is not None:
            self.after(action)
        if action.agent_id in self.held:
            await self.held[action.agent_id].wait()
        return HookOutcome(f"did {action.describe()}", began if self.stamps else None)

    async def revert(self, agent_id: str, address: str, fault_id: str) -> bool:
        self.reverted.append((agent_id, fault_id))
        return True


class FakeLeader:
    def __init__(self) -> None:
        self.acts: list[LeaderAction] = []
        self.undos: list[LeaderAction] = []
        self.slow: Callable[[], None] | None = None
        """Called after the signal is sent (the process slow to be seen stopped)."""

    async def act(self, action: LeaderAction, duration_s: float) -> str:
        self.acts.append(action)
        if self.slow is not None:
            self.slow()
        return action.describe()

    async def undo(self, action: LeaderAction) -> str:
        self.undos.append(action)
        return "undone"


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.cluster = FakeCluster(cluster_view())
        self.breakers = FakeBreakers()
        self.hooks = FakeHooks(self.clock)
        self.leader = FakeLeader()
        self.injector = FaultInjector(
            limits=Limits(max_duration_s=60.0),
            cluster=self.cluster,
            breakers=self.breakers,
            hooks=self.hooks,
            leader=self.leader,
            memory_cap_bytes=1024 * 1024 * 1024,
            clock=self.clock,
            rng=random.Random(3),
            tracer=TracerProvider().get_tracer("test"),
        )


@pytest.fixture
async def rig() -> Rig:
    made = Rig()
    yield made
    await made.injector.close()


def fault_spec(
    kind: int = K.FAULT_KIND_BROWSER_CRASH,
    intensity: int = Level.INTENSITY_MODERATE,
    *,
    ids: Sequence[str] = ("agent-1/browser-0",),
    target_kind: int = T.TARGET_KIND_BROWSER,
    mode: int = M.SELECTOR_MODE_ALL,
    duration_s: float = 10.0,
    **fields: object,
) -> pb.FaultSpec:
    spec = pb.FaultSpec(kind=kind, intensity=intensity, **fields)
    spec.target.CopyFrom(pb.TargetSelector(kind=target_kind, ids=list(ids), mode=mode))
    spec.duration.FromNanoseconds(round(duration_s * 1e9))
    return spec


async def test_inject_applies_the_hook_and_reverts_when_the_duration_ends(rig: Rig) -> None:
    fault = await rig.injector.inject(fault_spec(duration_s=10))
    assert fault.state == S.FAULT_STATE_ACTIVE
    assert len(fault.trace_id) == 32 and int(fault.trace_id, 16)
    [(action, fault_id, duration)] = rig.hooks.applied
    assert (action.agent_id, action.hook, action.browser_id) == (
        "agent-1",
        H.FAULT_HOOK_KILL_BROWSER,
        "browser-0",
    )
    # The agent is told the duration, so it reverts by itself if the injector dies.
    assert (fault_id, duration) == (fault.fault_id, 10.0)
    [hit] = fault.targets
    assert (hit.kind, hit.id, hit.agent_id) == (
        T.TARGET_KIND_BROWSER,
        "agent-1/browser-0",
        "agent-1",
    )
    assert fault.reverts_at.ToSeconds() == int(START + 10)

    await rig.clock.advance(9.9)
    assert rig.injector.get(fault.fault_id).state == S.FAULT_STATE_ACTIVE
    await rig.clock.advance(0.2)
    await until(lambda: rig.injector.get(fault.fault_id).state == S.FAULT_STATE_REVERTED, "revert")
    reverted = rig.injector.get(fault.fault_id)
    assert "duration ended" in reverted.detail
    assert reverted.reverted_at.ToSeconds() == int(START + 10.1)
    # A kill cannot be undone on the agent: nothing is asked of it.
    assert rig.hooks.reverted == []


def seconds(stamp: object) -> float:
    nanos: int = stamp.ToNanoseconds()  # type: ignore[attr-defined]
    return nanos / 1e9


def at(expected: float | list[float]) -> object:
    """Equal to within a millisecond (a relative tolerance is useless at epoch values)."""
    return pytest.approx(expected, rel=0, abs=1e-3)


async def test_a_fault_is_dated_by_when_its_first_effect_began(rig: Rig) -> None:
    """Agents slow to answer: the fault began with the first effect, not when the
    actions returned (a recovery of what it caused may start before that)."""

    def slow_answer(action: AgentAction) -> None:
        rig.clock.t += 1.67

    rig.hooks.after = slow_answer
    spec = fault_spec(
        K.FAULT_KIND_LATENCY,
        Level.INTENSITY_MILD,
        ids=["agent-0", "agent-1"],
        target_kind=T.TARGET_KIND_AGENT,
        duration_s=10,
    )
    fault = await rig.injector.inject(spec)
    assert rig.clock.now() == at(START + 2 * 1.67)
    assert seconds(fault.injected_at) == at(START)
    assert seconds(fault.reverts_at) == at(START + 10)
    await rig.clock.advance(10 - 2 * 1.67 + 0.1)
    await until(lambda: rig.injector.get(fault.fault_id).state == S.FAULT_STATE_REVERTED, "end")


async def test_without_a_stamp_a_fault_is_dated_by_when_its_action_started(rig: Rig) -> None:
    """An agent that does not say, and leader_loss (a signal, no hook): the time just
    before the action started."""
    rig.hooks.stamps = False

    def slow_answer(action: AgentAction) -> None:
        rig.clock.t += 2

    rig.hooks.after = slow_answer
    fault = await rig.injector.inject(fault_spec(duration_s=10))
    assert seconds(fault.injected_at) == at(START)

    def slow_signal() -> None:
        rig.clock.t += 3

    rig.leader.slow = slow_signal
    mild = pb.FaultSpec(kind=K.FAULT_KIND_LEADER_LOSS, intensity=Level.INTENSITY_MILD)
    mild.duration.FromSeconds(5)
    before = rig.clock.now()
    leader = await rig.injector.inject(mild)
    assert seconds(leader.injected_at) == at(before)
    assert seconds(leader.reverts_at) == at(before + 5)


async def test_an_agents_stamp_is_kept_within_its_call(rig: Rig) -> None:
    """A clock skewed between machines cannot date the fault outside the hook call."""

    class Skewed(FakeHooks):
        async def apply(
            self, action: AgentAction, fault_id: str, duration_s: float, intensity: int
        ) -> HookOutcome:
            outcome = await super().apply(action, fault_id, duration_s, intensity)
            return HookOutcome(outcome.detail, START - 3600)

    rig.injector._hooks = Skewed(rig.clock)
    fault = await rig.injector.inject(fault_spec(duration_s=10))
    assert seconds(fault.injected_at) == at(START)


async def test_a_composite_is_dated_by_its_earliest_childs_first_effect(rig: Rig) -> None:
    """Children applied at once may answer in another order than their effects began."""

    def on_its_way() -> None:
        rig.clock.t += 1

    rig.hooks.slow = on_its_way
    rig.hooks.held["agent-0"] = asyncio.Event()
    spec = pb.FaultSpec(kind=K.FAULT_KIND_MULTIPLE_FAILURES, intensity=Level.INTENSITY_MILD)
    spec.duration.FromSeconds(20)
    spec.children.extend(
        [
            fault_spec(ids=["agent-0/browser-0"]),
            fault_spec(K.FAULT_KIND_CONNECTION_LOST, ids=["agent-1/browser-0"]),
        ]
    )
    injecting = asyncio.create_task(rig.injector.inject(spec))
    await until(lambda: len(rig.hooks.applied) == 2, "both effects to begin")
    [parent] = rig.injector.faults()
    await until(
        lambda: rig.injector.get(f"{parent.fault_id}-2").state == S.FAULT_STATE_ACTIVE,
        "the second child to answer first",
    )
    assert seconds(rig.injector.get(parent.fault_id).injected_at) == at(START + 2)
    rig.hooks.held["agent-0"].set()
    fault = await injecting
    assert [seconds(c.injected_at) for c in fault.children] == at([START + 1, START + 2])
    assert seconds(fault.injected_at) == at(START + 1)
    assert seconds(fault.reverts_at) == at(START + 21)


async def test_revertible_hooks_are_reverted_on_their_agent(rig: Rig) -> None:
    fault = await rig.injector.inject(
        fault_spec(
            K.FAULT_KIND_LATENCY,
            Level.INTENSITY_SEVERE,
            ids=["agent-2"],
            target_kind=T.TARGET_KIND_AGENT,
        )
    )
    [(action, _, _)] = rig.hooks.applied
    assert (action.hook, action.delay_s) == (H.FAULT_HOOK_DELAY, 2.0)
    after = await rig.injector.revert(fault.fault_id)
    assert after.state == S.FAULT_STATE_REVERTED
    assert "RevertFault" in after.detail
    assert rig.hooks.reverted == [("agent-2", fault.fault_id)]
    # Reverting again changes nothing; the timer that would have reverted it is gone.
    again = await rig.injector.revert(fault.fault_id)
    assert again == after
    await rig.clock.advance(20)
    assert rig.hooks.reverted == [("agent-2", fault.fault_id)]


async def test_refusals_are_recorded_and_inject_nothing(rig: Rig) -> None:
    unscoped = fault_spec(target_kind=T.TARGET_KIND_BROWSER)
    del unscoped.target.ids[:]
    with pytest.raises(Refusal) as caught:
        await rig.injector.inject(unscoped)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "force" in caught.value.reason
    assert caught.value.fault_id
    with pytest.raises(Refusal):
        await rig.injector.inject(fault_spec(duration_s=61))
    refused = rig.injector.faults([S.FAULT_STATE_REFUSED])
    assert refused[0].fault_id == caught.value.fault_id
    assert len(refused) == 2 and all(f.detail for f in refused)
    assert rig.hooks.applied == [] and rig.cluster.requests == []
    # With force the same unscoped selector goes through (here: every ready browser).
    forced = await rig.injector.inject(unscoped, force=True)
    assert forced.state == S.FAULT_STATE_ACTIVE
    assert len(forced.targets) == 6


async def test_revert_all_during_an_injection_undoes_what_lands_after_it(rig: Rig) -> None:
    rig.hooks.gate = asyncio.Event()
    spec = fault_spec(
        K.FAULT_KIND_LATENCY, Level.INTENSITY_MILD, ids=["agent-0"], target_kind=T.TARGET_KIND_AGENT
    )
    injecting = asyncio.create_task(rig.injector.inject(spec))
    await until(lambda: len(rig.injector.faults()) == 1, "the fault to be recorded")
    assert await rig.injector.revert_all() == 1
    rig.hooks.gate.set()
    fault = await injecting
    assert fault.state == S.FAULT_STATE_REVERTED
    assert "RevertAll" in fault.detail
    assert rig.hooks.reverted == [("agent-0", fault.fault_id)]


async def test_a_dry_run_resolves_and_injects_nothing(rig: Rig) -> None:
    fault = await rig.injector.inject(fault_spec(dry_run=True))
    assert fault.state == S.FAULT_STATE_DRY_RUN
    assert [t.detail for t in fault.targets] == ["dry run: would kill_browser on browser-0"]
    assert rig.hooks.applied == []


async def test_unknown_targets_fail_and_unfit_ones_are_skipped(rig: Rig) -> None:
    with pytest.raises(FaultError) as missing:
        await rig.injector.inject(fault_spec(ids=["agent-9/browser-0"]))
    assert missing.value.code == "NOT_FOUND"
    assert rig.injector.get(missing.value.fault_id).state == S.FAULT_STATE_FAILED
    rig.cluster.current.agents[1].browsers[1].state = common_pb2.BROWSER_STATE_FAILED
    with pytest.raises(FaultError) as unfit:
        await rig.injector.inject(fault_spec(ids=["agent-1/browser-0"]))
    assert unfit.value.code == "FAILED_PRECONDITION"
    assert "FAILED" in unfit.value.reason
    rig.cluster.error = FaultError("UNAVAILABLE", "the coordinator could not describe it")
    with pytest.raises(FaultError) as down:
        await rig.injector.inject(fault_spec())
    assert down.value.code == "UNAVAILABLE"
    assert rig.hooks.applied == []


async def test_an_action_that_fails_everywhere_leaves_the_fault_failed(rig: Rig) -> None:
    rig.hooks.failing = {"agent-1"}
    fault = await rig.injector.inject(fault_spec())
    assert fault.state == S.FAULT_STATE_FAILED
    assert "UNAVAILABLE" in fault.detail and "UNAVAILABLE" in fault.targets[0].detail


async def test_breakers_adapt_the_intensity(rig: Rig) -> None:
    rig.breakers.states_by_key[("agent", "agent-1")] = common_pb2.BREAKER_STATE_HALF_OPEN
    with pytest.raises(Refusal) as severe:
        await rig.injector.inject(fault_spec(intensity=Level.INTENSITY_SEVERE))
    assert severe.value.code == "FAILED_PRECONDITION"
    assert "HALF_OPEN" in severe.value.reason and "mild and moderate only" in severe.value.reason
    assert rig.injector.get(severe.value.fault_id).state == S.FAULT_STATE_REFUSED
    moderate = await rig.injector.inject(fault_spec(intensity=Level.INTENSITY_MODERATE))
    assert moderate.state == S.FAULT_STATE_ACTIVE
    rig.breakers.states_by_key[("browser", "agent-1/browser-0")] = common_pb2.BREAKER_STATE_OPEN
    with pytest.raises(Refusal, match="OPEN"):
        await rig.injector.inject(fault_spec(intensity=Level.INTENSITY_MILD))
    # Mode all over two agents, one of them open: the other is hit, the skip is noted.
    both = fault_spec(
        K.FAULT_KIND_LATENCY,
        Level.INTENSITY_MILD,
        ids=["agent-0", "agent-1"],
        target_kind=T.TARGET_KIND_AGENT,
    )
    rig.breakers.states_by_key[("agent", "agent-1")] = common_pb2.BREAKER_STATE_OPEN
    fault = await rig.injector.inject(both)
    assert [t.agent_id for t in fault.targets] == ["agent-0"]
    assert "skipped agent-1: breaker agent-1 is OPEN" in fault.detail


async def test_unknown_breakers_are_closed_and_the_detail_says_why(rig: Rig) -> None:
    rig.breakers.note = "breakers unknown (recovery at x answered UNIMPLEMENTED); treated as CLOSED"
    fault = await rig.injector.inject(fault_spec(intensity=Level.INTENSITY_SEVERE))
    assert fault.state == S.FAULT_STATE_ACTIVE
    assert "treated as CLOSED" in fault.detail


async def test_multiple_failures_apply_children_at_once_and_revert_together(rig: Rig) -> None:
    spec = pb.FaultSpec(kind=K.FAULT_KIND_MULTIPLE_FAILURES, intensity=Level.INTENSITY_MILD)
    spec.duration.FromSeconds(30)
    spec.children.extend(
        [
            fault_spec(K.FAULT_KIND_MEMORY_PRESSURE, 0, ids=["agent-0/browser-1"], duration_s=30),
            fault_spec(
                K.FAULT_KIND_LATENCY,
                Level.INTENSITY_MILD,
                ids=["agent-2"],
                target_kind=T.TARGET_KIND_AGENT,
                duration_s=5,
            ),
        ]
    )
    fault = await rig.injector.inject(spec)
    assert fault.state == S.FAULT_STATE_ACTIVE
    assert [c.state for c in fault.children] == [S.FAULT_STATE_ACTIVE] * 2
    assert [c.fault_id for c in fault.children] == [f"{fault.fault_id}-1", f"{fault.fault_id}-2"]
    assert len(rig.cluster.requests) == 1  # one view for all children
    assert {a.hook for a, _, _ in rig.hooks.applied} == {
        H.FAULT_HOOK_ALLOCATE_MEMORY,
        H.FAULT_HOOK_DELAY,
    }
    # The short child ends on its own; the parent stays active until its own end.
    await rig.clock.advance(6)
    await until(
        lambda: rig.injector.get(f"{fault.fault_id}-2").state == S.FAULT_STATE_REVERTED, "child"
    )
    assert rig.injector.get(fault.fault_id).state == S.FAULT_STATE_ACTIVE
    assert await rig.injector.revert_all() == 1
    parent = rig.injector.get(fault.fault_id)
    assert parent.state == S.FAULT_STATE_REVERTED
    assert "RevertAll" in parent.detail
    assert {agent for agent, _ in rig.hooks.reverted} == {"agent-0", "agent-2"}


async def test_a_composite_lasts_its_duration_from_when_its_children_took_effect(
    rig: Rig,
) -> None:
    """Applying can take seconds (killing a browser under load): the parent's
    duration starts once its children are in force, not when it was asked for."""

    def slow() -> None:
        rig.clock.t += 2.5

    rig.hooks.slow = slow
    spec = pb.FaultSpec(kind=K.FAULT_KIND_MULTIPLE_FAILURES, intensity=Level.INTENSITY_MILD)
    spec.duration.FromSeconds(3)
    spec.children.extend(
        [
            fault_spec(ids=["agent-0/browser-0"], duration_s=3),
            fault_spec(K.FAULT_KIND_CONNECTION_LOST, ids=["agent-1/browser-0"], duration_s=3),
        ]
    )
    fault = await rig.injector.inject(spec)
    assert fault.state == S.FAULT_STATE_ACTIVE
    injected = fault.injected_at.ToNanoseconds() / 1e9
    assert injected > START
    assert fault.reverts_at.ToNanoseconds() / 1e9 == pytest.approx(injected + 3)
    await rig.clock.advance(2.9 - (rig.clock.now() - injected))
    assert rig.injector.get(fault.fault_id).state == S.FAULT_STATE_ACTIVE
    await rig.clock.advance(0.2)
    parent = rig.injector.get(fault.fault_id)
    assert parent.state == S.FAULT_STATE_REVERTED
    lasted = (parent.reverted_at.ToNanoseconds() - parent.injected_at.ToNanoseconds()) / 1e9
    assert lasted == pytest.approx(3, abs=0.2)


async def test_a_cascade_applies_children_at_its_interval_and_cancels_the_rest(rig: Rig) -> None:
    spec = pb.FaultSpec(kind=K.FAULT_KIND_CASCADE, intensity=Level.INTENSITY_MILD)
    spec.duration.FromSeconds(30)
    spec.interval.FromSeconds(10)
    spec.target.CopyFrom(
        pb.TargetSelector(kind=T.TARGET_KIND_AGENT, ids=["agent-0"], mode=M.SELECTOR_MODE_ALL)
    )
    spec.children.extend(
        [
            pb.FaultSpec(kind=K.FAULT_KIND_CONNECTION_LOST),
            pb.FaultSpec(kind=K.FAULT_KIND_LATENCY),
            pb.FaultSpec(kind=K.FAULT_KIND_PARTITION),
        ]
    )
    fault = await rig.injector.inject(spec)
    assert [c.state for c in fault.children] == [
        S.FAULT_STATE_ACTIVE,
        S.FAULT_STATE_PENDING,
        S.FAULT_STATE_PENDING,
    ]
    assert [a.hook for a, _, _ in rig.hooks.applied] == [H.FAULT_HOOK_CUT_SESSION]
    await rig.clock.advance(10)
    await until(lambda: len(rig.hooks.applied) == 2, "the second step")
    assert rig.hooks.applied[1][0].hook == H.FAULT_HOOK_DELAY
    reverted = await rig.injector.revert(fault.fault_id)
    assert [c.state for c in reverted.children] == [S.FAULT_STATE_REVERTED] * 3
    assert "before it was injected" in reverted.children[2].detail
    await rig.clock.advance(30)
    assert len(rig.hooks.applied) == 2  # the third step never came


async def test_leader_loss_hits_the_leader_and_undoes_by_intensity(rig: Rig) -> None:
    mild = pb.FaultSpec(kind=K.FAULT_KIND_LEADER_LOSS, intensity=Level.INTENSITY_MILD)
    mild.duration.FromSeconds(5)
    fault = await rig.injector.inject(mild)
    assert [(t.kind, t.id) for t in fault.targets] == [(T.TARGET_KIND_REPLICA, "coordinator-1")]
    assert rig.leader.acts[0].mode is LeaderMode.STOP
    await rig.clock.advance(5)
    await until(lambda: len(rig.leader.undos) == 1, "SIGCONT")
    severe = pb.FaultSpec()
    severe.CopyFrom(mild)
    severe.intensity = Level.INTENSITY_SEVERE
    await rig.injector.inject(severe)
    await rig.clock.advance(5)
    await until(lambda: rig.injector.faults([S.FAULT_STATE_ACTIVE]) == [], "the end")
    assert len(rig.leader.undos) == 1  # a severe loss is not restarted
    wrong = pb.FaultSpec()
    wrong.CopyFrom(mild)
    wrong.target.CopyFrom(
        pb.TargetSelector(
            kind=T.TARGET_KIND_REPLICA, ids=["coordinator-0"], mode=M.SELECTOR_MODE_ONE
        )
    )
    with pytest.raises(FaultError, match="the leader is coordinator-1"):
        await rig.injector.inject(wrong)


async def test_watch_sees_existing_faults_then_every_change(rig: Rig) -> None:
    first = await rig.injector.inject(fault_spec(dry_run=True))
    seen: list[tuple[str, int]] = []

    async def watch() -> None:
        async for fault in rig.injector.watch(include_existing=True):
            seen.append((fault.fault_id, fault.state))

    watcher = asyncio.create_task(watch())
    await until(lambda: rig.injector.book.watchers == 1 and len(seen) == 1, "the existing fault")
    second = await rig.injector.inject(fault_spec(duration_s=2))
    await rig.clock.advance(2)
    await until(lambda: (second.fault_id, S.FAULT_STATE_REVERTED) in seen, "the revert")
    watcher.cancel()
    states = [state for fault_id, state in seen if fault_id == second.fault_id]
    assert seen[0] == (first.fault_id, S.FAULT_STATE_DRY_RUN)
    assert states[-2:] == [S.FAULT_STATE_ACTIVE, S.FAULT_STATE_REVERTED]


def test_view_requests_ask_only_for_what_the_selectors_need() -> None:
    limits = Limits(max_duration_s=60)
    shard = fault_spec(target_kind=T.TARGET_KIND_SHARD)
    shard.target.ids[:] = ["minilm-l6/0"]
    assert view_request(validate(shard, force=False, limits=limits)) == ViewRequest(
        agents=True, models=frozenset({"minilm-l6"})
    )
    every = fault_spec(target_kind=T.TARGET_KIND_SHARD, mode=M.SELECTOR_MODE_ONE)
    del every.target.ids[:]
    assert view_request(validate(every, force=False, limits=limits)).models is None
    leader = pb.FaultSpec(kind=K.FAULT_KIND_LEADER_LOSS, intensity=Level.INTENSITY_MILD)
    leader.duration.FromSeconds(5)
    assert view_request(validate(leader, force=False, limits=limits)) == ViewRequest(replicas=True)
