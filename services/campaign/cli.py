"""``webshard campaign``: the fault-tolerance campaign, from the command line.

Without ``--target`` it brings up a local cluster (three coordinators, agents
with headless browsers of ``--engines`` and warm standbys, the fault-injector,
recovery and metrics) in the output directory and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from webshard.cli.local import ENGINES, parse_engines

from services.campaign.runner import (
    Addresses,
    Campaign,
    Cell,
    Plan,
    Thresholds,
    failures,
    percentile,
    summary_line,
)
from services.campaign.scenarios import SCENARIOS
from services.common.engines import engine_counts

STRATEGIES = ("simple", "progressive", "coordinated")
MODES = ("basic", "comparative", "stress", "comprehensive")
REPORTS = {
    "json": "report.json",
    "markdown": "report.md",
    "html": "report.html",
    "junit": "junit.xml",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The campaign's flags."""
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="comparative",
        help="basic: browser_crash under progressive; comparative: every scenario under "
        "every strategy; stress: comparative with 4 concurrent clients and 3 iterations; "
        "comprehensive: as comparative, adaptive included, 3 iterations",
    )
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--spares",
        type=int,
        default=-1,
        help="hot spares per shard (-1: the deploy's default, one where the fleet has room; 2 "
        "keep multiple_failures, which takes two browsers at once, off the load path)",
    )
    parser.add_argument(
        "--sharding", default="layer", choices=("layer", "attention_feedforward", "component")
    )
    parser.add_argument(
        "--scenario", action="append", help=f"one of {', '.join(SCENARIOS)}; repeatable"
    )
    parser.add_argument(
        "--recovery-strategy",
        action="append",
        help="simple, progressive, coordinated or adaptive; repeatable",
    )
    parser.add_argument("--iterations", type=int, help="faults per scenario x strategy")
    parser.add_argument("--concurrency", type=int, help="clients sending requests throughout")
    parser.add_argument("--runtime", default="browser", choices=("browser", "native"))
    parser.add_argument(
        "--ep", default="wasm", help="execution provider to pin (wasm, webgpu, cpu, ...)"
    )
    parser.add_argument("--intensity", default="moderate", choices=("mild", "moderate", "severe"))
    parser.add_argument("--fault-duration-s", type=float, default=3.0)
    parser.add_argument("--agents", type=int, default=3, help="agents of the local cluster")
    parser.add_argument(
        "--engines",
        type=parse_engines,
        default=["chromium"],
        help=f"the local cluster's browser engines, comma-separated, that its agents take "
        f"in turn ({', '.join(ENGINES)}) [chromium]",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("campaign-results"))
    parser.add_argument(
        "--target",
        type=Path,
        help="a running cluster's data directory (or its cluster.json); none starts a local one",
    )
    parser.add_argument("--min-success-rate", type=float, default=1.0)
    parser.add_argument(
        "--max-p95-ms", type=float, help="fail when a cell's recovery p95 exceeds it"
    )


def plan_from(args: argparse.Namespace) -> Plan:
    """The plan the flags and the mode ask for."""
    mode_scenarios, mode_strategies, iterations, concurrency = {
        "basic": (("browser_crash",), ("progressive",), 2, 2),
        "comparative": (SCENARIOS, STRATEGIES, 2, 2),
        "stress": (SCENARIOS, STRATEGIES, 3, 4),
        "comprehensive": (SCENARIOS, (*STRATEGIES, "adaptive"), 3, 2),
    }[args.mode]
    return Plan(
        model=args.model,
        sharding=args.sharding,
        shards=args.shards,
        replicas=args.replicas,
        spares=None if args.spares == -1 else args.spares,
        runtime=args.runtime,
        ep=None if args.ep in ("", "auto") else args.ep,
        scenarios=tuple(args.scenario or mode_scenarios),
        strategies=tuple(args.recovery_strategy or mode_strategies),
        iterations=args.iterations or iterations,
        concurrency=args.concurrency or concurrency,
        intensity=args.intensity,
        fault_duration_s=args.fault_duration_s,
    )


