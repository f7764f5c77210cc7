"""The fault-injector records every fault that ends, children included, and no dry run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from webshard.fault_injector.v1 import fault_injector_pb2 as fi
from webshard.metrics.v1 import metrics_pb2

from services.fault_injector.server import record_faults


def fault(fault_id: str, state: int, *, dry_run: bool = False, **kw: Any) -> fi.Fault:
    spec = fi.FaultSpec(
        dry_run=dry_run, labels={"run_id": "run-1"} if fault_id.count("-") == 1 else {}
    )
    return fi.Fault(fault_id=fault_id, state=state, spec=spec, **kw)  # type: ignore[arg-type]


class Injector:
    def __init__(self, faults: list[fi.Fault]) -> None:
        self.faults = faults

    async def watch(self, *, include_existing: bool) -> AsyncIterator[fi.Fault]:
        for f in self.faults:
            yield f
        await asyncio.Event().wait()  # a watch stays open


class Sender:
    def __init__(self) -> None:
        self.events: list[metrics_pb2.Event] = []

    def send(self, event: metrics_pb2.Event) -> bool:
        self.events.append(event)
        return True


async def test_children_are_recorded_dry_runs_are_not_and_nothing_twice() -> None:
    probe = fault("f-1", fi.FAULT_STATE_FAILED, dry_run=True)
    probe.children.extend(
        [
            fault("f-1-1", fi.FAULT_STATE_REFUSED, dry_run=True),
            fault("f-1-2", fi.FAULT_STATE_DRY_RUN, dry_run=True),
        ]
    )
    composite = fault("f-2", fi.FAULT_STATE_REVERTED)
    composite.children.extend(
        [fault("f-2-1", fi.FAULT_STATE_REFUSED), fault("f-2-2", fi.FAULT_STATE_REVERTED)]
    )
    refused = fault("f-3", fi.FAULT_STATE_REFUSED)
    active = fault("f-4", fi.FAULT_STATE_ACTIVE)
    sender = Sender()
    watching = asyncio.create_task(
        record_faults(
            Injector([probe, composite, refused, refused, active]),  # type: ignore[arg-type]
            sender,  # type: ignore[arg-type]
        )
    )
    try:
        async with asyncio.timeout(5):
            while len(sender.events) < 4:  # noqa: ASYNC110 - the fake sender has no event
                await asyncio.sleep(0.01)
    finally:
        watching.cancel()
    recorded = [(e.fault.fault_id, e.fault.state, e.fault.run_id) for e in sender.events]
    assert recorded == [
        ("f-2", "reverted", "run-1"),
        ("f-2-1", "refused", "run-1"),
        ("f-2-2", "reverted", "run-1"),
        ("f-3", "refused", "run-1"),
    ]
