"""The fault-injector's core: validate, resolve, consult breakers, inject, revert.

Every fault goes through the same steps, each one able to stop it:

1. the guardrails (``spec.validate``): refused -> REFUSED, nothing injected;
2. the targets, resolved against the cluster (``targets``): none -> FAILED;
3. the breakers of the targets (closed: any intensity; half-open: mild and
   moderate; open: none): every target blocked -> REFUSED;
4. a dry run stops here -> DRY_RUN, with the actions it would have taken;
5. the actions, performed by the agents (hooks) or on the leader's workload:
   any took effect -> ACTIVE until its duration ends, none -> FAILED. The
   fault is dated (``injected_at``) by its first effect, as the agent stamped
   it, not by when the actions returned; its duration counts from there.

The end of the duration reverts the fault; so do RevertFault and RevertAll. The
agents are also told the duration, so they revert by themselves if this
injector dies first. The collaborators (cluster view, breakers, agent hooks,
leader workload, clock) come in as interfaces, so this module needs no network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from webshard.common.v1 import common_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as pb

from services.fault_injector.actions import (
    Action,
    AgentAction,
    LeaderAction,
    breaker_keys,
    ineligible,
    plan_actions,
)
from services.fault_injector.faults import TERMINAL, FaultBook, FaultRecord, timestamp
from services.fault_injector.schedule import Clock, SystemClock, Timers
from services.fault_injector.spec import (
    FaultError,
    Limits,
    Plan,
    Refusal,
    bounded,
    breaker_allows,
    intensity_name,
    kind_name,
    validate,
)
from services.fault_injector.targets import (
    ClusterView,
    Target,
    TargetKind,
    candidates,
    pick,
    split,
)

log = logging.getLogger(__name__)

State = pb.FaultState
Kind = common_pb2.FaultKind


class ActionError(Exception):
    """An action that did not take effect; the message says why."""


@dataclasses.dataclass(frozen=True)
class HookOutcome:
    """What an agent's fault hook did, and when its effect began."""

    detail: str
    began_at: float | None = None
    """Wall-clock seconds when the agent began the effect; None when it did not say."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One action's outcome: whether it took effect, what was done, and when it began."""

    ok: bool
    detail: str
    began_at: float = 0.0
    """Seconds on the injector's clock; meaningful only when ``ok``."""


@dataclasses.dataclass(frozen=True)
class ViewRequest:
    """The parts of the cluster a set of faults needs to resolve its targets."""

    agents: bool = False
    models: frozenset[str] | None = frozenset()
    """Placements of these models; None for every deployed model."""
    replicas: bool = False

    def merge(self, other: ViewRequest) -> ViewRequest:
        """What either needs."""
        models = None if self.models is None or other.models is None else self.models | other.models
        return ViewRequest(self.agents or other.agents, models, self.replicas or other.replicas)


class ClusterSource(Protocol):
    """Where the cluster's agents, placements and replicas come from."""

    async def view(self, request: ViewRequest) -> ClusterView:
        """The parts asked for; FaultError UNAVAILABLE when the coordinator cannot say."""
        ...


@dataclasses.dataclass
class BreakerStates:
    """Breaker states by (scope, id), and a note when they could not be read."""

    states: dict[tuple[str, str], int]
    note: str = ""


class BreakerSource(Protocol):
    """Where breaker states come from (the recovery service)."""

    async def states(self, keys: Sequence[tuple[str, str]]) -> BreakerStates:
        """The state of each breaker; unknown ones may be left out (read as closed)."""
        ...


class AgentHooks(Protocol):
    """Performs agent actions through the agents' fault hooks."""

    async def apply(
        self, action: AgentAction, fault_id: str, duration_s: float, intensity: int
    ) -> HookOutcome:
        """Perform one hook for a fault of ``intensity``; returns the agent's detail and
        the time its effect began, raises ActionError."""
        ...

    async def revert(self, agent_id: str, address: str, fault_id: str) -> bool:
        """Undo a fault's hooks on one agent; raises ActionError."""
        ...


