"""Recovery bookkeeping: one recovery per failure, its trace, its watchers.

``Recoveries.report`` turns a failure report into a recovery, or joins it to the
recovery already running for the same agent, browser and shard (reporters see one
failure from several sides: the coordinator's broken hop, the page's crash
report, the agent's supervisor). A new failure counts against the target's
breakers; each recovery runs in its own task: look up the model's placement,
choose the strategy, plan, execute, record the outcome for the adaptive strategy.

Every recovery is one OpenTelemetry trace: a root span "recovery" from the
failure's detection to the end of the verify that passed, with one child span per
phase; the actions' calls carry their phase's span to the coordinator, and the
coordinator's to the agents, so their spans are in the same trace. The root names
the failure (``fault.id`` and ``fault.intensity`` of the injected fault that caused
it, ``fault.kind`` - the failure's kind -, agent, browser, model, shard), the
strategy and the outcome, and links to the fault's injection. A report that names
the fault may come after the one that started the recovery (the coordinator's data
path sees a crash first, the agent that applied the fault a moment later); the
recovery then takes the fault from it. Every change to a recovery is published to
the watchers.

No gRPC here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.recovery.breakers import Breakers, Clock
from services.recovery.execution import (
    Actuator,
    Executor,
    PhaseRecord,
    PlacementSource,
)
from services.recovery.strategies import (
    IN_PLACE_BUDGET_S,
    AdaptiveChooser,
    Failure,
    Level,
    ModelPlacement,
    Plan,
    Strategy,
    failed_shards,
    make_plan,
)

log = logging.getLogger(__name__)

_STOPPED = "the recovery service stopped before the recovery finished"


class RecoveryState(enum.IntEnum):
    """A recovery's life-cycle state; the numbers are webshard.recovery.v1.RecoveryState's."""

    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3


@dataclass(frozen=True)
class RecoveryRecord:
    """One recovery at one moment; every change makes a new record."""

    recovery_id: str
    failure: Failure
    """The report that started it (``detected_at`` filled in when the reporter left it out)."""
    strategy: Strategy
    """The strategy asked for or configured (ADAPTIVE included)."""
    state: RecoveryState
    started_at: float
    """When the failure was detected, seconds since the epoch."""
    trace_id: str
    """The recovery's trace, lowercase hex."""
    phases: tuple[PhaseRecord, ...] = ()
    finished_at: float | None = None
    """The end of the verify that passed, or when the recovery gave up."""
    highest_level: Level | None = None
    detail: str = ""
    chosen: Strategy | None = None
    """The concrete strategy that made the plan, once planned (adaptive's pick)."""
    reports: int = 1
    """Reports of the failure joined into this recovery, the first included."""
    retry_of: str = ""
    """The failed recovery this one starts again; empty for a first attempt."""
    retry_pending: bool = False
    """A failed recovery that will be started again shortly (``retried_by`` then)."""
    retried_by: str = ""
    """The recovery that started this failed one again; empty when none (yet)."""
    redundancy_restored_at: float | None = None
    """When, after it succeeded, every shard of its model was back to the healthy
    replicas and spares it had when the failure was planned for (a hot spare's
    takeover is followed by a new spare loaded in the background); None until then,
    and for good when that did not happen within ``redundancy_wait_s``."""

    @property
    def duration_s(self) -> float | None:
        """From detection to the end; None while running."""
        if self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True)
