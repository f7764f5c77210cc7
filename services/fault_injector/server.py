"""Wires the fault-injector's servicer into the common bootstrap."""

from __future__ import annotations

from webshard.fault_injector.v1 import fault_injector_pb2_grpc as pb_grpc

from services.common.server import BasicApp, Lifecycle
from services.fault_injector.servicer import SERVICE, FaultInjectorServicer
from services.fault_injector.settings import FaultInjectorSettings


def make_app(settings: FaultInjectorSettings, lifecycle: Lifecycle) -> BasicApp:
    """The fault-injector."""
    return BasicApp(
        service_names=(SERVICE,),
        registrations=[
            (pb_grpc.add_FaultInjectorServiceServicer_to_server, FaultInjectorServicer())
        ],
    )
