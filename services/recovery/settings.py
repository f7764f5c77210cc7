"""Recovery settings."""

from __future__ import annotations

import dataclasses

from services.common.settings import ServerSettings, setting

DEFAULT_PORT = 50054


@dataclasses.dataclass
class RecoverySettings(ServerSettings):
    """Settings of the recovery service."""

    coordinators: list[str] = setting(
        ["127.0.0.1:50051"], "Coordinator replica addresses, comma-separated."
    )
    default_strategy: str = setting(
        "progressive",
        "Strategy for failures whose model names none: "
        "simple, progressive, coordinated or adaptive.",
    )