class RecoveriesConfig:
    """How recoveries are run and kept."""

    default_strategy: Strategy = Strategy.PROGRESSIVE
    """The strategy when neither the report nor the model's deployment names one."""
    dedupe_window_s: float = 10.0
    """A report joins the running recovery of the same agent, browser and shard when
    detected within this many seconds of the last report joined to it."""
    max_recoveries: int = 1000
    """Recent recoveries kept; the oldest finished ones are forgotten first."""
    watch_buffer: int = 1024
    """Changes a watcher may fall behind by before its watch is ended."""
    action_timeout_s: float = 30.0
    """The deadline of each action, and of the placement lookup before planning. Loading
    a shard into a browser takes seconds, and several times that while other browsers
    launch on the same cores: a tighter deadline fails recoveries that would succeed."""
    retries: int = 2
    """A failed recovery is started again up to this many times, so a failure that
    outlasts one attempt (a leader change mid-action, a destination lost too) does not
    leave a shard short of a replica; 0 turns this off."""
    retry_after_s: float = 1.0
    """The wait before the first retry; each later one waits twice as long."""
    in_place_budget_s: float = IN_PLACE_BUDGET_S
    """What a whole in-place rung (retry, reconnect; verify included) may take."""
    redundancy_wait_s: float = 120.0
    """How long after a recovery its model's redundancy is watched for (off the
    recovery's path: the recovery has already answered)."""
    redundancy_check_s: float = 0.25
    """How often the placement is read meanwhile."""

    def validate(self) -> None:
        """Raise ValueError naming the first value out of range."""
        if self.default_strategy not in Strategy:
            raise ValueError(f"unknown default strategy {self.default_strategy!r}")
        if self.dedupe_window_s < 0:
            raise ValueError(f"dedupe window {self.dedupe_window_s} s is negative")
        if self.max_recoveries < 1 or self.watch_buffer < 1:
            raise ValueError("max recoveries and the watch buffer must be at least 1")
        if self.action_timeout_s <= 0:
            raise ValueError(f"action timeout {self.action_timeout_s} s must be positive")
        if self.retries < 0 or self.retry_after_s < 0:
            raise ValueError("retries and the wait before a retry must not be negative")
        if self.in_place_budget_s <= 0:
            raise ValueError(f"in-place budget {self.in_place_budget_s} s must be positive")
        if self.redundancy_wait_s < 0 or self.redundancy_check_s <= 0:
            raise ValueError("the redundancy wait must not be negative, its checks positive")


class WatchOverflow(Exception):
    """A watcher fell too far behind; it should watch again with include_existing."""


