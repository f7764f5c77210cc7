"""Wires the metrics servicer into the common bootstrap."""

from __future__ import annotations

from webshard.metrics.v1 import metrics_pb2_grpc as pb_grpc

from services.common.server import BasicApp, Lifecycle
from services.metrics.servicer import SERVICE, MetricsServicer
from services.metrics.settings import MetricsSettings


def make_app(settings: MetricsSettings, lifecycle: Lifecycle) -> BasicApp:
    """The metrics service."""
    return BasicApp(
        service_names=(SERVICE,),
        registrations=[(pb_grpc.add_MetricsServiceServicer_to_server, MetricsServicer())],
    )