class LeaderControl(Protocol):
    """Acts on the coordinator leader's workload."""

    async def act(self, action: LeaderAction, duration_s: float) -> str:
        """Stop or kill the leader; returns what was done, raises ActionError."""
        ...

    async def undo(self, action: LeaderAction) -> str:
        """Resume or restart it; returns what was done, raises ActionError."""
        ...


def view_request(plan: Plan) -> ViewRequest:
    """What the leaves of ``plan`` need from the cluster."""
    if plan.composite:
        request = ViewRequest()
        for child in plan.children:
            request = request.merge(view_request(child))
        return request
    spec = plan.spec
    if spec.kind == Kind.FAULT_KIND_LEADER_LOSS:
        return ViewRequest(replicas=True)
    selector = spec.target
    models: frozenset[str] | None = frozenset()
    if selector.kind == TargetKind.TARGET_KIND_SHARD:
        named = {i.strip().rsplit("/", 1)[0] for i in selector.ids if "/" in i}
        if selector.model.strip():
            models = frozenset({selector.model.strip()})
        elif named:
            models = frozenset(named)
        else:
            models = None
    elif selector.kind == TargetKind.TARGET_KIND_BROWSER and selector.model.strip():
        models = frozenset({selector.model.strip()})
    return ViewRequest(agents=True, models=models)


def _target_message(action: Action, detail: str) -> pb.FaultTarget:
    if isinstance(action, LeaderAction):
        return pb.FaultTarget(
            kind=TargetKind.TARGET_KIND_REPLICA, id=action.replica_id, detail=detail
        )
    return pb.FaultTarget(
        kind=action.target_kind,  # type: ignore[arg-type]
        id=action.target_id,
        agent_id=action.agent_id,
        detail=detail,
    )


