"""Reports over the stored events: JSON (everything), Markdown, HTML, JUnit XML.

Every report is built from the same figures: recoveries grouped by scenario and
strategy (count, success rate, p50/p95/max recovery time). JSON carries the raw
rows too, with a schema version a reader can check. HTML draws charts from the
rows as well (see ``html_report``). JUnit XML has one test case per scenario and
strategy, failing when any recovery in it failed, so any CI system can show a
campaign's outcome.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any
from xml.etree import ElementTree

from services.metrics import html_report
from services.metrics.store import SummaryRow

SCHEMA_VERSION = 1
"""Bumped whenever a field of the JSON report changes meaning or goes away."""

CELL = ("scenario", "strategy")

HTML_TABLES = html_report.TABLES
"""The tables ``render_html`` reads."""

MARKDOWN_TABLES = ("breaker_transitions", "delivery_losses")
"""The tables ``render_markdown`` reads."""


def _cell(row: SummaryRow) -> tuple[str, str]:
    return row.group.get("scenario", ""), row.group.get("strategy", "")


def _summary(row: SummaryRow) -> dict[str, Any]:
    return {
        "scenario": row.group.get("scenario", ""),
        "strategy": row.group.get("strategy", ""),
        "count": row.count,
        "success_rate": row.success_rate,
        "p50_ms": row.p50_ms,
        "p95_ms": row.p95_ms,
        "max_ms": row.max_ms,
        "redundancy_restored": row.redundancy_restored,
        "redundancy_restored_p50_ms": row.redundancy_restored_p50_ms,
        "redundancy_restored_p95_ms": row.redundancy_restored_p95_ms,
        "engines": row.engines,
    }


def render_json(
    run_id: str, summary: Sequence[SummaryRow], tables: Mapping[str, list[dict[str, Any]]]
) -> bytes:
    """Everything: the summary by scenario and strategy, and every stored row."""
    totals = html_report.loss_totals(tables.get("delivery_losses", ()))
    doc = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(),
        "run_id": run_id,
        "summary": [_summary(row) for row in summary],
        "breaker_transitions": len(tables.get("breaker_transitions", ())),
        "delivery": {
            "dropped": sum(totals.values()),
            "losses": [
                {"service": service, "reason": reason, "dropped": count}
                for (service, reason), count in totals.items()
            ],
        },
        "tables": tables,
    }
    return json.dumps(doc, indent=2, default=str).encode()


def render_markdown(
    run_id: str,
    summary: Sequence[SummaryRow],
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> bytes:
    """The table of recoveries by scenario and strategy; then, from ``tables`` where
    given, the breaker transitions' count and the records services could not deliver."""
    lines = [
        f"# webshard recovery report{f' — run {run_id}' if run_id else ''}",
        "",
        "| scenario | strategy | recoveries | success rate | p50 ms | p95 ms | max ms "
        "| redundancy restored p50 ms | p95 ms | engines |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        scenario, strategy = _cell(row)
        lines.append(
            f"| {scenario} | {strategy} | {row.count} | {row.success_rate:.1%} | "
            f"{row.p50_ms:.1f} | {row.p95_ms:.1f} | {row.max_ms:.1f} | "
            f"{html_report.ms(row.redundancy_restored_p50_ms)} | "
            f"{html_report.ms(row.redundancy_restored_p95_ms)} | {html_report.engines(row)} |"
        )
    if not summary:
        lines.append("| (no recoveries recorded) | | | | | | | | | |")
    if tables is not None:
        transitions = len(tables.get("breaker_transitions", ()))
        lines += ["", f"Circuit breakers: {transitions} transition(s) recorded."]
        totals = html_report.loss_totals(tables.get("delivery_losses", ()))
        if totals:
            lines += [
                "",
                f"**{sum(totals.values())} record(s) never reached the metrics service**; "
                "the figures above are missing them:",
                "",
                "| service | reason | dropped |",
                "|---|---|---|",
                *(f"| {s} | {r} | {n} |" for (s, r), n in totals.items()),
            ]
        else:
            lines += ["", "Delivery: no service reported records it could not deliver."]
    return ("\n".join(lines) + "\n").encode()


def render_html(
    run_id: str, summary: Sequence[SummaryRow], tables: Mapping[str, list[dict[str, Any]]]
) -> bytes:
    """One self-contained HTML page: the Markdown table, then charts as inline SVG.

    ``tables`` needs the rows of ``HTML_TABLES`` (as ``MetricsStore.rows`` gives
    them); a table left out is drawn as empty.
    """
    return html_report.render_html(run_id, summary, tables)


def render_junit(run_id: str, summary: Sequence[SummaryRow]) -> bytes:
    """One test case per scenario and strategy; a failure when any of its recoveries failed."""
    failures = sum(1 for row in summary if row.success_rate < 1.0)
    suite = ElementTree.Element(
        "testsuite",
        name=f"webshard recovery{f' {run_id}' if run_id else ''}",
        tests=str(len(summary)),
        failures=str(failures),
        errors="0",
        time=f"{sum(row.p50_ms * row.count for row in summary) / 1000:.3f}",
    )
    for row in summary:
        scenario, strategy = _cell(row)
        case = ElementTree.SubElement(
            suite,
            "testcase",
            classname=f"webshard.recovery.{scenario}",
            name=strategy,
            time=f"{row.p50_ms / 1000:.3f}",
        )
        ElementTree.SubElement(case, "system-out").text = (
            f"recoveries={row.count} success_rate={row.success_rate:.4f} "
            f"p50_ms={row.p50_ms:.1f} p95_ms={row.p95_ms:.1f} max_ms={row.max_ms:.1f}"
        )
        if row.success_rate < 1.0:
            failed = round(row.count * (1.0 - row.success_rate))
            ElementTree.SubElement(
                case,
                "failure",
                message=f"{failed} of {row.count} recoveries failed",
                type="RecoveryFailed",
            )
    xml: bytes = ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True)
    return xml
