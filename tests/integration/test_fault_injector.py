"""The fault-injector against real processes, driven with grpcurl as a user would.

Guardrails are checked on an injector of their own (with a token, and no cluster
behind it: a refusal must come before anything is resolved). The injection runs
on a local cluster with two agents of one browser each: a browser_crash kills a
real browser, which the agent then reports FAILED, and the fault reverts when its
duration ends, as a watch sees; a mild leader_loss stops the leader's process for
its duration. The moderate one's restart is checked on a coordinator of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import webshard
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as agent_grpc
from webshard.cli.local import LocalCluster
from webshard.common.v1 import common_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as pb
from webshard.fault_injector.v1 import fault_injector_pb2_grpc as fi_grpc

from services.fault_injector.actions import LeaderAction, LeaderMode
from services.fault_injector.leader import LocalLeaderControl
from tests.conftest import ServiceProcess, health_status, wait_for
from tests.integration.test_services import GRPCURL

TOKEN = "integration-token"
API = "webshard.fault_injector.v1.FaultInjectorService"


def grpcurl(
    address: str, method: str, body: dict[str, object], *headers: str
) -> subprocess.CompletedProcess[str]:
    args = [GRPCURL, "-plaintext", "-max-time", "30"]
    for header in headers:
        args += ["-H", header]
    # The body goes on stdin: a spec with thousands of children is too long for argv.
    return subprocess.run(
        [*args, "-d", "@", address, f"{API}/{method}"],
        input=json.dumps(body),
        capture_output=True,
        text=True,
    )


def crash_spec(browser: str, *, duration: str = "3s", **extra: object) -> dict[str, object]:
    return {
        "spec": {
            "kind": "FAULT_KIND_BROWSER_CRASH",
            "intensity": "INTENSITY_MODERATE",
            "target": {
                "kind": "TARGET_KIND_BROWSER",
                "ids": [browser],
                "mode": "SELECTOR_MODE_ALL",
            },
            "duration": duration,
            **extra,
        }
    }


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """An injector that needs a token, with nothing listening where its cluster should be."""
    logs = tmp_path_factory.mktemp("guarded")
    proc = ServiceProcess(
        "fault_injector",
        [
            "--fault-token",
            TOKEN,
            "--max-duration-s",
            "60",
            "--coordinators",
            "127.0.0.1:1",
            "--recovery",
            "127.0.0.1:1",
        ],
        logs / "fault-injector.log",
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def test_calls_without_the_right_token_are_refused(guarded: ServiceProcess) -> None:
    missing = grpcurl(guarded.address, "InjectFault", crash_spec("agent-0/browser-0"))
    assert missing.returncode != 0
    assert "Unauthenticated" in missing.stderr and "Bearer" in missing.stderr
    wrong = grpcurl(guarded.address, "ListFaults", {}, "authorization: Bearer nope")
    assert "PermissionDenied" in wrong.stderr
    listed = grpcurl(guarded.address, "ListFaults", {}, f"authorization: Bearer {TOKEN}")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {}  # nothing was recorded, nothing injected


def test_an_undefined_fault_kind_is_refused_before_the_injector_sees_it(
    guarded: ServiceProcess,
) -> None:
    """Every server refuses enum values their enum does not define (the shared error
    interceptor), so such a request never becomes a fault, not even a refused one."""
    auth = f"authorization: Bearer {TOKEN}"
    before = json.loads(grpcurl(guarded.address, "ListFaults", {}, auth).stdout)
    body = {"spec": {"kind": 42, "intensity": "INTENSITY_MILD"}}
    refused = grpcurl(guarded.address, "InjectFault", body, auth)
    assert refused.returncode != 0
    assert "InvalidArgument" in refused.stderr, refused.stderr
    assert "spec.kind is 42, which FaultKind does not define" in refused.stderr
    assert "BROWSER_CRASH" in refused.stderr
    after = json.loads(grpcurl(guarded.address, "ListFaults", {}, auth).stdout)
    assert after == before


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {
                "spec": {
                    "kind": "FAULT_KIND_BROWSER_CRASH",
                    "intensity": "INTENSITY_MILD",
                    "target": {"kind": "TARGET_KIND_BROWSER", "mode": "SELECTOR_MODE_ALL"},
                    "duration": "5s",
                }
            },
            "pass force",
        ),
        (crash_spec("agent-0/browser-0", duration="-5s"), "must be positive"),
        (crash_spec("agent-0/browser-0", duration="3600s"), "maximum of 60 s"),
        (
            {
                "spec": {
                    "kind": "FAULT_KIND_BROWSER_CRASH",
                    "intensity": "INTENSITY_MILD",
                    "target": {"kind": "TARGET_KIND_BROWSER", "ids": ["agent-0/browser-0"]},
                }
            },
            "duration is required, at most 60 s",
        ),
        (
            {
                "spec": {
                    "kind": "FAULT_KIND_MULTIPLE_FAILURES",
                    "duration": "5s",
                    "children": [crash_spec("agent-0/browser-0")["spec"]] * 2000,
                }
            },
            "2000 children; a fault takes at most 16",
        ),
    ],
)
def test_bad_specs_are_invalid_arguments_and_recorded_as_refused(
    guarded: ServiceProcess, body: dict[str, object], words: str
) -> None:
    auth = f"authorization: Bearer {TOKEN}"
    refused = grpcurl(guarded.address, "InjectFault", body, auth)
    assert refused.returncode != 0
    assert "InvalidArgument" in refused.stderr and words in refused.stderr, refused.stderr
    listed = json.loads(grpcurl(guarded.address, "ListFaults", {}, auth).stdout)
    states = {f["state"] for f in listed["faults"]}
    assert states == {"FAULT_STATE_REFUSED"}
    assert any(words in f["detail"] for f in listed["faults"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    data_dir = tmp_path_factory.mktemp("fault-cluster")
    local = LocalCluster(
        agents=2,
        data_dir=data_dir,
        auto_ports=True,
        extra_args={
            "browser_agent": ["--browsers", "1"],
            "fault_injector": ["--cluster-state", str(data_dir / "cluster.json")],
        },
    )
    # The launcher does not tell the injector where recovery is yet; this cluster's is
    # on an automatic port, so the injector is pointed at it here.
    injector = next(p for p in local.processes if p.service == "fault_injector")
    injector.args += ["--recovery", local.address("recovery")]
    local.start(timeout=120)
    try:
        yield local
    finally:
        local.stop()


def agent_status(address: str) -> agent_pb.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        return agent_grpc.BrowserAgentServiceStub(channel).GetStatus(
            agent_pb.GetStatusRequest(), timeout=10
        )


def the_browser(status: agent_pb.GetStatusResponse) -> common_pb2.BrowserInfo:
    [browser] = [b for b in status.browsers if b.runtime == common_pb2.RUNTIME_BROWSER]
    return browser


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def watch_into(address: str, seen: list[pb.Fault]) -> Callable[[], None]:
    """Start a watch on a thread; returns the function that ends it."""
    channel = grpc.insecure_channel(address)
    call = fi_grpc.FaultInjectorServiceStub(channel).WatchFaults(
        pb.WatchFaultsRequest(), timeout=120
    )

    def pump() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled by end()
            for change in call:
                seen.append(change.fault)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()

    def end() -> None:
        call.cancel()
        thread.join(timeout=10)
        channel.close()

    return end


def test_a_browser_crash_kills_the_browser_and_reverts_after_its_duration(
    cluster: LocalCluster,
) -> None:
    coordinators = cluster.coordinators()
    with webshard.Client(coordinators, timeout=10) as client:

        def registered() -> bool:
            agents = client.list_agents()
            return len(agents) == 2 and all(
                any(b.state == common_pb2.BROWSER_STATE_READY for b in a.browsers) for a in agents
            )

        wait_for(registered, 60, "both agents to register with a ready browser")
    agent = cluster.address("agent-0")
    victim = the_browser(agent_status(agent)).pid
    bystander = the_browser(agent_status(cluster.address("agent-1"))).pid
    injector = cluster.address("fault-injector")

    seen: list[pb.Fault] = []
    end_watch = watch_into(injector, seen)
    try:
        # The command in the README, with the address of this cluster's injector.
        injected = grpcurl(injector, "InjectFault", crash_spec("agent-0/browser-0"))
        assert injected.returncode == 0, injected.stderr
        fault = json.loads(injected.stdout)["fault"]
        assert fault["state"] == "FAULT_STATE_ACTIVE", fault
        [target] = fault["targets"]
        assert (target["id"], target["agentId"]) == ("agent-0/browser-0", "agent-0")
        assert f"pid {victim}" in target["detail"]
        assert len(fault["traceId"]) == 32
        # Recovery was asked for the breakers of agent-0 and agent-0/browser-0: closed.
        assert "breakers unknown" not in fault.get("detail", ""), fault

        wait_for(lambda: exited(victim), 10, "the browser's process to be gone")
        wait_for(
            lambda: the_browser(agent_status(agent)).state == common_pb2.BROWSER_STATE_FAILED,
            10,
            "the agent to report its browser FAILED",
        )
        assert not exited(bystander)

        def states() -> list[int]:
            return [f.state for f in seen if f.fault_id == fault["faultId"]]

        wait_for(lambda: pb.FAULT_STATE_REVERTED in states(), 15, "the fault to revert by itself")
        assert states()[-2:] == [pb.FAULT_STATE_ACTIVE, pb.FAULT_STATE_REVERTED]
        [done] = [f for f in seen if f.state == pb.FAULT_STATE_REVERTED]
        lasted = done.reverted_at.ToNanoseconds() - done.injected_at.ToNanoseconds()
        assert 3e9 <= lasted < 10e9
        assert "duration ended" in done.detail
        # The browser stays FAILED: bringing it back is recovery's job, not the injector's.
        assert the_browser(agent_status(agent)).state == common_pb2.BROWSER_STATE_FAILED
    finally:
        end_watch()


def test_leader_loss_mild_stops_the_leader_for_its_duration(cluster: LocalCluster) -> None:
    injector = cluster.address("fault-injector")
    body = {
        "spec": {"kind": "FAULT_KIND_LEADER_LOSS", "intensity": "INTENSITY_MILD", "duration": "2s"}
    }
    injected = grpcurl(injector, "InjectFault", body)
    assert injected.returncode == 0, injected.stderr
    fault = json.loads(injected.stdout)["fault"]
    assert fault["state"] == "FAULT_STATE_ACTIVE", fault
    [target] = fault["targets"]
    leader = psutil.Process(cluster.popen(target["id"]).pid)
    wait_for(lambda: leader.status() == psutil.STATUS_STOPPED, 1.5, "the leader to be stopped")
    wait_for(lambda: leader.status() != psutil.STATUS_STOPPED, 10, "the leader to be resumed")
    with webshard.FaultInjectorClient(injector, timeout=10) as client:
        wait_for(
            lambda: client.get_fault(fault["faultId"]).state == pb.FAULT_STATE_REVERTED,
            10,
            "the fault to revert",
        )


async def test_a_killed_leader_is_started_again_from_the_cluster_state(tmp_path: Path) -> None:
    """leader_loss moderate, locally: SIGKILL through LocalWorkloads, then a restart from
    the arguments in cluster.json, whose pid is updated."""
    replica = ["--replica-id", "coordinator-0", "--data-dir", str(tmp_path / "c0")]
    victim = ServiceProcess("coordinator", replica, tmp_path / "coordinator-0.log")
    state = tmp_path / "cluster.json"
    entry = {
        "name": "coordinator-0",
        "service": "coordinator",
        "address": victim.address,
        "log": str(tmp_path / "coordinator-0.log"),
        "pid": victim.popen.pid,
        "args": ["--port", str(victim.port), *replica],
    }
    state.write_text(json.dumps({"pid": 1, "processes": [entry]}))
    control = LocalLeaderControl(state)
    restarted = 0
    try:
        victim.wait_serving()
        action = LeaderAction("coordinator-0", victim.address, LeaderMode.KILL)
        done = await control.act(action, 5.0)
        assert f"pid {victim.popen.pid}" in done
        assert victim.popen.wait(timeout=10) == -9
        again = await control.undo(action)
        restarted = json.loads(state.read_text())["processes"][0]["pid"]
        assert restarted != victim.popen.pid and f"pid {restarted}" in again
        await asyncio.to_thread(
            wait_for, lambda: health_status(victim.address) == "SERVING", 30, "the restart"
        )
    finally:
        victim.stop()
        if restarted:
            with contextlib.suppress(psutil.Error):
                psutil.Process(restarted).kill()
        await control.close()
