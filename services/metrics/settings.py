"""Metrics settings."""

from __future__ import annotations

import dataclasses

from services.common.settings import ServerSettings, SettingsError, setting

DEFAULT_PORT = 50055


@dataclasses.dataclass
class MetricsSettings(ServerSettings):
    """Settings of the metrics service."""

    db_path: str = setting("", "DuckDB file; empty puts metrics.duckdb in the data directory.")
    http_port: int = setting(8080, "Port of the HTTP dashboard; 0 turns the dashboard off.")
    coordinators: list[str] = setting(
        ["127.0.0.1:50051"],
        "Coordinator replica addresses, comma-separated; the dashboard shows each replica.",
    )
    recovery: str = setting(
        "127.0.0.1:50054",
        "The recovery service's address, read by the dashboard for recoveries and breakers.",
    )
    fault_injector: str = setting(
        "127.0.0.1:50053",
        "The fault-injector's address, read by the dashboard for the faults in progress.",
    )
    fault_token: str = setting(
        "", "Bearer token the dashboard sends to a fault-injector that requires one."
    )
    retention_days: float = setting(
        30.0, "Days events are kept; older rows are dropped at start and every hour."
    )
    ingest_batch_events: int = setting(
        10_000, "Events an ingest stream commits in one transaction, at most."
    )
    ingest_flush_ms: float = setting(
        50.0, "Longest an ingested event waits for its batch to fill before it is committed."
    )

    def validate(self) -> None:
        """Raise SettingsError when a value is out of range."""
        super().validate()
        if not 0 <= self.http_port <= 65535:
            raise SettingsError(f"http port {self.http_port} is outside 0..65535")
        if self.retention_days <= 0:
            raise SettingsError(f"retention {self.retention_days} days is not positive")
        if self.ingest_batch_events < 1:
            raise SettingsError(f"ingest batch of {self.ingest_batch_events} events is below 1")
        if self.ingest_flush_ms <= 0:
            raise SettingsError(f"ingest flush interval {self.ingest_flush_ms} ms is not positive")
