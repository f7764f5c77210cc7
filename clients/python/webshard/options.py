"""Transport settings for the webshard clients: retries, keepalive and channel limits.

Every client takes these as keyword arguments and turns them into gRPC channel
arguments; nothing here opens a connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLUSTER_TOKEN_ENV",
    "FAULT_TOKEN_ENV",
    "ChannelOptions",
    "KeepaliveOptions",
    "RetryPolicy",
    "token_metadata",
]

CLUSTER_TOKEN_ENV = "WEBSHARD_CLUSTER_TOKEN"
"""Where the ``webshard`` command reads the cluster token: the token that services
started with it require of calls that change state (deploy, replace a shard, ...)."""
FAULT_TOKEN_ENV = "WEBSHARD_FAULT_TOKEN"
"""Where the ``webshard`` command reads the fault-injector's token."""

# Below this interval the services answer pings with GOAWAY ("too_many_pings"):
# their grpc.http2.min_ping_interval_without_data_ms is 5 s.
SERVER_MIN_PING_INTERVAL_S = 5.0


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` ("authorization: Bearer <token>");
    none for no token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _duration(seconds: float) -> str:
    """Formats seconds as a service-config JSON duration ("0.1s", "1s")."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the channel retries a call that failed with UNAVAILABLE.

    The policy goes to gRPC as service config, so the retries happen inside the
    channel (with jittered exponential backoff) and only for the methods a
    client declares idempotent: reads, and Infer, whose request id makes a
    repeated request answer the same. ``max_attempts=1`` turns retries off.
    """

    max_attempts: int = 5
    """Attempts in all, the first included; gRPC caps this at 5."""
    initial_backoff_s: float = 0.1
    """Upper bound of the random wait before the first retry, in seconds."""
    max_backoff_s: float = 1.0
    """Upper bound of the random wait before any retry, in seconds."""
    backoff_multiplier: float = 2.0
    """Factor the wait's upper bound grows by after each retry."""
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE",)
    """Status codes that are retried. UNAVAILABLE is the one that means the
    request may be sent again unchanged; others mean it would fail again."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0:
            raise ValueError("initial_backoff_s and max_backoff_s must be positive")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must not be below initial_backoff_s")
        if self.backoff_multiplier <= 0:
            raise ValueError("backoff_multiplier must be positive")

    def service_config(self, methods: Iterable[tuple[str, str]]) -> str:
        """Returns the gRPC service config JSON that applies this policy to ``methods``.

        ``methods`` holds (full service name, method name) pairs. With one
        attempt, or no methods, the config carries no retry policy at all,
        because gRPC rejects a retry policy with fewer than two attempts.
        """
        names = [{"service": service, "method": method} for service, method in methods]
        config: dict[str, Any] = {"methodConfig": []}
        if names and self.max_attempts > 1:
            config["methodConfig"].append(
                {
                    "name": names,
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": _duration(self.initial_backoff_s),
                        "maxBackoff": _duration(self.max_backoff_s),
                        "backoffMultiplier": self.backoff_multiplier,
                        "retryableStatusCodes": list(self.retryable_status_codes),
                    },
                }
            )
        return json.dumps(config, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class KeepaliveOptions:
    """HTTP/2 keepalive pings on the client's connections.

    Watches and ingest streams stay open for minutes with nothing to send; a
    peer that vanished (a killed pod, a cut network) sends no FIN, so without
    pings such a stream would wait forever. Pings find the dead peer within
    ``time_s + timeout_s``. The services refuse pings more often than every
    5 s (their minimum ping interval), so ``time_s`` may not go below that.
    """

    time_s: float = 20.0
    """Seconds of silence on a connection before the client sends a ping."""
    timeout_s: float = 10.0
    """Seconds to wait for the ping's answer before the connection is closed as dead."""
    permit_without_calls: bool = True
    """Ping even with no call in flight, so the next call finds a live connection
    (or fails over at once) instead of discovering a dead one on its deadline."""

    def __post_init__(self) -> None:
        if self.time_s < SERVER_MIN_PING_INTERVAL_S:
            raise ValueError(
                f"keepalive time_s must be at least {SERVER_MIN_PING_INTERVAL_S:g} s "
                f"(the services' minimum ping interval), not {self.time_s:g}"
            )
        if self.timeout_s <= 0:
            raise ValueError("keepalive timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """Everything a client's gRPC channels are built with."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of idempotent calls inside the channel."""
    keepalive: KeepaliveOptions = field(default_factory=KeepaliveOptions)
    """Keepalive pings, for long-lived streams."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest message sent or received. Activations and model outputs are
    large tensors; gRPC's own 4 MiB default is too small for them."""
    max_reconnect_backoff_s: float = 5.0
    """Longest wait between reconnection attempts to an unreachable address.
    gRPC's default (120 s) would keep a restarted coordinator replica out of
    use for minutes."""
    user_agent: str = "webshard-python"
    """Sent as the primary user agent, so server logs name the SDK."""

    def __post_init__(self) -> None:
        if self.max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        if self.max_reconnect_backoff_s <= 0:
            raise ValueError("max_reconnect_backoff_s must be positive")

    def channel_args(self, idempotent_methods: Iterable[tuple[str, str]]) -> list[tuple[str, Any]]:
        """Returns gRPC channel arguments, retrying only ``idempotent_methods``."""
        keepalive = self.keepalive
        return [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", self.retry.service_config(idempotent_methods)),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(keepalive.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
            # gRPC stops pinging after two pings with no data frames by default,
            # which would leave an idle watch unguarded; 0 lifts that limit.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_reconnect_backoff_ms", int(self.max_reconnect_backoff_s * 1000)),
            ("grpc.primary_user_agent", self.user_agent),
        ]
