"""Every service serves health, reflection and its whole API, and shuts down gracefully."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import webshard
from webshard.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc

from tests.conftest import ServiceProcess, wait_for

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")

# module, its API, one method a later release fills in ("" when all are), the JSON body for it
SERVICES = [
    ("coordinator", "webshard.coordinator.v1.CoordinatorService", "", "{}"),
    ("browser_agent", "webshard.browser_agent.v1.BrowserAgentService", "", "{}"),
    ("fault_injector", "webshard.fault_injector.v1.FaultInjectorService", "", "{}"),
    ("recovery", "webshard.recovery.v1.RecoveryService", "", "{}"),
    ("metrics", "webshard.metrics.v1.MetricsService", "", "{}"),
]


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "10", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize(("module", "api", "method", "body"), SERVICES)
def test_service_serves_health_reflection_and_its_api(
    start_service: Callable[..., ServiceProcess], module: str, api: str, method: str, body: str
) -> None:
    # The agent runs no browser here: this test is about the server, not Chromium.
    proc = start_service(module, *(["--browsers", "0"] if module == "browser_agent" else []))

    listed = grpcurl(proc.address, "list")
    assert listed.returncode == 0, listed.stderr
    names = listed.stdout.split()
    assert api in names
    assert "grpc.health.v1.Health" in names

    full_method = f"{api.rsplit('.', 1)[0]}.{method}" if "/" in method else f"{api}/{method}"
    described = grpcurl(proc.address, "describe", full_method.split("/", maxsplit=1)[0])
    assert full_method.split("/")[1] in described.stdout

    health = grpcurl(proc.address, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}
    per_service = grpcurl(
        "-d", json.dumps({"service": api}), proc.address, "grpc.health.v1.Health/Check"
    )
    assert json.loads(per_service.stdout) == {"status": "SERVING"}

    if not method:
        return
    full_method = f"{api}/{method}"
    assert method in described.stdout
    unfilled = grpcurl("-d", body, proc.address, full_method)
    assert unfilled.returncode != 0
    assert "Unimplemented" in unfilled.stderr
    assert f"{full_method} is not implemented in this version of webshard" in unfilled.stderr


def test_sigterm_during_an_agent_session_ends_it_with_unavailable_and_exits_0(
    start_service: Callable[..., ServiceProcess],
) -> None:
    proc = start_service("coordinator", "--drain-grace-s", "3")
    with grpc.insecure_channel(proc.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

        def leads() -> bool:
            # A replica with no peers elects itself within an election timeout.
            status = stub.ClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=5)
            return bool(status.leader_id == status.replica_id)

        wait_for(leads, 10, "the single replica to lead")
        outbound: list[coordinator_pb2.AgentSessionRequest] = [
            coordinator_pb2.AgentSessionRequest(
                registration=coordinator_pb2.AgentRegistration(
                    agent_id="agent-test", address="127.0.0.1:1"
                )
            )
        ]
        keep_open = threading.Event()

        def requests():  # type: ignore[no-untyped-def]
            yield from outbound
            keep_open.wait(30)  # the agent side never closes: only the server can end it

        responses = stub.AgentSession(requests(), timeout=30)
        first = next(responses)
        assert first.WhichOneof("message") == "accepted"

        proc.popen.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in responses:
                pass
        keep_open.set()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.popen.wait(timeout=15) == 0


def test_sigterm_when_idle_exits_0_and_turns_health_off(
    start_service: Callable[..., ServiceProcess],
) -> None:
    proc = start_service("metrics", "--drain-grace-s", "1")
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=15) == 0
    log = proc.log.read_text()
    assert '"message": "shutting down"' in log
    assert '"message": "stopped"' in log


def test_bad_settings_stop_the_service_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.coordinator", "--peers", "not-a-peer"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "peer 'not-a-peer' is not id=host:port" in result.stderr


def test_an_agent_registers_with_the_coordinator(
    start_service: Callable[..., ServiceProcess],
) -> None:
    coordinator = start_service("coordinator")
    agent = start_service(
        "browser_agent",
        "--browsers",
        "0",
        "--agent-id",
        "agent-7",
        "--coordinators",
        coordinator.address,
    )

    # The SDK waits out the replica's first election (it serves before it leads).
    with webshard.Client([coordinator.address], timeout=10) as client:

        def registered() -> bool:
            agents = client.list_agents()
            return [a.agent_id for a in agents] == ["agent-7"] and agents[
                0
            ].address == f"127.0.0.1:{agent.port}"

        wait_for(registered, 20, "agent-7 to register")
        agent.popen.send_signal(signal.SIGTERM)
        assert agent.popen.wait(timeout=15) == 0
        wait_for(lambda: client.list_agents() == [], 20, "agent-7 to drop out of the healthy list")
