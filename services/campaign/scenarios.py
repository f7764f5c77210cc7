"""The campaign's scenarios: which fault each one injects, and where.

Targets are picked from the model's current placement, rotating over the browsers
that hold shards, so every iteration hits a browser that is serving.
"""

from __future__ import annotations

from collections.abc import Sequence

from webshard.aio import target_selector
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as fi

from services.common.durations import duration

SCENARIOS = (
    "connection_lost",
    "component_failure",
    "browser_crash",
    "memory_pressure",
    "multiple_failures",
)
"""The scenarios a campaign runs unless told otherwise, in order."""

SINGLE_KINDS = {
    "connection_lost": common_pb2.FAULT_KIND_CONNECTION_LOST,
    "component_failure": common_pb2.FAULT_KIND_COMPONENT_FAILURE,
    "browser_crash": common_pb2.FAULT_KIND_BROWSER_CRASH,
    "memory_pressure": common_pb2.FAULT_KIND_MEMORY_PRESSURE,
    "latency": common_pb2.FAULT_KIND_LATENCY,
}
MULTIPLE = ("browser_crash", "connection_lost")
"""The children of multiple_failures, on two browsers of different agents."""


class NoTarget(Exception):
    """The placement has no browser (or not two) to hit."""


def serving_browsers(placement: coordinator_pb2.Placement) -> list[str]:
    """The "agent/browser" ids holding at least one shard, in a stable order."""
    return sorted(
        {f"{r.agent_id}/{r.browser_id}" for shard in placement.shards for r in shard.replicas}
    )


def _single(kind: str, browser: str, intensity: int, duration_s: float) -> fi.FaultSpec:
    return fi.FaultSpec(
        kind=SINGLE_KINDS[kind],
        intensity=intensity,  # type: ignore[arg-type]
        target=target_selector("browser", browser),
        duration=duration(duration_s),
    )


def fault_spec(
    scenario: str,
    placement: coordinator_pb2.Placement,
    iteration: int,
    *,
    intensity: int = common_pb2.INTENSITY_MODERATE,
    duration_s: float = 3.0,
    labels: dict[str, str] | None = None,
) -> fi.FaultSpec:
    """The fault of ``scenario``'s ``iteration``-th run against ``placement``."""
    browsers = serving_browsers(placement)
    if not browsers:
        raise NoTarget(f"{placement.model} has no replica in any browser")
    first = browsers[iteration % len(browsers)]
    if scenario in SINGLE_KINDS:
        spec = _single(scenario, first, intensity, duration_s)
    elif scenario == "multiple_failures":
        second = _other_agent(browsers, first)
        spec = fi.FaultSpec(
            kind=common_pb2.FAULT_KIND_MULTIPLE_FAILURES,
            intensity=intensity,  # type: ignore[arg-type]
            duration=duration(duration_s),
            children=[
                _single(MULTIPLE[0], first, intensity, duration_s),
                _single(MULTIPLE[1], second, intensity, duration_s),
            ],
        )
    else:
        known = ", ".join([*SINGLE_KINDS, "multiple_failures"])
        raise ValueError(f"unknown scenario {scenario!r}; choose from {known}")
    spec.labels.update(labels or {})
    return spec


def _other_agent(browsers: Sequence[str], first: str) -> str:
    agent = first.partition("/")[0]
    for browser in browsers:
        if browser.partition("/")[0] != agent:
            return browser
    raise NoTarget("multiple_failures needs serving browsers on two agents")
