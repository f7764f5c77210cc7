"""Wires the recovery servicer into the common bootstrap."""

from __future__ import annotations

from webshard.recovery.v1 import recovery_pb2_grpc as pb_grpc

from services.common.server import BasicApp, Lifecycle
from services.recovery.servicer import SERVICE, RecoveryServicer
from services.recovery.settings import RecoverySettings


def make_app(settings: RecoverySettings, lifecycle: Lifecycle) -> BasicApp:
    """The recovery service."""
    return BasicApp(
        service_names=(SERVICE,),
        registrations=[(pb_grpc.add_RecoveryServiceServicer_to_server, RecoveryServicer())],
    )
