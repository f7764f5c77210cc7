"""The fault-injector's servicer in-process: the token, status codes, and the watch on drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from webshard.aio import FaultInjectorClient, target_selector
from webshard.common.v1 import common_pb2
from webshard.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from webshard.fault_injector.v1 import fault_injector_pb2 as fi_pb
from webshard.fault_injector.v1 import fault_injector_pb2_grpc as pb_grpc

from services.common.server import Lifecycle
from services.fault_injector.servicer import FaultInjectorServicer
from tests.unit.test_fault_injector import Rig

TOKEN = "s3cret-token"


class Served:
    def __init__(self, rig: Rig, lifecycle: Lifecycle, address: str) -> None:
        self.rig = rig
        self.lifecycle = lifecycle
        self.address = address


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    rig = Rig()
    lifecycle = Lifecycle()
    server = grpc.aio.server()
    pb_grpc.add_FaultInjectorServiceServicer_to_server(
        FaultInjectorServicer(rig.injector, TOKEN, lifecycle), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(rig, lifecycle, f"127.0.0.1:{port}")
    finally:
        await server.stop(0)
        await rig.injector.close()


async def test_calls_need_the_token(served: Served) -> None:
    async with FaultInjectorClient(served.address, timeout=5) as anonymous:
        with pytest.raises(UnauthenticatedError, match="Bearer"):
            await anonymous.list_faults()
        with pytest.raises(UnauthenticatedError):
            await anonymous.inject(kind="browser_crash", target="browser:agent-1/browser-0")
    async with FaultInjectorClient(served.address, token="wrong", timeout=5) as wrong:
        with pytest.raises(PermissionDeniedError):
            await wrong.revert_all()
    # Nothing reached the injector, and nothing was recorded for the refused calls.
    assert served.rig.injector.faults() == []
    async with FaultInjectorClient(served.address, token=TOKEN, timeout=5) as client:
        fault = await client.inject(
            kind="browser_crash", target="browser:agent-1/browser-0", duration_s=5
        )
        assert fault.state == 2  # ACTIVE
        assert [f.fault_id for f in await client.list_faults(states=["active"])] == [fault.fault_id]


async def test_refusals_answer_their_status_and_name_the_recorded_fault(served: Served) -> None:
    async with FaultInjectorClient(served.address, token=TOKEN, timeout=5) as client:
        with pytest.raises(InvalidArgumentError, match="force") as unscoped:
            await client.inject(
                kind="browser_crash", target=target_selector("browser", mode="all"), duration_s=5
            )
        with pytest.raises(InvalidArgumentError, match="exceeds"):
            await client.inject(kind="browser_crash", target="browser:b", duration_s=3600)
        with pytest.raises(NotFoundError):
            await client.get_fault("f-none")
        refused = await client.list_faults(states=["refused"])
        assert len(refused) == 2
        assert refused[0].fault_id in unscoped.value.message
        assert served.rig.hooks.applied == []


async def test_watch_ends_with_unavailable_when_the_server_drains(served: Served) -> None:
    async with FaultInjectorClient(served.address, token=TOKEN, timeout=5) as client:
        await client.inject(
            kind="browser_crash", target="browser:agent-1/browser-0", duration_s=5, dry_run=True
        )
        seen = []

        async def watch() -> None:
            async for fault in client.watch_faults(include_existing=True):
                seen.append(fault.state)
                if len(seen) == 1:
                    served.lifecycle.draining.set()

        with pytest.raises(UnavailableError, match="shutting down"):
            await asyncio.wait_for(watch(), timeout=5)
        assert seen == [6]  # DRY_RUN


async def test_a_spec_past_the_limits_is_refused_and_loses_nothing_accepted(
    served: Served,
) -> None:
    async with FaultInjectorClient(served.address, token=TOKEN, timeout=5) as client:
        active = await client.inject(
            kind="browser_crash", target="browser:agent-1/browser-0", duration_s=30
        )
        child = fi_pb.FaultSpec(
            kind=common_pb2.FAULT_KIND_BROWSER_CRASH,
            target=target_selector("browser", "agent-1/browser-0"),
        )
        huge = fi_pb.FaultSpec(
            kind=common_pb2.FAULT_KIND_MULTIPLE_FAILURES,
            intensity=common_pb2.INTENSITY_MILD,
            children=[child] * 2000,
        )
        huge.duration.FromSeconds(5)
        with pytest.raises(InvalidArgumentError, match="2000 children; a fault takes at most 16"):
            await client.inject(huge)
        with pytest.raises(InvalidArgumentError, match="duration is required, at most 60 s"):
            await client.inject(kind="browser_crash", target="browser:agent-1/browser-0")
        faults = await client.list_faults()
        assert [f.state for f in faults] == [
            fi_pb.FAULT_STATE_ACTIVE,
            fi_pb.FAULT_STATE_REFUSED,
            fi_pb.FAULT_STATE_REFUSED,
        ]
        assert faults[0].fault_id == active.fault_id
        # The refused spec is recorded cut to the limits, so the book stays small.
        assert len(faults[1].spec.children) == 16
        assert len(served.rig.hooks.applied) == 1  # none of the 2,000 children was applied
