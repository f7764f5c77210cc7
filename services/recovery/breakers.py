"""Circuit breakers per agent and per browser.

A breaker guards one target: an agent (``agent-1``) or one of its browsers
(``agent-1/b0``). It is CLOSED while the target is trusted, OPEN for a while after
the target failed too often, then HALF_OPEN, when a few probes decide whether it
closes again or reopens. Recovery skips the levels that act in place on an open
target; the fault-injector scales its faults to the state (DESIGN §6).

Plain logic with an injected clock; no gRPC here. An OPEN breaker turns HALF_OPEN
lazily, the first time anyone looks at it after its open duration; the transition
is recorded at the moment the duration ended, not at the moment it was noticed.

Half-open breakers are probed actively, not only by the traffic that happens to
come: this module decides when a probe is due (``Breakers.start_due_probes``) and
what its result means (``Breakers.finish_probe``); ``services.recovery.probes`` runs
them. A probe that answers counts as one half-open success, one that fails reopens
the breaker, and one that could not run (the target holds nothing to probe, the
coordinator is unreachable) leaves it half-open until the next attempt.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
"""Seconds since the epoch; ``time.time`` in the service, a fake in tests."""

MAX_DURATION_S = 86_400.0
"""The longest open duration or probe interval accepted: a day."""


class BreakerState(enum.IntEnum):
    """A breaker's state; the numbers are webshard.common.v1.BreakerState's."""

    CLOSED = 1
    OPEN = 2
    HALF_OPEN = 3

    @property
    def label(self) -> str:
        """The state in lowercase, as logs and spans show it."""
        return self.name.lower()


class Cause(enum.StrEnum):
    """What made a breaker change state; logs and the transition history carry it."""

    TRAFFIC = "traffic"
    """An outcome of the work recovery did or saw (a recovery's action, a verify)."""
    OPEN_DURATION = "open_duration"
    """The open duration ended."""
    PROBE = "probe"
    """An active half-open probe answered or failed."""
    RESET = "reset"
    """Someone closed the breaker by hand."""


class ProbeOutcome(enum.Enum):
    """What one half-open probe found."""

    PASSED = "passed"
    """The target answered: one half-open success."""
    FAILED = "failed"
    """The target did not answer, or answered wrongly: the breaker reopens."""
    SKIPPED = "skipped"
    """Nothing could be asked of the target; the breaker stays half-open."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """A probe's outcome and what it did, in words."""

    outcome: ProbeOutcome
    detail: str


class BreakerScope(enum.IntEnum):
    """What a breaker guards; the numbers are webshard.recovery.v1.BreakerScope's."""

    AGENT = 1
    BROWSER = 2


@dataclass(frozen=True, slots=True)
class BreakerKey:
    """Names one breaker: its scope and its target id ("agent" or "agent/browser")."""

    scope: BreakerScope
    target_id: str

    @classmethod
    def agent(cls, agent_id: str) -> BreakerKey:
        """The breaker of an agent."""
        return cls(BreakerScope.AGENT, agent_id)

    @classmethod
    def browser(cls, agent_id: str, browser_id: str) -> BreakerKey:
        """The breaker of one browser of an agent."""
        return cls(BreakerScope.BROWSER, f"{agent_id}/{browser_id}")

    @classmethod
    def parse(cls, scope: int, target_id: str) -> BreakerKey:
        """Check a scope and an id as a caller sent them; raise ValueError saying what is wrong."""
        if scope not in {s.value for s in BreakerScope}:
            raise ValueError("scope must be agent or browser")
        if not target_id:
            raise ValueError("target_id is empty; give an agent id or agent/browser")
        parts = target_id.split("/")
        shown = repr(target_id) if len(target_id) <= 40 else repr(target_id[:40]) + "..."
        if scope == BreakerScope.AGENT and len(parts) != 1:
            raise ValueError(f"an agent breaker's id has no slash; {shown} names a browser")
        if scope == BreakerScope.BROWSER and (len(parts) != 2 or not all(parts)):
            raise ValueError(f"a browser breaker's id is agent/browser, not {shown}")
        if len(target_id) > 2 * 200 + 1:
            raise ValueError(f"target_id {shown} is too long to name an agent or browser")
        return cls(BreakerScope(scope), target_id)

    def __str__(self) -> str:
        return self.target_id


@dataclass(frozen=True)
class BreakerConfig:
    """How every breaker decides; one configuration for all of them."""

    enabled: bool = True
    """False keeps every breaker CLOSED (outcomes are still counted), so a run with
    breakers and a run without them can be measured side by side."""
    window: int = 20
    """The failure rate is taken over this many most recent outcomes."""
    minimum_calls: int = 10
    """The failure rate counts only once the window holds at least this many outcomes,
    so two failures out of three calls do not open a breaker."""
    failure_rate_threshold: float = 0.5
    """A CLOSED breaker opens when the failure fraction over the window reaches this."""
    consecutive_failures: int = 5
    """A CLOSED breaker opens after this many failures in a row; 0 turns this rule off."""
    open_duration_s: float = 30.0
    """An OPEN breaker turns HALF_OPEN after this many seconds."""
    half_open_probes: int = 3
    """A HALF_OPEN breaker closes after this many successes in a row; any failure reopens it."""
    active_probes: bool = True
    """Probe a HALF_OPEN breaker's target actively; False leaves it to traffic."""
    probe_interval_s: float = 1.0
    """After a probe that passed, a HALF_OPEN breaker that needs more successes is probed
    again this many seconds later. A probe that could not run is tried again after
    ``open_duration_s``, so a target with nothing to probe is not asked over and over."""

    def validate(self) -> None:
        """Raise ValueError naming the first value out of range."""
        if self.window < 1:
            raise ValueError(f"breaker window {self.window} must be at least 1")
        if not 1 <= self.minimum_calls <= self.window:
            raise ValueError(
                f"breaker minimum calls {self.minimum_calls} must be within 1..window "
                f"({self.window})"
            )
        if not 0 < self.failure_rate_threshold <= 1:
            raise ValueError(
                f"breaker failure rate threshold {self.failure_rate_threshold} "
                "must be within (0, 1]"
            )
        if self.consecutive_failures < 0:
            raise ValueError(
                f"breaker consecutive failures {self.consecutive_failures} is negative"
            )
        if self.open_duration_s <= 0:
            raise ValueError(f"breaker open duration {self.open_duration_s} s must be positive")
        if self.half_open_probes < 1:
            raise ValueError(f"breaker half-open probes {self.half_open_probes} must be >= 1")
        if not 0 < self.probe_interval_s <= MAX_DURATION_S:
            raise ValueError(
                f"breaker probe interval {self.probe_interval_s} s must be within "
                f"(0, {MAX_DURATION_S:g}]"
            )
        if self.open_duration_s > MAX_DURATION_S:
            raise ValueError(
                f"breaker open duration {self.open_duration_s} s is over a day "
                f"({MAX_DURATION_S:g} s); a breaker that long is a ban, reset it by hand instead"
            )


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a breaker's state."""

    key: BreakerKey
    from_state: BreakerState
    to_state: BreakerState
    at: float
    """When it changed, seconds since the epoch."""
    reason: str
    cause: Cause = Cause.TRAFFIC
    """What made it change."""


@dataclass(frozen=True, slots=True)
class ProbeTicket:
    """One probe begun: which breaker, and which of its half-open spells it probes.

    A result that comes back after the breaker moved on (reset by hand, reopened by
    traffic) belongs to a spell that is over and changes nothing.
    """

    key: BreakerKey
    spell: int
    started_at: float


@dataclass(frozen=True, slots=True)
class BreakerView:
    """A breaker as callers see it at one moment."""

    key: BreakerKey
    state: BreakerState
    consecutive_failures: int
    failure_rate: float
    """Failure fraction over the window; 0 for an empty window."""
    calls: int
    """Outcomes in the window."""
    changed_at: float | None
    """When the state last changed; None when it never did."""
    next_probe_at: float | None
    """When an OPEN breaker turns HALF_OPEN; None in the other states."""


class CircuitBreaker:
    """One breaker. Not thread-safe; the service uses it from one event loop."""

    def __init__(
        self,
        key: BreakerKey,
        config: BreakerConfig,
        clock: Clock,
        emit: Callable[[Transition], None],
    ) -> None:
        self.key = key
        self._config = config
        self._clock = clock
        self._emit = emit
        self._state = BreakerState.CLOSED
        self._outcomes: deque[bool] = deque(maxlen=config.window)
        self._consecutive = 0
        self._probe_successes = 0
        self._changed_at: float | None = None
        self._open_until: float | None = None
        self._spell = 0
        """Counts state changes, so a probe's result can tell whether its spell is over."""
        self._probing = False
        self._cause = Cause.TRAFFIC
        """The cause the next transition is recorded with."""
        self._probe_after: float | None = None
        """While HALF_OPEN, the earliest time of the next probe; None: at once."""

    @property
    def state(self) -> BreakerState:
        """The state now (an OPEN breaker whose time is up has turned HALF_OPEN)."""
        self._advance()
        return self._state

    @property
    def failure_rate(self) -> float:
        """Failure fraction over the window."""
        if not self._outcomes:
            return 0.0
        return self._outcomes.count(False) / len(self._outcomes)

    def allows(self) -> bool:
        """Whether work may go to the target: CLOSED, or HALF_OPEN for a probe."""
        return self.state != BreakerState.OPEN

    def record(self, ok: bool, reason: str, cause: Cause = Cause.TRAFFIC) -> None:
        """Count one outcome and change state if a threshold says so.

        While OPEN, outcomes are counted but change nothing: the open duration is a
        promise to leave the target alone for that long.
        """
        self._advance()
        self._cause = cause
        try:
            self._count(ok, reason)
        finally:
            self._cause = Cause.TRAFFIC

    def _count(self, ok: bool, reason: str) -> None:
        self._outcomes.append(ok)
        self._consecutive = 0 if ok else self._consecutive + 1
        if not self._config.enabled:
            return
        config = self._config
        if self._state == BreakerState.HALF_OPEN:
            if not ok:
                self._move(BreakerState.OPEN, self._clock(), f"a half-open probe failed: {reason}")
                return
            self._probe_successes += 1
            if self._probe_successes >= config.half_open_probes:
                self._move(
                    BreakerState.CLOSED,
                    self._clock(),
                    f"{self._probe_successes} half-open probes succeeded; the last: {reason}",
                )
        elif self._state == BreakerState.CLOSED and not ok:
            rate = self.failure_rate
            if config.consecutive_failures and self._consecutive >= config.consecutive_failures:
                self._move(
                    BreakerState.OPEN,
                    self._clock(),
                    f"{self._consecutive} consecutive failures "
                    f"(threshold {config.consecutive_failures}): {reason}",
                )
            elif (
                len(self._outcomes) >= config.minimum_calls
                and rate >= config.failure_rate_threshold
            ):
                self._move(
                    BreakerState.OPEN,
                    self._clock(),
                    f"failure rate {rate:.0%} over the last {len(self._outcomes)} outcomes "
                    f"(threshold {config.failure_rate_threshold:.0%}): {reason}",
                )

    def reset(self, reason: str) -> None:
        """Close the breaker and forget its outcomes; recorded when it was not CLOSED."""
        self._advance()
        if self._state != BreakerState.CLOSED:
            self._cause = Cause.RESET
            self._move(BreakerState.CLOSED, self._clock(), reason)
        self._outcomes.clear()
        self._consecutive = 0

    def view(self) -> BreakerView:
        """A snapshot of the breaker."""
        state = self.state
        return BreakerView(
            key=self.key,
            state=state,
            consecutive_failures=self._consecutive,
            failure_rate=self.failure_rate,
            calls=len(self._outcomes),
            changed_at=self._changed_at,
            next_probe_at=self._open_until if state == BreakerState.OPEN else None,
        )

    def probe_due_at(self) -> float | None:
        """When this breaker next wants a probe; None when it wants none (CLOSED,
        probing now, or probes turned off)."""
        if not (self._config.enabled and self._config.active_probes) or self._probing:
            return None
        if self._state == BreakerState.OPEN:
            return self._open_until
        if self._state == BreakerState.HALF_OPEN:
            return self._probe_after if self._probe_after is not None else self._changed_at
        return None

    def begin_probe(self) -> ProbeTicket | None:
        """Start a probe when one is due now; None when none is (one at a time)."""
        self._advance()
        due = self.probe_due_at()
        now = self._clock()
        if self._state != BreakerState.HALF_OPEN or due is None or now < due:
            return None
        self._probing = True
        return ProbeTicket(self.key, self._spell, now)

    def finish_probe(self, ticket: ProbeTicket, result: ProbeResult) -> bool:
        """Apply a probe's result; False when its half-open spell was already over."""
        self._probing = False
        self._advance()
        if ticket.spell != self._spell or self._state != BreakerState.HALF_OPEN:
            return False
        now = self._clock()
        match result.outcome:
            case ProbeOutcome.PASSED:
                self.record(True, result.detail, Cause.PROBE)
                if self._state == BreakerState.HALF_OPEN:
                    self._probe_after = now + self._config.probe_interval_s
            case ProbeOutcome.FAILED:
                self.record(False, result.detail, Cause.PROBE)
            case ProbeOutcome.SKIPPED:
                # Nothing was learnt about the target; try again after as long as an
                # open spell lasts, and meanwhile let traffic decide.
                self._probe_after = now + self._config.open_duration_s
        return True

    def _advance(self) -> None:
        if (
            self._state == BreakerState.OPEN
            and self._open_until is not None
            and self._clock() >= self._open_until
        ):
            self._cause = Cause.OPEN_DURATION
            self._move(
                BreakerState.HALF_OPEN,
                self._open_until,
                f"open for {self._config.open_duration_s:g} s; "
                f"{self._config.half_open_probes} successful probes close it",
            )

    def _move(self, to_state: BreakerState, at: float, reason: str) -> None:
        transition = Transition(self.key, self._state, to_state, at, reason, self._cause)
        self._cause = Cause.TRAFFIC
        self._state = to_state
        self._changed_at = at
        self._probe_successes = 0
        self._spell += 1
        self._probe_after = None
        if to_state == BreakerState.OPEN:
            self._open_until = at + self._config.open_duration_s
        else:
            self._open_until = None
        if to_state == BreakerState.CLOSED:
            # A closed breaker starts afresh: the failures that opened it are history.
            self._outcomes.clear()
            self._consecutive = 0
        self._emit(transition)


class Breakers:
    """Every breaker, created on first use, with the history of their transitions."""

    def __init__(self, config: BreakerConfig, clock: Clock, *, history: int = 1000) -> None:
        config.validate()
        self.config = config
        self._clock = clock
        self._breakers: dict[BreakerKey, CircuitBreaker] = {}
        self._history: deque[Transition] = deque(maxlen=history)
        self._listeners: list[Callable[[Transition], None]] = []

    def add_listener(self, listener: Callable[[Transition], None]) -> Callable[[], None]:
        """Call ``listener`` with every transition from now on; returns a function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def transitions(self) -> list[Transition]:
        """The most recent transitions, oldest first."""
        return list(self._history)

    def get(self, key: BreakerKey) -> BreakerView:
        """The breaker's view; a target never seen has a CLOSED breaker (not stored)."""
        breaker = self._breakers.get(key)
        if breaker is None:
            return BreakerView(key, BreakerState.CLOSED, 0, 0.0, 0, None, None)
        return breaker.view()

    def known(self, key: BreakerKey) -> bool:
        """Whether the target's breaker has seen an outcome (is stored)."""
        return key in self._breakers

    def is_open(self, key: BreakerKey) -> bool:
        """Whether the target's breaker is OPEN now."""
        breaker = self._breakers.get(key)
        return breaker is not None and not breaker.allows()

    def open_runtimes(self) -> list[tuple[str, str]]:
        """(agent, browser) of every OPEN breaker; browser "" for an agent's."""
        runtimes = []
        for key, breaker in self._breakers.items():
            if not breaker.allows():
                agent, _, browser = key.target_id.partition("/")
                runtimes.append((agent, browser))
        return sorted(runtimes)

    def record(self, key: BreakerKey, ok: bool, reason: str) -> None:
        """Count one outcome for one breaker."""
        self._breaker(key).record(ok, reason)

    def record_target(self, agent_id: str, browser_id: str, ok: bool, reason: str) -> None:
        """Count one outcome for an agent and, when named, its browser."""
        if browser_id:
            self.record(BreakerKey.browser(agent_id, browser_id), ok, reason)
        self.record(BreakerKey.agent(agent_id), ok, reason)

    def reset(self, key: BreakerKey, reason: str = "reset by hand") -> BreakerView:
        """Close a breaker by hand; a target never seen stays unstored and CLOSED."""
        breaker = self._breakers.get(key)
        if breaker is None:
            return self.get(key)
        breaker.reset(reason)
        return breaker.view()

    def start_due_probes(self, limit: int | None = None) -> list[ProbeTicket]:
        """Begin a probe of every breaker due one now (at most ``limit``), oldest due first.

        A breaker already being probed is not due: one probe per target at a time.
        """
        now = self._clock()
        due = sorted(
            (at, _order(key), breaker)
            for key, breaker in self._breakers.items()
            if (at := breaker.probe_due_at()) is not None and at <= now
        )
        tickets: list[ProbeTicket] = []
        for _, _, breaker in due:
            if limit is not None and len(tickets) >= limit:
                break
            ticket = breaker.begin_probe()
            if ticket is not None:
                tickets.append(ticket)
        return tickets

    def next_probe_at(self) -> float | None:
        """The earliest time a breaker will want a probe; None when none will."""
        times = [
            at for breaker in self._breakers.values() if (at := breaker.probe_due_at()) is not None
        ]
        return min(times, default=None)

    def finish_probe(self, ticket: ProbeTicket, result: ProbeResult) -> bool:
        """Apply a probe's result to its breaker; False when its spell was already over."""
        breaker = self._breakers.get(ticket.key)
        return breaker is not None and breaker.finish_probe(ticket, result)

    def list(self) -> list[BreakerView]:
        """Every breaker, agents first, then by id."""
        return [self._breakers[key].view() for key in sorted(self._breakers, key=_order)]

    def _breaker(self, key: BreakerKey) -> CircuitBreaker:
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = CircuitBreaker(key, self.config, self._clock, self._emit)
            self._breakers[key] = breaker
        return breaker

    def _emit(self, transition: Transition) -> None:
        self._history.append(transition)
        for listener in list(self._listeners):
            listener(transition)


def _order(key: BreakerKey) -> tuple[int, str]:
    return (key.scope.value, key.target_id)
