"""Executing a recovery plan through an actuator, one timed phase per step.

The executor climbs the plan's ladder (``strategies.Rung``) until a rung's verify
passes. A rung whose breaker is open is skipped and recorded as a skipped phase;
an action the actuator cannot take (``ActionUnavailable``), a failed action, an
action past its deadline and an unexpected error all count as that rung failing,
which escalates to the next. Every step is one ``PhaseRecord`` and one child span
of the recovery's span, current while the step's action runs: the actuator's calls
carry it (as gRPC metadata) to the services they reach, whose spans join the
recovery's trace.

No gRPC here: the actuator is a protocol, faked in tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from services.recovery.breakers import BreakerKey, Clock
from services.recovery.strategies import (
    IN_PLACE_BUDGET_S,
    Action,
    Level,
    ModelPlacement,
    Plan,
    Rung,
    Step,
    Target,
)

log = logging.getLogger(__name__)

Evidence = tuple[str, str]
"""An (agent_id, browser_id) pair an action showed working or failing."""


class ActionUnavailable(NotImplementedError):
    """The actuator cannot take this action (yet); the strategy escalates past it."""


class ActionFailed(Exception):
    """The action was tried and did not work.

    ``failed_on`` names the agents and browsers that demonstrably failed, for
    their breakers.
    """

    def __init__(self, detail: str, *, failed_on: Sequence[Evidence] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.failed_on = tuple(failed_on)


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What a successful action did."""

    detail: str
    served_by: tuple[Evidence, ...] = ()
    """Agents and browsers that demonstrably worked (a verify's hops), for their breakers."""


class Actuator(Protocol):
    """Takes recovery actions. Each returns what it did or raises ActionFailed or
    ActionUnavailable."""

    async def retry_in_place(self, target: Target) -> ActionResult:
        """Retry the target shard's hop on the same replica."""
        ...

    async def reconnect(self, target: Target) -> ActionResult:
        """Reopen the stream or page connection to the target's agent or browser."""
        ...

    async def replace_on_standby(self, target: Target) -> ActionResult:
        """Move the target shard to a warm standby or another replica."""
        ...

    async def restart_browser(self, target: Target) -> ActionResult:
        """Replace the target's browser with a fresh one."""
        ...

    async def restart_agent(self, target: Target) -> ActionResult:
        """Restart the target's agent (its pod, in Kubernetes)."""
        ...

    async def barrier(self, target: Target) -> ActionResult:
        """Pause new requests for the target's model."""
        ...

    async def resume(self, target: Target) -> ActionResult:
        """Let the target's model take requests again, resuming from boundary activations."""
        ...

    async def verify(self, target: Target) -> ActionResult:
        """Check that the target's model answers correctly again."""
        ...


class PlacementSource(Protocol):
    """Where a model's shards live; recovery asks before it plans."""

    async def placement(self, model: str) -> ModelPlacement | None:
        """The model's placement; None when it is not deployed or cannot be read now."""
        ...


@dataclass(frozen=True, slots=True)
class PhaseRecord:
    """One timed step of a recovery."""

    name: str
    level: Level | None
    started_at: float
    """Seconds since the epoch."""
    duration_s: float
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """How a plan's execution ended."""

    ok: bool
    highest_level: Level | None
    """The highest level whose rung ran (skipped rungs do not count)."""
    finished_at: float
    """The end of the verify that passed, or of the last phase."""
    detail: str
    """What the passing rung did, or why every rung failed."""


def _call(actuator: Actuator, step: Step) -> Callable[[Target], Coroutine[Any, Any, ActionResult]]:
    methods = {
        Action.RETRY_IN_PLACE: actuator.retry_in_place,
        Action.RECONNECT: actuator.reconnect,
        Action.REPLACE_ON_STANDBY: actuator.replace_on_standby,
        Action.RESTART_BROWSER: actuator.restart_browser,
        Action.RESTART_AGENT: actuator.restart_agent,
        Action.BARRIER: actuator.barrier,
        Action.RESUME: actuator.resume,
        Action.VERIFY: actuator.verify,
    }
    return methods[step.action]


