"""Browser-agent settings."""

from __future__ import annotations

import dataclasses

from services.common.settings import ServerSettings, SettingsError, setting

DEFAULT_PORT = 50052


@dataclasses.dataclass
class AgentSettings(ServerSettings):
    """Settings of one browser agent."""

    agent_id: str = setting("agent-0", "This agent's id, unique in the cluster.")
    advertise_address: str = setting(
        "", "Address the coordinator should use to reach this agent; empty uses host:port."
    )
    coordinators: list[str] = setting(
        ["127.0.0.1:50051"],
        "Coordinator replica addresses, comma-separated; the agent follows the leader.",
    )
    memory_budget_mb: int = setting(4096, "Memory the agent may give to shards, in MiB.")
    reconnect_max_backoff_s: float = setting(
        2.0, "Longest wait between attempts to reopen the coordinator session."
    )

    def validate(self) -> None:
        """Check the agent's identity and coordinators."""
        super().validate()
        if not self.agent_id:
            raise SettingsError("agent id must not be empty")
        if not self.coordinators:
            raise SettingsError("at least one coordinator address is needed")
        if self.memory_budget_mb <= 0:
            raise SettingsError("memory budget must be positive")
