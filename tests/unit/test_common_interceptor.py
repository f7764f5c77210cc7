"""The error interceptor every server runs (with OpenTelemetry's, as ``serve`` installs them):
undecodable requests and undefined enum values are INVALID_ARGUMENT, DomainErrors
become their status, and no message is too long to arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from webshard.metrics.v1 import metrics_pb2

from services.common.errors import (
    DomainError,
    FailedPrecondition,
    NotFound,
    quote,
    shorten,
)
from services.common.interceptor import EnumCheck
from services.common.server import SERVER_OPTIONS, Lifecycle, server_interceptors

Behavior = Callable[..., Any]


class Handlers(grpc.GenericRpcHandler):
    """A test service whose behaviours each test sets; messages are real generated ones."""

    def __init__(self) -> None:
        self.unary: Behavior = self._report
        self.server_stream: Behavior = self._reports
        self.bidi: Behavior = self._echo
        self.seen: list[object] = []

    async def _report(self, request: object, context: object) -> metrics_pb2.GetReportResponse:
        self.seen.append(request)
        return metrics_pb2.GetReportResponse(content=b"ok")

    async def _reports(
        self, request: object, context: object
    ) -> AsyncIterator[metrics_pb2.GetReportResponse]:
        self.seen.append(request)
        yield metrics_pb2.GetReportResponse(content=b"one")

    async def _echo(
        self, requests: AsyncIterator[coordinator_pb2.InferRequest], context: Any
    ) -> AsyncIterator[coordinator_pb2.InferResponse]:
        async for request in Lifecycle().stream(requests, context):
            self.seen.append(request)
            yield coordinator_pb2.InferResponse(request_id=request.request_id)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        report = metrics_pb2.GetReportRequest.FromString
        infer = coordinator_pb2.InferRequest.FromString
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "/t.T/Report": grpc.unary_unary_rpc_method_handler(
                self.unary,
                report,
                metrics_pb2.GetReportResponse.SerializeToString,
            ),
            "/t.T/Infer": grpc.unary_unary_rpc_method_handler(
                self.unary,
                infer,
                metrics_pb2.GetReportResponse.SerializeToString,
            ),
            "/t.T/Struct": grpc.unary_unary_rpc_method_handler(
                self.unary,
                struct_pb2.Struct.FromString,
                metrics_pb2.GetReportResponse.SerializeToString,
            ),
            "/t.T/Reports": grpc.unary_stream_rpc_method_handler(
                self.server_stream,
                report,
                metrics_pb2.GetReportResponse.SerializeToString,
            ),
            "/t.T/Echo": grpc.stream_stream_rpc_method_handler(
                self.bidi, infer, coordinator_pb2.InferResponse.SerializeToString
            ),
        }
        return handlers.get(details.method)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Handlers, grpc.aio.Channel]]:
    handlers = Handlers()
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=server_interceptors())
    server.add_generic_rpc_handlers([handlers])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield handlers, channel
    await server.stop(0)


async def call(
    channel: grpc.aio.Channel, method: str, request: bytes | Any
) -> grpc.aio.AioRpcError:
    """Call ``method`` with ``request`` (raw bytes are sent as they are); return its error."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await channel.unary_unary(f"/t.T/{method}")(raw, timeout=5)
    return failed.value


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xff\xff\xff\xff",  # not protobuf
        b"\x12\x02\xff\xfe",  # run_id (a string) holding bad UTF-8
    ],
)
async def test_a_request_that_cannot_be_decoded_is_invalid_argument(
    served: tuple[Handlers, grpc.aio.Channel], raw: bytes
) -> None:
    handlers, channel = served
    error = await call(channel, "Report", raw)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the request is not a valid webshard.metrics.v1.GetReportRequest"
    assert handlers.seen == []


