"""Wires the fault-injector's servicer into the common bootstrap."""

from __future__ import annotations

from webshard.fault_injector.v1 import fault_injector_pb2_grpc as pb_grpc

from services.common.auth import fault_token
from services.common.server import BasicApp, Lifecycle
from services.fault_injector.agents import GrpcAgentHooks
from services.fault_injector.breakers import RecoveryBreakers
from services.fault_injector.cluster import CoordinatorCluster
from services.fault_injector.injector import FaultInjector
from services.fault_injector.leader import leader_control
from services.fault_injector.servicer import SERVICE, FaultInjectorServicer
from services.fault_injector.settings import FaultInjectorSettings
from services.fault_injector.spec import Limits


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

    return BasicApp(
        service_names=(SERVICE,),
        registrations=[
            (
                pb_grpc.add_FaultInjectorServiceServicer_to_server,
                FaultInjectorServicer(injector, token, lifecycle),
            )
        ],
        on_stop=stop,
    )
