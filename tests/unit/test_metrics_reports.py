"""Reports: JSON with everything, the Markdown table, HTML with charts, JUnit XML for any CI."""

from __future__ import annotations

import datetime as dt
import json
from html.parser import HTMLParser
from xml.etree import ElementTree

from webshard.common.v1 import common_pb2
from webshard.metrics.v1 import metrics_pb2 as pb

from services.common.server import Lifecycle
from services.metrics import html_report, reports
from services.metrics.servicer import MetricsServicer
from services.metrics.store import EVENT_TIME, MetricsStore
from tests.unit.test_metrics_store import T0, recovery, request, store_with


def figures() -> tuple[list[reports.SummaryRow], dict[str, list[dict[str, object]]]]:
    events = [recovery(i, ms=float(10 * (i + 1))) for i in range(4)]
    for i, event in enumerate(events):  # the spares were back 1 to 4 s later
        event.recovery.redundancy_restored.FromMilliseconds(1000 * (i + 1))
        event.recovery.engine = "firefox" if i == 0 else "chromium"
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
    assert cells[("browser_crash", "progressive")]["redundancy_restored_p50_ms"] == 2500.0
    assert cells[("latency", "progressive")]["redundancy_restored_p50_ms"] is None
    assert cells[("browser_crash", "progressive")]["engines"] == {"chromium": 3, "firefox": 1}
    assert {r["engine"] for r in doc["tables"]["recoveries"]} == {"chromium", "firefox", ""}
    assert len(doc["tables"]["recoveries"]) == 7
    assert {r["recovery_id"] for r in doc["tables"]["recoveries"]} >= {"rec-0", "rec-12"}


def test_markdown_has_one_row_per_scenario_and_strategy() -> None:
    summary, _ = figures()
    text = reports.render_markdown("r1", summary).decode()
    assert "| browser_crash | progressive | 4 | 100.0% | 25.0 |" in text
    assert "| 2500.0 | 3850.0 | chromium 3, firefox 1 |" in text  # spares back; engines
    assert "| latency | progressive | 3 | 66.7% |" in text
    assert text.count("| — | — | — |") == 1  # latency's spares never counted, no engine


def test_junit_fails_the_cells_where_a_recovery_failed() -> None:
    summary, _ = figures()
    suite = ElementTree.fromstring(reports.render_junit("r1", summary))
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {c.get("classname"): c for c in suite.iter("testcase")}
    assert cases["webshard.recovery.browser_crash"].find("failure") is None
    failure = cases["webshard.recovery.latency"].find("failure")
    assert failure is not None and failure.get("message") == "1 of 3 recoveries failed"


# --- HTML ---------------------------------------------------------------------------


class Page(HTMLParser):
    """What the tests read from an HTML report: its figures and text, and tag balance."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "circle", "rect", "line"})

    def __init__(self, html: bytes) -> None:
        super().__init__()
        self.figures: list[dict[str, str]] = []
        self.svgs_in_figure: list[int] = []
        self.open: list[str] = []
        self.text: list[str] = []
        self.feed(html.decode())
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "figure":
            self.figures.append(attributes)
            self.svgs_in_figure.append(0)
        if tag == "svg" and "figure" in self.open:
            self.svgs_in_figure[-1] += 1
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.open.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def cell_charts(self) -> list[dict[str, str]]:
        return [f for f in self.figures if "cell-chart" in f.get("class", "").split()]

    def figure(self, kind: str) -> dict[str, str]:
        [found] = [f for f in self.figures if kind in f.get("class", "").split()]
        return found

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def html_of(store: MetricsStore, run_id: str = "r1") -> bytes:
    summary = store.recovery_summary(list(reports.CELL), run_id=run_id)
    tables = {table: store.rows(table, run_id=run_id) for table in reports.HTML_TABLES}
    return reports.render_html(run_id, summary, tables)


def with_strategy(event: pb.Event, strategy: int, trace_id: str = "") -> pb.Event:
    event.recovery.strategy = strategy  # type: ignore[assignment]
    event.recovery.trace_id = trace_id
    return event


def span(trace_id: str, span_id: str, name: str, start_ms: int, ms: int) -> pb.Event:
    event = pb.Event(
        span=pb.SpanRecord(trace_id=trace_id, span_id=span_id, name=name, service="recovery")
    )
    event.span.start.FromDatetime((T0 + dt.timedelta(milliseconds=start_ms)).replace(tzinfo=dt.UTC))
    event.span.duration.FromMilliseconds(ms)
    return event


def breaker(target: str, to_state: int, second: int) -> pb.Event:
    event = pb.Event(
        breaker_transition=pb.BreakerTransition(
            target_id=target, from_state=common_pb2.BREAKER_STATE_CLOSED, to_state=to_state
        )
    )
    event.breaker_transition.at.FromDatetime(
        (T0 + dt.timedelta(seconds=second)).replace(tzinfo=dt.UTC)
    )
    return event


def test_html_has_the_table_and_one_cell_chart_per_scenario_and_strategy() -> None:
    events = [
        with_strategy(recovery(10 * s + i, scenario=scenario, ms=20.0 + i), strategy)
        for s, (scenario, strategy) in enumerate(
            (scenario, strategy)
            for scenario in ("browser_crash", "latency", "oom")
            for strategy in (
                common_pb2.RECOVERY_STRATEGY_SIMPLE,
                common_pb2.RECOVERY_STRATEGY_PROGRESSIVE,
            )
        )
        for i in range(3)
    ]
    page = Page(html_of(store_with(events)))
    cells = page.cell_charts()
    assert len(cells) == 6
    assert {(c["data-scenario"], c["data-strategy"]) for c in cells} == {
        (scenario, strategy)
        for scenario in ("browser_crash", "latency", "oom")
        for strategy in ("simple", "progressive")
    }
    assert all(count == 1 for count in page.svgs_in_figure)
    assert "success-chart" in page.figure("success-chart")["class"]
    assert "browser_crash simple 3 100.0% 21.0 21.9 22.0" in page.all_text
    assert "p50 21.0" in page.all_text and "p95 21.9" in page.all_text


def test_html_escapes_every_string_from_the_data() -> None:
    nasty = '<script>alert("x")</script>&'
    events = [recovery(0, scenario=nasty), recovery(1, scenario=nasty, ok=False)]
    events[0].recovery.recovery_id = "<b>rec</b>"
    events += [breaker("<img src=x>", common_pb2.BREAKER_STATE_OPEN, 1)]
    html = html_of(store_with(events))
    text = html.decode()
    assert "<script" not in text and "<img" not in text and "<b>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in text
    page = Page(html)  # parses with balanced tags
    [cell] = page.cell_charts()
    assert cell["data-scenario"] == nasty
    assert nasty in page.all_text


def test_html_of_an_empty_store_says_there_is_nothing_to_show() -> None:
    html = html_of(store_with([]))
    page = Page(html)
    assert html.startswith(b"<!DOCTYPE html>")
    assert page.cell_charts() == []
    assert "No recoveries recorded: nothing to show" in page.all_text
    assert "no breaker transitions recorded" in page.all_text.lower()
    assert page.open == []


def test_html_is_self_contained() -> None:
    summary, tables = figures()
    text = reports.render_html("r1", summary, tables).decode()
    assert "<script" not in text
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and '<link rel="stylesheet"' not in text


def run_request(second: int, run: str = "r1") -> pb.Event:
    """A request of ``run`` at T0 + ``second``: it stretches the run's window to then."""
    event = request(second, 5)
    event.request.run_id = run
    return event


