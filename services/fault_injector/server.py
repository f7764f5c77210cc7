"""Wires the fault-injector's servicer into the common bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from webshard.fault_injector.v1 import fault_injector_pb2 as fi
from webshard.fault_injector.v1 import fault_injector_pb2_grpc as pb_grpc
from webshard.metrics.v1 import metrics_pb2

from services.common.auth import fault_token
from services.common.metrics_delivery import MetricsSender, sender_from
from services.common.server import BasicApp, Lifecycle
from services.fault_injector.agents import GrpcAgentHooks
from services.fault_injector.breakers import RecoveryBreakers
from services.fault_injector.cluster import CoordinatorCluster
from services.fault_injector.injector import FaultInjector
from services.fault_injector.leader import leader_control
from services.fault_injector.servicer import SERVICE, FaultInjectorServicer
from services.fault_injector.settings import FaultInjectorSettings
from services.fault_injector.spec import Limits

log = logging.getLogger(__name__)

RECORDED_STATES = (
    fi.FAULT_STATE_REVERTED,
    fi.FAULT_STATE_FAILED,
    fi.FAULT_STATE_REFUSED,
)
"""A fault is recorded once, when it reaches one of these; dry runs are not faults (a
campaign's dry run of a composite, asking which children would be refused, records
nothing)."""

REMEMBERED = 10_000
"""Recorded fault ids kept so a fault published again is not recorded twice."""


def fault_event(fault: fi.Fault, run_id: str = "") -> metrics_pb2.Event:
    """A fault (with its children's targets) as the metrics service records it.

    The campaign run comes from the spec's ``run_id`` label, which the campaign
    sets on every fault it asks for (refused attempts included); a composite's
    children are recorded under their parent's run (``run_id``).
    """
    record = metrics_pb2.FaultRecord(
        fault_id=fault.fault_id,
        kind=fault.spec.kind,
        intensity=fault.spec.intensity,
        state=fi.FaultState.Name(fault.state).removeprefix("FAULT_STATE_").lower(),
        targets=[t.id for t in fault.targets]
        + [t.id for child in fault.children for t in child.targets],
        detail=fault.detail,
        run_id=fault.spec.labels.get("run_id", "") or run_id,
    )
    if fault.HasField("injected_at"):
        record.injected_at.CopyFrom(fault.injected_at)
    if fault.HasField("reverted_at"):
        record.reverted_at.CopyFrom(fault.reverted_at)
    return metrics_pb2.Event(fault=record)


def _with_descendants(fault: fi.Fault) -> list[fi.Fault]:
    return [fault, *(d for child in fault.children for d in _with_descendants(child))]


async def record_faults(injector: FaultInjector, sender: MetricsSender) -> None:
    """Send every fault to metrics when it ends; runs until cancelled.

    Reads the injector's watch (which ends a watcher that falls behind, so this
    one only queues and never waits) and watches again, existing faults included,
    when it ends; the ids already recorded keep a fault from being sent twice.
    """
    recorded: OrderedDict[str, None] = OrderedDict()
    include_existing = False
    while True:
        async for fault in injector.watch(include_existing=include_existing):
            if fault.spec.dry_run:
                continue
            run_id = fault.spec.labels.get("run_id", "")
            # A composite's children are faults of their own (one may be refused while
            # the others run): each is recorded when it ends, like the composite.
            ended = [f for f in _with_descendants(fault) if f.state in RECORDED_STATES]
            for one in ended:
                if one.fault_id in recorded:
                    continue
                recorded[one.fault_id] = None
                if len(recorded) > REMEMBERED:
                    recorded.popitem(last=False)
                sender.send(fault_event(one, run_id))
        log.warning("the fault watch for metrics ended; watching again")
        include_existing = True


def make_app(settings: FaultInjectorSettings, lifecycle: Lifecycle) -> BasicApp:
    """The fault-injector: the injector over the coordinator, recovery and the agents."""
    token = fault_token(settings.fault_token, settings.cluster_token)
    cluster = CoordinatorCluster(settings.coordinators)
    breakers = RecoveryBreakers(settings.recovery)
    hooks = GrpcAgentHooks(timeout_s=settings.agent_timeout_s, token=token)
    leader = leader_control(settings.cluster_state, settings.pod_namespace)
    injector = FaultInjector(
        limits=Limits(max_duration_s=settings.max_duration_s),
        cluster=cluster,
        breakers=breakers,
        hooks=hooks,
        leader=leader,
        memory_cap_bytes=settings.memory_pressure_cap_mb * 1024 * 1024,
    )

    sender = sender_from(settings, "fault-injector")
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        if sender is not None:
            sender.start()
            tasks.append(asyncio.create_task(record_faults(injector, sender)))

    async def stop() -> None:
        # Faults still in force are reverted before the injector goes: a stopped
        # injector leaves nothing behind (the agents' own timers are the backstop).
        try:
            await injector.close()
        finally:
            await leader.close()
            await hooks.close()
            await breakers.close()
            await cluster.close()
            # After the injector's close: the faults it reverted are recorded too.
            for task in tasks:
                await asyncio.sleep(0)  # let the watch hand over the last changes
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if sender is not None:
                await sender.close()

    return BasicApp(
        service_names=(SERVICE,),
        registrations=[
            (
                pb_grpc.add_FaultInjectorServiceServicer_to_server,
                FaultInjectorServicer(injector, token, lifecycle),
            )
        ],
        on_start=start,
        on_stop=stop,
    )
