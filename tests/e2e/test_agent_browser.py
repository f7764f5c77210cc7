"""The browser agent end to end: real model shards in real headless Chromium over gRPC."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from webshard.browser_agent.v1 import browser_agent_pb2 as pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as pb_grpc
from webshard.common.v1 import common_pb2
from webshard.tensors import decode_tensor, encode_tensor

from services.coordinator.deployments import spec_of
from services.models import NativeRunner, cut_model, example_inputs
from services.models.sharding import Shard
from tests.conftest import ServiceProcess, browser_processes, health_status, wait_for

pytestmark = pytest.mark.browser
EP = common_pb2.ExecutionProvider
CHUNK = 1024 * 1024


def upload(shard: Shard, provider: int) -> Iterator[pb.LoadShardRequest]:
    """The LoadShard stream the coordinator would send for a layer-cut shard."""
    yield pb.LoadShardRequest(
        header=pb.LoadShardHeader(
            shard=spec_of(shard, common_pb2.SHARDING_STRATEGY_LAYER),
            runtime=common_pb2.RUNTIME_BROWSER,
            execution_provider=provider,  # type: ignore[arg-type]
        )
    )
    data = shard.path.read_bytes()
    for start in range(0, len(data), CHUNK):
        yield pb.LoadShardRequest(chunk=data[start : start + CHUNK])


def feeds_for(
    shards: list[Shard], index: int, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The inputs of shard ``index``: the model inputs run natively through the shards before it."""
    runner = NativeRunner()
    tensors = dict(inputs)
    for shard in shards[:index]:
        tensors.update(runner(shard, {n: tensors[n] for n in shard.input_names}))
    return {n: tensors[n] for n in shards[index].input_names}


def run_on_agent(
    stub: pb_grpc.BrowserAgentServiceStub, handle: str, feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    [reply] = stub.RunShard(
        iter(
            [
                pb.RunShardRequest(
                    handle=handle,
                    sequence=1,
                    inputs=[encode_tensor(k, v) for k, v in feeds.items()],
                )
            ]
        ),
        timeout=120,
    )
    assert reply.error_code == 0, reply.error_message
    return {t.name: decode_tensor(t) for t in reply.outputs}


@pytest.fixture(scope="module")
def agent_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    data_dir = tmp_path_factory.mktemp("agent")
    proc = ServiceProcess(
        "browser_agent",
        ["--browsers", "1", "--data-dir", str(data_dir), "--coordinators", "127.0.0.1:1"],
        data_dir.parent / "agent.log",
    )
    try:
        proc.wait_serving(timeout=120)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def agent(agent_proc: ServiceProcess) -> Iterator[pb_grpc.BrowserAgentServiceStub]:
    with grpc.insecure_channel(agent_proc.address) as channel:
        yield pb_grpc.BrowserAgentServiceStub(channel)


@pytest.mark.parametrize(
    ("model", "provider", "seq_len"),
    [
        ("minilm-l6", EP.EXECUTION_PROVIDER_WASM, 32),
        ("minilm-l6", EP.EXECUTION_PROVIDER_WEBGPU, 32),
        ("vit-tiny", EP.EXECUTION_PROVIDER_WASM, 0),
        ("whisper-tiny-enc", EP.EXECUTION_PROVIDER_WASM, 0),
    ],
)
def test_a_model_shard_in_the_browser_matches_native(
    agent: pb_grpc.BrowserAgentServiceStub, model: str, provider: int, seq_len: int
) -> None:
    shards = cut_model(model, "layer", 3)
    middle = shards[1]
    feeds = feeds_for(shards, 1, example_inputs(model, seq_len=seq_len or 32, seed=5))
    loaded = agent.LoadShard(upload(middle, provider), timeout=180)
    assert loaded.shard.execution_provider == provider
    assert loaded.browser_id.startswith("browser-")
    got = run_on_agent(agent, loaded.shard.handle, feeds)
    expected = NativeRunner()(middle, feeds)
    for name, value in expected.items():
        assert np.max(np.abs(got[name] - value)) <= 1e-4, name
    agent.UnloadShard(pb.UnloadShardRequest(handle=loaded.shard.handle), timeout=30)


def test_webnn_is_reported_unavailable_and_pinning_it_fails_with_the_reason(
    agent: pb_grpc.BrowserAgentServiceStub,
) -> None:
    status = agent.GetStatus(pb.GetStatusRequest(), timeout=30)
    [browser] = [b for b in status.browsers if b.runtime == common_pb2.RUNTIME_BROWSER]
    webnn = browser.capabilities.webnn
    assert not webnn.available
    assert webnn.reason
    assert EP.EXECUTION_PROVIDER_WEBNN not in browser.capabilities.execution_providers
    assert browser.capabilities.webgpu.available
    assert browser.memory_bytes > 0

    shard = cut_model("vit-tiny", "layer", 2)[0]
    with pytest.raises(grpc.RpcError) as refused:
        agent.LoadShard(upload(shard, EP.EXECUTION_PROVIDER_WEBNN), timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert webnn.reason in (refused.value.details() or "")
    after = agent.GetStatus(pb.GetStatusRequest(), timeout=30)
    assert all(
        s.execution_provider != EP.EXECUTION_PROVIDER_WEBNN
        for b in after.browsers
        for s in b.shards
    )


def test_health_says_serving_only_once_the_browsers_are_up(tmp_path: Path) -> None:
    proc = ServiceProcess(
        "browser_agent",
        ["--browsers", "1", "--data-dir", str(tmp_path / "a"), "--coordinators", "127.0.0.1:1"],
        tmp_path / "agent.log",
    )
    try:
        seen = []
        while (state := health_status(proc.address, timeout=1.0)) != "SERVING":
            assert proc.popen.poll() is None, proc.log.read_text()
            seen.append(state)
        assert "NOT_SERVING" in seen  # the launch takes seconds: it was asked during it
        with grpc.insecure_channel(proc.address) as channel:
            status = pb_grpc.BrowserAgentServiceStub(channel).GetStatus(
                pb.GetStatusRequest(), timeout=10
            )
        assert [b.state for b in status.browsers if b.runtime == common_pb2.RUNTIME_BROWSER] == [
            common_pb2.BROWSER_STATE_READY
        ]
    finally:
        proc.stop()


def test_sigkill_of_the_agent_leaves_no_browser(
    start_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "victim"
    proc = start_service(
        "browser_agent",
        "--browsers",
        "1",
        "--standby-browsers",
        "1",
        "--data-dir",
        str(data_dir),
        "--coordinators",
        "127.0.0.1:1",
        wait=False,
    )
    proc.wait_serving(timeout=180)
    assert browser_processes(data_dir), "the agent's browsers should be running"
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(timeout=10)
    wait_for(lambda: not browser_processes(data_dir), 30, "every browser process to exit")
