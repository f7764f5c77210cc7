"""The agent loads shards by bytes or by hash and runs them on its native runtime."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from webshard.browser_agent.v1 import browser_agent_pb2 as pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as pb_grpc
from webshard.common.v1 import common_pb2
from webshard.tensors import decode_tensor, encode_tensor

from tests.conftest import ServiceProcess

CHUNK = 64 * 1024


def tiny_shard(seed: int = 0) -> bytes:
    """y = gelu(x @ w + b): a one-block shard with float32 weights."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["h"]),
        helper.make_node("Mul", ["h", "h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def header(data: bytes, **kwargs: object) -> pb.LoadShardRequest:
    spec = common_pb2.ShardSpec(
        model="tiny", index=0, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
    )
    return pb.LoadShardRequest(header=pb.LoadShardHeader(shard=spec, **kwargs))  # type: ignore[arg-type]


def upload(data: bytes, **kwargs: object) -> Iterator[pb.LoadShardRequest]:
    yield header(data, **kwargs)
    for start in range(0, len(data), CHUNK):
        yield pb.LoadShardRequest(chunk=data[start : start + CHUNK])


@pytest.fixture
def agent(
    start_service: Callable[..., ServiceProcess],
) -> Iterator[pb_grpc.BrowserAgentServiceStub]:
    proc = start_service("browser_agent", "--browsers", "0", "--coordinators", "127.0.0.1:1")
    with grpc.insecure_channel(proc.address) as channel:
        yield pb_grpc.BrowserAgentServiceStub(channel)


def run(
    stub: pb_grpc.BrowserAgentServiceStub, requests: list[pb.RunShardRequest]
) -> list[pb.RunShardResponse]:
    return list(stub.RunShard(iter(requests), timeout=30))


def test_load_run_reload_by_hash_and_unload(agent: pb_grpc.BrowserAgentServiceStub) -> None:
    data = tiny_shard()
    loaded = agent.LoadShard(upload(data), timeout=30)
    assert not loaded.cached
    assert loaded.browser_id == "native"
    assert loaded.shard.execution_provider == common_pb2.EXECUTION_PROVIDER_CPU
    assert loaded.shard.execution_provider_reason.startswith("cpu:")

    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    [reply] = run(
        agent,
        [
            pb.RunShardRequest(
                handle=loaded.shard.handle,
                request_id="r1",
                sequence=7,
                inputs=[encode_tensor("x", x)],
            )
        ],
    )
    assert reply.error_code == 0, reply.error_message
    assert reply.sequence == 7 and reply.request_id == "r1"
    expected = ort.InferenceSession(data).run(None, {"x": x})[0]
    np.testing.assert_allclose(decode_tensor(reply.outputs[0]), expected, rtol=0, atol=1e-6)

    again = agent.LoadShard(iter([header(data, by_hash_only=True)]), timeout=30)
    assert again.cached
    assert again.shard.handle != loaded.shard.handle

    status = agent.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert hashlib.sha256(data).hexdigest() in status.cached_shard_sha256
    [native] = status.browsers
    assert native.runtime == common_pb2.RUNTIME_NATIVE
    assert native.memory_bytes > 0
    assert {s.handle for s in native.shards} == {loaded.shard.handle, again.shard.handle}

    agent.UnloadShard(pb.UnloadShardRequest(handle=loaded.shard.handle), timeout=10)
    with pytest.raises(grpc.RpcError) as unknown:
        agent.UnloadShard(pb.UnloadShardRequest(handle=loaded.shard.handle), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_shards_are_refused_with_a_reason(agent: pb_grpc.BrowserAgentServiceStub) -> None:
    data = tiny_shard()
    cases = [
        (
            iter([header(b"x" * 10, by_hash_only=True)]),
            grpc.StatusCode.NOT_FOUND,
            "not in this agent's store",
        ),
        (
            iter([header(data), pb.LoadShardRequest(chunk=data[:-1] + b"\x00")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hash to",
        ),
        (
            iter([header(data), pb.LoadShardRequest(chunk=data[:100])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "received 100 bytes",
        ),
        (
            iter([pb.LoadShardRequest(chunk=b"abc")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "must start with a header",
        ),
        (
            upload(data, execution_provider=common_pb2.EXECUTION_PROVIDER_WEBGPU),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CPU provider only",
        ),
        (upload(data, browser_id="browser-9"), grpc.StatusCode.NOT_FOUND, "no browser 'browser-9'"),
    ]
    garbage = b"this is not an onnx model" * 10
    cases.append((upload(garbage), grpc.StatusCode.INVALID_ARGUMENT, "could not load the shard"))
    for requests, code, message in cases:
        with pytest.raises(grpc.RpcError) as refused:
            agent.LoadShard(requests, timeout=30)
        assert refused.value.code() == code, refused.value.details()
        assert message in refused.value.details()
    assert agent.GetStatus(pb.GetStatusRequest(), timeout=10).browsers[0].shards == []


def test_a_bad_activation_fails_alone_and_the_stream_keeps_serving(
    agent: pb_grpc.BrowserAgentServiceStub,
) -> None:
    loaded = agent.LoadShard(upload(tiny_shard()), timeout=30)
    handle = loaded.shard.handle
    good = encode_tensor("x", np.ones((1, 32), np.float32))
    replies = run(
        agent,
        [
            pb.RunShardRequest(handle="nope", sequence=1, inputs=[good]),
            pb.RunShardRequest(
                handle=handle, sequence=2, inputs=[encode_tensor("x", np.ones((1, 31), np.float32))]
            ),
            pb.RunShardRequest(
                handle=handle, sequence=3, inputs=[encode_tensor("z", np.ones((1, 32), np.float32))]
            ),
            pb.RunShardRequest(
                handle=handle,
                sequence=4,
                inputs=[
                    common_pb2.Tensor(
                        name="x",
                        dtype=common_pb2.DATA_TYPE_FLOAT32,
                        shape=[1, 32],
                        data=b"\x00" * 5,
                    )
                ],
            ),
            pb.RunShardRequest(handle=handle, sequence=5, inputs=[good]),
        ],
    )
    by_sequence = {r.sequence: r for r in replies}
    assert by_sequence[1].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert by_sequence[2].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_sequence[3].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "missing input tensor(s) x" in by_sequence[3].error_message
    assert by_sequence[4].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "needs 128 bytes" in by_sequence[4].error_message
    assert by_sequence[5].error_code == 0
    assert list(decode_tensor(by_sequence[5].outputs[0]).shape) == [1, 64]
