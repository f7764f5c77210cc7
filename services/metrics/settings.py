"""Metrics settings."""

from __future__ import annotations

import dataclasses

from services.common.settings import ServerSettings, setting

DEFAULT_PORT = 50055


@dataclasses.dataclass
class MetricsSettings(ServerSettings):
    """Settings of the metrics service."""

    db_path: str = setting("", "DuckDB file; empty puts metrics.duckdb in the data directory.")
    http_port: int = setting(8080, "Port of the HTTP dashboard.")
