"""The agent's shard bookkeeping: which runtime holds which shard, under which handle.

Plain logic over the runtimes and the shard store; the servicer maps it to gRPC.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from webshard.common.v1 import common_pb2

from services.browser_agent.runtime import (
    BadInput,
    LoadResult,
    RunResult,
    ShardRuntime,
    ShardRuntimeError,
    Tensors,
)
from services.common.pulse import Pulse

log = logging.getLogger(__name__)


class NotFound(ShardRuntimeError):
    """A handle, browser or shard the agent does not have."""

    code = "NOT_FOUND"


class Unavailable(ShardRuntimeError):
    """The agent cannot place a shard where it was asked to."""

    code = "FAILED_PRECONDITION"


@dataclass
class LoadedEntry:
    """A loaded shard and the runtime holding it."""

    spec: common_pb2.ShardSpec
    runtime: ShardRuntime
    result: LoadResult
    runs: int = 0
    """Activations answered since the load."""

    def to_proto(self) -> common_pb2.LoadedShard:
        """The contract's view."""
        return common_pb2.LoadedShard(
            handle=self.result.handle,
            spec=self.spec,
            execution_provider=self.result.execution_provider,  # type: ignore[arg-type]
            execution_provider_reason=self.result.reason,
            runs=self.runs,
            engine=self.runtime.engine,
        )


class Pool(Protocol):
    """What the host needs of the browser pool (``browser.pool.BrowserPool``)."""

    def is_standby(self, browser_id: str) -> bool:
        """True when ``browser_id`` is a standby ready to be promoted."""
        ...

    def standbys(self) -> Sequence[ShardRuntime]:
        """The standbys ready to be promoted."""
        ...

    async def promote_standby(self, browser_id: str = "") -> ShardRuntime:
        """Put a standby into service; raise a ShardRuntimeError when none is ready."""
        ...

    async def launch_active(self) -> ShardRuntime:
        """Launch a browser straight into service."""
        ...

    async def retire(self, browser_id: str) -> None:
        """Close a browser and launch a standby in its place."""
        ...

    async def shrink(self, browser_id: str) -> bool:
        """Close a browser left holding nothing when the pool has grown past its size."""
        ...


@runtime_checkable
class Connectable(Protocol):
    """A runtime with a connection that can drop (a browser's page socket)."""

    @property
    def connected(self) -> bool:
        """True while the runtime is reachable."""
        ...

    @property
    def changed(self) -> Pulse:
        """Fires when ``connected`` or the runtime's state changes."""
        ...


@dataclass
class Restarted:
    """A browser replaced by a fresh one, and its shards as reloaded there."""

    runtime: ShardRuntime
    reloaded: list[tuple[str, LoadedEntry]]
    """(previous handle, new entry) per shard."""
    from_standby: bool


