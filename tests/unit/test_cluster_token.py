"""The cluster token: state-changing calls need it when a service has one; reads stay open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from webshard.aio import Client, MetricsClient
from webshard.browser_agent.v1 import browser_agent_pb2
from webshard.cli.local import LocalCluster
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import UnauthenticatedError
from webshard.metrics.v1 import metrics_pb2
from webshard.recovery.v1 import recovery_pb2

from services.browser_agent.servicer import GUARDED_METHODS as AGENT_GUARDED
from services.common.auth import bearer_interceptors, bearer_metadata, fault_token
from services.common.server import SERVER_OPTIONS, server_interceptors
from services.common.settings import load_settings
from services.coordinator.servicer import GUARDED_METHODS as COORDINATOR_GUARDED
from services.coordinator.settings import CoordinatorSettings
from services.metrics.servicer import GUARDED_METHODS as METRICS_GUARDED
from services.recovery.servicer import GUARDED_METHODS as RECOVERY_GUARDED

TOKEN = "s3cret-token"
REPORT = metrics_pb2.GetReportRequest
ANSWER = metrics_pb2.GetReportResponse
GUARDED = frozenset({"/t.T/Write", "/t.T/Upload", "/t.T/Chat", "/t.T/Follow"})


class Handlers(grpc.GenericRpcHandler):
    """A read, and one guarded method of each kind; ``ran`` names the handlers that ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def _unary(self, request: Any, context: Any) -> ANSWER:
        self.ran.append("unary")
        return ANSWER(content=b"ok")

    async def _upload(self, requests: AsyncIterator[Any], context: Any) -> ANSWER:
        self.ran.append("upload")
        count = 0
        async for _ in requests:
            count += 1
        return ANSWER(content=str(count).encode())

    async def _stream(self, request: Any, context: Any) -> AsyncIterator[ANSWER]:
        self.ran.append("stream")
        yield ANSWER(content=b"one")

    async def _chat(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[ANSWER]:
        self.ran.append("chat")
        async for _ in requests:
            yield ANSWER(content=b"echo")

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        de, ser = REPORT.FromString, ANSWER.SerializeToString
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "/t.T/Read": grpc.unary_unary_rpc_method_handler(self._unary, de, ser),
            "/t.T/Write": grpc.unary_unary_rpc_method_handler(self._unary, de, ser),
            "/t.T/Upload": grpc.stream_unary_rpc_method_handler(self._upload, de, ser),
            "/t.T/Follow": grpc.unary_stream_rpc_method_handler(self._stream, de, ser),
            "/t.T/Chat": grpc.stream_stream_rpc_method_handler(self._chat, de, ser),
        }
        return handlers.get(details.method)


async def _serve(token: str) -> tuple[grpc.aio.Server, Handlers, str]:
    handlers = Handlers()
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=server_interceptors(token, GUARDED)
    )
    server.add_generic_rpc_handlers([handlers])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, handlers, f"127.0.0.1:{port}"


@pytest.fixture
async def guarded() -> AsyncIterator[tuple[Handlers, grpc.aio.Channel]]:
    server, handlers, address = await _serve(TOKEN)
    async with grpc.aio.insecure_channel(address) as channel:
        yield handlers, channel
    await server.stop(0)


def _unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(
        method, request_serializer=REPORT.SerializeToString, response_deserializer=ANSWER.FromString
    )


async def _requests() -> AsyncIterator[REPORT]:
    yield REPORT(run_id="a")
    yield REPORT(run_id="b")


async def test_reads_need_no_token(guarded: tuple[Handlers, grpc.aio.Channel]) -> None:
    handlers, channel = guarded
    reply = await _unary(channel, "/t.T/Read")(REPORT(), timeout=5)
    assert reply.content == b"ok"
    assert handlers.ran == ["unary"]


