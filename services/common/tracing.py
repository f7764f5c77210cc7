"""OpenTelemetry tracing for a service.

Spans always exist (so trace ids flow through logs, metadata and recovery records);
they leave the process only when an OTLP endpoint is configured.
"""

from __future__ import annotations

from opentelemetry import trace
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
