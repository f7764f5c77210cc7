"""OpenTelemetry tracing for a service.

Spans always exist (so trace ids flow through logs, metadata and recovery records);
they leave the process only when an OTLP endpoint is configured.

Trace context crosses services in two ways: gRPC metadata (``traceparent``), set by
the client interceptors from ``client_interceptors`` and read by the server
interceptor every service runs; and, where one long-lived stream carries many
requests' messages (the coordinator's RunShard stream to an agent), a
``traceparent`` field in each message (``inject_traceparent`` / ``extract_context``).
"""

from __future__ import annotations

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def configure_tracing(
    service: str, otlp_endpoint: str = "", extra_processors: list[SpanProcessor] | None = None
) -> TracerProvider:
    """Install a tracer provider named ``webshard-<service>`` and return it."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"webshard-{service}"}))
    if otlp_endpoint:
        # Imported here so a service without an endpoint never loads the exporter.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    for processor in extra_processors or []:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def client_interceptors(*, stream_stream: bool = True) -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry's grpc.aio client interceptors: a client span per call, and the
    caller's trace context sent as metadata.

    ``stream_stream=False`` leaves bidirectional streams alone: a long-lived stream
    shared by many requests would otherwise belong to the trace of whichever request
    opened it (and grpc.aio wraps every call of a kind that has an interceptor, which
    costs a queue hop per message on a hot stream).
    """
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors()  # type: ignore[no-untyped-call]
    if stream_stream:
        return interceptors
    return [i for i in interceptors if not isinstance(i, grpc.aio.StreamStreamClientInterceptor)]


def inject_traceparent() -> str:
    """The W3C traceparent of the current span; empty when there is none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def extract_context(traceparent: str) -> Context:
    """A context whose parent is the span ``traceparent`` names; an empty context (a new
    trace) when it names none or cannot be read."""
    if not traceparent:
        return Context()
    return propagate.extract({"traceparent": traceparent}, context=Context())
