"""The agent's memory-pressure watch."""

from __future__ import annotations

from services.browser_agent.memory import MemoryWatch, Sample

MIB = 1024 * 1024


def sample(rss_mib: int, handles: frozenset[str] = frozenset({"a"})) -> Sample:
    return Sample("browser-0", handles, rss_mib * MIB)


def test_a_browser_is_reported_once_per_crossing_of_its_headroom() -> None:
    watch = MemoryWatch(100 * MIB)
    assert watch.observe([sample(500)]) == []  # the baseline
    assert watch.limit("browser-0") == 600 * MIB
    assert watch.observe([sample(590)]) == []
    [pressure] = watch.observe([sample(700)])
    assert (pressure.browser_id, pressure.rss_bytes, pressure.limit_bytes) == (
        "browser-0",
        700 * MIB,
        600 * MIB,
    )
    assert "700 MiB, over its limit of 600 MiB" in pressure.message
    assert watch.observe([sample(720)]) == []  # still over: reported once
    assert watch.observe([sample(550)]) == []  # back under: re-armed
    assert len(watch.observe([sample(650)])) == 1


def test_memory_given_back_lowers_the_baseline() -> None:
    watch = MemoryWatch(100 * MIB)
    watch.observe([sample(900)])  # taken while an earlier allocation was still held
    watch.observe([sample(500)])
    assert watch.limit("browser-0") == 600 * MIB
    assert len(watch.observe([sample(650)])) == 1


def test_new_shards_or_none_take_a_new_baseline() -> None:
    watch = MemoryWatch(100 * MIB)
    watch.observe([sample(500)])
    assert watch.observe([sample(800, frozenset({"a", "b"}))]) == []
    assert watch.limit("browser-0") == 900 * MIB
    assert watch.observe([sample(900, frozenset())]) == []
    assert watch.limit("browser-0") is None
    watch.observe([sample(500)])
    assert watch.observe([]) == []
    assert watch.limit("browser-0") is None


def test_a_shard_unloaded_during_the_pressure_does_not_hide_it() -> None:
    """A fault allocates, and a spare moves off the browser at the same moment: the
    unload must not make the allocation part of a new baseline."""
    watch = MemoryWatch(100 * MIB)
    watch.observe([sample(500, frozenset({"a", "b"}))])
    [pressure] = watch.observe([sample(700, frozenset({"a"}))])
    assert pressure.limit_bytes == 600 * MIB
    # Loading a shard still takes a new baseline (a load grows memory by design).
    assert watch.observe([sample(800, frozenset({"a", "c"}))]) == []
    assert watch.limit("browser-0") == 900 * MIB
