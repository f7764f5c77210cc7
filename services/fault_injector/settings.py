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
    max_duration_s: float = setting(600.0, "The longest duration a fault may ask for.")
    fault_token: str = setting(
        "", "When set, every call must carry 'authorization: Bearer <token>' metadata."
    )

    def validate(self) -> None:
        """Check the duration cap."""
        super().validate()
        if self.max_duration_s <= 0:
            raise SettingsError("max duration must be positive")
