"""Circuit breakers: each threshold, half-open probes, reset, disabled; time from a fake clock."""

from __future__ import annotations

import pytest
from webshard.common.v1 import common_pb2
from webshard.recovery.v1 import recovery_pb2

from services.recovery.breakers import (
    BreakerConfig,
    BreakerKey,
    Breakers,
    BreakerScope,
    BreakerState,
    Cause,
    ProbeOutcome,
    ProbeResult,
    Transition,
)

T0 = 1_700_000_000.0
AGENT = BreakerKey.agent("agent-1")
BROWSER = BreakerKey.browser("agent-1", "b0")


class FakeClock:
    """Seconds since the epoch that move only when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def board(clock: FakeClock, **knobs: object) -> tuple[Breakers, list[Transition]]:
    seen: list[Transition] = []
    breakers = Breakers(BreakerConfig(**knobs), clock)  # type: ignore[arg-type]
    breakers.add_listener(seen.append)
    return breakers, seen


def test_consecutive_failures_open_the_breaker_and_the_transition_is_observable() -> None:
    clock = FakeClock()
    breakers, seen = board(clock, consecutive_failures=3, minimum_calls=10, window=10)
    for _ in range(2):
        breakers.record(AGENT, False, "stream broken")
    breakers.record(AGENT, True, "verify passed")  # a success breaks the run
    for _ in range(2):
        breakers.record(AGENT, False, "stream broken")
    assert breakers.get(AGENT).state == BreakerState.CLOSED
    assert breakers.get(AGENT).consecutive_failures == 2

    clock.advance(1)
    breakers.record(AGENT, False, "stream broken")
    view = breakers.get(AGENT)
    assert view.state == BreakerState.OPEN
    assert breakers.is_open(AGENT)
    assert view.changed_at == T0 + 1
    assert view.next_probe_at == T0 + 1 + 30.0
    assert seen == breakers.transitions()
    [transition] = seen
    assert (transition.from_state, transition.to_state, transition.at) == (
        BreakerState.CLOSED,
        BreakerState.OPEN,
        T0 + 1,
    )
    assert transition.reason.startswith("3 consecutive failures (threshold 3): stream broken")


def test_failure_rate_counts_only_after_the_minimum_calls_over_a_sliding_window() -> None:
    clock = FakeClock()
    breakers, seen = board(
        clock, consecutive_failures=0, window=4, minimum_calls=4, failure_rate_threshold=0.75
    )
    for ok in (False, False, False):  # 100 % failures, but only 3 calls
        breakers.record(AGENT, ok, "x")
    assert breakers.get(AGENT).state == BreakerState.CLOSED
    breakers.record(AGENT, True, "x")  # 3/4 = 75 %, but a success never opens
    assert breakers.get(AGENT).failure_rate == 0.75
    assert not seen
    breakers.record(AGENT, True, "x")  # the window slides: F F T T
    breakers.record(AGENT, False, "x")  # F T T F: 50 %
    breakers.record(AGENT, False, "x")  # T T F F: 50 %
    assert breakers.get(AGENT).state == BreakerState.CLOSED
    breakers.record(AGENT, False, "x")  # T F F F: 75 %
    view = breakers.get(AGENT)
    assert view.state == BreakerState.OPEN
    assert view.calls == 4
    assert "failure rate 75% over the last 4 outcomes" in seen[-1].reason


def test_open_turns_half_open_after_the_open_duration_and_probes_close_it() -> None:
    clock = FakeClock()
    breakers, seen = board(clock, consecutive_failures=1, open_duration_s=10, half_open_probes=2)
    breakers.record(BROWSER, False, "renderer crash")
    breakers.record(BROWSER, True, "ignored while open")
    clock.advance(9.9)
    assert breakers.get(BROWSER).state == BreakerState.OPEN
    clock.advance(5)
    view = breakers.get(BROWSER)
    assert view.state == BreakerState.HALF_OPEN
    assert view.next_probe_at is None
    # Recorded when the open duration ended, not when someone looked.
    assert seen[-1].at == T0 + 10
    assert not breakers.is_open(BROWSER)

    breakers.record(BROWSER, True, "probe")
    assert breakers.get(BROWSER).state == BreakerState.HALF_OPEN
    breakers.record(BROWSER, True, "probe")
    view = breakers.get(BROWSER)
    assert view.state == BreakerState.CLOSED
    assert (view.calls, view.consecutive_failures) == (0, 0)  # closed starts afresh
    assert [(t.from_state, t.to_state) for t in seen] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_any_failure_while_half_open_reopens() -> None:
    clock = FakeClock()
    breakers, seen = board(clock, consecutive_failures=1, open_duration_s=10, half_open_probes=3)
    breakers.record(AGENT, False, "gone")
    clock.advance(10)
    breakers.record(AGENT, True, "probe")
    clock.advance(1)
    breakers.record(AGENT, False, "gone again")
    view = breakers.get(AGENT)
    assert view.state == BreakerState.OPEN
    assert view.next_probe_at == T0 + 11 + 10
    assert seen[-1].reason == "a half-open probe failed: gone again"


def test_reset_closes_by_hand_and_is_recorded() -> None:
    clock = FakeClock()
    breakers, seen = board(clock, consecutive_failures=1)
    breakers.record(AGENT, False, "gone")
    clock.advance(2)
    view = breakers.reset(AGENT)
    assert view.state == BreakerState.CLOSED
    assert view.changed_at == T0 + 2
    assert seen[-1] == Transition(
        AGENT, BreakerState.OPEN, BreakerState.CLOSED, T0 + 2, "reset by hand", Cause.RESET
    )
    # Resetting a closed breaker changes no state, so records no transition.
    breakers.reset(AGENT)
    assert len(seen) == 2


def test_a_target_never_seen_has_a_closed_breaker_that_is_not_stored() -> None:
    breakers, seen = board(FakeClock())
    view = breakers.get(BreakerKey.browser("agent-9", "b3"))
    assert (view.state, view.changed_at, view.calls) == (BreakerState.CLOSED, None, 0)
    assert breakers.reset(AGENT).state == BreakerState.CLOSED
    assert breakers.list() == []
    assert not seen


def test_disabled_breakers_stay_closed_but_still_count() -> None:
    breakers, seen = board(FakeClock(), enabled=False, consecutive_failures=1)
    for _ in range(50):
        breakers.record(AGENT, False, "gone")
    view = breakers.get(AGENT)
    assert view.state == BreakerState.CLOSED
    assert not breakers.is_open(AGENT)
    assert (view.consecutive_failures, view.failure_rate) == (50, 1.0)
    assert not seen


def test_record_target_counts_for_the_agent_and_its_browser_and_lists_agents_first() -> None:
    breakers, _ = board(FakeClock())
    breakers.record_target("agent-2", "b1", False, "crash")
    breakers.record_target("agent-1", "", False, "gone")
    assert [v.key for v in breakers.list()] == [
        BreakerKey.agent("agent-1"),
        BreakerKey.agent("agent-2"),
        BreakerKey.browser("agent-2", "b1"),
    ]


@pytest.mark.parametrize(
    ("scope", "target_id", "error"),
    [
        (0, "agent-1", "scope must be agent or browser"),
        (1, "", "target_id is empty"),
        (1, "agent-1/b0", "names a browser"),
        (2, "agent-1", "agent/browser"),
        (2, "agent-1/", "agent/browser"),
    ],
)
def test_breaker_keys_are_checked(scope: int, target_id: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        BreakerKey.parse(scope, target_id)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="minimum calls"):
        Breakers(BreakerConfig(window=5, minimum_calls=6), FakeClock())
    with pytest.raises(ValueError, match="failure rate threshold"):
        BreakerConfig(failure_rate_threshold=0).validate()
    with pytest.raises(ValueError, match="probe interval 0 s"):
        BreakerConfig(probe_interval_s=0).validate()
    with pytest.raises(ValueError, match=r"open duration 1000000\.0 s is over a day"):
        BreakerConfig(open_duration_s=1e6).validate()


# ------------------------------------------------------------------- active probes

PASSED = ProbeResult(ProbeOutcome.PASSED, "probe of shard 0 of m on agent-1/b0 answered")
FAILED = ProbeResult(ProbeOutcome.FAILED, "probe of shard 0 of m on agent-1/b0 failed: gone")
SKIPPED = ProbeResult(ProbeOutcome.SKIPPED, "agent-1 holds no shard and is not registered")


def opened(clock: FakeClock, **knobs: object) -> tuple[Breakers, list[Transition]]:
    """A board whose agent breaker opened at T0 (open for 10 s, two probes close it)."""
    values: dict[str, object] = {
        "consecutive_failures": 1,
        "open_duration_s": 10.0,
        "half_open_probes": 2,
        "probe_interval_s": 1.0,
    }
    values.update(knobs)
    breakers, seen = board(clock, **values)
    breakers.record(AGENT, False, "gone")
    return breakers, seen


def test_a_probe_is_due_when_the_open_time_ends_and_not_before() -> None:
    clock = FakeClock()
    breakers, seen = opened(clock)
    assert breakers.next_probe_at() == T0 + 10
    clock.advance(9.9)
    assert breakers.start_due_probes() == []
    clock.advance(0.2)
    [ticket] = breakers.start_due_probes()
    assert ticket.key == AGENT
    # Noticing the end of the open time half-opens the breaker, recorded when it ended.
    assert seen[-1].to_state == BreakerState.HALF_OPEN
    assert (seen[-1].at, seen[-1].cause) == (T0 + 10, Cause.OPEN_DURATION)
    # One probe per target at a time: none is due while it runs.
    assert breakers.next_probe_at() is None
    assert breakers.start_due_probes() == []


def test_probes_that_answer_close_the_breaker_after_the_required_successes() -> None:
    clock = FakeClock()
    breakers, seen = opened(clock)
    clock.advance(10)
    [first] = breakers.start_due_probes()
    clock.advance(0.5)
    assert breakers.finish_probe(first, PASSED)
    # One success of the two needed: still half-open, probed again after the interval.
    assert breakers.get(AGENT).state == BreakerState.HALF_OPEN
    assert breakers.next_probe_at() == T0 + 11.5
    clock.advance(0.9)
    assert breakers.start_due_probes() == []
    clock.advance(0.1)
    [second] = breakers.start_due_probes()
    assert breakers.finish_probe(second, PASSED)
    assert breakers.get(AGENT).state == BreakerState.CLOSED
    last = seen[-1]
    assert (last.from_state, last.to_state, last.cause) == (
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
        Cause.PROBE,
    )
    assert last.at == T0 + 11.5
    assert last.reason == f"2 half-open probes succeeded; the last: {PASSED.detail}"
    # A closed breaker wants no probe.
    assert breakers.next_probe_at() is None


def test_a_probe_that_fails_reopens_the_breaker_for_another_open_time() -> None:
    clock = FakeClock()
    breakers, seen = opened(clock)
    clock.advance(12)
    [ticket] = breakers.start_due_probes()
    assert breakers.finish_probe(ticket, FAILED)
    view = breakers.get(AGENT)
    assert view.state == BreakerState.OPEN
    assert view.next_probe_at == T0 + 22
    assert (seen[-1].cause, seen[-1].reason) == (
        Cause.PROBE,
        f"a half-open probe failed: {FAILED.detail}",
    )
    assert breakers.next_probe_at() == T0 + 22


def test_a_probe_that_could_not_run_leaves_the_breaker_half_open_until_a_later_try() -> None:
    clock = FakeClock()
    breakers, seen = opened(clock)
    clock.advance(10)
    [ticket] = breakers.start_due_probes()
    transitions = len(seen)
    assert breakers.finish_probe(ticket, SKIPPED)
    assert breakers.get(AGENT).state == BreakerState.HALF_OPEN
    assert len(seen) == transitions
    # Tried again after an open duration, not at once.
    assert breakers.next_probe_at() == T0 + 20
    # Meanwhile traffic still decides: a success from a recovery counts.
    breakers.record(AGENT, True, "verify passed")
    breakers.record(AGENT, True, "verify passed")
    assert breakers.get(AGENT).state == BreakerState.CLOSED
    assert seen[-1].cause == Cause.TRAFFIC


def test_a_probe_result_from_a_spell_that_is_over_changes_nothing() -> None:
    clock = FakeClock()
    breakers, seen = opened(clock)
    clock.advance(10)
    [ticket] = breakers.start_due_probes()
    breakers.reset(AGENT)
    assert not breakers.finish_probe(ticket, FAILED)
    assert breakers.get(AGENT).state == BreakerState.CLOSED
    assert seen[-1].cause == Cause.RESET
    # Traffic reopens it, the new spell half-opens: the old ticket still does not count.
    breakers.record(AGENT, False, "gone again")
    clock.advance(10)
    [fresh] = breakers.start_due_probes()
    assert not breakers.finish_probe(ticket, PASSED)
    assert breakers.finish_probe(fresh, FAILED)
    assert breakers.get(AGENT).state == BreakerState.OPEN


def test_probes_are_bounded_in_number_and_started_oldest_due_first() -> None:
    clock = FakeClock()
    breakers, _ = board(clock, consecutive_failures=1, open_duration_s=10.0)
    targets = [BreakerKey.agent(f"agent-{i}") for i in range(3)]
    for key in reversed(targets):  # agent-2 opens first, so its probe is due first
        breakers.record(key, False, "gone")
        clock.advance(1)
    clock.advance(10)
    first = breakers.start_due_probes(limit=2)
    assert [t.key for t in first] == [targets[2], targets[1]]
    assert [t.key for t in breakers.start_due_probes(limit=2)] == [targets[0]]


def test_no_probes_when_probes_or_breakers_are_off() -> None:
    clock = FakeClock()
    for knobs in ({"active_probes": False}, {"enabled": False}):
        breakers, _ = opened(clock, **knobs)
        clock.advance(60)
        assert breakers.start_due_probes() == []
        assert breakers.next_probe_at() is None


def test_enums_carry_the_contract_numbers() -> None:
    for state in BreakerState:
        assert common_pb2.BreakerState.Name(state.value) == f"BREAKER_STATE_{state.name}"
    for scope in BreakerScope:
        assert recovery_pb2.BreakerScope.Name(scope.value) == f"BREAKER_SCOPE_{scope.name}"


def test_open_breakers_name_the_runtimes_to_avoid() -> None:
    clock = FakeClock()
    breakers, _ = board(clock, consecutive_failures=1, minimum_calls=10, window=10)
    assert breakers.open_runtimes() == []
    breakers.record(BROWSER, False, "page crashed")
    breakers.record(BreakerKey.agent("agent-2"), False, "agent lost")
    breakers.record(BreakerKey.agent("agent-3"), True, "verify passed")
    assert breakers.open_runtimes() == [("agent-1", "b0"), ("agent-2", "")]