async def test_a_write_without_a_token_is_unauthenticated_and_runs_nothing(
    guarded: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = guarded
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel, "/t.T/Write")(REPORT(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "WEBSHARD_CLUSTER_TOKEN" in (caught.value.details() or "")
    assert "authorization: Bearer" in (caught.value.details() or "")
    assert handlers.ran == []


async def test_a_write_with_a_wrong_token_is_permission_denied(
    guarded: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = guarded
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel, "/t.T/Write")(
            REPORT(), timeout=5, metadata=bearer_metadata(TOKEN + "x")
        )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "WEBSHARD_CLUSTER_TOKEN" in (caught.value.details() or "")
    assert TOKEN not in (caught.value.details() or "")
    assert handlers.ran == []


async def test_a_write_with_the_token_goes_through(
    guarded: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = guarded
    reply = await _unary(channel, "/t.T/Write")(
        REPORT(), timeout=5, metadata=bearer_metadata(TOKEN)
    )
    assert reply.content == b"ok"
    assert handlers.ran == ["unary"]


async def test_an_undecodable_write_without_a_token_is_refused_for_the_token(
    guarded: tuple[Handlers, grpc.aio.Channel],
) -> None:
    _, channel = guarded
    raw = channel.unary_unary("/t.T/Write")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\xff\xff\xff", timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_streaming_writes_of_every_kind_are_guarded(
    guarded: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = guarded
    upload = channel.stream_unary(
        "/t.T/Upload",
        request_serializer=REPORT.SerializeToString,
        response_deserializer=ANSWER.FromString,
    )
    follow = channel.unary_stream(
        "/t.T/Follow",
        request_serializer=REPORT.SerializeToString,
        response_deserializer=ANSWER.FromString,
    )
    chat = channel.stream_stream(
        "/t.T/Chat",
        request_serializer=REPORT.SerializeToString,
        response_deserializer=ANSWER.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(_requests(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in follow(REPORT(), timeout=5)]
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # A bidi call is refused before the client writes (a write racing the refusal
    # fails on the client's side with a transport error instead of the status).
    refused = chat(timeout=5, metadata=bearer_metadata("nope"))
    assert await refused.code() is grpc.StatusCode.PERMISSION_DENIED
    assert handlers.ran == []

    metadata = bearer_metadata(TOKEN)
    assert (await upload(_requests(), timeout=5, metadata=metadata)).content == b"2"
    assert [r.content async for r in follow(REPORT(), timeout=5, metadata=metadata)] == [b"one"]
    answers = [r.content async for r in chat(_requests(), timeout=5, metadata=metadata)]
    assert answers == [b"echo", b"echo"]


async def test_without_a_token_configured_nothing_is_checked() -> None:
    server, handlers, address = await _serve("")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            assert (await _unary(channel, "/t.T/Write")(REPORT(), timeout=5)).content == b"ok"
    finally:
        await server.stop(0)
    assert handlers.ran == ["unary"]


async def test_a_channel_with_the_bearer_interceptor_sends_the_token() -> None:
    server, handlers, address = await _serve(TOKEN)
    try:
        async with grpc.aio.insecure_channel(
            address, interceptors=bearer_interceptors(TOKEN)
        ) as channel:
            assert (await _unary(channel, "/t.T/Write")(REPORT(), timeout=5)).content == b"ok"
            upload = channel.stream_unary(
                "/t.T/Upload",
                request_serializer=REPORT.SerializeToString,
                response_deserializer=ANSWER.FromString,
            )
            assert (await upload(_requests(), timeout=5)).content == b"2"
    finally:
        await server.stop(0)
    assert handlers.ran == ["unary", "upload"]


async def test_the_sdk_sends_its_token_on_every_call() -> None:
    """MetricsClient.ingest (a client stream) against a server guarding the real Ingest."""
    path = "/webshard.metrics.v1.MetricsService/Ingest"
    committed: list[int] = []

    async def ingest(requests: AsyncIterator[Any], context: Any) -> metrics_pb2.IngestResponse:
        count = sum([len(r.events) async for r in requests])
        committed.append(count)
        return metrics_pb2.IngestResponse(committed=count)

    class Ingest(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            if details.method != path:
                return None
            return grpc.stream_unary_rpc_method_handler(
                ingest,
                metrics_pb2.IngestRequest.FromString,
                metrics_pb2.IngestResponse.SerializeToString,
            )

    server = grpc.aio.server(interceptors=server_interceptors(TOKEN, frozenset({path})))
    server.add_generic_rpc_handlers([Ingest()])
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    events = [metrics_pb2.Event(fault=metrics_pb2.FaultRecord(fault_id="f"))]
    try:
        async with MetricsClient(address, token=TOKEN, timeout=5) as client:
            assert await client.ingest(events) == 1
        async with MetricsClient(address, timeout=5) as client:
            with pytest.raises(UnauthenticatedError):
                await client.ingest(events)
    finally:
        await server.stop(0)
    assert committed == [1]


def _names(service: ServiceDescriptor) -> set[str]:
    return {f"/{service.full_name}/{m.name}" for m in service.methods}


def test_each_service_guards_its_state_changing_methods_and_leaves_reads_open() -> None:
    coordinator = _names(coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"])
    raft = _names(coordinator_pb2.DESCRIPTOR.services_by_name["RaftService"])
    agent = _names(browser_agent_pb2.DESCRIPTOR.services_by_name["BrowserAgentService"])
    recovery = _names(recovery_pb2.DESCRIPTOR.services_by_name["RecoveryService"])
    metrics = _names(metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"])
    # Every name is a real method (a typo would leave the method open).
    assert coordinator | raft >= COORDINATOR_GUARDED
    assert agent >= AGENT_GUARDED
    assert recovery >= RECOVERY_GUARDED
    assert metrics >= METRICS_GUARDED
    assert raft <= COORDINATOR_GUARDED
    short = {m.rsplit("/", 1)[1] for m in COORDINATOR_GUARDED}
    assert {"ReplaceShard", "VerifyShard", "DeployModel", "UndeployModel", "AgentSession"} <= short
    assert not {"Infer", "InferStream", "GetPlacement", "ListAgents", "ClusterStatus"} & short
    assert {m.rsplit("/", 1)[1] for m in AGENT_GUARDED} == {
        "LoadShard",
        "RunShard",
        "UnloadShard",
        "RestartBrowser",
        "ReconnectBrowser",
    }
    assert {m.rsplit("/", 1)[1] for m in RECOVERY_GUARDED} == {"ReportFailure", "ResetBreaker"}
    assert {m.rsplit("/", 1)[1] for m in METRICS_GUARDED} == {"Ingest"}


def test_the_cluster_token_is_a_setting_of_every_service() -> None:
    env = {"WEBSHARD_CLUSTER_TOKEN": "from-env"}
    assert load_settings(CoordinatorSettings, [], env=env).cluster_token == "from-env"
    flag = load_settings(CoordinatorSettings, ["--cluster-token", "from-flag"], env=env)
    assert flag.cluster_token == "from-flag"


def test_the_fault_token_falls_back_to_the_cluster_token() -> None:
    assert fault_token("", "cluster") == "cluster"
    assert fault_token("fault", "cluster") == "fault"
    assert fault_token("", "") == ""


def test_the_sdk_token_goes_on_every_call_of_the_coordinator_client() -> None:
    client = Client("127.0.0.1:1", token=TOKEN)
    assert ("authorization", f"Bearer {TOKEN}") in client._transport.metadata
    assert Client("127.0.0.1:1")._transport.metadata == ()


def test_a_local_cluster_gives_its_token_to_every_process_in_the_environment(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(agents=1, data_dir=tmp_path, auto_ports=True, cluster_token=TOKEN)
    assert cluster._env["WEBSHARD_CLUSTER_TOKEN"] == TOKEN
    # Never on a command line: ps and cluster.json show those.
    assert not any(TOKEN in arg for proc in cluster.processes for arg in proc.args)