def test_breaker_timeline_has_a_lane_per_target() -> None:
    events = [
        recovery(0),
        run_request(4),
        breaker("agent-1", common_pb2.BREAKER_STATE_OPEN, 1),
        breaker("agent-1", common_pb2.BREAKER_STATE_HALF_OPEN, 3),
        breaker("agent-2", common_pb2.BREAKER_STATE_OPEN, 2),
    ]
    text = html_of(store_with(events)).decode()
    assert text.count('class="lane"') == 2
    assert 'data-target="agent-1"' in text and 'data-target="agent-2"' in text
    assert "agent-1: half_open from 2.000 s to 2.100 s" in text
    assert "agent-2: closed from 0.000 s to 1.000 s (before the first record)" in text
    assert "no breaker transitions recorded" not in text.lower()


def test_waterfall_of_the_slowest_recovery_is_drawn_from_its_spans() -> None:
    events = [
        with_strategy(recovery(0, ms=50.0), common_pb2.RECOVERY_STRATEGY_SIMPLE, "t-fast"),
        with_strategy(recovery(1, ms=900.0), common_pb2.RECOVERY_STRATEGY_SIMPLE, "t-slow"),
        span("t-slow", "a", "recover", 0, 900),
        span("t-slow", "b", "replace_shard", 100, 700),
        span("t-fast", "c", "fast_only", 0, 50),
    ]
    page = Page(html_of(store_with(events)))
    assert page.figure("waterfall")["data-source"] == "spans"
    text = page.all_text
    assert "recover · recovery" in text and "replace_shard · recovery" in text
    assert "fast_only" not in text
    assert "Trace t-slow of the slowest recovery, rec-1" in text
    assert "starts at 100.0 ms, lasts 700.0 ms" in text


def test_waterfall_falls_back_to_the_phases_when_no_spans_are_stored() -> None:
    slow = with_strategy(recovery(1, ms=900.0), common_pb2.RECOVERY_STRATEGY_SIMPLE, "t-none")
    slow.recovery.phases.add(name="replace", level="shard", ok=False).duration.FromMilliseconds(300)
    events = [recovery(0, ms=50.0), slow, span("other", "a", "elsewhere", 0, 5)]
    page = Page(html_of(store_with(events)))
    assert page.figure("waterfall")["data-source"] == "phases"
    text = page.all_text
    assert "drawn from its 2 recorded phases laid end to end" in text
    assert "no spans are stored for its trace t-none" in text
    assert "detect · shard" in text and "replace · shard" in text
    assert "elsewhere" not in text
    assert "replace · shard: starts at 10.0 ms, lasts 300.0 ms" in text


async def test_get_report_serves_html() -> None:
    servicer = MetricsServicer(store_with([recovery(0), recovery(1)]), Lifecycle())
    try:
        response = await servicer.GetReport(
            pb.GetReportRequest(format=pb.REPORT_FORMAT_HTML, run_id="r1"),
            None,  # type: ignore[arg-type]
        )
    finally:
        servicer.close()
    assert response.content_type == "text/html; charset=utf-8"
    assert len(Page(response.content).cell_charts()) == 1


def test_a_cell_with_many_recoveries_is_drawn_as_a_histogram() -> None:
    many = html_report.STRIP_MAX + 1
    events = [recovery(i, ms=float(i % 97), ok=i % 10 != 0) for i in range(many)]
    html = html_of(store_with(events))
    page = Page(html)
    assert len(page.cell_charts()) == 1
    text = html.decode()
    chart = text[text.index('class="chart cell-chart"') : text.index("</figure>")]
    assert "<circle" not in chart and "<rect" in chart
    assert f"{many} recoveries" in page.all_text and "a histogram" in page.all_text
