"""`webshard up` starts a whole cluster on loopback and leaves nothing behind when stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import webshard
from webshard.errors import UnavailableError

from tests.conftest import browser_processes, health_status, wait_for
from tests.integration.test_services import GRPCURL, SERVICES

WEBSHARD = str(Path(sys.executable).parent / "webshard")
AGENTS = 2


class Up:
    """A `webshard up` process and what it printed."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.output = data_dir.parent / "up.out"
        with open(self.output, "wb") as out:
            self.popen = subprocess.Popen(
                [
                    WEBSHARD,
                    "up",
                    "--agents",
                    str(AGENTS),
                    "--ports",
                    "auto",
                    "--data-dir",
                    str(data_dir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_up(self) -> None:
        def up() -> bool:
            if self.popen.poll() is not None:
                pytest.fail(f"webshard up exited:\n{self.output.read_text()}")
            return "webshard is up" in self.output.read_text()

        wait_for(up, 120, "webshard up to report every process SERVING")

    def processes(self) -> list[dict[str, object]]:
        state = json.loads((self.data_dir / "cluster.json").read_text())
        procs: list[dict[str, object]] = state["processes"]
        return procs


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    proc = Up(tmp_path / "cluster")
    yield proc
    # Whatever the test did, nothing may outlive it.
    leftovers = [p for p in descendants(proc.popen.pid)]
    if proc.popen.poll() is None:
        proc.popen.kill()
    for p in leftovers:
        p.kill()


def test_up_serves_every_service_and_sigterm_leaves_no_process(up: Up) -> None:
    up.wait_up()
    procs = up.processes()
    names = sorted(str(p["name"]) for p in procs)
    assert names == sorted(
        [
            "coordinator-0",
            "coordinator-1",
            "coordinator-2",
            "agent-0",
            "agent-1",
            "fault-injector",
            "recovery",
            "metrics",
        ]
    )
    apis = {module: api for module, api, _, _ in SERVICES}
    for proc in procs:
        address = str(proc["address"])
        assert health_status(address) == "SERVING"
        listed = subprocess.run(
            [GRPCURL, "-plaintext", address, "list"], capture_output=True, text=True, timeout=30
        )
        assert apis[str(proc["service"])] in listed.stdout.split(), listed.stderr
        assert address in up.output.read_text()

    status = subprocess.run(
        [WEBSHARD, "status", "--json", "--data-dir", str(up.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    rows = json.loads(status.stdout)["processes"]
    assert {r["name"]: r["health"] for r in rows} == {n: "SERVING" for n in names}

    # The replicas elect a leader, and every agent holds its session with it.
    coordinators = [str(p["address"]) for p in procs if p["service"] == "coordinator"]
    with webshard.Client(coordinators, timeout=10) as client:

        def agents_registered() -> bool:
            try:
                return sorted(a.agent_id for a in client.list_agents()) == ["agent-0", "agent-1"]
            except UnavailableError:
                return False  # no leader elected yet

        wait_for(agents_registered, 30, "both agents to register with the leader")

    pids = [int(str(p["pid"])) for p in procs]
    assert browser_processes(up.data_dir), "each agent runs a headless Chromium"
    up.popen.send_signal(signal.SIGTERM)
    assert up.popen.wait(timeout=60) == 0
    assert "stopped" in up.output.read_text()
    assert [
        pid
        for pid in pids
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ] == []
    assert not (up.data_dir / "cluster.json").exists()
    assert browser_processes(up.data_dir) == []
    status_after = subprocess.run(
        [WEBSHARD, "status", "--data-dir", str(up.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status_after.returncode == 1
    assert "no local cluster is running" in status_after.stdout


def test_sigkill_of_up_takes_every_service_with_it(up: Up) -> None:
    up.wait_up()
    pids = [int(str(p["pid"])) for p in up.processes()]
    os.kill(up.popen.pid, signal.SIGKILL)
    up.popen.wait(timeout=10)

    def all_gone() -> bool:
        return not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            for pid in pids
        )

    wait_for(all_gone, 30, "every service to exit after its launcher was killed")
    wait_for(lambda: not browser_processes(up.data_dir), 30, "every browser to exit")


def test_up_refuses_a_busy_default_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 50051))
        except OSError:
            pytest.skip("port 50051 is taken by something else on this machine")
        busy.listen()
        result = subprocess.run(
            [WEBSHARD, "up", "--once", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "port 50051 on 127.0.0.1 is in use" in result.stderr
    assert "--ports auto" in result.stderr
