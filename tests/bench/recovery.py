"""`make bench-recovery`: recovery time and success rate per scenario x strategy,
with circuit breakers on and off, real browsers.

For each breaker setting a local cluster starts (3 agents, each with one headless
browser of ``--engines``, taken in turn, Chromium by default, and one warm
standby; recovery with ``--breakers-enabled`` on or off) and the campaign runner
injects every scenario under every strategy ``--iterations`` times while requests
flow, every answer checked against the reference. Each row
is one cell: its recoveries' p50/p95/max (detection to verified answer), the same
from the fault's first effect (as the agent's hook stamped it: detection included),
detection (first effect to first failure report), the replace and verify phases'
p50, the time until every shard had its replicas and spares back (p50/p95), what
clients felt (the p99 of requests started within 5 s of a fault over the run's p99
away from faults), the success rate, and the answers checked, wrong and failed
meanwhile.

    make bench-recovery                                  # 30 faults per cell
    make bench-recovery BENCH_ARGS="--iterations 3 --scenario browser_crash"

A long run can be measured in parts: ``--keep`` keeps the rows of the cells this
run does not measure from the bench-results/recovery.json already there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from webshard.cli.local import LocalCluster, parse_engines

from services.campaign.cli import ProgressBar
from services.campaign.runner import Addresses, Campaign, Plan, percentile
from services.campaign.scenarios import SCENARIOS
from services.common.engines import engine_counts
from tests.bench.common import RESULTS, write

STRATEGIES = ("simple", "progressive", "coordinated")
COLUMNS = (
    "scenario",
    "strategy",
    "breakers",
    "spares",
    "fleet",
    "faults",
    "recoveries",
    "p50_ms",
    "p95_ms",
    "max_ms",
    "effect_p50_ms",
    "effect_p95_ms",
    "detect_p50_ms",
    "replace_p50_ms",
    "verify_p50_ms",
    "restored_p50_ms",
    "restored_p95_ms",
    "p99_after_fault_ratio",
    "success_rate",
    "answers",
    "wrong",
    "failed",
    "ep",
    "engines",
)


def run(plan: Plan, breakers: bool, data_dir: Path, engines: list[str]) -> list[dict[str, Any]]:
    """One cluster (its agents taking ``engines`` in turn), one campaign; a row per cell."""
    cluster = LocalCluster(
        agents=3,
        data_dir=data_dir,
        auto_ports=True,
        engines=engines,
        extra_args={
            "browser_agent": ["--browsers", "1", "--standby-browsers", "1", "--native", "false"],
            "recovery": ["--breakers-enabled", "true" if breakers else "false"],
        },
    )
    cluster.start(timeout=300)
    try:
        addresses = Addresses.of(cluster)

        async def campaign() -> list[dict[str, Any]]:
            runner = Campaign(plan, addresses, progress=ProgressBar())
            try:
                cells = await runner.run()
            finally:
                await runner.close()
            return [
                {
                    "scenario": c.scenario,
                    "strategy": c.strategy,
                    "breakers": "on" if breakers else "off",
                    "spares": plan.spares,
                    "fleet": ",".join(engines),
                    "faults": c.faults,
                    "recoveries": c.recoveries,
                    "p50_ms": c.percentile(50),
                    "p95_ms": c.percentile(95),
                    "max_ms": max(c.durations_ms) if c.durations_ms else None,
                    "effect_p50_ms": percentile(c.effect_ms, 50),
                    "effect_p95_ms": percentile(c.effect_ms, 95),
                    "detect_p50_ms": percentile(c.detect_ms, 50),
                    "replace_p50_ms": c.phase_p50("replace"),
                    "verify_p50_ms": c.phase_p50("verify"),
                    "restored_p50_ms": percentile(c.restored_ms, 50),
                    "restored_p95_ms": percentile(c.restored_ms, 95),
                    "p99_after_fault_ratio": c.p99_ratio,
                    "success_rate": round(c.success_rate, 4),
                    "answers": c.answers,
                    "wrong": c.wrong,
                    "failed": c.lost,
                    "ep": c.ep,
                    "engines": engine_counts(c.engines),
                    "problems": c.problems,
                }
                for c in cells
            ]

        return asyncio.run(campaign())
    finally:
        cluster.stop()


def cell(row: dict[str, Any]) -> tuple[str, str, str]:
    """A row's cell: scenario, strategy, breakers."""
    return row["scenario"], row["strategy"], row["breakers"]


def kept(plan: Plan, settings: list[bool]) -> list[dict[str, Any]]:
    """The rows of an earlier run whose cells this plan does not measure."""
    path = RESULTS / "recovery.json"
    if not path.exists():
        return []
    measured = {
        (scenario, strategy, "on" if breakers else "off")
        for scenario in plan.scenarios
        for strategy in plan.strategies
        for breakers in settings
    }
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"]
    return [r for r in rows if cell(r) not in measured]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30, help="faults per cell [30]")
    parser.add_argument("--scenario", action="append", help="repeatable [every scenario]")
    parser.add_argument(
        "--strategy", action="append", help="repeatable [simple, progressive, coordinated]"
    )
    parser.add_argument("--breakers", choices=("on", "off", "both"), default="both")
    parser.add_argument(
        "--spares", type=int, default=-1, help="hot spares per shard [-1: the deploy's default]"
    )
    parser.add_argument(
        "--engines",
        type=parse_engines,
        default=["chromium"],
        help="the agents' browser engines, taken in turn [chromium]",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the other cells' rows from the bench-results/recovery.json already there",
    )
    args = parser.parse_args()
    plan = Plan(
        scenarios=tuple(args.scenario or SCENARIOS),
        strategies=tuple(args.strategy or STRATEGIES),
        iterations=args.iterations,
        concurrency=2,
        spares=None if args.spares == -1 else args.spares,
    )
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.breakers]
    rows = kept(plan, settings) if args.keep else []
    with tempfile.TemporaryDirectory(prefix="webshard-bench-recovery-") as tmp:
        for breakers in settings:
            where = Path(tmp) / ("breakers-on" if breakers else "breakers-off")
            rows += run(plan, breakers, where, args.engines)
            rows.sort(key=cell)
            # Written after each setting: a long run stopped halfway keeps what it measured.
            write("recovery", rows, COLUMNS)


if __name__ == "__main__":
    main()
