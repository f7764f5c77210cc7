"""Recovery settings."""

from __future__ import annotations

import dataclasses

from services.common.settings import ServerSettings, SettingsError, setting
from services.recovery.breakers import BreakerConfig
from services.recovery.recoveries import RecoveriesConfig
from services.recovery.strategies import Strategy

DEFAULT_PORT = 50054

_BREAKER = BreakerConfig()
_RECOVERIES = RecoveriesConfig()


@dataclasses.dataclass
class RecoverySettings(ServerSettings):
    """Settings of the recovery service."""

    coordinators: list[str] = setting(
        ["127.0.0.1:50051"], "Coordinator replica addresses, comma-separated."
    )
    metrics: str = setting(
        "127.0.0.1:50055",
        "The metrics service's address, where every breaker transition is sent; empty sends none.",
    )
    metrics_queue: int = setting(
        10_000, "Records waiting for the metrics service, at most; more are dropped and counted."
    )
    metrics_give_up_s: float = setting(
        60.0,
        "Seconds a batch of records is retried while metrics is unreachable before it is "
        "dropped and counted.",
    )
    default_strategy: str = setting(
        "progressive",
        "Strategy for failures whose report and model name none: "
        "simple, progressive, coordinated or adaptive.",
    )
    breakers_enabled: bool = setting(
        _BREAKER.enabled,
        "Circuit breakers on; off keeps every breaker closed (to measure without them).",
    )
    breaker_window: int = setting(
        _BREAKER.window, "Outcomes a breaker's failure rate is taken over (the most recent)."
    )
    breaker_minimum_calls: int = setting(
        _BREAKER.minimum_calls, "Outcomes in the window before the failure rate counts."
    )
    breaker_failure_rate: float = setting(
        _BREAKER.failure_rate_threshold,
        "Failure fraction over the window that opens a closed breaker, in (0, 1].",
    )
    breaker_consecutive_failures: int = setting(
        _BREAKER.consecutive_failures,
        "Failures in a row that open a closed breaker; 0 turns this rule off.",
    )
    breaker_open_s: float = setting(
        _BREAKER.open_duration_s, "Seconds an open breaker stays open before it turns half-open."
    )
    breaker_half_open_probes: int = setting(
        _BREAKER.half_open_probes,
        "Successes in a row that close a half-open breaker; any failure reopens it.",
    )
    breaker_probes: bool = setting(
        _BREAKER.active_probes,
        "Probe a breaker's target (a pinned inference of a shard it holds, else its agent's "
        "status) when its open time ends; off leaves half-open breakers to traffic.",
    )
    breaker_probe_interval_s: float = setting(
        _BREAKER.probe_interval_s,
        "Seconds between the probes of a half-open breaker that needs more than one success.",
    )
    breaker_probe_timeout_s: float = setting(
        10.0, "Deadline of one breaker probe; a probe that runs past it failed."
    )
    dedupe_window_s: float = setting(
        _RECOVERIES.dedupe_window_s,
        "A report of the same agent, browser and shard within this many seconds joins the "
        "recovery running for it.",
    )
    max_recoveries: int = setting(
        _RECOVERIES.max_recoveries, "Recent recoveries kept; the oldest finished go first."
    )
    list_limit: int = setting(100, "Recoveries ListRecoveries returns when its limit is 0.")
    watch_buffer: int = setting(
        _RECOVERIES.watch_buffer,
        "Changes a watcher may fall behind by before its watch ends with RESOURCE_EXHAUSTED.",
    )
    action_timeout_s: float = setting(
        _RECOVERIES.action_timeout_s,
        "Deadline of each recovery action (a verify inference included) and of a placement lookup.",
    )
    in_place_budget_s: float = setting(
        _RECOVERIES.in_place_budget_s,
        "Seconds a whole in-place level (retry in place, reconnect; its verify included) "
        "may take before recovery escalates to the re-place.",
    )
    recovery_retries: int = setting(
        _RECOVERIES.retries,
        "Times a failed recovery is started again (so no shard is left short of a replica); "
        "0 turns this off.",
    )
    recovery_retry_after_s: float = setting(
        _RECOVERIES.retry_after_s,
        "Seconds before a failed recovery's first retry; each later one waits twice as long.",
    )
    verify_text: str = setting(
        "webshard recovery check", "Text a verify inference sends to a text model."
    )
    adaptive_min_trials: int = setting(
        3, "Trials of each strategy per failure kind before adaptive stops exploring."
    )
    adaptive_history: int = setting(
        50, "Most recent outcomes per failure kind and strategy that adaptive weighs."
    )
    adaptive_seed: int = setting(0, "Seed of adaptive's tie-breaks while it explores.")

    def strategy(self) -> Strategy:
        """The default strategy; raises SettingsError for an unknown name."""
        try:
            return Strategy.parse(self.default_strategy)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def breaker_config(self) -> BreakerConfig:
        """The breakers' configuration; raises SettingsError for a value out of range."""
        config = BreakerConfig(
            enabled=self.breakers_enabled,
            window=self.breaker_window,
            minimum_calls=self.breaker_minimum_calls,
            failure_rate_threshold=self.breaker_failure_rate,
            consecutive_failures=self.breaker_consecutive_failures,
            open_duration_s=self.breaker_open_s,
            half_open_probes=self.breaker_half_open_probes,
            active_probes=self.breaker_probes,
            probe_interval_s=self.breaker_probe_interval_s,
        )
        try:
            config.validate()
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return config

    def recoveries_config(self) -> RecoveriesConfig:
        """How recoveries run and are kept; raises SettingsError for a value out of range."""
        config = RecoveriesConfig(
            default_strategy=self.strategy(),
            dedupe_window_s=self.dedupe_window_s,
            max_recoveries=self.max_recoveries,
            watch_buffer=self.watch_buffer,
            action_timeout_s=self.action_timeout_s,
            retries=self.recovery_retries,
            retry_after_s=self.recovery_retry_after_s,
            in_place_budget_s=self.in_place_budget_s,
        )
        try:
            config.validate()
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return config

    def validate(self) -> None:
        """Fail at startup on an unknown strategy or a knob out of range."""
        super().validate()
        if not self.coordinators:
            raise SettingsError("coordinators is empty; give at least one host:port")
        self.breaker_config()
        if not 0 < self.breaker_probe_timeout_s <= 600:
            raise SettingsError(
                f"breaker probe timeout {self.breaker_probe_timeout_s} s must be within (0, 600]"
            )
        self.recoveries_config()
        if self.list_limit < 1:
            raise SettingsError(f"list limit {self.list_limit} must be at least 1")
        if self.adaptive_min_trials < 1 or self.adaptive_history < self.adaptive_min_trials:
            raise SettingsError(
                "adaptive min trials must be at least 1 and adaptive history at least that"
            )
