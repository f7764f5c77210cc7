"""Memory pressure: a browser whose process tree outgrows the size it had after loading.

Each browser holding shards gets a baseline, its smallest resident memory since
it last gained a shard; a sample above baseline + headroom is pressure. A shard
unloaded keeps the baseline (memory only falls, and the baseline follows it
down): were it taken again then, memory a fault had just allocated would become
part of it, and the pressure would go unseen. Each crossing is reported once;
the browser is re-armed when it falls back under the limit (or gains a shard).
Plain logic; the agent samples and reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One browser's memory at one moment."""

    browser_id: str
    handles: frozenset[str]
    """The shards it holds; a change re-takes the baseline."""
    rss_bytes: int


@dataclass(frozen=True)
class Pressure:
    """A browser that crossed its limit."""

    browser_id: str
    rss_bytes: int
    limit_bytes: int

    @property
    def message(self) -> str:
        """What the failure report says."""
        mib = 1024 * 1024
        return (
            f"browser {self.browser_id} holds {self.rss_bytes // mib} MiB, over its limit of "
            f"{self.limit_bytes // mib} MiB (its size after loading plus the headroom)"
        )


@dataclass
class _Tracked:
    handles: frozenset[str]
    baseline: int
    over: bool = False


class MemoryWatch:
    """Finds browsers newly over their memory limit, sample by sample."""

    def __init__(self, headroom_bytes: int) -> None:
        if headroom_bytes <= 0:
            raise ValueError("the memory headroom must be positive")
        self._headroom = headroom_bytes
        self._tracked: dict[str, _Tracked] = {}

    def limit(self, browser_id: str) -> int | None:
        """The browser's current limit; None before its first sample."""
        tracked = self._tracked.get(browser_id)
        return None if tracked is None else tracked.baseline + self._headroom

    def observe(self, samples: Iterable[Sample]) -> list[Pressure]:
        """Take one round of samples; return the browsers that crossed their limit in it."""
        crossed = []
        seen = set()
        for sample in samples:
            seen.add(sample.browser_id)
            tracked = self._tracked.get(sample.browser_id)
            if not sample.handles or sample.rss_bytes <= 0:
                self._tracked.pop(sample.browser_id, None)
                continue
            if tracked is None or not sample.handles <= tracked.handles:
                # New, or a shard loaded: its size now is where growth counts from.
                self._tracked[sample.browser_id] = _Tracked(sample.handles, sample.rss_bytes)
                continue
            tracked.handles = sample.handles  # only unloaded: the baseline stands
            # Memory a page gave back lowers the baseline (freed buffers leave the
            # process tree only once collected, so the first sample may be high).
            tracked.baseline = min(tracked.baseline, sample.rss_bytes)
            limit = tracked.baseline + self._headroom
            if sample.rss_bytes > limit and not tracked.over:
                tracked.over = True
                crossed.append(Pressure(sample.browser_id, sample.rss_bytes, limit))
            elif sample.rss_bytes <= limit:
                tracked.over = False
        for gone in set(self._tracked) - seen:
            del self._tracked[gone]
        return crossed
