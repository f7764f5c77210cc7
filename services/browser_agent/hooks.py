"""Fault hooks: the agent's side of fault injection, performed for real.

The fault-injector names a hook, a target (a browser, or the browser holding a
shard handle) and a fault id; the agent performs it and records it under that
id, so ``RevertFaultHook`` can undo it and a ``duration`` makes the agent undo it
by itself (an injector that dies cannot leave a fault behind).

| hook | effect | revert |
|---|---|---|
| KILL_BROWSER | SIGKILL the browser's process tree | none: recovery replaces the browser |
| CRASH_PAGE | CDP ``Page.crash`` on the page's renderer | none |
| OFFLINE | CDP offline + the page's socket cut and refused | back online; the page reconnects |
| CUT_SESSION | the coordinator session stream is cancelled | none: it reconnects by itself |
| FAIL_SESSION | the shard's onnxruntime-web session is released | none |
| LOSE_DEVICE | the page's WebGPU device is destroyed | none |
| ALLOCATE_MEMORY | real memory allocated and touched in the page | released |
| DELAY | RunShard activations (and session messages) held ``delay`` | delay removed |
| DROP | RunShard activations unanswered (session cut and refused) | traffic flows again |

A killed or crashed browser stays FAILED in the pool; restarting it is recovery's
job, not a hook's. The agent names the fault (id, intensity, the trace of the hook
call) in the failure reports it makes about a browser while one of the fault's
effects on it (or on the whole agent) is in force, or up to ``CAUSE_WINDOW_S``
after the effect ended, so a recovery carries the fault that caused it.

Effects that several faults share (one page offline for two faults, memory held
for two, two delays on one path) last while any of those faults holds them:
reverting one fault undoes only its own part.

Each result carries the wall-clock time its effect began, stamped just before
the hook acts: the injector dates the fault by it, so no failure or recovery the
effect causes seems to start before its fault.

Plain logic over the agent's runtimes and session; the servicer maps it to gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import psutil
from webshard.common.v1 import common_pb2

from services.browser_agent.agent import ShardHost
from services.browser_agent.runtime import ShardRuntime, ShardRuntimeError
from services.common.failures import FaultCause

log = logging.getLogger(__name__)

State = common_pb2.BrowserState


class Hook(enum.IntEnum):
    """The hooks, numbered as ``webshard.browser_agent.v1.FaultHook`` numbers them."""

    KILL_BROWSER = 1
    CRASH_PAGE = 2
    OFFLINE = 3
    CUT_SESSION = 4
    FAIL_SESSION = 5
    LOSE_DEVICE = 6
    ALLOCATE_MEMORY = 7
    DELAY = 8
    DROP = 9


# Hooks that act on the whole agent rather than on one browser.
AGENT_HOOKS = frozenset({Hook.CUT_SESSION, Hook.DELAY, Hook.DROP})
# Hooks whose effect lasts until reverted.
REVERTIBLE_HOOKS = frozenset({Hook.OFFLINE, Hook.ALLOCATE_MEMORY, Hook.DELAY, Hook.DROP})
CAUSE_WINDOW_S = 10.0
"""How long after a fault's effect ended the agent still names it as a failure's cause:
a crash is reported within a second, a page's memory only at the next check."""


class HookError(Exception):
    """A hook that cannot be performed; ``code`` names the gRPC status it maps to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@runtime_checkable
class FaultableBrowser(Protocol):
    """What a browser runtime offers to fault hooks (``browser.runtime.BrowserRuntime``)."""

    @property
    def runtime_id(self) -> str:
        """The browser id."""
        ...

    @property
    def state(self) -> common_pb2.BrowserState.ValueType:
        """Its life-cycle state."""
        ...

    @property
    def pid(self) -> int | None:
        """The browser's main process id."""
        ...

    def info(self) -> common_pb2.BrowserInfo:
        """State, pid, memory and loaded shards."""
        ...

    async def crash_page(self) -> None:
        """Crash the page's renderer."""
        ...

    async def kill(self) -> None:
        """SIGKILL the browser's process tree."""
        ...

    async def set_offline(self, offline: bool) -> None:
        """Cut the page off the agent, or let it reconnect."""
        ...

    async def allocate_memory(self, size_bytes: int) -> int:
        """Allocate memory in the page; returns the page's total held allocation."""
        ...

    async def release_memory(self) -> int:
        """Drop the page's held allocation; returns its size."""
        ...

    async def fail_session(self, handle: str) -> None:
        """Make a shard's session fail its next run."""
        ...

    async def lose_device(self) -> None:
        """Destroy the page's WebGPU device."""
        ...