def addresses_from_state(path: Path) -> Addresses:
    """The services of a cluster started by ``webshard up``, from its state file."""
    state_file = path / "cluster.json" if path.is_dir() else path
    state = json.loads(state_file.read_text())
    by_service: dict[str, list[str]] = {}
    for process in state["processes"]:
        by_service.setdefault(process["service"], []).append(process["address"])
    return Addresses(
        coordinators=by_service["coordinator"],
        fault_injector=by_service["fault_injector"][0],
        recovery=by_service["recovery"][0],
        metrics=by_service["metrics"][0],
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


COLUMNS: tuple[tuple[str, Callable[[Cell], str]], ...] = (
    ("scenario", lambda c: c.scenario),
    ("strategy", lambda c: c.strategy),
    ("faults", lambda c: str(c.faults)),
    ("recoveries", lambda c: str(c.recoveries)),
    ("p50 ms", lambda c: _ms(c.percentile(50))),
    ("p95 ms", lambda c: _ms(c.percentile(95))),
    ("from effect p50", lambda c: _ms(percentile(c.effect_ms, 50))),
    ("p95", lambda c: _ms(percentile(c.effect_ms, 95))),
    ("detect p50", lambda c: _ms(percentile(c.detect_ms, 50))),
    ("replace p50", lambda c: _ms(c.phase_p50("replace"))),
    ("verify p50", lambda c: _ms(c.phase_p50("verify"))),
    ("restored p50", lambda c: _ms(percentile(c.restored_ms, 50))),
    ("p99 after fault", lambda c: "-" if c.p99_ratio is None else f"{c.p99_ratio:.1f}x"),
    ("success", lambda c: f"{c.success_rate:.0%}" if c.recoveries else "-"),
    ("answers", lambda c: str(c.answers)),
    ("wrong", lambda c: str(c.wrong)),
    ("failed", lambda c: str(c.lost)),
    ("EP", lambda c: c.ep),
    ("engines", lambda c: engine_counts(c.engines) or "-"),
)
"""The campaign table: p50/p95 count from detection to the verified answer, "from
effect" from the fault's first effect (detection included); detect is first effect
to first failure report; restored is detection until every shard had its replicas
and spares back; "p99 after fault" is the p99 of the requests started within
5 s of a fault over the run's p99 away from faults."""


def table(cells: Sequence[Cell]) -> str:
    """The scenario x strategy table."""
    rows = [tuple(name for name, _ in COLUMNS)]
    rows += [tuple(show(c) for _, show in COLUMNS) for c in cells]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ProgressBar:
    """A one-line progress bar on a terminal, one line per step otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._started = time.monotonic()

    def __call__(self, done: int, total: int, what: str) -> None:
        width = 30
        filled = round(width * done / total) if total else width
        elapsed = time.monotonic() - self._started
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what} ({elapsed:.0f} s)"
        if self._tty:
            end = "\n" if done == total else ""
            self._stream.write(f"\r\033[K{line}{end}")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


async def run_campaign(
    plan: Plan, addresses: Addresses, output_dir: Path, thresholds: Thresholds
) -> int:
    """Run, print the table, write the reports; 0 when every threshold holds."""
    campaign = Campaign(plan, addresses, progress=ProgressBar())
    try:
        cells = await campaign.run()
        reports = {name: await campaign.report(fmt) for fmt, name in REPORTS.items()}
        await asyncio.to_thread(_write, output_dir, reports)
    finally:
        await campaign.close()
    print(
        f"\nrun {campaign.run_id}: {plan.model}, {plan.shards} shards ({plan.sharding}), "
        f"{plan.replicas} replicas, {'default' if plan.spares is None else plan.spares} "
        f"spares, runtime {plan.runtime}"
    )
    print(table(cells))
    print(summary_line(cells))
    print(f"reports: {', '.join(str(output_dir / n) for n in REPORTS.values())}")
    broken = failures(cells, thresholds)
    for line in broken:
        print(f"FAILED {line}", file=sys.stderr)
    if not broken:
        print("every threshold holds")
    return 1 if broken else 0


def _write(output_dir: Path, files: dict[str, bytes]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (output_dir / name).write_bytes(content)


def main(args: argparse.Namespace) -> int:
    """Run the campaign the parsed flags describe."""
    try:
        plan = plan_from(args)
        plan.validate()
    except ValueError as exc:
        print(f"webshard campaign: {exc}", file=sys.stderr)
        return 2
    thresholds = Thresholds(args.min_success_rate, args.max_p95_ms)
    output_dir: Path = args.output_dir.resolve()
    if args.target is not None:
        return asyncio.run(
            run_campaign(plan, addresses_from_state(args.target), output_dir, thresholds)
        )

    from webshard.cli.local import LocalCluster

    agent_args = (
        ["--browsers", "1", "--standby-browsers", "1", "--native", "false"]
        if plan.runtime == "browser"
        else ["--browsers", "0"]
    )
    cluster = LocalCluster(
        agents=args.agents,
        data_dir=output_dir / "cluster",
        auto_ports=True,
        extra_args={"browser_agent": agent_args},
        engines=args.engines if plan.runtime == "browser" else (),
    )
    print(f"starting a local cluster in {cluster.data_dir} ...", file=sys.stderr)
    cluster.start(timeout=300)
    try:
        return asyncio.run(run_campaign(plan, Addresses.of(cluster), output_dir, thresholds))
    finally:
        cluster.stop()
