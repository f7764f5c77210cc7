"""The agent's fault hooks on one real headless Chromium, over gRPC.

One agent (one browser, no coordinator) for the whole module, one small shard
(vit-tiny's first block) on wasm. Every test leaves the browser as it found it:
each fault is reverted before the test ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration
from webshard.browser_agent.v1 import browser_agent_pb2 as pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as pb_grpc
from webshard.common.v1 import common_pb2
from webshard.tensors import encode_tensor

from services.models import cut_model, example_inputs
from tests.conftest import ServiceProcess, wait_for
from tests.e2e.test_agent_browser import upload

pytestmark = pytest.mark.browser
H = pb.FaultHook
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.BrowserAgentServiceStub]:
    data_dir = tmp_path_factory.mktemp("hooks-agent")
    proc = ServiceProcess(
        "browser_agent",
        ["--browsers", "1", "--data-dir", str(data_dir), "--coordinators", "127.0.0.1:1"],
        data_dir.parent / "hooks-agent.log",
    )
    try:
        proc.wait_serving(timeout=120)
        with grpc.insecure_channel(proc.address) as channel:
            yield pb_grpc.BrowserAgentServiceStub(channel)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def shard(agent: pb_grpc.BrowserAgentServiceStub) -> tuple[str, dict[str, np.ndarray]]:
    """A loaded shard's handle and its inputs."""
    first = cut_model("vit-tiny", "layer", 2)[0]
    loaded = agent.LoadShard(upload(first, common_pb2.EXECUTION_PROVIDER_WASM), timeout=120)
    feeds = example_inputs("vit-tiny", seed=3)
    return loaded.shard.handle, {n: feeds[n] for n in first.input_names}


def replies(
    agent: pb_grpc.BrowserAgentServiceStub,
    shard: tuple[str, dict[str, np.ndarray]],
    timeout: float = 60,
) -> list[pb.RunShardResponse]:
    """The answers to one activation: none when it was lost."""
    handle, feeds = shard
    request = pb.RunShardRequest(
        handle=handle, sequence=1, inputs=[encode_tensor(k, v) for k, v in feeds.items()]
    )
    return list(agent.RunShard(iter([request]), timeout=timeout))


def run(
    agent: pb_grpc.BrowserAgentServiceStub,
    shard: tuple[str, dict[str, np.ndarray]],
    timeout: float = 60,
) -> pb.RunShardResponse:
    [reply] = replies(agent, shard, timeout)
    return reply


def browser(agent: pb_grpc.BrowserAgentServiceStub) -> common_pb2.BrowserInfo:
    status = agent.GetStatus(pb.GetStatusRequest(), timeout=10)
    [info] = [b for b in status.browsers if b.runtime == common_pb2.RUNTIME_BROWSER]
    return info


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def apply(agent: pb_grpc.BrowserAgentServiceStub, **fields: object) -> pb.ApplyFaultHookResponse:
    return agent.ApplyFaultHook(pb.ApplyFaultHookRequest(**fields), timeout=60)


def revert(agent: pb_grpc.BrowserAgentServiceStub, fault_id: str) -> bool:
    return agent.RevertFaultHook(pb.RevertFaultHookRequest(fault_id=fault_id), timeout=30).reverted


def test_bad_hooks_are_refused(
    agent: pb_grpc.BrowserAgentServiceStub, shard: tuple[str, dict[str, np.ndarray]]
) -> None:
    cases = [
        ({"hook": 42, "browser_id": "browser-0"}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            {"hook": H.FAULT_HOOK_ALLOCATE_MEMORY, "browser_id": "browser-0", "memory_bytes": -1},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ({"hook": H.FAULT_HOOK_KILL_BROWSER, "browser_id": "browser-9"}, grpc.StatusCode.NOT_FOUND),
        ({"hook": H.FAULT_HOOK_FAIL_SESSION, "shard_handle": "nope"}, grpc.StatusCode.NOT_FOUND),
        # The shard runs on wasm: there is no WebGPU device to lose.
        (
            {"hook": H.FAULT_HOOK_LOSE_DEVICE, "shard_handle": shard[0]},
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ]
    for fields, code in cases:
        with pytest.raises(grpc.RpcError) as refused:
            apply(agent, fault_id="bad", **fields)
        assert refused.value.code() == code, fields
    assert revert(agent, "bad") is False
    assert browser(agent).state == common_pb2.BROWSER_STATE_READY


def test_offline_cuts_runs_and_its_revert_restores_them(
    agent: pb_grpc.BrowserAgentServiceStub, shard: tuple[str, dict[str, np.ndarray]]
) -> None:
    assert run(agent, shard).error_code == 0
    answer = apply(agent, fault_id="off", hook=H.FAULT_HOOK_OFFLINE, browser_id="browser-0")
    assert answer.revertible and answer.browser_id == "browser-0"
    cut = run(agent, shard)
    assert cut.error_code == grpc.StatusCode.UNAVAILABLE.value[0], cut.error_message
    assert revert(agent, "off") is True
    # The page reconnects by itself with its shards, once it is allowed to.
    wait_for(lambda: browser(agent).state == common_pb2.BROWSER_STATE_READY, 30, "reconnect")
    assert run(agent, shard).error_code == 0


def test_allocated_memory_shows_in_the_browser_and_is_released(
    agent: pb_grpc.BrowserAgentServiceStub,
) -> None:
    before = browser(agent).memory_bytes
    answer = apply(
        agent,
        fault_id="mem",
        hook=H.FAULT_HOOK_ALLOCATE_MEMORY,
        browser_id="browser-0",
        memory_bytes=96 * MIB,
    )
    assert answer.revertible and str(96 * MIB) in answer.detail
    wait_for(lambda: browser(agent).memory_bytes >= before + 64 * MIB, 10, "the memory to show")
    assert revert(agent, "mem") is True
    # Given back at once (collected), not whenever the page next collects garbage: the
    # agent's memory watch re-arms only when the browser falls back under its limit.
    wait_for(lambda: browser(agent).memory_bytes < before + 32 * MIB, 5, "the memory to go")


def test_delay_holds_each_activation_and_drop_leaves_it_unanswered(
    agent: pb_grpc.BrowserAgentServiceStub, shard: tuple[str, dict[str, np.ndarray]]
) -> None:
    apply(agent, fault_id="slow", hook=H.FAULT_HOOK_DELAY, delay=seconds(0.8))
    started = time.monotonic()
    assert run(agent, shard).error_code == 0
    assert time.monotonic() - started >= 0.8
    assert revert(agent, "slow") is True

    apply(agent, fault_id="cut", hook=H.FAULT_HOOK_DROP, duration=seconds(60))
    with pytest.raises(grpc.RpcError) as lost:
        run(agent, shard, timeout=1.0)
    assert lost.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert revert(agent, "cut") is True
    assert run(agent, shard).error_code == 0


def test_a_duration_reverts_on_the_agent_by_itself(
    agent: pb_grpc.BrowserAgentServiceStub, shard: tuple[str, dict[str, np.ndarray]]
) -> None:
    apply(agent, fault_id="brief", hook=H.FAULT_HOOK_DROP, duration=seconds(0.5))

    def answered() -> bool:
        try:
            # Lost while the drop lasted: the stream ends once it heals, with no answer.
            return [r.error_code for r in replies(agent, shard, timeout=2.0)] == [0]
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return False

    wait_for(answered, 20, "the drop to end")
    assert revert(agent, "brief") is False  # it had already reverted itself