@dataclass
class _Entry:
    record: RecoveryRecord
    span: trace.Span
    received_at: float
    last_detected_at: float
    requested: Strategy | None
    attempt: int = 0
    """0 for a first attempt, n for the n-th retry."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Watch:
    """A subscription to every change, from the moment it was made.

    Iterate it; close it when done. Raises WatchOverflow when it fell more than
    the buffer behind, rather than skipping changes silently.
    """

    def __init__(self, owner: Recoveries, initial: list[RecoveryRecord], limit: int) -> None:
        self._owner = owner
        self._items: deque[RecoveryRecord] = deque(initial)
        self._limit = limit
        self._event = asyncio.Event()
        self.overflowed = False

    def push(self, record: RecoveryRecord) -> None:
        """Queue one change (called by the owner)."""
        if self.overflowed:
            return
        if len(self._items) >= self._limit:
            self.overflowed = True
        else:
            self._items.append(record)
        self._event.set()

    def close(self) -> None:
        """Stop receiving changes."""
        self._owner._unsubscribe(self)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RecoveryRecord:
        while True:
            if self.overflowed:
                raise WatchOverflow(
                    f"the watcher fell more than {self._limit} changes behind; "
                    "watch again with include_existing"
                )
            if self._items:
                return self._items.popleft()
            self._event.clear()
            await self._event.wait()


class Recoveries:
    """Every recent recovery, the running ones' tasks, and the watchers.

    Args:
        actuator: takes the recovery actions.
        breakers: counts failures and action outcomes; its open breakers skip levels.
        chooser: the adaptive strategy's memory; every finished recovery is recorded in it.
        placements: where models' shards live; None plans from the report alone.
        config: see RecoveriesConfig.
        clock: seconds since the epoch (reports carry wall-clock detection times).
        tracer_provider: where the spans go; None uses the global provider.
        new_id: makes recovery ids.
    """

    def __init__(
        self,
        *,
        actuator: Actuator,
        breakers: Breakers,
        chooser: AdaptiveChooser,
        placements: PlacementSource | None = None,
        config: RecoveriesConfig | None = None,
        clock: Clock = time.time,
        tracer_provider: TracerProvider | None = None,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.config = config or RecoveriesConfig()
        self.config.validate()
        self.breakers = breakers
        self.chooser = chooser
        self._actuator = actuator
        self._placements = placements
        self._clock = clock
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self._new_id = new_id
        self._entries: dict[str, _Entry] = {}
        self._running: dict[tuple[str, str, str, int], str] = {}
        self._recovered: dict[tuple[str, str, str, int], str] = {}
        """Failure key -> the recovery that last recovered it (late reports join it)."""
        self._watches: set[Watch] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        """Work off the recoveries' path: retries waiting, redundancy watches."""

    # ------------------------------------------------------------------ queries

    def get(self, recovery_id: str) -> RecoveryRecord | None:
        """One recovery, or None when unknown or forgotten."""
        entry = self._entries.get(recovery_id)
        return entry.record if entry is not None else None

    def list(self, limit: int) -> list[RecoveryRecord]:
        """Up to ``limit`` recoveries, the most recently reported first."""
        records = [entry.record for entry in reversed(self._entries.values())]
        return records[: max(limit, 0)]

    def watch(self, *, include_existing: bool = False) -> Watch:
        """Subscribe to every change; with ``include_existing``, the known recoveries
        come first, oldest first."""
        initial = [e.record for e in self._entries.values()] if include_existing else []
        watch = Watch(self, initial, self.config.watch_buffer)
        self._watches.add(watch)
        return watch

    def unhealthy_runtimes(self) -> Sequence[tuple[str, str]]:
        """(agent, browser) no shard should move to now: a recovery is under way there,
        or its breaker is open (browser "" for a whole agent)."""
        running = {(agent, browser) for agent, browser, _, _ in self._running}
        return sorted(running | set(self.breakers.open_runtimes()))

    async def wait(self, recovery_id: str) -> RecoveryRecord:
        """Wait until the recovery finishes; return its final record. KeyError when unknown."""
        entry = self._entries[recovery_id]
        await entry.done.wait()
        return entry.record

    # ------------------------------------------------------------------ reports

    def report(
        self, failure: Failure, strategy: Strategy | None = None, *, retry_of: str = ""
    ) -> tuple[RecoveryRecord, bool]:
        """Start a recovery for ``failure``, or join the one running for it.

        ``strategy`` overrides the model's and the configured strategy. Returns the
        recovery and whether the report was joined to one already running. Must be
        called on the event loop that runs the recoveries. ``retry_of`` names the
        failed recovery this one starts again (no new failure for the breakers).
        """
        now = self._clock()
        detected = failure.detected_at if failure.detected_at is not None else now
        failure = dataclasses.replace(failure, detected_at=detected)
        joined = self._join(failure, detected)
        if joined is not None:
            return joined, True

        previous = self._entries.get(retry_of) if retry_of else None
        if not retry_of:
            self.breakers.record_target(
                failure.agent_id,
                failure.browser_id,
                False,
                f"{failure.kind.label} reported by {failure.source.name.lower()}",
            )
        # A reporter whose clock runs ahead of ours must not make a negative duration.
        started_at = min(detected, now)
        current = trace.get_current_span().get_span_context()
        links = [Link(c) for c in (current, _fault_span(failure)) if c.is_valid]
        span = self._tracer.start_span(
            "recovery",
            context=Context(),  # a trace of its own, not a child of the RPC that reported it
            start_time=_ns(started_at),
            links=links or None,
            attributes={
                "fault.id": failure.fault_id,
                "fault.intensity": failure.fault_intensity,
                "fault.kind": failure.kind.label,
                "failure.source": failure.source.name.lower(),
                "agent.id": failure.agent_id,
                "browser.id": failure.browser_id,
                "model.name": failure.model,
                "shard.index": failure.shard_index,
                "recovery.strategy": (strategy or self.config.default_strategy).label,
                **({"recovery.retry_of": retry_of} if retry_of else {}),
            },
        )
        record = RecoveryRecord(
            recovery_id=self._new_id(),
            failure=failure,
            strategy=strategy or self.config.default_strategy,
            state=RecoveryState.RUNNING,
            started_at=started_at,
            trace_id=format(span.get_span_context().trace_id, "032x"),
            retry_of=retry_of,
        )
        span.set_attribute("recovery.id", record.recovery_id)
        attempt = previous.attempt + 1 if previous is not None else 0
        entry = _Entry(record, span, now, detected, strategy, attempt)
        self._entries[record.recovery_id] = entry
        self._running[failure.dedupe_key] = record.recovery_id
        self._evict()
        self._publish(record)
        log.info(
            "recovery started",
            extra={
                "recovery_id": record.recovery_id,
                "agent_id": failure.agent_id,
                "browser_id": failure.browser_id,
                "kind": failure.kind.label,
                "recovery_trace_id": record.trace_id,
            },
        )
        entry.task = asyncio.get_running_loop().create_task(self._run(entry))
        return record, False

    def _join(self, failure: Failure, detected: float) -> RecoveryRecord | None:
        # A shard's error on a browser already being recovered as a whole joins that
        # recovery. So does a late report that names the fault behind a failure recovered
        # already without knowing it (a spare takes over in milliseconds, before the
        # agent's own report of the crash arrives): the same failure, now attributed.
        entry = None
        for key in (failure.dedupe_key, failure.domain_key):
            recovery_id = self._running.get(key)
            if recovery_id is None and failure.fault_id:
                recovery_id = self._recovered.get(key)
            entry = self._entries.get(recovery_id) if recovery_id is not None else None
            if entry is not None:
                break
        if entry is None or abs(detected - entry.last_detected_at) > self.config.dedupe_window_s:
            return None
        if entry.record.state != RecoveryState.RUNNING and (
            entry.record.state != RecoveryState.SUCCEEDED or entry.record.failure.fault_id
        ):
            return None
        entry.last_detected_at = max(entry.last_detected_at, detected)
        changes: dict[str, object] = {"reports": entry.record.reports + 1}
        if failure.fault_id and not entry.record.failure.fault_id:
            # The first report came from a side that did not know the fault.
            changes["failure"] = dataclasses.replace(
                entry.record.failure,
                fault_id=failure.fault_id,
                fault_intensity=failure.fault_intensity,
                fault_traceparent=failure.fault_traceparent,
            )
            if entry.record.state == RecoveryState.RUNNING:  # a finished span takes nothing
                entry.span.set_attribute("fault.id", failure.fault_id)
                entry.span.set_attribute("fault.intensity", failure.fault_intensity)
                fault = _fault_span(failure)
                if fault.is_valid:
                    entry.span.add_link(fault)
        self._change(entry, **changes)
        return entry.record

    # ------------------------------------------------------------------ running

    async def _run(self, entry: _Entry) -> None:
        # The recovery's span is current while it runs, so every log line it causes
        # (the actuator's included) carries the recovery's trace id.
        with trace.use_span(
            entry.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            await self._recover(entry)

    async def _recover(self, entry: _Entry) -> None:
        failure = entry.record.failure
        parent = trace.set_span_in_context(entry.span)
        try:
            plan_started = self._clock()
            placement = await self._placement(failure.model)
            strategy = (
                entry.requested
                or (placement.strategy if placement is not None else None)
                or self.config.default_strategy
            )
            plan = make_plan(strategy, failure, placement, self.chooser)
            plan_ended = max(plan_started, self._clock())
            # Detecting and planning belong to the level the plan starts at.
            level = plan.rungs[0].level
            entry.span.set_attribute("recovery.strategy", strategy.label)
            entry.span.set_attribute("recovery.strategy.chosen", plan.strategy.label)
            self._change(entry, strategy=strategy, chosen=plan.strategy)
            self._instant_phase(
                entry,
                parent,
                PhaseRecord(
                    "detect",
                    level,
                    entry.record.started_at,
                    max(0.0, entry.received_at - entry.record.started_at),
                    True,
                    _describe(failure)
                    + (
                        f"; started again after recovery {entry.record.retry_of} failed"
                        if entry.record.retry_of
                        else ""
                    ),
                ),
            )
            self._instant_phase(
                entry,
                parent,
                PhaseRecord(
                    "plan",
                    level,
                    plan_started,
                    plan_ended - plan_started,
                    True,
                    _plan_detail(plan, failure, placement),
                ),
            )
            executor = Executor(
                actuator=self._actuator,
                clock=self._clock,
                is_open=self.breakers.is_open,
                on_phase=lambda phase: self._change(entry, phases=(*entry.record.phases, phase)),
                on_evidence=lambda agent, browser, ok: self.breakers.record_target(
                    agent, browser, ok, f"recovery {entry.record.recovery_id}"
                ),
                tracer=self._tracer,
                action_timeout_s=self.config.action_timeout_s,
                in_place_budget_s=self.config.in_place_budget_s,
            )
            result = await executor.execute(plan, parent)
            detail = result.detail
            if result.ok and result.highest_level is not None:
                detail = f"restored at {result.highest_level.name.lower()}: {detail}"
            retry = not result.ok and entry.attempt < self.config.retries
            self._finish(
                entry,
                result.ok,
                result.finished_at,
                result.highest_level,
                detail,
                retry_pending=retry,
            )
            if result.ok and placement is not None:
                self._background(self._await_redundancy(entry, placement))
            duration = result.finished_at - entry.record.started_at
            self.chooser.record(failure.kind, plan.strategy, result.ok, duration)
            if retry:
                self._background(self._retry(entry))
        except asyncio.CancelledError:
            self._finish(
                entry,
                False,
                self._clock(),
                entry.record.highest_level,
                _STOPPED,
            )
            raise
        except Exception as exc:
            log.exception("recovery crashed", extra={"recovery_id": entry.record.recovery_id})
            self._finish(
                entry,
                False,
                self._clock(),
                entry.record.highest_level,
                f"recovery crashed: {type(exc).__name__}: {exc}",
            )

    async def _retry(self, entry: _Entry) -> None:
        """Start a failed recovery again after a wait that doubles with each attempt."""
        await asyncio.sleep(self.config.retry_after_s * 2**entry.attempt)
        failure = dataclasses.replace(entry.record.failure, detected_at=self._clock())
        record, _ = self.report(failure, entry.requested, retry_of=entry.record.recovery_id)
        self._change(entry, retry_pending=False, retried_by=record.recovery_id)
        log.info(
            "failed recovery started again",
            extra={
                "recovery_id": record.recovery_id,
                "retry_of": entry.record.recovery_id,
                "attempt": entry.attempt + 1,
            },
        )

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await_redundancy(self, entry: _Entry, before: ModelPlacement) -> None:
        """Stamp ``redundancy_restored_at`` once the model's placement is back to
        ``before``'s healthy replicas and spares, with a span in the recovery's trace."""
        checks = max(1, round(self.config.redundancy_wait_s / self.config.redundancy_check_s))
        for _ in range(checks):
            now = await self._placement(before.model)
            if now is not None and now.redundancy_as(before):
                break
            await asyncio.sleep(self.config.redundancy_check_s)
        else:
            log.info(
                "redundancy not restored in time",
                extra={
                    "recovery_id": entry.record.recovery_id,
                    "model": before.model,
                    "waited_s": self.config.redundancy_wait_s,
                },
            )
            return
        recovered = entry.record.finished_at or entry.record.started_at
        restored = max(self._clock(), recovered)
        self._change(entry, redundancy_restored_at=restored)
        span = self._tracer.start_span(
            "restore-redundancy",
            context=trace.set_span_in_context(entry.span),
            start_time=_ns(recovered),
        )
        span.set_attribute("recovery.redundancy_restored_ms", (restored - recovered) * 1000)
        span.end(end_time=_ns(restored))

    async def _placement(self, model: str) -> ModelPlacement | None:
        if not model or self._placements is None:
            return None
        try:
            return await asyncio.wait_for(
                self._placements.placement(model), self.config.action_timeout_s
            )
        except Exception as exc:
            # Planning goes on from the report alone; the plan phase says so.
            log.warning("placement lookup failed", extra={"model": model, "error": f"{exc!r}"})
            return None

    def _instant_phase(self, entry: _Entry, parent: Context, phase: PhaseRecord) -> None:
        """Record a phase that already happened, with its span."""
        span = self._tracer.start_span(phase.name, context=parent, start_time=_ns(phase.started_at))
        span.set_attribute("recovery.phase", phase.name)
        if phase.level is not None:
            span.set_attribute("recovery.level", phase.level.name.lower())
        span.set_attribute("recovery.ok", phase.ok)
        span.set_attribute("recovery.detail", phase.detail)
        span.end(end_time=_ns(phase.started_at + phase.duration_s))
        self._change(entry, phases=(*entry.record.phases, phase))

    def _finish(
        self,
        entry: _Entry,
        ok: bool,
        finished_at: float,
        highest: Level | None,
        detail: str,
        *,
        retry_pending: bool = False,
    ) -> None:
        finished_at = max(finished_at, entry.record.started_at)
        state = RecoveryState.SUCCEEDED if ok else RecoveryState.FAILED
        self._change(
            entry,
            state=state,
            finished_at=finished_at,
            highest_level=highest,
            detail=detail,
            retry_pending=retry_pending,
        )
        span = entry.span
        span.set_attribute("recovery.outcome", state.name.lower())
        if highest is not None:
            span.set_attribute("recovery.highest_level", highest.name.lower())
        if not ok:
            span.set_status(Status(StatusCode.ERROR, detail))
        span.end(end_time=_ns(finished_at))
        key = entry.record.failure.dedupe_key
        if self._running.get(key) == entry.record.recovery_id:
            del self._running[key]
            if ok:
                self._recovered[key] = entry.record.recovery_id
        entry.done.set()
        log.info(
            "recovery finished",
            extra={
                "recovery_id": entry.record.recovery_id,
                "outcome": state.name.lower(),
                "duration_s": round(finished_at - entry.record.started_at, 6),
                "detail": detail,
            },
        )

    # ------------------------------------------------------------------ changes

    def _change(self, entry: _Entry, **changes: object) -> None:
        entry.record = dataclasses.replace(entry.record, **changes)  # type: ignore[arg-type]
        self._publish(entry.record)

    def _publish(self, record: RecoveryRecord) -> None:
        for watch in list(self._watches):
            watch.push(record)

    def _unsubscribe(self, watch: Watch) -> None:
        self._watches.discard(watch)

    def _evict(self) -> None:
        excess = len(self._entries) - self.config.max_recoveries
        if excess <= 0:
            return
        # Running recoveries are never forgotten; the oldest finished ones go first.
        for recovery_id in [
            rid for rid, e in self._entries.items() if e.record.state != RecoveryState.RUNNING
        ][:excess]:
            del self._entries[recovery_id]
        for key in [k for k, rid in self._recovered.items() if rid not in self._entries]:
            del self._recovered[key]

    async def close(self) -> None:
        """Cancel the retries waiting, the redundancy watches and the running recoveries
        (each ends FAILED), and end every watch."""
        for task in list(self._tasks):
            task.cancel()
        tasks = [e.task for e in self._entries.values() if e.task is not None and not e.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A task cancelled before it first ran never saw its cancellation.
        for entry in self._entries.values():
            if entry.record.state == RecoveryState.RUNNING:
                self._finish(entry, False, self._clock(), None, _STOPPED)
        self._watches.clear()


def _describe(failure: Failure) -> str:
    text = f"{failure.kind.label} at {failure.target}, reported by {failure.source.name.lower()}"
    return f"{text}: {failure.message}" if failure.message else text


def _plan_detail(plan: Plan, failure: Failure, placement: ModelPlacement | None) -> str:
    detail = plan.describe()
    if failure.model and placement is None:
        return f"{detail}; placement of {failure.model} unknown, planned from the report alone"
    shards = failed_shards(failure, placement)
    if shards:
        return f"{detail}; failed shards {', '.join(map(str, shards))}"
    return detail


def _fault_span(failure: Failure) -> trace.SpanContext:
    """The span of the fault's injection the failure names; invalid when it names none."""
    if not failure.fault_traceparent:
        return trace.INVALID_SPAN_CONTEXT
    context = TraceContextTextMapPropagator().extract({"traceparent": failure.fault_traceparent})
    return trace.get_current_span(context).get_span_context()


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)
