"""Reports: JSON with everything, the Markdown table, JUnit XML for any CI."""

from __future__ import annotations

import json
from xml.etree import ElementTree

from services.metrics import reports
from services.metrics.store import EVENT_TIME
from tests.unit.test_metrics_store import recovery, request, store_with


def figures() -> tuple[list[reports.SummaryRow], dict[str, list[dict[str, object]]]]:
    events = [recovery(i, ms=float(10 * (i + 1))) for i in range(4)]
    events += [recovery(10 + i, scenario="latency", ok=i != 0) for i in range(3)]
    events += [request(20, 5)]
    store = store_with(events)
    summary = store.recovery_summary(list(reports.CELL), run_id="r1")
    tables = {table: store.rows(table, run_id="r1") for table in EVENT_TIME}
    return summary, tables


def test_json_holds_the_summary_every_row_and_a_schema_version() -> None:
    summary, tables = figures()
    doc = json.loads(reports.render_json("r1", summary, tables))
    assert doc["schema_version"] == reports.SCHEMA_VERSION
    assert doc["run_id"] == "r1"
    cells = {(c["scenario"], c["strategy"]): c for c in doc["summary"]}
    assert cells[("browser_crash", "progressive")]["count"] == 4
    assert cells[("latency", "progressive")]["success_rate"] == 2 / 3
    assert len(doc["tables"]["recoveries"]) == 7
    assert {r["recovery_id"] for r in doc["tables"]["recoveries"]} >= {"rec-0", "rec-12"}


def test_markdown_has_one_row_per_scenario_and_strategy() -> None:
    summary, _ = figures()
    text = reports.render_markdown("r1", summary).decode()
    assert "| browser_crash | progressive | 4 | 100.0% | 25.0 |" in text
    assert "| latency | progressive | 3 | 66.7% |" in text


def test_junit_fails_the_cells_where_a_recovery_failed() -> None:
    summary, _ = figures()
    suite = ElementTree.fromstring(reports.render_junit("r1", summary))
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {c.get("classname"): c for c in suite.iter("testcase")}
    assert cases["webshard.recovery.browser_crash"].find("failure") is None
    failure = cases["webshard.recovery.latency"].find("failure")
    assert failure is not None and failure.get("message") == "1 of 3 recoveries failed"
