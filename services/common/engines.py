"""The browser engines an agent can run: the names the agents, placement and reports share."""

from __future__ import annotations

from collections.abc import Mapping

ENGINES = ("chromium", "firefox")
"""Chromium (under chromedriver) and Firefox (over WebDriver BiDi)."""


def unknown_engine(name: str) -> str:
    """What refusing an engine ``name`` that is not one of ENGINES says."""
    return f"unknown browser engine {name[:64]!r}; engines: {', '.join(ENGINES)}"


def engine_counts(counts: Mapping[str, int]) -> str:
    """Counts by engine as a report shows them (``chromium 3, firefox 1``); "" for none."""
    return ", ".join(f"{engine} {n}" for engine, n in sorted(counts.items()))