class Link:
    """Conditions injected on one path out of the agent: a delay, or every message dropped.

    Each fault sets its own condition under its key; the path carries the largest
    delay set and drops while any fault drops.
    """

    def __init__(self) -> None:
        self._delays: dict[str, float] = {}
        self._drops: set[str] = set()
        self._open = asyncio.Event()
        self._open.set()

    @property
    def delay_s(self) -> float:
        """The latency every message gets now."""
        return max(self._delays.values(), default=0.0)

    @property
    def dropped(self) -> bool:
        """True while every message is dropped."""
        return bool(self._drops)

    def delay(self, key: str, seconds: float) -> None:
        """Add ``seconds`` of latency under ``key``."""
        self._delays[key] = seconds

    def drop(self, key: str) -> None:
        """Drop every message, under ``key``."""
        self._drops.add(key)
        self._open.clear()

    def clear(self, key: str) -> bool:
        """Remove what ``key`` set; True when it had set something."""
        had = self._delays.pop(key, None) is not None
        if key in self._drops:
            self._drops.discard(key)
            had = True
        if not self._drops:
            self._open.set()
        return had

    async def hold(self) -> None:
        """Wait out the current latency (at once when there is none)."""
        seconds = self.delay_s
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def deliver(self) -> bool:
        """Carry one message: wait out the latency, then False if it is dropped.

        Checked after the wait, as on a real link a message in flight when the
        partition starts is lost too.
        """
        await self.hold()
        return not self.dropped

    async def wait_open(self) -> None:
        """Wait until nothing drops messages (a partition refuses new connections)."""
        await self._open.wait()


class Session(Protocol):
    """What hooks need of the agent's coordinator session."""

    @property
    def link(self) -> Link:
        """The conditions on the session's traffic."""
        ...

    def cut(self) -> bool:
        """Break the open session stream; False when none is open."""
        ...

    def report_status(self) -> None:
        """Tell the coordinator the browsers' state now (a fault began or ended)."""
        ...


@dataclasses.dataclass(frozen=True)
class HookRequest:
    """One hook to perform, as ``ApplyFaultHookRequest`` carries it."""

    fault_id: str
    hook: int
    browser_id: str = ""
    shard_handle: str = ""
    memory_bytes: int = 0
    duration_s: float = 0.0
    """0 leaves the effect until it is reverted."""
    delay_s: float = 0.0
    data_path_only: bool = False
    intensity: common_pb2.Intensity.ValueType = common_pb2.INTENSITY_UNSPECIFIED
    traceparent: str = ""
    """The W3C traceparent of the hook call, named in the reports the effect causes."""


@dataclasses.dataclass(frozen=True)
class HookResult:
    """What a hook did."""

    browser_id: str
    detail: str
    revertible: bool
    began_at: float = 0.0
    """Wall-clock seconds (``time.time``) when the effect began: stamped just before
    the hook acted, so nothing the effect causes is reported before it."""


@dataclasses.dataclass
class _Effect:
    """What a hook did to a browser (or, with no browser id, to the whole agent), and when."""

    cause: FaultCause
    browser_id: str
    ended_at: float | None
    """None while the effect is in force."""


@dataclasses.dataclass
class _Applied:
    """A revertible effect in force, and the timer that reverts it."""

    fault_id: str
    hook: Hook
    browser: FaultableBrowser | None
    result: HookResult
    memory_bytes: int = 0
    data_path_only: bool = False
    timer: asyncio.Task[None] | None = None
    effect: _Effect | None = None


def _require(condition: bool, code: str, message: str) -> None:
    if not condition:
        raise HookError(code, message)


