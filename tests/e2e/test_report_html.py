"""The HTML report opened in headless Chromium: no console errors, one chart per cell."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from webshard.common.v1 import common_pb2
from webshard.metrics.v1 import metrics_pb2 as pb

from services.metrics import reports
from services.metrics.store import MetricsStore
from tests.conftest import browser_processes
from tests.unit.test_metrics_store import T0, recovery, store_with

pytestmark = pytest.mark.browser

SCENARIOS = ("browser_crash", "network_partition", "<oom & friends>")
STRATEGIES = {
    "simple": common_pb2.RECOVERY_STRATEGY_SIMPLE,
    "progressive": common_pb2.RECOVERY_STRATEGY_PROGRESSIVE,
}
REAP_S = 15.0


def campaign_events() -> list[pb.Event]:
    """A few recoveries per scenario and strategy, some failed, with spans and breaker flips."""
    events = []
    for s, scenario in enumerate(SCENARIOS):
        for k, strategy in enumerate(STRATEGIES.values()):
            for i in range(5):
                n = 100 * s + 10 * k + i
                event = recovery(n, scenario=scenario, ms=40.0 + 37 * i + 11 * s, ok=i != 3)
                event.recovery.strategy = strategy  # type: ignore[assignment]
                event.recovery.trace_id = f"trace-{n}"
                events.append(event)
    slowest = events[-1].recovery
    slowest.duration.FromMilliseconds(5000)
    for j, name in enumerate(("recover", "detect", "replace_shard", "verify")):
        span = pb.Event(span=pb.SpanRecord(trace_id=slowest.trace_id, span_id=f"s{j}"))
        span.span.name, span.span.service = name, "recovery"
        span.span.start.FromDatetime(
            (T0 + dt.timedelta(milliseconds=400 * j)).replace(tzinfo=dt.UTC)
        )
        span.span.duration.FromMilliseconds(5000 if j == 0 else 1200)
        events.append(span)
    for second, (target, state) in enumerate(
        [("agent-1", "OPEN"), ("agent-2", "OPEN"), ("agent-1", "HALF_OPEN"), ("agent-1", "CLOSED")]
    ):
        flip = pb.Event(breaker_transition=pb.BreakerTransition(target_id=target, reason="errors"))
        flip.breaker_transition.from_state = common_pb2.BREAKER_STATE_CLOSED
        flip.breaker_transition.to_state = common_pb2.BreakerState.Value(f"BREAKER_STATE_{state}")
        flip.breaker_transition.at.FromDatetime(
            (T0 + dt.timedelta(seconds=second)).replace(tzinfo=dt.UTC)
        )
        events.append(flip)
    return events


def write_report(store: MetricsStore, path: Path) -> int:
    """Render the store's HTML report to ``path``; return its number of cells."""
    summary = store.recovery_summary(list(reports.CELL), run_id="r1")
    tables = {table: store.rows(table, run_id="r1") for table in reports.HTML_TABLES}
    path.write_bytes(reports.render_html("r1", summary, tables))
    return len(summary)


def reap(processes: list[psutil.Process]) -> None:
    """Wait for ``processes`` to exit; kill and fail on any that outlive the wait."""
    _, alive = psutil.wait_procs(processes, timeout=REAP_S)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not alive, f"browser processes outlived driver.quit(): {[p.pid for p in alive]}"


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium on a fresh profile; every process of it is gone afterwards."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service("/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    launched: list[psutil.Process] = []
    try:
        driver_process = psutil.Process(service.process.pid)
        launched = [driver_process, *driver_process.children(recursive=True)]
        yield driver
    finally:
        launched += [p for p in browser_processes(profile) if p not in launched]
        try:
            driver.quit()
        finally:
            reap(launched)
            reap(browser_processes(profile))


def test_report_opens_without_errors_and_draws_a_chart_per_cell(
    chromium: webdriver.Chrome, tmp_path: Path
) -> None:
    store = store_with(campaign_events(), tmp_path / "metrics.duckdb")
    try:
        cells = write_report(store, tmp_path / "report.html")
    finally:
        store.close()
    assert cells == len(SCENARIOS) * len(STRATEGIES)

    chromium.get((tmp_path / "report.html").as_uri())
    assert "webshard recovery report" in chromium.title
    charts = chromium.find_elements(By.CSS_SELECTOR, "figure.cell-chart")
    assert len(charts) == cells
    for chart in charts:
        assert len(chart.find_elements(By.TAG_NAME, "svg")) == 1
        assert chart.find_element(By.TAG_NAME, "svg").size["height"] > 0
    assert {chart.get_attribute("data-scenario") for chart in charts} == set(SCENARIOS)
    lanes = chromium.find_elements(By.CSS_SELECTOR, "figure.breaker-chart g.lane")
    assert len(lanes) == 2
    waterfall = chromium.find_element(By.CSS_SELECTOR, "figure.waterfall")
    assert waterfall.get_attribute("data-source") == "spans"
    assert len(waterfall.find_elements(By.CSS_SELECTOR, "svg > rect")) == 4

    errors = [entry for entry in chromium.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def test_empty_report_opens_without_errors(chromium: webdriver.Chrome, tmp_path: Path) -> None:
    store = MetricsStore.open(tmp_path / "metrics.duckdb")
    try:
        assert write_report(store, tmp_path / "report.html") == 0
    finally:
        store.close()

    chromium.get((tmp_path / "report.html").as_uri())
    assert chromium.find_elements(By.CSS_SELECTOR, "figure.cell-chart") == []
    assert "nothing to show" in chromium.find_element(By.TAG_NAME, "body").text
    errors = [entry for entry in chromium.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
