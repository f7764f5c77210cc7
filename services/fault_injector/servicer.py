"""The fault-injector's gRPC servicer: authorization and status codes around the injector."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from webshard.fault_injector.v1 import fault_injector_pb2 as pb
from webshard.fault_injector.v1 import fault_injector_pb2_grpc as pb_grpc

from services.common.auth import require_token
from services.common.server import Lifecycle
from services.fault_injector.injector import FaultInjector
from services.fault_injector.spec import FaultError

SERVICE = pb.DESCRIPTOR.services_by_name["FaultInjectorService"].full_name
Context = grpc.aio.ServicerContext[object, object]


class FaultInjectorServicer(pb_grpc.FaultInjectorServiceServicer):
    """Injects, lists, reverts and watches faults.

    With a token configured, every call must carry ``authorization: Bearer
    <token>``: none is UNAUTHENTICATED, a wrong one PERMISSION_DENIED. Calls
    refused there are logged, not recorded as faults, so a caller without the
    token cannot write into the fault book.
    """

    def __init__(self, injector: FaultInjector, token: str, lifecycle: Lifecycle) -> None:
        self._injector = injector
        self._token = token
        self._lifecycle = lifecycle

    async def _authorize(self, context: Context, method: str) -> None:
        await require_token(context, self._token, method=method, service="fault-injector")

    @staticmethod
    async def _fail(context: Context, exc: FaultError) -> None:
        where = f"fault {exc.fault_id}: " if exc.fault_id else ""
        await context.abort(grpc.StatusCode[exc.code], f"{where}{exc.reason}")

    async def InjectFault(
        self, request: pb.InjectFaultRequest, context: Context
    ) -> pb.InjectFaultResponse:
        """Validate, resolve and inject a fault (or only resolve it, for a dry run)."""
        await self._authorize(context, "InjectFault")
        try:
            fault = await self._injector.inject(request.spec, force=request.force)
        except FaultError as exc:
            await self._fail(context, exc)
        return pb.InjectFaultResponse(fault=fault)

    async def GetFault(self, request: pb.GetFaultRequest, context: Context) -> pb.GetFaultResponse:
        """One fault, a child of a composite one included."""
        await self._authorize(context, "GetFault")
        try:
            return pb.GetFaultResponse(fault=self._injector.get(request.fault_id))
        except FaultError as exc:
            await self._fail(context, exc)
        raise AssertionError("unreachable: abort raises")

    async def ListFaults(
        self, request: pb.ListFaultsRequest, context: Context
    ) -> pb.ListFaultsResponse:
        """Faults oldest first, refused ones included, filtered by state."""
        await self._authorize(context, "ListFaults")
        return pb.ListFaultsResponse(faults=self._injector.faults(request.states))

    async def RevertFault(
        self, request: pb.RevertFaultRequest, context: Context
    ) -> pb.RevertFaultResponse:
        """Revert one fault now; a fault that has ended is returned as it is."""
        await self._authorize(context, "RevertFault")
        try:
            fault = await self._injector.revert(request.fault_id)
        except FaultError as exc:
            await self._fail(context, exc)
        return pb.RevertFaultResponse(fault=fault)

    async def RevertAll(
        self, request: pb.RevertAllRequest, context: Context
    ) -> pb.RevertAllResponse:
        """The kill switch: revert every fault still pending or active."""
        await self._authorize(context, "RevertAll")
        return pb.RevertAllResponse(reverted=await self._injector.revert_all())

    async def WatchFaults(
        self, request: pb.WatchFaultsRequest, context: Context
    ) -> AsyncIterator[pb.WatchFaultsResponse]:
        """Every change to every fault; ends with UNAVAILABLE when the server drains."""
        await self._authorize(context, "WatchFaults")
        changes = self._injector.watch(include_existing=request.include_existing)
        async for fault in self._lifecycle.stream(changes, context):
            yield pb.WatchFaultsResponse(fault=fault)
