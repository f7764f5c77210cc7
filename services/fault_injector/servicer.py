"""The fault-injector's gRPC servicer."""

from __future__ import annotations

from webshard.fault_injector.v1 import fault_injector_pb2 as pb
from webshard.fault_injector.v1 import fault_injector_pb2_grpc as pb_grpc

from services.common.server import unimplemented

SERVICE = pb.DESCRIPTOR.services_by_name["FaultInjectorService"].full_name


class FaultInjectorServicer(pb_grpc.FaultInjectorServiceServicer):
    """Injects, lists, reverts and watches faults."""

    InjectFault = unimplemented(f"{SERVICE}/InjectFault", "fault injection")
    GetFault = unimplemented(f"{SERVICE}/GetFault", "fault injection")
    ListFaults = unimplemented(f"{SERVICE}/ListFaults", "fault injection")
    RevertFault = unimplemented(f"{SERVICE}/RevertFault", "fault injection")
    RevertAll = unimplemented(f"{SERVICE}/RevertAll", "fault injection")
    WatchFaults = unimplemented(f"{SERVICE}/WatchFaults", "fault injection")