@dataclass
class Executor:
    """Runs plans for one recovery's bookkeeping.

    Attributes:
        actuator: takes the actions.
        clock: seconds since the epoch, for phase times.
        is_open: whether a breaker is OPEN now.
        on_phase: told about every phase as soon as it ends.
        on_evidence: told (agent, browser, ok) for every target an action showed
            working or failing.
        tracer: makes the phase spans.
        action_timeout_s: the deadline of each action.
        in_place_budget_s: what a whole in-place rung (``Rung.in_place``) may take.
    """

    actuator: Actuator
    clock: Clock
    is_open: Callable[[BreakerKey], bool]
    on_phase: Callable[[PhaseRecord], None]
    on_evidence: Callable[[str, str, bool], None]
    tracer: trace.Tracer
    action_timeout_s: float = 30.0
    in_place_budget_s: float = IN_PLACE_BUDGET_S

    async def execute(self, plan: Plan, parent: Context) -> ExecutionResult:
        """Climb ``plan``'s ladder under the span in ``parent``."""
        highest: Level | None = None
        failures: list[str] = []
        finished_at = self.clock()
        for rung in plan.rungs:
            open_keys = [str(k) for k in rung.skip_if_open if self.is_open(k)]
            first = (rung.setup or rung.actions)[0]
            if open_keys:
                detail = f"skipped: breaker {', '.join(open_keys)} is open"
                self._skipped(first, rung.level, detail, parent)
                failures.append(f"{rung.level.name.lower()} {detail}")
                continue
            highest = rung.level if highest is None else max(highest, rung.level)
            ok, detail, finished_at = await self._rung(rung, parent)
            if ok:
                return ExecutionResult(True, highest, finished_at, detail)
            failures.append(f"{rung.level.name.lower()}: {detail}")
        return ExecutionResult(
            False,
            highest,
            max(finished_at, self.clock()),
            "every level failed: " + "; ".join(failures),
        )

    async def _rung(self, rung: Rung, parent: Context) -> tuple[bool, str, float]:
        """Run one rung; return whether its verify passed, what happened, and when it ended."""
        deadline = self.clock() + self.in_place_budget_s if rung.in_place else None

        async def phase(step: Step) -> tuple[bool, str, float]:
            return await self._phase(step, rung.level, parent, deadline)

        failed: str | None = None
        for step in rung.setup:
            ok, detail, _ = await phase(step)
            if not ok:
                failed = f"{step.name} {step.target}: {detail}"
                break
        setup_ok = failed is None
        if setup_ok and rung.independent:
            # Each shard on its own: at once, so a browser's shards take over together.
            outcomes = await asyncio.gather(*(phase(step) for step in rung.actions))
            failed = next(
                (
                    f"{step.name} {step.target}: {detail}"
                    for step, (ok, detail, _) in zip(rung.actions, outcomes, strict=True)
                    if not ok
                ),
                None,
            )
        elif setup_ok:
            for step in rung.actions:
                ok, detail, _ = await phase(step)
                if not ok:
                    failed = f"{step.name} {step.target}: {detail}"
                    break
        if setup_ok:
            for step in rung.teardown:
                # A barrier taken is released whatever the budget says.
                ok, detail, _ = await self._phase(step, rung.level, parent, None)
                if not ok and failed is None:
                    failed = f"{step.name} {step.target}: {detail}"
        if failed is not None:
            return False, failed, self.clock()
        ok, detail, ended = await phase(rung.verify)
        if not ok:
            return False, f"verify: {detail}", ended
        return True, detail, ended

    async def _phase(
        self, step: Step, level: Level, parent: Context, deadline: float | None
    ) -> tuple[bool, str, float]:
        """Run one step as a timed phase with its own span; return ok, detail, end time.

        ``deadline`` (the rung's budget, on ``clock``) shortens the action's timeout.
        """
        started = self.clock()
        timeout = self.action_timeout_s
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - started))
        span = self.tracer.start_span(step.name, context=parent, start_time=_ns(started))
        span.set_attribute("recovery.phase", step.name)
        span.set_attribute("recovery.level", level.name.lower())
        span.set_attribute("recovery.target", str(step.target))
        ok = False
        try:
            # The phase's span is current for the action: wait_for's task copies the
            # context it is made in, so the action's calls are children of the phase.
            with trace.use_span(span, end_on_exit=False):
                if timeout <= 0:
                    raise TimeoutError  # the rung's budget is spent: not tried
                result = await asyncio.wait_for(_call(self.actuator, step)(step.target), timeout)
        except asyncio.CancelledError:
            # The service is stopping: the span still ends, so the trace is whole.
            span.set_status(Status(StatusCode.ERROR, "cancelled"))
            span.end(end_time=_ns(max(started, self.clock())))
            raise
        except ActionUnavailable as exc:
            detail = f"unavailable: {exc}"
        except ActionFailed as exc:
            detail = exc.detail
            for agent_id, browser_id in exc.failed_on:
                self.on_evidence(agent_id, browser_id, False)
        except TimeoutError:
            if timeout <= 0:
                detail = "not tried: the rung's time budget was spent"
            elif timeout < self.action_timeout_s:
                detail = f"no answer within {timeout:g} s (the rung's time budget)"
            else:
                detail = f"no answer within {timeout:g} s"
        except Exception as exc:
            # An actuator bug must not kill the recovery: it fails the phase, visibly.
            log.exception("recovery action raised", extra={"phase": step.name})
            detail = f"{type(exc).__name__}: {exc}"
        else:
            ok, detail = True, result.detail
            for agent_id, browser_id in result.served_by:
                self.on_evidence(agent_id, browser_id, True)
        ended = max(started, self.clock())
        span.set_attribute("recovery.ok", ok)
        span.set_attribute("recovery.detail", detail)
        if not ok:
            span.set_status(Status(StatusCode.ERROR, detail))
        span.end(end_time=_ns(ended))
        self.on_phase(PhaseRecord(step.name, level, started, ended - started, ok, detail))
        return ok, detail, ended

    def _skipped(self, step: Step, level: Level, detail: str, parent: Context) -> None:
        now = self.clock()
        span = self.tracer.start_span(step.name, context=parent, start_time=_ns(now))
        span.set_attribute("recovery.phase", step.name)
        span.set_attribute("recovery.level", level.name.lower())
        span.set_attribute("recovery.ok", False)
        span.set_attribute("recovery.detail", detail)
        span.end(end_time=_ns(now))
        self.on_phase(PhaseRecord(step.name, level, now, 0.0, False, detail))


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)
