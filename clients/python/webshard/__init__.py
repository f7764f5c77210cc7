"""webshard's Python SDK: clients for models sharded across a fleet of browsers.

``webshard.Client`` (blocking) and ``webshard.aio.Client`` (async) talk to the
coordinator; ``FaultInjectorClient``, ``RecoveryClient`` and ``MetricsClient``
to the other services. The generated contracts live in
``webshard.<service>.v1``.
"""

from importlib import metadata as _metadata

from webshard import aio, errors, options
from webshard.aio import InferResult, ShardHop, target_selector
from webshard.client import Client, FaultInjectorClient, MetricsClient, RecoveryClient
from webshard.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RPCCancelledError,
    RPCError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from webshard.options import ChannelOptions, KeepaliveOptions, RetryPolicy

try:
    __version__ = _metadata.version("webshard")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "ChannelOptions",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FaultInjectorClient",
    "InferResult",
    "InternalError",
    "InvalidArgumentError",
    "KeepaliveOptions",
    "MetricsClient",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCCancelledError",
    "RPCError",
    "RecoveryClient",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ShardHop",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "aio",
    "errors",
    "from_rpc_error",
    "options",
    "target_selector",
]
