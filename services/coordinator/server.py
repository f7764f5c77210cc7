"""Wires the coordinator's servicers into the common bootstrap."""

from __future__ import annotations

from pathlib import Path

from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

from services.common.server import BasicApp, Lifecycle
from services.coordinator.deployments import Deployments
from services.coordinator.registry import AgentRegistry
from services.coordinator.servicer import (
    RAFT_SERVICE,
    SERVICE,
    CoordinatorServicer,
    RaftServicer,
)
from services.coordinator.settings import CoordinatorSettings


def make_app(settings: CoordinatorSettings, lifecycle: Lifecycle) -> BasicApp:
    """One coordinator replica."""
    registry = AgentRegistry(settings.heartbeat_timeout_s)
    deployments = Deployments(registry, Path(settings.cache_dir) if settings.cache_dir else None)
    return BasicApp(
        service_names=(SERVICE, RAFT_SERVICE),
        registrations=[
            (
                pb_grpc.add_CoordinatorServiceServicer_to_server,
                CoordinatorServicer(settings, registry, deployments, lifecycle),
            ),
            (pb_grpc.add_RaftServiceServicer_to_server, RaftServicer()),
        ],
        on_stop=deployments.close,
    )
