"""The recovery service as a process: a failure it cannot repair without a coordinator,
its breakers, and a watch that SIGTERM ends with UNAVAILABLE."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

import grpc
import pytest
from webshard.common.v1 import common_pb2
from webshard.recovery.v1 import recovery_pb2 as pb
from webshard.recovery.v1 import recovery_pb2_grpc as pb_grpc

from tests.conftest import ServiceProcess


def test_a_recovery_without_a_coordinator_fails_visibly_and_sigterm_ends_the_watch(
    start_service: Callable[..., ServiceProcess],
) -> None:
    with socket.socket() as dead:  # bound, never listening: connections are refused
        dead.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{dead.getsockname()[1]}"
        proc = start_service("recovery", "--coordinators", coordinator, "--action-timeout-s", "1")
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.RecoveryServiceStub(channel)
            unseen = stub.GetBreaker(
                pb.GetBreakerRequest(scope=pb.BREAKER_SCOPE_AGENT, target_id="agent-1"),
                timeout=5,
            )
            assert unseen.breaker.state == common_pb2.BREAKER_STATE_CLOSED

            watch = stub.WatchRecoveries(pb.WatchRecoveriesRequest(), timeout=60)
            report = pb.FailureReport(
                source=pb.FAILURE_SOURCE_PAGE,
                kind=pb.FAILURE_KIND_RENDERER_CRASH,
                agent_id="agent-1",
                browser_id="b0",
                model="minilm-l6",
                shard_index=0,
            )
            reported = stub.ReportFailure(pb.ReportFailureRequest(report=report), timeout=5)
            recovery = next(watch).recovery
            while recovery.state == pb.RECOVERY_STATE_RUNNING:
                recovery = next(watch).recovery
            assert recovery.recovery_id == reported.recovery_id
            assert recovery.state == pb.RECOVERY_STATE_FAILED
            assert recovery.strategy == common_pb2.RECOVERY_STRATEGY_PROGRESSIVE
            assert recovery.highest_level == pb.ESCALATION_LEVEL_RESTART_AGENT
            # With no coordinator every action fails, so no rung reaches its verify.
            assert [p.name for p in recovery.phases] == [
                "detect",
                "plan",
                "retry",
                "reconnect",
                "replace",
                "restart-browser",
                "restart-agent",
            ]
            assert "every level failed" in recovery.detail
            assert "workload controller" in recovery.detail, recovery.detail
            assert len(recovery.trace_id) == 32

            targets = [b.target_id for b in stub.ListBreakers(pb.ListBreakersRequest()).breakers]
            assert targets == ["agent-1", "agent-1/b0"]

            proc.popen.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as ended:
                next(watch)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.popen.wait(timeout=15) == 0
