"""The SDK's hand-written client layer against real in-process gRPC servers.

Each test starts ``grpc.aio`` servers on loopback with small servicers built
on the generated ``*Servicer`` classes, so the wire, the deadlines, the
service-config retries and the trailing metadata are all real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest
import webshard
import webshard.aio
import webshard.tensors
from google.protobuf import any_pb2, duration_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from webshard.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RPCError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from webshard.fault_injector.v1 import fault_injector_pb2, fault_injector_pb2_grpc
from webshard.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from webshard.options import KeepaliveOptions, RetryPolicy
from webshard.recovery.v1 import recovery_pb2, recovery_pb2_grpc

# Retries fast enough for tests; still exercises the channel's retry policy.
FAST_RETRY = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)

CONTEXT = grpc.aio.ServicerContext[Any, Any]


# --------------------------------------------------------------------------- servers


class Server:
    """A grpc.aio server on a free loopback port."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """Starts servers with the servicers given; all stop at teardown."""
    started: list[Server] = []

    async def start(*adders: Callable[[grpc.aio.Server], None]) -> Server:
        server = Server()
        for add in adders:
            add(server.server)
        await server.server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.server.stop(None)


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A loopback address that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def duration_ms(ms: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(ms * 1e6))
    return duration


# The outputs the fake coordinator returns, written with struct so that the
# servers need no numpy; only tensor decoding does.
OUTPUT_VALUES: dict[str, list[Any]] = {
    "embedding": [i / 7 for i in range(6)],
    "tokens": [101, 2023, 102],
    "mask": [True, True, False],
    "half": [0.5, -1.25],
    "positions": [7, 8],
}
OUTPUT_TENSORS = [
    common_pb2.Tensor(
        name="embedding",
        dtype=common_pb2.DATA_TYPE_FLOAT32,
        shape=[2, 3],
        data=struct.pack("<6f", *OUTPUT_VALUES["embedding"]),
    ),
    common_pb2.Tensor(
        name="tokens",
        dtype=common_pb2.DATA_TYPE_INT64,
        shape=[1, 3],
        data=struct.pack("<3q", *OUTPUT_VALUES["tokens"]),
    ),
    common_pb2.Tensor(
        name="mask",
        dtype=common_pb2.DATA_TYPE_BOOL,
        shape=[1, 3],
        data=struct.pack("<3?", *OUTPUT_VALUES["mask"]),
    ),
    common_pb2.Tensor(
        name="half",
        dtype=common_pb2.DATA_TYPE_FLOAT16,
        shape=[2],
        data=struct.pack("<2e", *OUTPUT_VALUES["half"]),
    ),
    common_pb2.Tensor(
        name="positions",
        dtype=common_pb2.DATA_TYPE_INT32,
        shape=[2],
        data=struct.pack("<2i", *OUTPUT_VALUES["positions"]),
    ),
]
# A model whose answers carry tensors; the others answer with the trail only,
# so the tests of routing and errors run without numpy.
TENSOR_MODEL = "tensors"


@pytest.fixture
def np() -> ModuleType:
    """numpy, or a skip: the SDK needs it only to send or receive tensors."""
    module: ModuleType = pytest.importorskip("numpy")
    return module


class Coordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """One coordinator replica: a leader, or a follower naming ``leader``."""

    def __init__(self, name: str, *, leader: str | None = None) -> None:
        self.name = name
        self.leader = leader
        self.unavailable = False
        self.electing_answers = 0
        self.watch: tuple[int, asyncio.Event] | None = None
        """(n, event): set the event once n calls have arrived."""
        self.calls: list[str] = []
        self.time_remaining: list[float | None] = []
        self.requests: list[Any] = []

    async def _enter(self, method: str, request: Any, context: CONTEXT) -> None:
        self.calls.append(method)
        if self.watch is not None and len(self.calls) >= self.watch[0]:
            self.watch[1].set()
        self.time_remaining.append(context.time_remaining())
        self.requests.append(request)
        if self.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is draining")
        if self.electing_answers:
            self.electing_answers -= 1
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.name} knows no leader yet",
                trailing_metadata=(("webshard-leader", ""),),
            )
        if self.leader is not None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.name} is a follower",
                trailing_metadata=(("webshard-leader", self.leader),),
            )

    async def AgentSession(
        self, request_iterator: Any, context: CONTEXT
    ) -> AsyncIterator[coordinator_pb2.AgentSessionResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the SDK")
        yield coordinator_pb2.AgentSessionResponse()

    async def InferStream(
        self, request_iterator: Any, context: CONTEXT
    ) -> AsyncIterator[coordinator_pb2.InferStreamResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the SDK")
        yield coordinator_pb2.InferStreamResponse()

    async def ClusterStatus(
        self, request: coordinator_pb2.ClusterStatusRequest, context: CONTEXT
    ) -> coordinator_pb2.ClusterStatusResponse:
        await self._enter("ClusterStatus", request, context)
        return coordinator_pb2.ClusterStatusResponse(replica_id=self.name, leader_id=self.name)

    async def ListAgents(
        self, request: coordinator_pb2.ListAgentsRequest, context: CONTEXT
    ) -> coordinator_pb2.ListAgentsResponse:
        await self._enter("ListAgents", request, context)
        agents = [common_pb2.AgentInfo(agent_id="agent-1", healthy=True)]
        if request.include_unhealthy:
            agents.append(common_pb2.AgentInfo(agent_id="agent-2", healthy=False))
        return coordinator_pb2.ListAgentsResponse(agents=agents)

    async def DeployModel(
        self, request: coordinator_pb2.DeployModelRequest, context: CONTEXT
    ) -> coordinator_pb2.DeployModelResponse:
        await self._enter("DeployModel", request, context)
        placement = coordinator_pb2.Placement(
            model=request.model, sharding=request.sharding, version=1, runtime=request.runtime
        )
        return coordinator_pb2.DeployModelResponse(placement=placement)

    async def GetPlacement(
        self, request: coordinator_pb2.GetPlacementRequest, context: CONTEXT
    ) -> coordinator_pb2.GetPlacementResponse:
        await self._enter("GetPlacement", request, context)
        await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not deployed")

    async def UndeployModel(
        self, request: coordinator_pb2.UndeployModelRequest, context: CONTEXT
    ) -> coordinator_pb2.UndeployModelResponse:
        await self._enter("UndeployModel", request, context)
        return coordinator_pb2.UndeployModelResponse(unloaded_shards=4)

    async def Infer(
        self, request: coordinator_pb2.InferRequest, context: CONTEXT
    ) -> coordinator_pb2.InferResponse:
        await self._enter("Infer", request, context)
        if request.model == "missing":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "model 'missing' is not deployed; deploy it first"
            )
        return coordinator_pb2.InferResponse(
            request_id=request.request_id,
            outputs=OUTPUT_TENSORS if request.model == TENSOR_MODEL else [],
            trail=[
                common_pb2.ShardTiming(
                    shard_index=0,
                    agent_id="agent-1",
                    browser_id="b0",
                    execution_provider=common_pb2.EXECUTION_PROVIDER_WASM,
                    compute=duration_ms(12.5),
                    hop=duration_ms(14.0),
                    attempts=1,
                ),
                common_pb2.ShardTiming(
                    shard_index=1,
                    agent_id="agent-2",
                    browser_id="b1",
                    execution_provider=common_pb2.EXECUTION_PROVIDER_WEBGPU,
                    compute=duration_ms(600),
                    hop=duration_ms(650.25),
                    attempts=2,
                ),
            ],
            total=duration_ms(700),
            recovered=True,
        )


def coordinator_adder(servicer: Coordinator) -> Callable[[grpc.aio.Server], None]:
    return lambda server: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        servicer, server
    )


# --------------------------------------------------------------------------- options


def test_retry_policy_becomes_service_config() -> None:
    config = json.loads(
        RetryPolicy().service_config([("webshard.coordinator.v1.CoordinatorService", "Infer")])
    )
    (method_config,) = config["methodConfig"]
    assert method_config["name"] == [
        {"service": "webshard.coordinator.v1.CoordinatorService", "method": "Infer"}
    ]
    assert method_config["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    # One attempt means no retries: gRPC rejects a policy with fewer than two.
    single = json.loads(RetryPolicy(max_attempts=1).service_config([("s", "m")]))
    assert single == {"methodConfig": []}


def test_only_idempotent_methods_are_retried() -> None:
    client = webshard.aio.Client()
    args = dict(client._transport._channel_args)
    names = {
        (entry["service"], entry["method"])
        for entry in json.loads(args["grpc.service_config"])["methodConfig"][0]["name"]
    }
    service = "webshard.coordinator.v1.CoordinatorService"
    assert (service, "Infer") in names
    assert (service, "ClusterStatus") in names
    assert (service, "DeployModel") in names  # it carries a request id
    assert (service, "UndeployModel") not in names
    assert ("grpc.health.v1.Health", "Check") in names
    assert args["grpc.enable_retries"] == 1
    assert args["grpc.keepalive_time_ms"] == 20_000


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="at least 5 s"):
        KeepaliveOptions(time_s=1)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="no address"):
        webshard.aio.Client(" , ")
    with pytest.raises(ValueError, match="timeout"):
        webshard.aio.Client(timeout=0)


def test_target_lists_are_split_and_deduplicated() -> None:
    client = webshard.aio.Client("a:1, b:2,a:1")
    assert client.addresses == ("a:1", "b:2")
    assert client.address == "a:1"
    assert webshard.aio.Client(["a:1", "b:2,c:3"]).addresses == ("a:1", "b:2", "c:3")


# --------------------------------------------------------------------------- coordinator


async def test_every_call_carries_a_deadline(serve: Callable[..., Awaitable[Server]]) -> None:
    replica = Coordinator("c0")
    server = await serve(coordinator_adder(replica))
    async with webshard.aio.Client(server.address, timeout=7.0) as client:
        await client.cluster_status()
        await client.list_agents(include_unhealthy=True)
        await client.deploy("minilm-l6")
        await client.undeploy("minilm-l6", timeout=2.5)
        await client.infer("minilm-l6", texts="hello")
    assert replica.calls == ["ClusterStatus", "ListAgents", "DeployModel", "UndeployModel", "Infer"]
    # gRPC encodes a deadline with a few significant digits, rounding it up, so
    # the server may see slightly more than was asked for.
    slack = 0.1
    for remaining in replica.time_remaining:
        assert remaining is not None
        assert 0 < remaining <= 7.0 + slack
    undeploy = replica.time_remaining[3]
    assert undeploy is not None and undeploy <= 2.5 + slack


async def test_follower_redirects_to_leader_and_client_stays_there(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    leader = Coordinator("leader")
    leader_server = await serve(coordinator_adder(leader))
    follower = Coordinator("follower", leader=leader_server.address)
    follower_server = await serve(coordinator_adder(follower))

    # Only the follower is known: the leader's address is learned from the redirect.
    async with webshard.aio.Client(follower_server.address) as client:
        placement = await client.deploy("minilm-l6", shards=2)
        assert placement.model == "minilm-l6"
        assert follower.calls == ["DeployModel"]
        assert leader.calls == ["DeployModel"]
        assert client.address == leader_server.address
        assert leader_server.address in client.addresses

        status = await client.cluster_status()
        assert status.replica_id == "leader"
        await client.undeploy("minilm-l6")
        assert follower.calls == ["DeployModel"], "later calls go straight to the leader"
        assert leader.calls == ["DeployModel", "ClusterStatus", "UndeployModel"]


class RecordingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Records each unary call's method."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        method = client_call_details.method
        self.methods.append(method.decode() if isinstance(method, bytes) else method)
        return await continuation(client_call_details, request)


async def test_interceptors_wrap_every_channel_the_client_makes(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    leader = Coordinator("leader")
    leader_server = await serve(coordinator_adder(leader))
    follower = Coordinator("follower", leader=leader_server.address)
    follower_server = await serve(coordinator_adder(follower))
    recording = RecordingInterceptor()
    async with webshard.aio.Client(follower_server.address, interceptors=[recording]) as client:
        await client.deploy("minilm-l6")
    # The follower's channel and the leader's, made after the redirect, both intercept.
    assert (follower.calls, leader.calls) == (["DeployModel"], ["DeployModel"])
    assert recording.methods == ["/webshard.coordinator.v1.CoordinatorService/DeployModel"] * 2


async def test_redirects_are_bounded(serve: Callable[..., Awaitable[Server]]) -> None:
    a = Coordinator("a")
    b = Coordinator("b")
    server_a = await serve(coordinator_adder(a))
    server_b = await serve(coordinator_adder(b))
    # Two followers naming each other, as during a confused election.
    a.leader, b.leader = server_b.address, server_a.address
    async with webshard.aio.Client([server_a.address, server_b.address]) as client:
        with pytest.raises(FailedPreconditionError, match="follower") as caught:
            await client.deploy("minilm-l6")
    assert caught.value.metadata_value("webshard-leader") in (server_a.address, server_b.address)
    # At most len(replicas) + 2 redirects, so at most that many + 1 attempts.
    assert len(a.calls) + len(b.calls) <= 2 + 2 + 1


async def test_a_call_waits_out_an_election_within_its_deadline(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    electing = Coordinator("electing")
    server = await serve(coordinator_adder(electing))
    electing.electing_answers = 3  # "no leader known yet" three times, then it leads
    async with webshard.aio.Client([server.address], timeout=10.0) as client:
        placement = await client.deploy("minilm-l6")
    assert placement.model == "minilm-l6"
    assert electing.calls == ["DeployModel"] * 4


async def test_a_redirect_to_a_dead_leader_waits_for_the_new_one(
    serve: Callable[..., Awaitable[Server]], dead_address: str
) -> None:
    # The follower still names the leader that died; after a while it names the new one.
    follower = Coordinator("follower", leader=dead_address)
    server = await serve(coordinator_adder(follower))
    new_leader = Coordinator("new-leader")
    leader_server = await serve(coordinator_adder(new_leader))
    async with webshard.aio.Client([dead_address, server.address], timeout=10.0) as client:
        task = asyncio.create_task(client.deploy("minilm-l6"))
        # Far past the redirect budget, the call is still waiting for a leader.
        eighth = asyncio.Event()
        follower.watch = (8, eighth)
        await asyncio.wait_for(eighth.wait(), 10)
        assert not task.done()
        follower.leader = leader_server.address
        placement = await task
    assert placement.model == "minilm-l6"
    assert new_leader.calls == ["DeployModel"]


async def test_fails_over_past_a_replica_that_is_down(
    serve: Callable[..., Awaitable[Server]], dead_address: str
) -> None:
    live = Coordinator("live")
    server = await serve(coordinator_adder(live))
    async with webshard.aio.Client([dead_address, server.address], timeout=5.0) as client:
        status = await client.cluster_status()
        assert status.replica_id == "live"
        assert client.address == server.address
    # A write also moves on, because nothing was sent to the replica that refused.
    async with webshard.aio.Client(f"{dead_address},{server.address}", timeout=5.0) as client:
        placement = await client.deploy("minilm-l6")
        assert placement.model == "minilm-l6"
    assert live.calls == ["ClusterStatus", "DeployModel"]


async def test_unavailable_replica_is_retried_then_left_for_idempotent_calls_only(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    draining = Coordinator("draining")
    draining.unavailable = True
    healthy = Coordinator("healthy")
    server_a = await serve(coordinator_adder(draining))
    server_b = await serve(coordinator_adder(healthy))
    async with webshard.aio.Client(
        [server_a.address, server_b.address], retry=FAST_RETRY
    ) as client:
        status = await client.cluster_status()
        assert status.replica_id == "healthy"
        # The channel's retry policy tried the draining replica twice first.
        assert draining.calls == ["ClusterStatus", "ClusterStatus"]

    async with webshard.aio.Client(
        [server_a.address, server_b.address], retry=FAST_RETRY
    ) as client:
        with pytest.raises(UnavailableError, match="draining"):
            await client.undeploy("minilm-l6")
        # A deploy carries a request id, so it is retried and moves on like a read.
        await client.deploy("minilm-l6")
    # A write without a request id that reached a replica is neither retried nor sent elsewhere.
    assert draining.calls.count("UndeployModel") == 1
    assert "UndeployModel" not in healthy.calls
    assert "DeployModel" in healthy.calls


async def test_errors_are_typed(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(coordinator_adder(Coordinator("c0")))
    async with webshard.aio.Client(server.address) as client:
        with pytest.raises(InvalidArgumentError) as invalid:
            await client.infer("missing", texts=["hello"])
        with pytest.raises(NotFoundError) as missing:
            await client.placement("nope")
    assert invalid.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.message == "model 'missing' is not deployed; deploy it first"
    assert str(invalid.value).startswith("INVALID_ARGUMENT: ")
    assert not isinstance(invalid.value, grpc.RpcError)
    assert missing.value.message == "model 'nope' is not deployed"
    assert isinstance(missing.value, RPCError)


async def test_rich_error_details_are_decoded(serve: Callable[..., Awaitable[Server]]) -> None:
    status_pb2 = pytest.importorskip("google.rpc.status_pb2")
    detail = any_pb2.Any()
    detail.Pack(common_pb2.ShardSpec(model="minilm-l6", index=3))
    status = status_pb2.Status(code=5, message="shard 3 is gone", details=[detail])

    class Failing(Coordinator):
        async def ListAgents(
            self, request: coordinator_pb2.ListAgentsRequest, context: CONTEXT
        ) -> coordinator_pb2.ListAgentsResponse:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "shard 3 is gone",
                trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
            )

    server = await serve(coordinator_adder(Failing("c0")))
    async with webshard.aio.Client(server.address) as client:
        with pytest.raises(NotFoundError) as caught:
            await client.list_agents()
    (any_detail,) = caught.value.details
    spec = common_pb2.ShardSpec()
    assert any_detail.Unpack(spec)
    assert spec.index == 3


def test_from_rpc_error_maps_codes() -> None:
    raw = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("webshard-leader", "x:1")),
        details="missing token",
    )
    error = from_rpc_error(raw)
    assert isinstance(error, UnauthenticatedError)
    assert error.message == "missing token"
    assert error.metadata_value("webshard-leader") == "x:1"
    other = from_rpc_error(
        grpc.aio.AioRpcError(grpc.StatusCode.DATA_LOSS, grpc.aio.Metadata(), grpc.aio.Metadata())
    )
    assert type(other) is RPCError
    assert other.code is grpc.StatusCode.DATA_LOSS


async def test_infer_decodes_outputs_and_trail(
    serve: Callable[..., Awaitable[Server]], np: Any
) -> None:
    replica = Coordinator("c0")
    server = await serve(coordinator_adder(replica))
    tokens = np.array([[101, 2023, 102]], dtype=np.int64)
    mask = np.array([[True, True, False]])
    async with webshard.aio.Client(server.address) as client:
        result = await client.infer(
            TENSOR_MODEL,
            inputs={"input_ids": tokens, "attention_mask": mask},
            request_id="req-42",
        )
    assert result.request_id == "req-42"
    outputs = result.outputs
    expected_embedding = np.arange(6, dtype=np.float32).reshape(2, 3) / np.float32(7)
    np.testing.assert_array_equal(outputs["embedding"], expected_embedding)
    assert outputs["embedding"].dtype == np.float32
    np.testing.assert_array_equal(outputs["tokens"], tokens)
    assert outputs["tokens"].dtype == np.int64
    np.testing.assert_array_equal(outputs["mask"], mask)
    assert outputs["mask"].dtype == np.bool_
    np.testing.assert_array_equal(outputs["half"], np.array([0.5, -1.25], dtype=np.float16))
    assert outputs["half"].dtype == np.float16
    np.testing.assert_array_equal(outputs["positions"], np.array([7, 8], dtype=np.int32))
    assert outputs["positions"].dtype == np.int32
    assert outputs["embedding"].flags.writeable
    assert result.total_ms == pytest.approx(700)
    assert result.recovered is True
    assert [hop.execution_provider for hop in result.trail] == ["wasm", "webgpu"]
    first, second = result.trail
    assert (first.shard_index, first.agent_id, first.browser_id) == (0, "agent-1", "b0")
    assert first.compute_ms == pytest.approx(12.5)
    assert second.hop_ms == pytest.approx(650.25)
    assert second.attempts == 2

    (request,) = replica.requests
    sent = {tensor.name: tensor for tensor in request.inputs}
    assert sent["input_ids"].dtype == common_pb2.DATA_TYPE_INT64
    assert list(sent["input_ids"].shape) == [1, 3]
    assert sent["input_ids"].data == struct.pack("<3q", 101, 2023, 102)
    assert sent["attention_mask"].dtype == common_pb2.DATA_TYPE_BOOL


async def test_infer_request_id_is_generated_and_passed_through(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    replica = Coordinator("c0")
    server = await serve(coordinator_adder(replica))
    async with webshard.aio.Client(server.address) as client:
        first = await client.infer("minilm-l6", texts=["a", "b"])
        second = await client.infer("minilm-l6", texts=["a"])
        third = await client.infer("minilm-l6", texts=["a"], request_id="mine")
    sent = [request.request_id for request in replica.requests]
    assert len(sent[0]) == 32 and int(sent[0], 16) >= 0, "a uuid4 hex"
    assert sent[0] != sent[1]
    assert sent[2] == "mine"
    assert [first.request_id, second.request_id, third.request_id] == sent
    assert list(replica.requests[0].texts) == ["a", "b"]


async def test_deploy_maps_option_strings_to_enums(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    replica = Coordinator("c0")
    server = await serve(coordinator_adder(replica))
    async with webshard.aio.Client(server.address) as client:
        await client.deploy(
            "clip",
            sharding="attention_feedforward",
            shards=4,
            replicas=2,
            standby=1,
            runtime="browser",
            ep="webgpu",
            recovery_strategy="progressive",
        )
        await client.deploy("minilm-l6")
    explicit, defaults = replica.requests
    assert explicit.sharding == common_pb2.SHARDING_STRATEGY_ATTENTION_FEEDFORWARD
    assert (explicit.shard_count, explicit.replicas, explicit.standby_count) == (4, 2, 1)
    assert explicit.runtime == common_pb2.RUNTIME_BROWSER
    assert explicit.execution_provider == common_pb2.EXECUTION_PROVIDER_WEBGPU
    assert explicit.recovery_strategy == common_pb2.RECOVERY_STRATEGY_PROGRESSIVE
    assert defaults.sharding == common_pb2.SHARDING_STRATEGY_LAYER
    assert defaults.runtime == common_pb2.RUNTIME_UNSPECIFIED
    assert defaults.execution_provider == common_pb2.EXECUTION_PROVIDER_UNSPECIFIED


async def test_unknown_option_strings_raise_before_sending() -> None:
    client = webshard.aio.Client("127.0.0.1:1")
    with pytest.raises(ValueError, match="layer, attention_feedforward, component"):
        await client.deploy("m", sharding="diagonal")
    with pytest.raises(ValueError, match="webgpu, webnn, wasm, cpu"):
        await client.deploy("m", ep="cuda")
    with pytest.raises(ValueError, match="native, browser"):
        await client.deploy("m", runtime="unspecified")
    with pytest.raises(ValueError, match="texts or inputs"):
        await client.infer("m")
    await client.close()


def test_tensors_need_numpy_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(ImportError, match="pip install numpy"):
        webshard.tensors.decode_tensor(
            common_pb2.Tensor(name="x", dtype=common_pb2.DATA_TYPE_INT32)
        )


async def test_unsupported_input_dtype_is_refused(np: Any) -> None:
    client = webshard.aio.Client("127.0.0.1:1")
    with pytest.raises(ValueError, match="float32, float16, int64, int32 or bool"):
        await client.infer("m", inputs={"x": np.zeros(2, dtype=np.float64)})
    await client.close()


def test_malformed_tensor_is_refused(np: Any) -> None:
    tensor = common_pb2.Tensor(
        name="x", dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12
    )
    with pytest.raises(ValueError, match="needs 16 bytes, got 12"):
        webshard.tensors.decode_tensor(tensor)


async def test_check_health(serve: Callable[..., Awaitable[Server]]) -> None:
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set(
        "webshard.coordinator.v1.CoordinatorService", health_pb2.HealthCheckResponse.NOT_SERVING
    )
    server = await serve(lambda s: health_pb2_grpc.add_HealthServicer_to_server(servicer, s))
    async with webshard.aio.Client(server.address) as client:
        assert await client.check_health() is True
        assert (
            await client.check_health(service="webshard.coordinator.v1.CoordinatorService") is False
        )
        with pytest.raises(NotFoundError):
            await client.check_health(service="nope.v1.Nope")
    with webshard.Client(server.address) as sync_client:
        assert await asyncio.to_thread(sync_client.check_health) is True


# --------------------------------------------------------------------------- sync client


async def test_sync_client_behaves_the_same(serve: Callable[..., Awaitable[Server]]) -> None:
    leader = Coordinator("leader")
    leader_server = await serve(coordinator_adder(leader))
    follower = Coordinator("follower", leader=leader_server.address)
    follower_server = await serve(coordinator_adder(follower))

    def use() -> None:
        with webshard.Client(follower_server.address, timeout=4.0) as client:
            client.deploy("minilm-l6")
            assert client.address == leader_server.address
            assert client.cluster_status().replica_id == "leader"
            result = client.infer("minilm-l6", texts="hi")
            assert result.outputs == {}
            assert result.total_ms == pytest.approx(700)
            assert [hop.execution_provider for hop in result.trail] == ["wasm", "webgpu"]
            assert len(result.request_id) == 32
            with pytest.raises(InvalidArgumentError, match="deploy it first"):
                client.infer("missing", texts="hi")
        with pytest.raises(RuntimeError, match="closed"):
            client.cluster_status()

    # The servers run on this test's event loop; the sync client blocks, so
    # it runs in a worker thread.
    await asyncio.to_thread(use)
    assert follower.calls == ["DeployModel"]
    assert leader.calls == ["DeployModel", "ClusterStatus", "Infer", "Infer"]
    assert all(r is not None and r <= 4.1 for r in leader.time_remaining)


# --------------------------------------------------------------------------- other services


class FaultInjector(fault_injector_pb2_grpc.FaultInjectorServiceServicer):
    """Requires a token; records injected specs; streams two changes per watch."""

    def __init__(self) -> None:
        self.specs: list[fault_injector_pb2.InjectFaultRequest] = []
        self.watch_cancelled = asyncio.Event()

    async def _authorize(self, context: CONTEXT) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != "Bearer s3cret":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a fault token is required")

    async def InjectFault(
        self, request: fault_injector_pb2.InjectFaultRequest, context: CONTEXT
    ) -> fault_injector_pb2.InjectFaultResponse:
        await self._authorize(context)
        self.specs.append(request)
        state = (
            fault_injector_pb2.FAULT_STATE_DRY_RUN
            if request.spec.dry_run
            else fault_injector_pb2.FAULT_STATE_ACTIVE
        )
        fault = fault_injector_pb2.Fault(fault_id="f-1", spec=request.spec, state=state)
        return fault_injector_pb2.InjectFaultResponse(fault=fault)

    async def GetFault(
        self, request: fault_injector_pb2.GetFaultRequest, context: CONTEXT
    ) -> fault_injector_pb2.GetFaultResponse:
        await self._authorize(context)
        if request.fault_id != "f-1":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no fault {request.fault_id!r}")
        fault = fault_injector_pb2.Fault(
            fault_id="f-1", state=fault_injector_pb2.FAULT_STATE_ACTIVE
        )
        return fault_injector_pb2.GetFaultResponse(fault=fault)

    async def RevertFault(
        self, request: fault_injector_pb2.RevertFaultRequest, context: CONTEXT
    ) -> fault_injector_pb2.RevertFaultResponse:
        await self._authorize(context)
        fault = fault_injector_pb2.Fault(
            fault_id=request.fault_id, state=fault_injector_pb2.FAULT_STATE_REVERTED
        )
        return fault_injector_pb2.RevertFaultResponse(fault=fault)

    async def RevertAll(
        self, request: fault_injector_pb2.RevertAllRequest, context: CONTEXT
    ) -> fault_injector_pb2.RevertAllResponse:
        await self._authorize(context)
        return fault_injector_pb2.RevertAllResponse(reverted=3)

    async def ListFaults(
        self, request: fault_injector_pb2.ListFaultsRequest, context: CONTEXT
    ) -> fault_injector_pb2.ListFaultsResponse:
        await self._authorize(context)
        faults = [
            fault_injector_pb2.Fault(fault_id=f"f-{state}", state=state) for state in request.states
        ]
        return fault_injector_pb2.ListFaultsResponse(faults=faults)

    async def WatchFaults(
        self, request: fault_injector_pb2.WatchFaultsRequest, context: CONTEXT
    ) -> AsyncIterator[fault_injector_pb2.WatchFaultsResponse]:
        await self._authorize(context)
        try:
            for state in (
                fault_injector_pb2.FAULT_STATE_ACTIVE,
                fault_injector_pb2.FAULT_STATE_REVERTED,
            ):
                yield fault_injector_pb2.WatchFaultsResponse(
                    fault=fault_injector_pb2.Fault(fault_id="f-1", state=state)
                )
            if request.include_existing:
                return
            # Without include_existing the watch stays open until the client leaves.
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # The client may leave while the second change is still being sent.
            self.watch_cancelled.set()
            raise


async def test_fault_injector_client(serve: Callable[..., Awaitable[Server]]) -> None:
    servicer = FaultInjector()
    server = await serve(
        lambda s: fault_injector_pb2_grpc.add_FaultInjectorServiceServicer_to_server(servicer, s)
    )
    async with webshard.aio.FaultInjectorClient(server.address) as anonymous:
        with pytest.raises(UnauthenticatedError, match="token"):
            await anonymous.revert_all()

    async with webshard.aio.FaultInjectorClient(server.address, token="s3cret") as client:
        fault = await client.inject(
            kind="browser_crash",
            intensity="severe",
            target="agent:agent-1",
            duration_s=30,
            labels={"run_id": "r1"},
        )
        assert fault.state == fault_injector_pb2.FAULT_STATE_ACTIVE
        spec = servicer.specs[0].spec
        assert spec.kind == common_pb2.FAULT_KIND_BROWSER_CRASH
        assert spec.intensity == common_pb2.INTENSITY_SEVERE
        assert spec.target.kind == fault_injector_pb2.TARGET_KIND_AGENT
        assert list(spec.target.ids) == ["agent-1"]
        assert spec.target.mode == fault_injector_pb2.SELECTOR_MODE_ALL
        assert spec.duration.seconds == 30
        assert dict(spec.labels) == {"run_id": "r1"}

        whole = fault_injector_pb2.FaultSpec(
            kind=common_pb2.FAULT_KIND_LEADER_LOSS,
            intensity=common_pb2.INTENSITY_MILD,
            target=webshard.target_selector("replica", mode="all"),
        )
        dry = await client.inject(whole, dry_run=True, force=True)
        assert dry.state == fault_injector_pb2.FAULT_STATE_DRY_RUN
        assert servicer.specs[1].force is True
        with pytest.raises(ValueError, match="valid values"):
            await client.inject(kind="meteor_strike")

        assert (await client.get_fault("f-1")).state == fault_injector_pb2.FAULT_STATE_ACTIVE
        with pytest.raises(NotFoundError, match="no fault 'f-9'"):
            await client.get_fault("f-9")
        reverted = await client.revert("f-1")
        assert reverted.state == fault_injector_pb2.FAULT_STATE_REVERTED
        assert await client.revert_all() == 3
        listed = await client.list_faults(states=["active", "refused"])
        assert [f.state for f in listed] == [
            fault_injector_pb2.FAULT_STATE_ACTIVE,
            fault_injector_pb2.FAULT_STATE_REFUSED,
        ]

        changes = [f.state async for f in client.watch_faults(include_existing=True)]
        assert changes == [
            fault_injector_pb2.FAULT_STATE_ACTIVE,
            fault_injector_pb2.FAULT_STATE_REVERTED,
        ]
        # Leaving an open watch early cancels it on the server.
        async with contextlib.aclosing(client.watch_faults()) as watch:
            async for change in watch:
                assert change.fault_id == "f-1"
                break
        await asyncio.wait_for(servicer.watch_cancelled.wait(), timeout=5)
        servicer.watch_cancelled.clear()

    def use_sync() -> list[int]:
        with webshard.FaultInjectorClient(server.address, token="s3cret") as sync_client:
            assert sync_client.revert_all() == 3
            open_watch = sync_client.watch_faults()
            assert next(open_watch).fault_id == "f-1"
            open_watch.close()
            return [f.state for f in sync_client.watch_faults(include_existing=True)]

    assert await asyncio.to_thread(use_sync) == changes
    await asyncio.wait_for(servicer.watch_cancelled.wait(), timeout=5)


class Recovery(recovery_pb2_grpc.RecoveryServiceServicer):
    def __init__(self) -> None:
        self.breaker_requests: list[Any] = []

    async def ReportFailure(
        self, request: recovery_pb2.ReportFailureRequest, context: CONTEXT
    ) -> recovery_pb2.ReportFailureResponse:
        return recovery_pb2.ReportFailureResponse(
            recovery_id=f"r-{request.report.agent_id}-{request.strategy}"
        )

    async def GetRecovery(
        self, request: recovery_pb2.GetRecoveryRequest, context: CONTEXT
    ) -> recovery_pb2.GetRecoveryResponse:
        recovery = recovery_pb2.Recovery(
            recovery_id=request.recovery_id, state=recovery_pb2.RECOVERY_STATE_SUCCEEDED
        )
        return recovery_pb2.GetRecoveryResponse(recovery=recovery)

    async def ListRecoveries(
        self, request: recovery_pb2.ListRecoveriesRequest, context: CONTEXT
    ) -> recovery_pb2.ListRecoveriesResponse:
        recoveries = [recovery_pb2.Recovery(recovery_id=f"r-{i}") for i in range(request.limit)]
        return recovery_pb2.ListRecoveriesResponse(recoveries=recoveries)

    async def ListBreakers(
        self, request: recovery_pb2.ListBreakersRequest, context: CONTEXT
    ) -> recovery_pb2.ListBreakersResponse:
        breaker = recovery_pb2.Breaker(target_id="agent-1", state=common_pb2.BREAKER_STATE_CLOSED)
        return recovery_pb2.ListBreakersResponse(breakers=[breaker])

    async def ResetBreaker(
        self, request: recovery_pb2.ResetBreakerRequest, context: CONTEXT
    ) -> recovery_pb2.ResetBreakerResponse:
        self.breaker_requests.append(request)
        breaker = recovery_pb2.Breaker(
            scope=request.scope, target_id=request.target_id, state=common_pb2.BREAKER_STATE_CLOSED
        )
        return recovery_pb2.ResetBreakerResponse(breaker=breaker)

    async def GetBreaker(
        self, request: recovery_pb2.GetBreakerRequest, context: CONTEXT
    ) -> recovery_pb2.GetBreakerResponse:
        self.breaker_requests.append(request)
        return recovery_pb2.GetBreakerResponse(
            breaker=recovery_pb2.Breaker(
                scope=request.scope,
                target_id=request.target_id,
                state=common_pb2.BREAKER_STATE_OPEN,
            )
        )

    async def WatchRecoveries(
        self, request: recovery_pb2.WatchRecoveriesRequest, context: CONTEXT
    ) -> AsyncIterator[recovery_pb2.WatchRecoveriesResponse]:
        yield recovery_pb2.WatchRecoveriesResponse(
            recovery=recovery_pb2.Recovery(
                recovery_id="r-1", state=recovery_pb2.RECOVERY_STATE_RUNNING
            )
        )
        # Then nothing more: the watch ends at the caller's timeout.
        await asyncio.Event().wait()


async def test_recovery_client(serve: Callable[..., Awaitable[Server]]) -> None:
    servicer = Recovery()
    server = await serve(
        lambda s: recovery_pb2_grpc.add_RecoveryServiceServicer_to_server(servicer, s)
    )
    async with webshard.aio.RecoveryClient(server.address) as client:
        report = recovery_pb2.FailureReport(
            source=recovery_pb2.FAILURE_SOURCE_PAGE,
            kind=recovery_pb2.FAILURE_KIND_DEVICE_LOST,
            agent_id="agent-1",
        )
        response = await client.report_failure(report, strategy="coordinated")
        assert response.recovery_id == f"r-agent-1-{common_pb2.RECOVERY_STRATEGY_COORDINATED}"

        browser = await client.get_breaker("agent-1/b0")
        agent = await client.get_breaker("agent-1")
        assert browser.state == common_pb2.BREAKER_STATE_OPEN
        assert [r.scope for r in servicer.breaker_requests] == [
            recovery_pb2.BREAKER_SCOPE_BROWSER,
            recovery_pb2.BREAKER_SCOPE_AGENT,
        ]
        assert agent.target_id == "agent-1"
        reset = await client.reset_breaker("agent-1/b0")
        assert reset.state == common_pb2.BREAKER_STATE_CLOSED
        assert servicer.breaker_requests[-1].scope == recovery_pb2.BREAKER_SCOPE_BROWSER
        assert [b.target_id for b in await client.list_breakers()] == ["agent-1"]
        assert len(await client.list_recoveries(limit=3)) == 3
        recovery = await client.get_recovery("r-7")
        assert recovery.state == recovery_pb2.RECOVERY_STATE_SUCCEEDED

        # A watch with a timeout ends normally when the time is up.
        seen = [r.recovery_id async for r in client.watch_recoveries(timeout=0.3)]
        assert seen == ["r-1"]


class Metrics(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.summary_requests: list[Any] = []

    async def Ingest(
        self, request_iterator: AsyncIterator[metrics_pb2.IngestRequest], context: CONTEXT
    ) -> metrics_pb2.IngestResponse:
        async for batch in request_iterator:
            self.batches.append(len(batch.events))
        return metrics_pb2.IngestResponse(committed=sum(self.batches))

    async def QueryRecoverySummary(
        self, request: metrics_pb2.QueryRecoverySummaryRequest, context: CONTEXT
    ) -> metrics_pb2.QueryRecoverySummaryResponse:
        self.summary_requests.append(request)
        row = metrics_pb2.RecoverySummaryRow(
            group={"scenario": "browser_crash"}, count=10, success_rate=1.0, p50_ms=120
        )
        return metrics_pb2.QueryRecoverySummaryResponse(rows=[row])

    async def QueryTimeSeries(
        self, request: metrics_pb2.QueryTimeSeriesRequest, context: CONTEXT
    ) -> metrics_pb2.QueryTimeSeriesResponse:
        if request.metric != "request_rate":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown metric {request.metric!r}"
            )
        point = metrics_pb2.TimeSeriesPoint(
            at=request.time_range.start, value=request.bucket.seconds
        )
        return metrics_pb2.QueryTimeSeriesResponse(points=[point])

    async def GetReport(
        self, request: metrics_pb2.GetReportRequest, context: CONTEXT
    ) -> metrics_pb2.GetReportResponse:
        name = metrics_pb2.ReportFormat.Name(request.format)
        return metrics_pb2.GetReportResponse(content=name.encode(), content_type="text/plain")


async def test_metrics_client(serve: Callable[..., Awaitable[Server]]) -> None:
    servicer = Metrics()
    server = await serve(
        lambda s: metrics_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, s)
    )
    events = [
        metrics_pb2.Event(request=metrics_pb2.RequestRecord(request_id=str(i), ok=True))
        for i in range(1200)
    ]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    async with webshard.aio.MetricsClient(server.address) as client:
        assert await client.ingest(events, batch_size=500) == 1200
        assert servicer.batches == [500, 500, 200]

        rows = await client.recovery_summary(
            group_by=["scenario"], run_id="r1", time_range=(start, start + timedelta(hours=1))
        )
        assert rows[0].p50_ms == 120
        (request,) = servicer.summary_requests
        assert request.time_range.start.ToDatetime(tzinfo=UTC) == start
        assert list(request.group_by) == ["scenario"]

        (point,) = await client.time_series(
            "request_rate", time_range=(start, start + timedelta(minutes=5)), bucket_s=60
        )
        assert point.value == 60
        assert point.at.ToDatetime(tzinfo=UTC) == start
        with pytest.raises(InvalidArgumentError, match="unknown metric"):
            await client.time_series("vibes", time_range=(start, None), bucket_s=1)
        with pytest.raises(ValueError, match="timezone-aware"):
            await client.time_series(
                "request_rate", time_range=(datetime(2026, 1, 1), None), bucket_s=1
            )
        assert await client.report(format="junit") == b"REPORT_FORMAT_JUNIT_XML"
        assert await client.report(format="markdown") == b"REPORT_FORMAT_MARKDOWN"
        with pytest.raises(ValueError, match="json, markdown, html, junit"):
            await client.report(format="pdf")

    def use_sync() -> bytes:
        with webshard.MetricsClient(server.address) as sync_client:
            assert sync_client.ingest(iter(events[:3])) == 1203
            return sync_client.report(format="html")

    assert await asyncio.to_thread(use_sync) == b"REPORT_FORMAT_HTML"


def test_public_api() -> None:
    assert webshard.__version__
    for name in webshard.__all__:
        assert hasattr(webshard, name), name
    assert issubclass(webshard.UnavailableError, webshard.RPCError)
    assert webshard.Client.__module__ == "webshard.client"
    assert webshard.aio.Client.__module__ == "webshard.aio"
