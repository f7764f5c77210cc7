"""The metrics service's gRPC servicer."""

from __future__ import annotations

from webshard.metrics.v1 import metrics_pb2 as pb
from webshard.metrics.v1 import metrics_pb2_grpc as pb_grpc

from services.common.server import unimplemented

SERVICE = pb.DESCRIPTOR.services_by_name["MetricsService"].full_name


class MetricsServicer(pb_grpc.MetricsServiceServicer):
    """Ingests events and answers queries and reports."""

    Ingest = unimplemented(f"{SERVICE}/Ingest", "metric ingestion")
    QueryRecoverySummary = unimplemented(f"{SERVICE}/QueryRecoverySummary", "metric queries")
    QueryTimeSeries = unimplemented(f"{SERVICE}/QueryTimeSeries", "metric queries")
    GetReport = unimplemented(f"{SERVICE}/GetReport", "reports")
