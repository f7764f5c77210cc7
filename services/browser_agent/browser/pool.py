"""An agent's browsers: the ones that host shards and warm standbys ready to take over.

A standby is a launched browser whose page has onnxruntime-web loaded (its wasm
compiled), its WebGPU adapter requested and its capabilities reported, with no
shard assigned; promoting one costs a state change instead of a 2-3 s cold
launch. Each promotion launches a replacement standby in the background.

Every browser supervises itself (its process is polled; a dead one turns FAILED,
its tree is reaped and a ``process_exited`` event is emitted). The pool gathers
those events in ``events`` and replaces a standby that fails; a failed active
browser stays in the pool, FAILED, until the agent removes it, because the agent
decides how its shards recover.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

from webshard.common.v1 import common_pb2

from .errors import LaunchFailed, NoStandby
from .events import BrowserEvent, BrowserEventKind, EventCallback
from .options import BrowserOptions
from .runtime import BrowserRuntime

log = logging.getLogger(__name__)

State = common_pb2.BrowserState

# Each launch keeps a core busy for a second or two (browser start-up, compiling
# onnxruntime-web's wasm); more at once than there are cores only slows them all.
DEFAULT_CONCURRENT_LAUNCHES = 2


class BrowserPool:
    """``active`` browsers that host shards plus ``standby`` warm ones."""

    def __init__(
        self,
        shard_dir: Path | str,
        *,
        active: int,
        standby: int = 0,
        options: BrowserOptions | None = None,
        id_prefix: str = "browser",
        max_concurrent_launches: int = DEFAULT_CONCURRENT_LAUNCHES,
        on_event: EventCallback | None = None,
    ) -> None:
        if active < 0 or standby < 0:
            raise ValueError("browser counts must not be negative")
        if max_concurrent_launches < 1:
            raise ValueError("at least one launch must be allowed at a time")
        self._shard_dir = Path(shard_dir)
        self._active = active
        self._standby = standby
        self._options = options or BrowserOptions()
        self._prefix = id_prefix
        self._on_event = on_event
        self._launch_slots = asyncio.Semaphore(max_concurrent_launches)
        self._ids = itertools.count()
        self._browsers: dict[str, BrowserRuntime] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._standby_launches: set[asyncio.Task[None]] = set()
        self._closed = False
        self.events: asyncio.Queue[BrowserEvent] = asyncio.Queue()
        """Every event of every browser in the pool, in order."""

    # --- views --------------------------------------------------------------

    def browsers(self) -> list[BrowserRuntime]:
        """Every browser in the pool, launching ones included, in launch order."""
        return list(self._browsers.values())

    def active(self) -> list[BrowserRuntime]:
        """Launched browsers that host shards (READY, or FAILED until removed)."""
        return [
            b
            for b in self._browsers.values()
            if not b.standby and b.state in (State.BROWSER_STATE_READY, State.BROWSER_STATE_FAILED)
        ]

    def standbys(self) -> list[BrowserRuntime]:
        """Standbys ready to be promoted."""
        return [
            b
            for b in self._browsers.values()
            if b.state == State.BROWSER_STATE_STANDBY and b.connected
        ]

    def get(self, browser_id: str) -> BrowserRuntime:
        """The browser with this id; KeyError when the pool has none."""
        return self._browsers[browser_id]

    def infos(self) -> list[common_pb2.BrowserInfo]:
        """BrowserInfo of every browser in the pool."""
        return [b.info() for b in self._browsers.values()]

    # --- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Launch the active browsers and the standbys; on any failure reap all and raise."""
        launches = [self._launch(standby=False) for _ in range(self._active)]
        launches += [self._launch(standby=True) for _ in range(self._standby)]
        results = await asyncio.gather(*launches, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.close()
            raise failures[0]

    async def _launch(self, *, standby: bool) -> BrowserRuntime:
        browser_id = f"{self._prefix}-{next(self._ids)}"
        runtime = BrowserRuntime(
            browser_id, self._shard_dir, options=self._options, on_event=self._forward
        )
        self._browsers[browser_id] = runtime
        try:
            async with self._launch_slots:
                if self._closed:
                    raise LaunchFailed(f"{browser_id}: the pool is closed")
                await runtime.launch(standby=standby)
        except BaseException:
            self._browsers.pop(browser_id, None)
            raise
        return runtime

    def is_standby(self, browser_id: str) -> bool:
        """True when ``browser_id`` is a standby ready to be promoted."""
        return any(b.runtime_id == browser_id for b in self.standbys())

    async def promote_standby(self, browser_id: str = "") -> BrowserRuntime:
        """Turn a ready standby (``browser_id``, or any) into an active browser; launch
        its replacement in the background.

        Raises NoStandby when none is ready (all in use, or their replacements still launching).
        """
        for runtime in self.standbys():
            if browser_id and runtime.runtime_id != browser_id:
                continue
            runtime.promote()
            log.info("standby promoted", extra={"browser_id": runtime.runtime_id})
            self._replace_standby(only_if_short=True)
            return runtime
        launching = sum(
            1 for b in self._browsers.values() if b.state == State.BROWSER_STATE_STARTING
        )
        raise NoStandby(f"no standby browser is ready ({launching} launching)")

    async def launch_active(self) -> BrowserRuntime:
        """Launch a browser straight into service (no standby was ready): a cold launch."""
        return await self._launch(standby=False)

    async def remove(self, browser_id: str) -> None:
        """Close a browser and drop it from the pool (a failed one, once its shards moved)."""
        runtime = self._browsers.pop(browser_id, None)
        if runtime is not None:
            await runtime.close()

    async def retire(self, browser_id: str) -> None:
        """Close an active browser and launch a standby in its place, keeping the pool's
        size: unless the browsers left (launching ones included) already make it, as
        when a promotion in the same recovery launched the one replacement both need."""
        if browser_id in self._browsers:
            await self.remove(browser_id)
            alive = sum(b.state != State.BROWSER_STATE_FAILED for b in self._browsers.values())
            if alive < self._active + self._standby:
                self._replace_standby()

    async def shrink(self, browser_id: str) -> bool:
        """Close an active browser that holds nothing while the pool has more active
        browsers than it started with (each promotion adds one); True when closed.

        Without this a pool would grow by a browser for every shard recovery moved
        onto a standby.
        """
        runtime = self._browsers.get(browser_id)
        if runtime is None or runtime.standby or len(self.active()) <= self._active:
            return False
        await self.remove(browser_id)
        log.info("idle browser closed", extra={"browser_id": browser_id})
        return True

    async def settle(self) -> None:
        """Wait for the background launches in progress (replacement standbys)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def close(self) -> None:
        """Stop background launches and close every browser, reaping all their processes."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        browsers, self._browsers = list(self._browsers.values()), {}
        await asyncio.gather(*(b.close() for b in browsers), return_exceptions=True)

    # --- supervision --------------------------------------------------------

    def _replace_standby(self, *, only_if_short: bool = False) -> None:
        """Launch a standby; ``only_if_short``: unless the ready and launching ones
        already make the count (a browser retired and a promotion in one recovery must
        not both add one)."""
        if self._closed:
            return
        if only_if_short and len(self.standbys()) + len(self._standby_launches) >= self._standby:
            return
        task = asyncio.create_task(self._launch_replacement())
        for tasks in (self._background, self._standby_launches):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _launch_replacement(self) -> None:
        try:
            runtime = await self._launch(standby=True)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("replacement standby did not launch")
            return
        log.info("standby launched", extra={"browser_id": runtime.runtime_id})

    async def _retire_failed_standby(self, browser_id: str) -> None:
        await self.remove(browser_id)
        self._replace_standby()

    def _forward(self, event: BrowserEvent) -> None:
        self.events.put_nowait(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("browser pool event callback failed")
        gone = event.kind in (BrowserEventKind.PROCESS_EXITED, BrowserEventKind.PAGE_CRASHED)
        runtime = self._browsers.get(event.browser_id)
        if gone and runtime is not None and runtime.standby and not self._closed:
            # A standby holds no shard: nothing to recover, only to replace.
            task = asyncio.create_task(self._retire_failed_standby(event.browser_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
