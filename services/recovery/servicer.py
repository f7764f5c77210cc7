"""The recovery service's gRPC servicer."""

from __future__ import annotations

from webshard.recovery.v1 import recovery_pb2 as pb
from webshard.recovery.v1 import recovery_pb2_grpc as pb_grpc

from services.common.server import unimplemented

SERVICE = pb.DESCRIPTOR.services_by_name["RecoveryService"].full_name


class RecoveryServicer(pb_grpc.RecoveryServiceServicer):
    """Takes failure reports, runs recoveries, keeps breakers."""

    ReportFailure = unimplemented(f"{SERVICE}/ReportFailure", "recovery strategies")
    GetRecovery = unimplemented(f"{SERVICE}/GetRecovery", "recovery strategies")
    ListRecoveries = unimplemented(f"{SERVICE}/ListRecoveries", "recovery strategies")
    WatchRecoveries = unimplemented(f"{SERVICE}/WatchRecoveries", "recovery strategies")
    GetBreaker = unimplemented(f"{SERVICE}/GetBreaker", "circuit breakers")
    ListBreakers = unimplemented(f"{SERVICE}/ListBreakers", "circuit breakers")
    ResetBreaker = unimplemented(f"{SERVICE}/ResetBreaker", "circuit breakers")