class FaultHooks:
    """Performs fault hooks on an agent's browsers, data path and session."""

    def __init__(
        self,
        host: ShardHost,
        session: Session,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._host = host
        self._session = session
        self._clock = clock
        # The effect's start is told to the injector, on another machine maybe: wall time.
        self._wall_clock = wall_clock
        self._effects: deque[_Effect] = deque(maxlen=64)
        self.data_path = Link()
        """Conditions on RunShard activations; the servicer carries each through it."""
        self._applied: list[_Applied] = []
        # One hook at a time: an apply and a revert of the same page must not interleave.
        self._lock = asyncio.Lock()

    def cause(self, browser_id: str) -> FaultCause | None:
        """The fault behind a failure of ``browser_id`` now: the latest one whose effect
        on that browser is in force or ended within ``CAUSE_WINDOW_S``, else the latest
        such effect on the whole agent; None when no fault explains it."""
        now = self._clock()
        recent = [
            e
            for e in reversed(self._effects)
            if e.ended_at is None or now - e.ended_at <= CAUSE_WINDOW_S
        ]
        mine = [e for e in recent if e.browser_id == browser_id] or [
            e for e in recent if not e.browser_id
        ]
        return mine[0].cause if mine else None

    def active(self) -> list[tuple[str, Hook, str]]:
        """(fault id, hook, browser id) of every revertible effect in force."""
        return [(a.fault_id, a.hook, a.result.browser_id) for a in self._applied]

    def mark(self, infos: list[common_pb2.BrowserInfo]) -> list[common_pb2.BrowserInfo]:
        """``infos`` with each browser's faults in force filled in (a fault on the whole
        agent is in force on each of its browsers)."""
        for info in infos:
            del info.faults_in_force[:]
            info.faults_in_force.extend(
                sorted(
                    {
                        a.fault_id
                        for a in self._applied
                        if a.result.browser_id in ("", info.browser_id)
                    }
                )
            )
        return infos

    async def apply(self, request: HookRequest) -> HookResult:
        """Perform a hook; raises HookError with the status to answer when it cannot."""
        _require(bool(request.fault_id), "INVALID_ARGUMENT", "fault_id must not be empty")
        try:
            hook = Hook(request.hook)
        except ValueError:
            raise HookError(
                "INVALID_ARGUMENT",
                f"unknown fault hook {request.hook}; "
                f"known: {', '.join(h.name.lower() for h in Hook)}",
            ) from None
        _require(request.duration_s >= 0, "INVALID_ARGUMENT", "duration must not be negative")
        if hook is Hook.ALLOCATE_MEMORY:
            _require(
                request.memory_bytes > 0,
                "INVALID_ARGUMENT",
                f"memory_bytes must be positive for allocate_memory, not {request.memory_bytes}",
            )
        if hook is Hook.DELAY:
            _require(request.delay_s > 0, "INVALID_ARGUMENT", "delay must be positive")
        async with self._lock:
            same = self._find(request.fault_id, hook, request.browser_id)
            if same is not None:
                # A retried apply: the effect is in force already and must not stack.
                return same.result
            browser = None if hook in AGENT_HOOKS else self._browser(request)
            # Recorded first: the failure an effect causes (a killed browser's exit) may
            # be reported before the hook returns.
            effect = _Effect(
                FaultCause(request.fault_id, request.intensity, request.traceparent),
                browser.runtime_id if browser is not None else "",
                None,
            )
            self._effects.append(effect)
            began_at = self._wall_clock()
            try:
                applied = await self._perform(hook, browser, request)
            except ShardRuntimeError as exc:
                self._effects.remove(effect)
                raise HookError(exc.code, str(exc)) from exc
            except HookError:
                self._effects.remove(effect)
                raise
            log.info(
                "fault hook applied",
                extra={
                    "fault_id": request.fault_id,
                    "hook": hook.name,
                    "browser_id": applied.result.browser_id,
                    "detail": applied.result.detail,
                },
            )
            applied.effect = effect
            applied.result = dataclasses.replace(applied.result, began_at=began_at)
            if not applied.result.revertible:
                effect.ended_at = self._clock()  # done at once (a kill, a crash)
            if applied.result.revertible:
                self._applied.append(applied)
                self._session.report_status()
                if request.duration_s > 0:
                    applied.timer = asyncio.create_task(
                        self._revert_after(applied, request.duration_s),
                        name=f"revert-{request.fault_id}",
                    )
            return applied.result

    async def revert(self, fault_id: str) -> bool:
        """Undo every effect recorded under ``fault_id``; False when none was in force."""
        async with self._lock:
            mine = [a for a in self._applied if a.fault_id == fault_id]
            for applied in mine:
                if applied.timer is not None:
                    applied.timer.cancel()
                await self._undo(applied)
        return bool(mine)

    async def close(self) -> None:
        """Revert everything still in force (the agent is stopping)."""
        for fault_id in {a.fault_id for a in self._applied}:
            with contextlib.suppress(ShardRuntimeError, HookError):
                await self.revert(fault_id)

    # --- targets --------------------------------------------------------------

    def _find(self, fault_id: str, hook: Hook, browser_id: str) -> _Applied | None:
        for applied in self._applied:
            if (
                applied.fault_id == fault_id
                and applied.hook is hook
                and (not browser_id or applied.result.browser_id == browser_id)
            ):
                return applied
        return None

    def _browser(self, request: HookRequest) -> FaultableBrowser:
        runtime: ShardRuntime | None = None
        if request.browser_id:
            runtimes = self._host.runtimes()
            runtime = next((r for r in runtimes if r.runtime_id == request.browser_id), None)
            if runtime is None:
                known = ", ".join(r.runtime_id for r in runtimes) or "none"
                raise HookError(
                    "NOT_FOUND",
                    f"this agent has no browser {request.browser_id!r} (it has: {known})",
                )
        if request.shard_handle:
            try:
                holder = self._host.entry(request.shard_handle).runtime
            except ShardRuntimeError as exc:
                raise HookError("NOT_FOUND", str(exc)) from exc
            if runtime is not None and holder is not runtime:
                raise HookError(
                    "INVALID_ARGUMENT",
                    f"shard {request.shard_handle} is on {holder.runtime_id}, "
                    f"not on {request.browser_id}",
                )
            runtime = holder
        if runtime is None:
            raise HookError(
                "INVALID_ARGUMENT",
                f"{Hook(request.hook).name.lower()} needs a browser_id or a shard_handle",
            )
        if not isinstance(runtime, FaultableBrowser):
            raise HookError(
                "FAILED_PRECONDITION",
                f"{runtime.runtime_id} is not a browser; "
                f"{Hook(request.hook).name.lower()} acts on a browser",
            )
        return runtime

    # --- effects --------------------------------------------------------------

    async def _perform(
        self, hook: Hook, browser: FaultableBrowser | None, request: HookRequest
    ) -> _Applied:
        def done(detail: str, browser_id: str = "") -> _Applied:
            return _Applied(
                fault_id=request.fault_id,
                hook=hook,
                browser=browser,
                result=HookResult(
                    browser_id=browser_id or (browser.runtime_id if browser else ""),
                    detail=detail,
                    revertible=hook in REVERTIBLE_HOOKS,
                ),
                memory_bytes=request.memory_bytes,
                data_path_only=request.data_path_only,
            )

        if hook is Hook.CUT_SESSION:
            if self._session.cut():
                return done("coordinator session cut; the agent reconnects by itself")
            return done("no coordinator session was open to cut")
        if hook is Hook.DELAY:
            self.data_path.delay(request.fault_id, request.delay_s)
            where = "RunShard activations"
            if not request.data_path_only:
                self._session.link.delay(request.fault_id, request.delay_s)
                where += " and session messages"
            return done(f"{where} delayed by {request.delay_s * 1000:.0f} ms")
        if hook is Hook.DROP:
            self.data_path.drop(request.fault_id)
            if request.data_path_only:
                return done("RunShard activations dropped; the session is left alone")
            self._session.link.drop(request.fault_id)
            self._session.cut()
            return done("RunShard activations dropped; session cut and refused")

        assert browser is not None
        name = browser.runtime_id
        if hook is Hook.KILL_BROWSER:
            pid = browser.pid
            _require(
                browser.state != State.BROWSER_STATE_STOPPED
                and pid is not None
                and psutil.pid_exists(pid),
                "FAILED_PRECONDITION",
                f"{name} is not running (its process has exited)",
            )
            await browser.kill()
            return done(f"killed the process tree of {name} (pid {pid})")
        if hook is Hook.OFFLINE:
            _require(
                browser.state != State.BROWSER_STATE_STOPPED,
                "FAILED_PRECONDITION",
                f"{name} has stopped",
            )
            await browser.set_offline(True)
            return done(f"{name}'s page is offline: its socket is cut and refused")
        _require(
            browser.state in (State.BROWSER_STATE_READY, State.BROWSER_STATE_STANDBY),
            "FAILED_PRECONDITION",
            f"{name} is {State.Name(browser.state).removeprefix('BROWSER_STATE_')}, "
            f"so {hook.name.lower()} cannot reach its page",
        )
        if hook is Hook.CRASH_PAGE:
            await browser.crash_page()
            return done(f"crashed {name}'s renderer (CDP Page.crash)")
        if hook is Hook.FAIL_SESSION:
            handles = [request.shard_handle] if request.shard_handle else self._handles(browser)
            _require(bool(handles), "FAILED_PRECONDITION", f"{name} holds no shard to fail")
            for handle in handles:
                await browser.fail_session(handle)
            return done(f"failed the onnxruntime-web session of {', '.join(handles)}")
        if hook is Hook.LOSE_DEVICE:
            webgpu = [
                s.handle
                for s in browser.info().shards
                if s.execution_provider == common_pb2.EXECUTION_PROVIDER_WEBGPU
            ]
            _require(
                bool(webgpu),
                "FAILED_PRECONDITION",
                f"no shard on {name} runs on webgpu, so it has no WebGPU device to lose",
            )
            await browser.lose_device()
            return done(f"destroyed {name}'s WebGPU device (shards {', '.join(webgpu)})")
        if hook is Hook.ALLOCATE_MEMORY:
            total = await browser.allocate_memory(request.memory_bytes)
            return done(
                f"allocated {request.memory_bytes} bytes in {name}'s page "
                f"({total} bytes held by faults now)"
            )
        raise HookError("INVALID_ARGUMENT", f"unknown fault hook {hook}")  # pragma: no cover

    @staticmethod
    def _handles(browser: FaultableBrowser) -> list[str]:
        return [shard.handle for shard in browser.info().shards]

    def _others(self, applied: _Applied) -> Sequence[_Applied]:
        """The other effects of the same kind on the same target still in force."""
        return [
            a
            for a in self._applied
            if a is not applied and a.hook is applied.hook and a.browser is applied.browser
        ]

    async def _undo(self, applied: _Applied) -> None:
        self._applied.remove(applied)
        self._session.report_status()
        if applied.effect is not None:
            applied.effect.ended_at = self._clock()
        hook, browser = applied.hook, applied.browser
        if hook in (Hook.DELAY, Hook.DROP):
            self.data_path.clear(applied.fault_id)
            self._session.link.clear(applied.fault_id)
        elif hook is Hook.OFFLINE and browser is not None:
            if not self._others(applied) and browser.state != State.BROWSER_STATE_STOPPED:
                await browser.set_offline(False)
        elif (
            hook is Hook.ALLOCATE_MEMORY
            and browser is not None
            and browser.state == State.BROWSER_STATE_READY
        ):
            # The page holds one allocation for every fault; release it all and
            # take back what the faults still in force hold.
            await browser.release_memory()
            kept = sum(a.memory_bytes for a in self._others(applied))
            if kept:
                await browser.allocate_memory(kept)
        log.info(
            "fault hook reverted",
            extra={
                "fault_id": applied.fault_id,
                "hook": hook.name,
                "browser_id": applied.result.browser_id,
            },
        )

    async def _revert_after(self, applied: _Applied, seconds: float) -> None:
        await asyncio.sleep(seconds)
        applied.timer = None
        try:
            async with self._lock:
                if applied in self._applied:
                    await self._undo(applied)
        except (ShardRuntimeError, HookError) as exc:
            log.warning(
                "fault hook did not revert",
                extra={"fault_id": applied.fault_id, "hook": applied.hook.name, "error": str(exc)},
            )