async def test_an_undefined_enum_value_is_invalid_argument_naming_field_and_names(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = served
    error = await call(channel, "Report", metrics_pb2.GetReportRequest(format=999))  # type: ignore[arg-type]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("format is 999, which ReportFormat does not define")
    assert error.details().endswith(
        "use one of REPORT_FORMAT_{UNSPECIFIED, JSON, MARKDOWN, HTML, JUNIT_XML}"
    )
    assert handlers.seen == []


async def test_enum_values_are_checked_at_any_depth_and_in_repeated_fields(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = served
    request = coordinator_pb2.InferRequest(
        inputs=[
            common_pb2.Tensor(name="a", dtype=common_pb2.DATA_TYPE_FLOAT32),
            common_pb2.Tensor(name="b", dtype=77, data=b"\0" * 1_000_000),  # type: ignore[arg-type]
        ]
    )
    error = await call(channel, "Infer", request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("inputs[1].dtype is 77")
    # A map of a recursive type (Value holds the NullValue enum).
    nested = struct_pb2.Struct()
    nested.fields["k"].list_value.values.add().null_value = 3  # type: ignore[assignment]
    error = await call(channel, "Struct", nested)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("fields['k'].list_value.values[0].null_value is 3")
    assert handlers.seen == []


async def test_defined_values_pass(served: tuple[Handlers, grpc.aio.Channel]) -> None:
    handlers, channel = served
    request = metrics_pb2.GetReportRequest(format=metrics_pb2.REPORT_FORMAT_HTML, run_id="r")
    answer = await channel.unary_unary("/t.T/Report")(request.SerializeToString(), timeout=5)
    assert metrics_pb2.GetReportResponse.FromString(answer).content == b"ok"
    assert handlers.seen == [request]


class DeployError(DomainError):
    """A service's own error, on the shared base with its (code, message) shape."""


@pytest.mark.parametrize(
    ("error", "code", "details"),
    [
        (NotFound("no model 'm'"), grpc.StatusCode.NOT_FOUND, "no model 'm'"),
        (FailedPrecondition("not yet"), grpc.StatusCode.FAILED_PRECONDITION, "not yet"),
        (
            DeployError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "no room",
        ),
        (
            DomainError(grpc.StatusCode.UNAVAILABLE, "x" * 5_000_000),
            grpc.StatusCode.UNAVAILABLE,
            "x" * 299 + "…",
        ),
    ],
)
async def test_a_domain_error_ends_the_call_with_its_status(
    served: tuple[Handlers, grpc.aio.Channel],
    error: DomainError,
    code: grpc.StatusCode,
    details: str,
) -> None:
    handlers, channel = served

    async def raises(request: object, context: object) -> None:
        raise error

    handlers.unary = raises
    failed = await call(channel, "Report", metrics_pb2.GetReportRequest())
    assert (failed.code(), failed.details()) == (code, details)


async def test_a_domain_error_sends_its_trailers(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = served

    async def redirects(request: object, context: object) -> None:
        raise FailedPrecondition("not the leader", (("webshard-leader", "127.0.0.1:1"),))

    handlers.unary = redirects
    failed = await call(channel, "Report", metrics_pb2.GetReportRequest())
    assert failed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("webshard-leader", "127.0.0.1:1") in tuple(failed.trailing_metadata() or ())


async def test_long_messages_from_abort_and_unexpected_errors_arrive_cut_short(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    """A 5 MB name echoed into a message would exceed the metadata limit and arrive as
    RESOURCE_EXHAUSTED "Stream removed"; cut short, the real status arrives."""
    handlers, channel = served
    name = "m" * 5_000_000

    async def aborts(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {name}")

    handlers.unary = aborts
    failed = await call(channel, "Report", metrics_pb2.GetReportRequest())
    assert failed.code() == grpc.StatusCode.NOT_FOUND
    assert failed.details().startswith("no model mmm")
    assert len(failed.details()) == 300

    async def breaks(request: object, context: object) -> None:
        raise ValueError(name)

    handlers.unary = breaks
    failed = await call(channel, "Report", metrics_pb2.GetReportRequest())
    assert failed.code() == grpc.StatusCode.UNKNOWN
    assert failed.details().startswith("Unexpected <class 'ValueError'>: mmm")
    assert len(failed.details()) == 300


async def test_server_streams_refuse_bad_requests_and_end_with_a_domain_error(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = served
    reports = channel.unary_stream("/t.T/Reports")
    call = reports(b"\x08\xe7\x07", timeout=5)  # format = 999
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await anext(aiter(call))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def one_then_gone(request: object, context: object) -> AsyncIterator[Any]:
        yield metrics_pb2.GetReportResponse(content=b"one")
        raise NotFound("the run is gone")

    handlers.server_stream = one_then_gone
    call = reports(b"", timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for raw in call:
            received.append(metrics_pb2.GetReportResponse.FromString(raw).content)
    assert received == [b"one"]
    assert (failed.value.code(), failed.value.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "the run is gone",
    )


async def test_a_bad_message_in_a_request_stream_ends_it_with_invalid_argument(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    """Through ``Lifecycle.stream``: the messages before the bad one are served."""
    handlers, channel = served
    call = channel.stream_stream("/t.T/Echo")(timeout=5)
    await call.write(coordinator_pb2.InferRequest(request_id="r1").SerializeToString())
    answer = coordinator_pb2.InferResponse.FromString(await call.read())
    assert answer.request_id == "r1"
    await call.write(b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call.read()
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        failed.value.details() == "the request is not a valid webshard.coordinator.v1.InferRequest"
    )
    assert [r.request_id for r in handlers.seen] == ["r1"]  # type: ignore[attr-defined]


async def test_a_domain_error_in_a_bidi_stream_ends_it_with_its_status(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = served

    async def refuses(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for _ in Lifecycle().stream(requests, context):
            raise FailedPrecondition("paused")
        yield  # pragma: no cover

    handlers.bidi = refuses
    call = channel.stream_stream("/t.T/Echo")(timeout=5)
    await call.write(coordinator_pb2.InferRequest(request_id="r1").SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call.read()
    assert (failed.value.code(), failed.value.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "paused",
    )


async def test_a_draining_stream_still_ends_with_unavailable(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    handlers, channel = served
    lifecycle = Lifecycle()
    reading = asyncio.Event()

    async def drained(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        reading.set()
        async for _ in lifecycle.stream(requests, context):
            yield coordinator_pb2.InferResponse()  # pragma: no cover

    handlers.bidi = drained
    call = channel.stream_stream("/t.T/Echo")(timeout=5)
    await call.wait_for_connection()
    await asyncio.wait_for(reading.wait(), 5)
    lifecycle.draining.set()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call.read()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_messages_without_enums_are_not_walked() -> None:
    """The plan of a type with no enum (at any depth) is empty; a tensor's bytes are never
    looked at, only its dtype."""
    check = EnumCheck()
    assert check.problem(coordinator_pb2.UndeployModelRequest(model="m")) is None
    assert check._plan(coordinator_pb2.UndeployModelRequest.DESCRIPTOR) == ()
    steps = check._plan(common_pb2.Tensor.DESCRIPTOR)
    assert [step.name for step in steps] == ["dtype"]


def test_quote_shows_a_short_prefix_and_the_full_length() -> None:
    assert quote("model-a") == "'model-a'"
    assert quote("x" * 5_000_000) == f"{'x' * 64!r}… (5000000 characters)"
    assert quote(b"\0" * 100, limit=4) == "b'\\x00\\x00\\x00\\x00'… (100 bytes)"
    assert shorten("abc", 3) == "abc"
    assert shorten("abcd", 3) == "ab…"


async def test_a_method_the_servicer_does_not_implement_stays_unimplemented(
    served: tuple[Handlers, grpc.aio.Channel],
) -> None:
    """The generated base class's methods are not async: they set UNIMPLEMENTED and raise."""
    handlers, channel = served
    handlers.unary = coordinator_pb2_grpc.CoordinatorServiceServicer().ListAgents
    failed = await call(channel, "Report", metrics_pb2.GetReportRequest())
    assert failed.code() == grpc.StatusCode.UNIMPLEMENTED
