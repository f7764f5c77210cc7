"""Fault-injector settings."""

from __future__ import annotations

import dataclasses

from services.common.settings import ServerSettings, SettingsError, setting

DEFAULT_PORT = 50053


@dataclasses.dataclass
class FaultInjectorSettings(ServerSettings):
    """Settings of the fault-injector."""

    coordinators: list[str] = setting(
        ["127.0.0.1:50051"], "Coordinator replica addresses, comma-separated."
    )
    recovery: str = setting(
        "127.0.0.1:50054",
        "The recovery service's address, asked for breaker states before each injection.",
    )
    metrics: str = setting(
        "127.0.0.1:50055",
        "The metrics service's address, where every fault is recorded when it ends "
        "(refused ones too); empty sends none.",
    )
    metrics_queue: int = setting(
        10_000, "Records waiting for the metrics service, at most; more are dropped and counted."
    )
    metrics_give_up_s: float = setting(
        60.0,
        "Seconds a batch of records is retried while metrics is unreachable before it is "
        "dropped and counted.",
    )
    max_duration_s: float = setting(600.0, "The longest duration a fault may ask for.")
    fault_token: str = setting(
        "", "When set, every call must carry 'authorization: Bearer <token>' metadata."
    )
    cluster_state: str = setting(
        "",
        "A local cluster's state file (<data_dir>/cluster.json): maps coordinator replicas "
        "to their processes, for leader_loss.",
    )
    pod_namespace: str = setting(
        "", "In Kubernetes: this pod's namespace (leader_loss deletes coordinator pods there)."
    )
    memory_pressure_cap_mb: int = setting(
        1024,
        # No percent sign: argparse formats help texts with %.
        "memory_pressure allocates its share (25, 50 or 90 percent) of the agent's memory "
        "budget or of this cap, whichever is smaller, in MiB.",
    )
    agent_timeout_s: float = setting(
        30.0, "Deadline of each fault hook call to an agent, in seconds."
    )

    def validate(self) -> None:
        """Check the duration cap, the memory cap and the deadlines."""
        super().validate()
        if self.max_duration_s <= 0:
            raise SettingsError("max duration must be positive")
        if not self.coordinators:
            raise SettingsError("at least one coordinator address is needed")
        if self.memory_pressure_cap_mb < 1:
            raise SettingsError("the memory pressure cap must be at least 1 MiB")
        if self.agent_timeout_s <= 0:
            raise SettingsError("the agent call deadline must be positive")
