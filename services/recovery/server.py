"""Wires the recovery service: breakers, the adaptive chooser, the actuator, the servicer."""

from __future__ import annotations

import logging
import time

from google.protobuf.timestamp_pb2 import Timestamp
from webshard.metrics.v1 import metrics_pb2
from webshard.recovery.v1 import recovery_pb2_grpc as pb_grpc

from services.common.metrics_delivery import sender_from
from services.common.server import BasicApp, Lifecycle
from services.recovery.actuator import CoordinatorActuator
from services.recovery.breakers import Breakers, Transition
from services.recovery.probes import BreakerProber, ClusterProbes, GrpcAgentStatus
from services.recovery.recoveries import Recoveries
from services.recovery.servicer import GUARDED_METHODS, SERVICE, RecoveryServicer
from services.recovery.settings import RecoverySettings
from services.recovery.strategies import AdaptiveChooser

log = logging.getLogger(__name__)


def _log_transition(transition: Transition) -> None:
    log.info(
        "breaker transition",
        extra={
            "breaker": transition.key.target_id,
            "scope": transition.key.scope.name.lower(),
            "from": transition.from_state.label,
            "to": transition.to_state.label,
            "at": transition.at,
            "reason": transition.reason,
            "cause": transition.cause.value,
        },
    )


def transition_event(transition: Transition) -> metrics_pb2.Event:
    """A breaker transition as the metrics service records it."""
    at = Timestamp()
    at.FromNanoseconds(round(transition.at * 1e9))
    return metrics_pb2.Event(
        breaker_transition=metrics_pb2.BreakerTransition(
            target_id=transition.key.target_id,
            from_state=int(transition.from_state),  # type: ignore[arg-type]
            to_state=int(transition.to_state),  # type: ignore[arg-type]
            at=at,
            reason=transition.reason,
        )
    )


def make_app(settings: RecoverySettings, lifecycle: Lifecycle) -> BasicApp:
    """The recovery service."""
    # Wall-clock time: reports carry their detection time from other processes.
    clock = time.time
    breakers = Breakers(settings.breaker_config(), clock)
    breakers.add_listener(_log_transition)
    sender = sender_from(settings, "recovery")
    if sender is not None:

        def record(transition: Transition) -> None:
            sender.send(transition_event(transition))

        breakers.add_listener(record)
    actuator = CoordinatorActuator(
        settings.coordinators,
        verify_text=settings.verify_text,
        # A little inside the action's deadline, so that the coordinator's own answer
        # (UNAVAILABLE, NOT_FOUND) reaches the phase's detail before the deadline does.
        timeout_s=settings.action_timeout_s * 0.9,
        token=settings.cluster_token,
    )
    recoveries = Recoveries(
        actuator=actuator,
        placements=actuator,
        breakers=breakers,
        chooser=AdaptiveChooser(
            min_trials=settings.adaptive_min_trials,
            history=settings.adaptive_history,
            seed=settings.adaptive_seed,
        ),
        config=settings.recoveries_config(),
        clock=clock,
    )
    actuator.avoid = recoveries.unhealthy_runtimes

    agent_status = GrpcAgentStatus()
    prober = BreakerProber(
        breakers,
        ClusterProbes(actuator, agent_status, timeout_s=settings.breaker_probe_timeout_s),
        clock,
        timeout_s=settings.breaker_probe_timeout_s,
    )

    async def start() -> None:
        prober.start()
        if sender is not None:
            sender.start()

    async def stop() -> None:
        await prober.close()
        await recoveries.close()
        await actuator.close()
        await agent_status.close()
        if sender is not None:
            await sender.close()

    return BasicApp(
        service_names=(SERVICE,),
        registrations=[
            (
                pb_grpc.add_RecoveryServiceServicer_to_server,
                RecoveryServicer(
                    recoveries=recoveries,
                    breakers=breakers,
                    lifecycle=lifecycle,
                    list_limit=settings.list_limit,
                ),
            )
        ],
        on_start=start,
        on_stop=stop,
        guarded_methods=GUARDED_METHODS,
    )