class FaultInjector:
    """Injects faults, keeps them in a book, and reverts them on time or on demand."""

    def __init__(
        self,
        *,
        limits: Limits,
        cluster: ClusterSource,
        breakers: BreakerSource,
        hooks: AgentHooks,
        leader: LeaderControl,
        memory_cap_bytes: int,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._limits = limits
        self._cluster = cluster
        self._breakers = breakers
        self._hooks = hooks
        self._leader = leader
        self._memory_cap = memory_cap_bytes
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._tracer = tracer or trace.get_tracer(__name__)
        self._timers = Timers()
        self.book = FaultBook()

    # --- queries --------------------------------------------------------------

    def get(self, fault_id: str) -> pb.Fault:
        """One fault (top-level or child); FaultError NOT_FOUND for an unknown id."""
        return self._record(fault_id).snapshot()

    def faults(self, states: Iterable[int] = ()) -> list[pb.Fault]:
        """Top-level faults, oldest first, refused ones included."""
        return [record.snapshot() for record in self.book.faults(states)]

    def watch(self, *, include_existing: bool) -> AsyncIterator[pb.Fault]:
        """Every change to every fault from now on."""
        return self.book.watch(include_existing=include_existing)

    def _record(self, fault_id: str) -> FaultRecord:
        record = self.book.get(fault_id)
        if record is None:
            raise FaultError("NOT_FOUND", f"no fault {fault_id!r}")
        return record

    # --- inject ---------------------------------------------------------------

    async def inject(self, spec: pb.FaultSpec, *, force: bool = False) -> pb.Fault:
        """Inject a fault (or resolve it, for a dry run) and return it as it stands.

        Raises FaultError (Refusal for guardrails and breakers) when nothing was
        injected; the fault is recorded, REFUSED or FAILED, all the same.
        """
        record = FaultRecord(
            pb.Fault(
                fault_id=self.book.new_id(),
                # Cut to the limits: a refused spec is kept too, and must stay small.
                spec=bounded(spec),
                state=State.FAULT_STATE_PENDING,
                created_at=timestamp(self._clock.now()),
            )
        )
        with self._tracer.start_as_current_span(
            "fault.inject",
            attributes={
                "webshard.fault_id": record.fault_id,
                "webshard.fault.kind": kind_name(spec.kind),
                "webshard.fault.intensity": intensity_name(spec.intensity),
                "webshard.fault.dry_run": spec.dry_run,
            },
        ) as span:
            context = span.get_span_context()
            # Without a tracer provider (a bare test) spans are not recorded: no id.
            record.fault.trace_id = format(context.trace_id, "032x") if context.is_valid else ""
            self.book.add(record)
            try:
                plan = validate(spec, force=force, limits=self._limits)
            except Refusal as exc:
                self._end(record, exc.state, exc.reason, error=exc)
                span.set_status(Status(StatusCode.ERROR, exc.reason))
                exc.fault_id = record.fault_id
                raise
            record.plan = plan
            record.fault.spec.CopyFrom(plan.spec)
            self._adopt_children(record, plan)
            self.book.publish(record)
            if plan.composite:
                await self._start_composite(record)
            else:
                await self._inject_leaf(record, None)
            if isinstance(record.error, FaultError):
                span.set_status(Status(StatusCode.ERROR, record.error.reason))
                record.error.fault_id = record.fault_id
                raise record.error
            span.set_attribute("webshard.fault.state", State.Name(record.fault.state))
        return record.snapshot()

    def _adopt_children(self, record: FaultRecord, plan: Plan) -> None:
        for number, child_plan in enumerate(plan.children, 1):
            child = FaultRecord(
                pb.Fault(
                    fault_id=f"{record.fault_id}-{number}",
                    spec=child_plan.spec,
                    state=State.FAULT_STATE_PENDING,
                    created_at=record.fault.created_at,
                    trace_id=record.fault.trace_id,
                ),
                plan=child_plan,
                parent=record,
            )
            record.children.append(child)
            self._adopt_children(child, child_plan)
        self.book.index(record)

    async def _start_composite(self, record: FaultRecord) -> None:
        plan = record.plan
        assert plan is not None
        start = self._clock.now()
        if plan.spec.kind == Kind.FAULT_KIND_MULTIPLE_FAILURES:
            try:
                view = await self._cluster.view(view_request(plan))
            except FaultError as exc:
                for child in record.children:
                    self._end(child, exc.state, exc.reason, error=exc)
                return
            await asyncio.gather(*(self._start_child(child, view) for child in record.children))
        else:
            first, *rest = record.children
            await self._start_child(first, None)
            if rest and record.state not in TERMINAL and not plan.spec.dry_run:
                record.schedule = self._timers.start(
                    self._cascade(record, rest, start), f"cascade-{record.fault_id}"
                )
            elif rest and plan.spec.dry_run:
                # A dry run resolves every step now; nothing is scheduled.
                for child in rest:
                    await self._start_child(child, None)
        # The composite's own duration bounds its children, whichever of them is in force.
        # It counts from when the first child took effect (applying can take seconds).
        if record.state not in TERMINAL and record.timer is None and not plan.spec.dry_run:
            begun = start
            if record.fault.HasField("injected_at"):
                begun = record.fault.injected_at.ToNanoseconds() / 1e9
            ends = begun + plan.duration_s
            record.fault.reverts_at.CopyFrom(timestamp(ends))
            record.timer = self._timers.start(
                self._expire(record, ends), f"revert-{record.fault_id}"
            )
            self.book.publish(record)

    async def _start_child(self, child: FaultRecord, view: ClusterView | None) -> None:
        assert child.plan is not None
        if child.plan.composite:
            await self._start_composite(child)
        else:
            await self._inject_leaf(child, view)

    async def _cascade(self, record: FaultRecord, rest: list[FaultRecord], start: float) -> None:
        plan = record.plan
        assert plan is not None
        for step, child in enumerate(rest, 1):
            await self._clock.sleep(start + step * plan.interval_s - self._clock.now())
            if record.reverting or record.state in TERMINAL:
                return
            with self._tracer.start_as_current_span(
                "fault.cascade_step",
                attributes={"webshard.fault_id": child.fault_id, "webshard.step": step},
            ):
                await self._start_child(child, None)
        record.schedule = None

    async def _inject_leaf(self, record: FaultRecord, view: ClusterView | None) -> None:
        """Resolve, check breakers, then apply; the outcome is in the record's state."""
        plan = record.plan
        assert plan is not None
        spec = plan.spec
        notes: list[str] = []
        try:
            if view is None:
                view = await self._cluster.view(view_request(plan))
            targets, skipped = await self._targets(spec, view, notes)
            actions = plan_actions(
                spec.kind, spec.intensity, targets, view, memory_cap_bytes=self._memory_cap
            )
        except FaultError as exc:
            if record.state not in TERMINAL:
                self._end(record, exc.state, exc.reason, error=exc)
            return
        if record.state in TERMINAL:
            return  # reverted (RevertAll, say) while its targets were being resolved
        notes.extend(skipped)
        if spec.dry_run:
            record.fault.targets.extend(
                _target_message(a, f"dry run: would {a.describe()}") for a in actions
            )
            self._end(record, State.FAULT_STATE_DRY_RUN, "; ".join(notes))
            return
        # The agents get the duration too, so a fault outlives no dead injector.
        outcomes = await asyncio.gather(
            *(self._apply(record, action, plan.duration_s) for action in actions)
        )
        failures = []
        for action, outcome in zip(actions, outcomes, strict=True):
            record.fault.targets.append(_target_message(action, outcome.detail))
            if outcome.ok:
                record.applied.append(action)
            else:
                failures.append(outcome.detail)
        if record.state in TERMINAL:
            # Reverted while its actions were in flight: undo what took effect, now.
            await self._undo(record)
            self.book.publish(record)
            return
        if not record.applied:
            notes.insert(0, "no action took effect: " + "; ".join(failures))
            self._end(record, State.FAULT_STATE_FAILED, "; ".join(notes))
            return
        if failures:
            notes.insert(0, f"{len(failures)} of {len(actions)} actions failed")
        # The fault began with its first effect, not when its actions returned:
        # what the effect causes (a browser's exit, a recovery) may come before that.
        now = min(o.began_at for o in outcomes if o.ok)
        record.fault.state = State.FAULT_STATE_ACTIVE
        record.fault.detail = "; ".join(notes)
        record.fault.injected_at.CopyFrom(timestamp(now))
        record.fault.reverts_at.CopyFrom(timestamp(now + plan.duration_s))
        record.timer = self._timers.start(
            self._expire(record, now + plan.duration_s), f"revert-{record.fault_id}"
        )
        log.info(
            "fault injected",
            extra={
                "fault_id": record.fault_id,
                "kind": kind_name(spec.kind),
                "intensity": intensity_name(spec.intensity),
                "targets": [t.id for t in record.fault.targets],
                "duration_s": plan.duration_s,
            },
        )
        self.book.publish(record)
        if record.parent is not None:
            self._settle(record.parent)

    async def _targets(
        self, spec: pb.FaultSpec, view: ClusterView, notes: list[str]
    ) -> tuple[list[Target], list[str]]:
        """The targets hit, and notes on the candidates left out."""
        if spec.kind == Kind.FAULT_KIND_LEADER_LOSS:
            return [self._leader_target(spec, view)], []
        selector = spec.target
        matched = candidates(selector, view)
        eligible, unfit = split(matched, lambda t: ineligible(spec.kind, spec.intensity, t, view))
        if not eligible:
            reasons = "; ".join(why for _, why in unfit) or "the selector matches nothing"
            raise FaultError("FAILED_PRECONDITION", f"no target can take this fault: {reasons}")
        keys = sorted({key for t in eligible for key in breaker_keys(t, view)})
        breakers = await self._breakers.states(keys) if keys else BreakerStates({})
        if breakers.note:
            notes.append(breakers.note)

        def blocked(target: Target) -> str | None:
            for key in breaker_keys(target, view):
                state = breakers.states.get(key, common_pb2.BREAKER_STATE_CLOSED)
                if not breaker_allows(state, spec.intensity):
                    name = common_pb2.BreakerState.Name(state).removeprefix(  # type: ignore[arg-type]
                        "BREAKER_STATE_"
                    )
                    allowed = "mild and moderate only" if name == "HALF_OPEN" else "nothing"
                    return (
                        f"{target.id}: breaker {key[1]} is {name} "
                        f"({intensity_name(spec.intensity)} refused; it allows {allowed})"
                    )
            return None

        allowed, stopped = split(eligible, blocked)
        if not allowed:
            raise Refusal(
                "FAILED_PRECONDITION",
                "refused by circuit breakers: " + "; ".join(why for _, why in stopped),
            )
        targets = pick(selector, eligible, allowed, self._rng)
        skipped = [f"skipped {why}" for _, why in stopped] + [f"unfit {why}" for _, why in unfit]
        return targets, skipped

    @staticmethod
    def _leader_target(spec: pb.FaultSpec, view: ClusterView) -> Target:
        leader = view.leader()
        if leader is None:
            raise FaultError("UNAVAILABLE", "no coordinator replica names a leader right now")
        ids = [i.strip() for i in spec.target.ids if i.strip()]
        if ids and leader.replica_id not in ids:
            raise FaultError(
                "FAILED_PRECONDITION",
                f"the leader is {leader.replica_id}, which is not among {', '.join(ids)}",
            )
        return Target(
            TargetKind.TARGET_KIND_REPLICA,
            leader.replica_id,
            replica_id=leader.replica_id,
            replica_address=leader.address,
        )

    async def _apply(self, record: FaultRecord, action: Action, duration_s: float) -> Outcome:
        """Perform one action; when it took effect, its start is when its effect began.

        An agent's hook says when its effect began; that time is kept within the
        call's span (a clock skewed between machines cannot move it outside). An
        action without a hook (leader_loss) began just before it was started.
        """
        with self._tracer.start_as_current_span(
            "fault.apply",
            attributes={"webshard.fault_id": record.fault_id, "webshard.action": action.describe()},
        ) as span:
            started = self._clock.now()
            try:
                if isinstance(action, LeaderAction):
                    return Outcome(True, await self._leader.act(action, duration_s), started)
                hooked = await self._hooks.apply(
                    action, record.fault_id, duration_s, record.fault.spec.intensity
                )
            except ActionError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                return Outcome(False, f"failed: {exc}")
            began = started if hooked.began_at is None else hooked.began_at
            return Outcome(True, hooked.detail, min(max(began, started), self._clock.now()))

    # --- revert ---------------------------------------------------------------

    async def revert(self, fault_id: str, why: str = "reverted by RevertFault") -> pb.Fault:
        """Revert one fault now (a no-op for one that has ended); return it."""
        record = self._record(fault_id)
        await self._revert(record, why)
        return record.snapshot()

    async def revert_all(self, why: str = "reverted by RevertAll") -> int:
        """Revert every fault still pending or active; return how many."""
        live = [r for r in self.book.faults() if r.state not in TERMINAL]
        await asyncio.gather(*(self._revert(r, why) for r in live))
        return len(live)

    async def close(self) -> None:
        """Revert what is still in force, then stop the schedule."""
        try:
            await self.revert_all("reverted: the injector is stopping")
        finally:
            await self._timers.close()

    async def _expire(self, record: FaultRecord, at: float) -> None:
        await self._clock.sleep(at - self._clock.now())
        record.timer = None  # this task is the timer: the revert must not cancel it
        await self._revert(record, "reverted: its duration ended")

    async def _revert(self, record: FaultRecord, why: str) -> None:
        if record.state in TERMINAL:
            return
        if record.reverting:
            await record.ended.wait()
            return
        record.reverting = True
        record.revert_reason = why
        for task in (record.timer, record.schedule):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        record.timer = record.schedule = None
        if record.children:
            await asyncio.gather(*(self._revert(child, why) for child in record.children))
            self._settle(record)
            return
        if record.state == State.FAULT_STATE_PENDING:
            self._end(record, State.FAULT_STATE_REVERTED, f"{why} before it was injected")
            return
        notes = await self._undo(record)
        detail = why + (f"; {'; '.join(notes)}" if notes else "")
        if record.fault.detail:
            detail = f"{record.fault.detail}; {detail}"
        self._end(record, State.FAULT_STATE_REVERTED, detail)

    async def _undo(self, record: FaultRecord) -> list[str]:
        """Undo every revertible action; returns what the leader's undo did and what
        could not be undone."""
        notes: list[str] = []
        agents = {
            (a.agent_id, a.address)
            for a in record.applied
            if isinstance(a, AgentAction) and a.revertible
        }
        leaders = [a for a in record.applied if isinstance(a, LeaderAction) and a.revertible]

        async def on_agent(agent_id: str, address: str) -> None:
            try:
                await self._hooks.revert(agent_id, address, record.fault_id)
            except ActionError as exc:
                notes.append(
                    f"revert on {agent_id} failed ({exc}); the agent reverts by itself "
                    "when the duration ends"
                )

        async def on_leader(action: LeaderAction) -> None:
            try:
                notes.append(await self._leader.undo(action))
            except ActionError as exc:
                notes.append(f"undo on {action.replica_id} failed: {exc}")

        with self._tracer.start_as_current_span(
            "fault.revert", attributes={"webshard.fault_id": record.fault_id}
        ):
            await asyncio.gather(
                *(on_agent(agent_id, address) for agent_id, address in sorted(agents)),
                *(on_leader(action) for action in leaders),
            )
        return notes

    # --- states ---------------------------------------------------------------

    def _end(
        self, record: FaultRecord, state: int, detail: str, *, error: Exception | None = None
    ) -> None:
        record.fault.state = state  # type: ignore[assignment]
        if detail:
            record.fault.detail = detail
        if state == State.FAULT_STATE_REVERTED:
            record.fault.reverted_at.CopyFrom(timestamp(self._clock.now()))
        record.error = error
        record.ended.set()
        for task in (record.timer, record.schedule):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        record.timer = record.schedule = None
        log.info(
            "fault ended" if state != State.FAULT_STATE_REFUSED else "fault refused",
            extra={
                "fault_id": record.fault_id,
                "state": State.Name(state),  # type: ignore[arg-type]
                "detail": detail,
                "dry_run": record.fault.spec.dry_run,
            },
        )
        self.book.publish(record)
        if record.parent is not None:
            self._settle(record.parent)

    def _settle(self, record: FaultRecord) -> None:
        """Derive a composite fault's state from its children's."""
        if record.state in TERMINAL:
            return
        why = record.revert_reason
        states = [child.state for child in record.children]
        if any(s == State.FAULT_STATE_ACTIVE for s in states) or (
            any(s == State.FAULT_STATE_PENDING for s in states) and not record.reverting
        ):
            changed = False
            if record.state != State.FAULT_STATE_ACTIVE and any(
                s == State.FAULT_STATE_ACTIVE for s in states
            ):
                record.fault.state = State.FAULT_STATE_ACTIVE
                changed = True
            # The earliest first effect of any child: children applied at once may
            # become active in another order than their effects began.
            first = min(
                (
                    c.fault.injected_at.ToNanoseconds()
                    for c in record.children
                    if c.fault.HasField("injected_at")
                ),
                default=0,
            )
            if (
                first
                and record.state == State.FAULT_STATE_ACTIVE
                and (
                    not record.fault.HasField("injected_at")
                    or first < record.fault.injected_at.ToNanoseconds()
                )
            ):
                record.fault.injected_at.FromNanoseconds(first)
                changed = True
            if changed:
                self.book.publish(record)
                if record.parent is not None:  # a nested composite: its parent follows
                    self._settle(record.parent)
            return
        if any(s == State.FAULT_STATE_PENDING for s in states):
            return  # a revert is cancelling the pending children now
        summary = ", ".join(
            f"{child.fault_id} {State.Name(child.state).removeprefix('FAULT_STATE_').lower()}"  # type: ignore[arg-type]
            for child in record.children
        )
        if all(s == State.FAULT_STATE_DRY_RUN for s in states):
            self._end(record, State.FAULT_STATE_DRY_RUN, summary)
        elif any(s == State.FAULT_STATE_REVERTED for s in states):
            self._end(record, State.FAULT_STATE_REVERTED, "; ".join(p for p in (why, summary) if p))
        elif all(s == State.FAULT_STATE_REFUSED for s in states):
            errors = [c.error for c in record.children if isinstance(c.error, FaultError)]
            self._end(
                record,
                State.FAULT_STATE_REFUSED,
                summary,
                error=Refusal(errors[0].code if errors else "FAILED_PRECONDITION", summary),
            )
        else:
            errors = [c.error for c in record.children if isinstance(c.error, FaultError)]
            applied_any = any(c.applied for c in record.walk())
            self._end(
                record,
                State.FAULT_STATE_FAILED,
                summary,
                error=None
                if applied_any
                else FaultError(errors[0].code if errors else "UNAVAILABLE", summary),
            )
