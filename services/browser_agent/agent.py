"""The agent's shard bookkeeping: which runtime holds which shard, under which handle.

Plain logic over the runtimes and the shard store; the servicer maps it to gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from webshard.common.v1 import common_pb2

from services.browser_agent.runtime import (
    LoadResult,
    RunResult,
    ShardRuntime,
    ShardRuntimeError,
    Tensors,
)


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

    def to_proto(self) -> common_pb2.LoadedShard:
        """The contract's view."""
        return common_pb2.LoadedShard(
            handle=self.result.handle,
            spec=self.spec,
            execution_provider=self.result.execution_provider,  # type: ignore[arg-type]
            execution_provider_reason=self.result.reason,
        )


class ShardHost:
    """Loads shards into runtimes and runs them by handle."""

    def __init__(
        self,
        native: ShardRuntime | None,
        browsers: Callable[[], Sequence[ShardRuntime]] = tuple,
    ) -> None:
        self._native = native
        self._browsers = browsers  # the pool's current list: it changes on crashes
        self._loaded: dict[str, LoadedEntry] = {}

    def runtimes(self) -> list[ShardRuntime]:
        """Every runtime, native first."""
        return ([self._native] if self._native is not None else []) + list(self._browsers())

    def status(self) -> list[common_pb2.BrowserInfo]:
        """Each runtime's info with the shards it holds."""
        infos = []
        for runtime in self.runtimes():
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
        """Run one activation through a loaded shard."""
        entry = self.entry(handle)
        return entry, await entry.runtime.run(handle, inputs)

    async def unload(self, handle: str) -> LoadedEntry:
        """Release a loaded shard."""
        entry = self.entry(handle)
        await entry.runtime.unload(handle)
        del self._loaded[handle]
        return entry

    def shards_on(self, runtime_id: str) -> list[common_pb2.ShardSpec]:
        """The shards loaded in one runtime."""
        return [e.spec for e in self._loaded.values() if e.runtime.runtime_id == runtime_id]

    def forget(self, runtime: ShardRuntime) -> list[LoadedEntry]:
        """Drop every shard a dead runtime held and return them."""
        lost = [e for e in self._loaded.values() if e.runtime is runtime]
        for e in lost:
            del self._loaded[e.result.handle]
        return lost
