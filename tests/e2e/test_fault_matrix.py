"""Every fault kind under every recovery strategy, with real browsers.

minilm-l6 in 3 layer shards, 2 replicas each, over 3 agents that each run one
headless Chromium and keep one warm standby. For each kind x strategy, one fault
is injected while requests keep flowing, and the campaign runner (the same one
``webshard campaign`` uses) checks that every request answered with the correct
embedding, that the fault caused recoveries that all succeeded with their phases
timed, and that the fault reverted by itself when its duration ended.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import webshard
from webshard.cli.local import LocalCluster
from webshard.common.v1 import common_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as fi
from webshard.recovery.v1 import recovery_pb2

from services.campaign.runner import Addresses, Campaign, Plan
from tests.conftest import wait_for

pytestmark = pytest.mark.browser

KINDS = (
    "connection_lost",
    "component_failure",
    "browser_crash",
    "memory_pressure",
    "multiple_failures",
)
STRATEGIES = ("simple", "progressive", "coordinated")
AGENT_SEEN = frozenset({"connection_lost", "browser_crash", "memory_pressure", "multiple_failures"})
"""The kinds whose failures the agent that applied the fault sees and reports."""
FAULT_S = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        agents=3,
        data_dir=tmp_path_factory.mktemp("cluster"),
        auto_ports=True,
        extra_args={
            "browser_agent": ["--browsers", "1", "--standby-browsers", "1", "--native", "false"]
        },
    )
    cluster.start(timeout=300)
    try:
        with webshard.Client(cluster.coordinators(), timeout=60) as client:
            wait_for(lambda: len(client.list_agents()) == 3, 60, "three agents to attach")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def addresses(cluster: LocalCluster) -> Addresses:
    return Addresses.of(cluster)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", KINDS)
def test_requests_stay_correct_and_the_fault_is_recovered(
    addresses: Addresses, kind: str, strategy: str
) -> None:
    assert_recovered(addresses, kind, strategy)


def assert_recovered(addresses: Addresses, kind: str, strategy: str) -> None:
    """One fault of ``kind`` under ``strategy`` while requests flow: every answer correct,
    every recovery succeeded (after retries), its phases timed and stored."""
    plan = Plan(
        scenarios=(kind,),
        strategies=(strategy,),
        iterations=1,
        concurrency=1,
        fault_duration_s=FAULT_S,
    )

    async def run() -> tuple[Campaign, list[recovery_pb2.Recovery], int]:
        campaign = Campaign(plan, addresses)
        try:
            [cell] = await campaign.run()
            stored = await campaign._metrics.recovery_summary(
                group_by=["scenario", "strategy"], run_id=campaign.run_id
            )
        finally:
            await campaign.close()
        assert cell.answers > 0
        assert (cell.wrong, cell.lost) == (0, 0), cell
        [iteration] = campaign.iterations
        return campaign, iteration.recoveries, sum(row.count for row in stored)

    campaign, recoveries, stored = asyncio.run(run())
    [iteration] = campaign.iterations
    assert not iteration.problem, iteration.problem
    # Every answer during the fault was checked against the reference: none wrong, none lost.
    during = [
        a for a in campaign.answers if iteration.started_at <= a.started_at < iteration.ended_at
    ]
    assert during and all(a.ok and a.correct for a in during)
    # The fault reverted by itself once its duration was over (nothing here reverts it).
    fault = iteration.fault
    assert fault is not None and fault.state == fi.FAULT_STATE_REVERTED
    lasted = (fault.reverted_at.ToNanoseconds() - fault.injected_at.ToNanoseconds()) / 1e9
    # (A multiple_failures parent counts from after its children were applied.)
    assert FAULT_S - 0.5 <= lasted <= FAULT_S + 10
    # It was detected and recovered; each recovery's phases were timed; metrics stored them.
    assert recoveries
    # A failed attempt (a second failure struck the replacement, say: its verify saw the
    # new replica die) was started again, and the attempts for it ended in success.
    by_id = {r.recovery_id: r for r in recoveries}
    for recovery in recoveries:
        attempt = recovery
        while attempt.state == recovery_pb2.RECOVERY_STATE_FAILED:
            assert attempt.retried_by in by_id, (attempt.detail, attempt.retried_by)
            attempt = by_id[attempt.retried_by]
        assert attempt.state == recovery_pb2.RECOVERY_STATE_SUCCEEDED, attempt.detail
    for recovery in recoveries:
        if recovery.state != recovery_pb2.RECOVERY_STATE_SUCCEEDED:
            continue
        names = [p.name for p in recovery.phases]
        assert names[:2] == ["detect", "plan"] and names[-1] == "verify"
        assert all(p.duration.ToNanoseconds() >= 0 for p in recovery.phases)
        assert recovery.duration.ToNanoseconds() > 0
        # Every shard had its replicas and spares back after it recovered, not before.
        if recovery.HasField("redundancy_restored"):
            restored = recovery.redundancy_restored.ToNanoseconds()
            assert restored >= recovery.duration.ToNanoseconds()
    assert stored == len(recoveries)
    # A failure the agent saw (a crash, a lost page, a page over its memory) names the
    # fault that caused it, and its intensity; the data path alone (component_failure)
    # cannot know the fault.
    faults = {fault.fault_id, *(child.fault_id for child in fault.children)}
    named = [r.report for r in recoveries if r.report.fault_id]
    assert all(r.fault_id in faults for r in named), (faults, named)
    assert all(r.fault_intensity == common_pb2.INTENSITY_MODERATE for r in named), named
    if kind in AGENT_SEEN:
        assert named, f"no recovery of the {kind} names its fault"
    if kind == "multiple_failures":
        # No shard moves onto a browser another child holds offline once recovery knows
        # of it (a crash can take a spare promoted a moment before: that is a failure of
        # its own, recovered as such).
        offline = {
            tuple(t.id.split("/", 1))
            for child in fault.children
            if child.spec.kind == common_pb2.FAULT_KIND_CONNECTION_LOST
            for t in child.targets
        }
        known = {
            where: min(r.started_at.ToNanoseconds() for r in mine)
            for where in offline
            if (
                mine := [r for r in recoveries if (r.report.agent_id, r.report.browser_id) == where]
            )
        }
        until = fault.reverted_at.ToNanoseconds()
        moves = [
            (tuple(moved[1].split("/", 1)), phase.started_at.ToNanoseconds())
            for recovery in recoveries
            for phase in recovery.phases
            if phase.name == "replace" and (moved := re.search(r"moved to (\S+/\S+)", phase.detail))
        ]
        assert not [(to, at) for to, at in moves if to in known and known[to] <= at < until], (
            known,
            moves,
        )


def logged(cluster: LocalCluster, service: str, message: str) -> int:
    """How many times ``service`` logged ``message`` in this cluster's life (dry runs, which
    change nothing and are no faults, left out)."""
    lines = (cluster.data_dir / "logs" / f"{service}.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return sum(1 for r in records if r.get("message") == message and not r.get("dry_run"))


def test_the_report_has_every_breaker_transition_and_refused_fault_the_services_logged(
    cluster: LocalCluster, addresses: Addresses
) -> None:
    # After the whole matrix (15 campaigns): what recovery and the injector logged
    # reached the metrics service, or its loss is counted, never silently missing.
    async def report() -> dict[str, Any]:
        async with webshard.aio.MetricsClient(addresses.metrics, timeout=60) as metrics:
            return dict(json.loads(await metrics.report(format="json")))

    transitions = logged(cluster, "recovery", "breaker transition")
    refused = logged(cluster, "fault-injector", "fault refused")
    assert transitions > 0  # the matrix opens breakers: the comparison means something

    def arrived() -> bool:
        doc = asyncio.run(report())
        stored_refused = sum(
            1 for f in doc["tables"].get("faults", ()) if f.get("state") == "refused"
        )
        dropped = doc["delivery"]["dropped"]
        return (
            doc["breaker_transitions"] + dropped == transitions
            and stored_refused + dropped == refused
        )

    wait_for(arrived, 30, f"{transitions} breaker transitions and {refused} refused faults")
