"""The metrics dashboard of a real local cluster in headless Chromium: live, with no reload."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import webshard
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from webshard.fault_injector.v1 import fault_injector_pb2

from tests.conftest import browser_cluster, browser_processes

pytestmark = pytest.mark.browser

ARTIFACTS = Path(os.environ.get("WEBSHARD_TEST_ARTIFACTS", "test-artifacts"))

CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=1400,1000",
)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(profile: Path, driver_pid: int | None) -> list[str]:
    """Wait for this test's chromedriver and Chromium to exit; kill and name any that do not."""

    def left() -> list[psutil.Process]:
        procs = browser_processes(profile)
        if driver_pid is not None and _running(driver_pid):
            procs.append(psutil.Process(driver_pid))
        return procs

    deadline = time.monotonic() + 15
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = left()
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [f"{p.pid}" for p in leftovers]


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile; quit afterwards, leaving no process behind."""
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    service = Service("/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    driver_pid = service.process.pid if service.process is not None else None
    try:
        yield driver
    finally:
        driver.quit()
        leftovers = _reap(profile, driver_pid)
    assert not leftovers, f"browser processes outlived driver.quit(): {leftovers}"


def test_the_dashboard_lists_the_agents_and_shows_a_fault_without_reloading(
    tmp_path: Path,
) -> None:
    profile = tmp_path / "profile"
    with browser_cluster(tmp_path / "cluster", agents=2) as cluster:
        url = cluster.dashboard_url()
        assert url is not None
        with chromium(profile) as driver:
            driver.get(url)
            wait = WebDriverWait(driver, 60, poll_frequency=0.2)
            wait.until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#agents [data-agent-id]")) == 2
            )
            agents = driver.find_elements(By.CSS_SELECTOR, "#agents [data-agent-id]")
            assert sorted(a.get_attribute("data-agent-id") or "" for a in agents) == [
                "agent-0",
                "agent-1",
            ]
            assert driver.find_element(By.ID, "connection").text == "live"
            wait.until(lambda d: "leader:" in d.find_element(By.ID, "coordinators").text)
            assert "browser-0" in driver.find_element(By.ID, "agents").text
            driver.execute_script("window.__marker = 1")

            with webshard.FaultInjectorClient(
                cluster.address("fault-injector"), timeout=60
            ) as injector:
                fault = injector.inject(
                    kind="latency", intensity="mild", target="agent:agent-1", duration_s=10
                )
            assert fault.state == fault_injector_pb2.FAULT_STATE_ACTIVE, fault.detail
            row = f'#faults [data-fault-id="{fault.fault_id}"]'
            WebDriverWait(driver, 20, poll_frequency=0.2).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, row)
            )
            assert "latency" in driver.find_element(By.CSS_SELECTOR, row).text
            assert driver.execute_script("return window.__marker") == 1
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))

            # Its revert takes the row away, still on the same page.
            WebDriverWait(driver, 40, poll_frequency=0.2).until(
                lambda d: not d.find_elements(By.CSS_SELECTOR, row)
            )
            assert driver.execute_script("return window.__marker") == 1