class ShardHost:
    """Loads shards into runtimes and runs them by handle.

    With a ``pool``, a load may name a standby (it is promoted first), a browser
    can be restarted (a standby, else a cold launch, takes its place and its
    shards), and a dead browser is retired (its shards forgotten, a standby
    launched in its place).
    """

    def __init__(
        self,
        native: ShardRuntime | None,
        browsers: Callable[[], Sequence[ShardRuntime]] = tuple,
        pool: Pool | None = None,
    ) -> None:
        self._native = native
        self._browsers = browsers  # the pool's current list: it changes on crashes
        self._pool = pool
        self._loaded: dict[str, LoadedEntry] = {}
        # (runtime id, spec, wall time) of recent unloads: what a browser held when it
        # failed, even where a spare's takeover unloaded it before the failure was reported.
        self._unloaded: deque[tuple[str, common_pb2.ShardSpec, float]] = deque(maxlen=256)

    def runtimes(self) -> list[ShardRuntime]:
        """Every runtime, native first."""
        return ([self._native] if self._native is not None else []) + list(self._browsers())

    def status(self) -> list[common_pb2.BrowserInfo]:
        """Each runtime's info with the shards it holds, then the ready standbys."""
        infos = []
        standbys = list(self._pool.standbys()) if self._pool is not None else []
        for runtime in self.runtimes() + standbys:
            info = runtime.info()
            del info.shards[:]
            info.shards.extend(e.to_proto() for e in self._loaded.values() if e.runtime is runtime)
            infos.append(info)
        return infos

    def choose(self, runtime: int, browser_id: str) -> ShardRuntime:
        """The runtime a shard should load into."""
        if browser_id:
            for candidate in self.runtimes():
                if candidate.runtime_id == browser_id:
                    return candidate
            known = ", ".join(r.runtime_id for r in self.runtimes()) or "none"
            raise NotFound(f"this agent has no browser {browser_id!r} (it has: {known})")
        ready = [b for b in self._browsers() if b.info().state == common_pb2.BROWSER_STATE_READY]
        if runtime == common_pb2.RUNTIME_NATIVE or (
            runtime == common_pb2.RUNTIME_UNSPECIFIED and not ready
        ):
            if self._native is None:
                raise Unavailable("this agent runs no native runtime")
            return self._native
        if not ready:
            raise Unavailable("this agent has no ready browser to load a shard into")
        # The browser holding the fewest shards takes the next one.
        return min(ready, key=lambda b: sum(e.runtime is b for e in self._loaded.values()))

    async def target(self, runtime: int, browser_id: str) -> ShardRuntime:
        """Like ``choose``, promoting ``browser_id`` first when it names a ready standby."""
        if browser_id and self._pool is not None and self._pool.is_standby(browser_id):
            await self._pool.promote_standby(browser_id)
        return self.choose(runtime, browser_id)

    def browser(self, browser_id: str) -> ShardRuntime:
        """The active browser called ``browser_id``; NotFound otherwise."""
        for candidate in self._browsers():
            if candidate.runtime_id == browser_id:
                return candidate
        raise NotFound(f"this agent has no active browser {browser_id!r}")

    async def restart(self, browser_id: str, path_of: Callable[[str], str]) -> Restarted:
        """Close a browser and reload its shards in a standby (or a fresh launch).

        ``path_of`` maps a shard's sha256 to its file in the store.
        """
        if self._pool is None:
            raise Unavailable("this agent has no browser pool")
        old = self.browser(browser_id)
        lost = self.forget(old)
        await self._pool.retire(browser_id)
        try:
            fresh, from_standby = await self._pool.promote_standby(), True
        except ShardRuntimeError:
            fresh, from_standby = await self._pool.launch_active(), False
        reloaded = [
            (
                entry.result.handle,
                await self.load(
                    entry.spec,
                    path_of(entry.spec.sha256),
                    fresh,
                    entry.result.execution_provider,
                ),
            )
            for entry in lost
        ]
        return Restarted(fresh, reloaded, from_standby)

    async def retire_failed(self, browser_id: str) -> list[LoadedEntry]:
        """Forget a dead browser's shards and launch a standby in its place."""
        lost = [e for e in self._loaded.values() if e.runtime.runtime_id == browser_id]
        for entry in lost:
            del self._loaded[entry.result.handle]
        if self._pool is not None:
            await self._pool.retire(browser_id)
        return lost

    async def wait_connected(self, browser_id: str, timeout_s: float) -> float:
        """Wait until the browser's page is connected; the seconds waited.

        Raises NotFound for an unknown browser and Unavailable when the page stays
        disconnected past ``timeout_s``.
        """
        runtime = self.browser(browser_id)
        started = time.monotonic()
        while isinstance(runtime, Connectable) and not runtime.connected:
            if runtime.info().state == common_pb2.BROWSER_STATE_FAILED:
                raise Unavailable(f"browser {browser_id} has failed; it cannot reconnect")
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise Unavailable(
                    f"browser {browser_id}'s page is still disconnected after {waited:.1f} s"
                )
            await runtime.changed.wait(timeout_s - waited)
        return time.monotonic() - started

    async def load(
        self, spec: common_pb2.ShardSpec, path: str, target: ShardRuntime, provider: int
    ) -> LoadedEntry:
        """Load the stored shard into ``target``."""
        result = await target.load(spec.sha256, path, provider)
        entry = LoadedEntry(spec=spec, runtime=target, result=result)
        self._loaded[result.handle] = entry
        return entry

    def entry(self, handle: str) -> LoadedEntry:
        """The loaded shard under ``handle``."""
        try:
            return self._loaded[handle]
        except KeyError:
            raise NotFound(f"no shard is loaded under handle {handle!r}") from None

    async def run(self, handle: str, inputs: Tensors) -> tuple[LoadedEntry, RunResult]:
        """Run one activation through a loaded shard.

        Raises BadInput for tensors no shard should be given (NaN or infinite values
        would only come back as NaN outputs): the sender's error, not the runtime's.
        """
        entry = self.entry(handle)
        for name, value in inputs.items():
            array = np.asarray(value)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise BadInput(f"input {name[:64]!r} holds NaN or infinite values")
        result = await entry.runtime.run(handle, inputs)
        entry.runs += 1
        return entry, result

    async def unload(self, handle: str) -> LoadedEntry:
        """Release a loaded shard."""
        entry = self.entry(handle)
        await entry.runtime.unload(handle)
        del self._loaded[handle]
        runtime_id = entry.runtime.runtime_id
        self._unloaded.append((runtime_id, entry.spec, time.time()))
        left = self.shards_on(runtime_id)
        log.info(
            "shard unloaded",
            extra={"handle": handle, "browser_id": runtime_id, "still_loaded": len(left)},
        )
        if self._pool is not None and not left:
            await self._pool.shrink(runtime_id)
        return entry

    def shards_on(self, runtime_id: str) -> list[common_pb2.ShardSpec]:
        """The shards loaded in one runtime."""
        return [e.spec for e in self._loaded.values() if e.runtime.runtime_id == runtime_id]

    def shards_held(self, runtime_id: str, at: float) -> list[common_pb2.ShardSpec]:
        """The shards ``runtime_id`` held at wall time ``at``: those loaded in it now and
        those unloaded from it since."""
        since = [spec for rid, spec, when in self._unloaded if rid == runtime_id and when >= at]
        return self.shards_on(runtime_id) + since

    def forget(self, runtime: ShardRuntime) -> list[LoadedEntry]:
        """Drop every shard a dead runtime held and return them."""
        lost = [e for e in self._loaded.values() if e.runtime is runtime]
        for e in lost:
            del self._loaded[e.result.handle]
        return lost
