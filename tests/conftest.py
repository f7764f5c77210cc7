"""Fixtures shared by the suite: free ports, service processes that are always reaped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import psutil
import pytest
import webshard
from grpc_health.v1 import health_pb2, health_pb2_grpc
from webshard.cli.local import LocalCluster

from services.browser_agent.browser.engines import missing_binaries
from services.browser_agent.browser.options import BrowserOptions

REPO = Path(__file__).resolve().parents[1]

NEEDS_FIREFOX = pytest.mark.skipif(
    bool(missing_binaries(BrowserOptions(engine="firefox"))),
    reason="needs Firefox (make setup installs firefox-esr)",
)
"""Marks a test that runs Firefox: skipped, saying what to install, where it is not."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def health_status(address: str, timeout: float = 1.0) -> str:
    """The health service's answer for the whole server, or UNREACHABLE."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def browser_processes(data_dir: Path) -> list[psutil.Process]:
    """Chromium and chromedriver processes whose command line names ``data_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(data_dir) in cmdline and proc.info["name"] in ("chromium", "chromedriver", "chrome"):
            found.append(proc)
    return found


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait for ``condition`` with a deadline, yielding to the event loop meanwhile."""
    try:
        async with asyncio.timeout(timeout):
            # Polled: the conditions are other components' states, with no event to await.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def attached_cluster(
    data_dir: Path,
    agents: int,
    agent_args: list[str],
    *,
    timeout: float = 240,
    engines: Sequence[str] = (),
) -> Iterator[LocalCluster]:
    """A local cluster started with every agent attached to the leader, stopped afterwards."""
    local = LocalCluster(
        agents=agents,
        data_dir=data_dir,
        auto_ports=True,
        extra_args={"browser_agent": agent_args},
        engines=engines,
    )
    local.start(timeout=timeout)
    try:
        with webshard.Client(local.coordinators(), timeout=60) as client:
            wait_for(lambda: len(client.list_agents()) == agents, 60, f"{agents} agents to attach")
        yield local
    finally:
        local.stop()


def browser_cluster(
    data_dir: Path, agents: int, engines: Sequence[str] = ()
) -> contextlib.AbstractContextManager[LocalCluster]:
    """A local cluster whose agents each run one headless browser (no native runtime):
    Chromium, or ``engines`` in turn."""
    return attached_cluster(
        data_dir, agents, ["--browsers", "1", "--native", "false"], engines=engines
    )


def native_cluster(data_dir: Path, agents: int) -> contextlib.AbstractContextManager[LocalCluster]:
    """A local cluster whose agents run shards in their native runtime (no browser)."""
    return attached_cluster(data_dir, agents, ["--browsers", "0"], timeout=120)


class ServiceProcess:
    """A service started as `python -m services.<module>` on a free port."""

    def __init__(self, module: str, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", f"services.{module}", "--port", str(self.port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
                # stop() kills: what a service makes in its temporary directory
                # (an agent's shard store) stays under the test's tmp_path.
                env={**os.environ, "TMPDIR": str(log.parent)},
            )

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Block until the process answers SERVING."""

        def serving() -> bool:
            if self.popen.poll() is not None:
                pytest.fail(f"service exited early:\n{self.log.read_text()}")
            return health_status(self.address) == "SERVING"

        wait_for(serving, timeout, f"{self.address} to serve")

    def stop(self) -> None:
        """Kill the process and its whole group."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start services on free ports; every one is reaped at teardown."""
    started: list[ServiceProcess] = []

    def start(module: str, *args: str, wait: bool = True) -> ServiceProcess:
        proc = ServiceProcess(module, list(args), tmp_path / f"{module}-{len(started)}.log")
        started.append(proc)
        if wait:
            proc.wait_serving()
        return proc

    yield start
    for proc in started:
        proc.stop()
