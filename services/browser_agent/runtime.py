"""What the agent asks of a place that runs shards: a browser page or the native runtime.

Both runtimes take the same shard bytes (ONNX, content-addressed by sha256) and
the same tensors (numpy arrays by graph name), so their outputs are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from webshard.common.v1 import common_pb2

Tensors = dict[str, np.ndarray]


class ShardRuntimeError(Exception):
    """Base of the errors a runtime raises; ``code`` names the gRPC status it maps to."""

    code = "INTERNAL"


class ShardRejected(ShardRuntimeError):
    """The shard bytes do not load (corrupt ONNX, unsupported operator)."""

    code = "INVALID_ARGUMENT"


class ProviderUnavailable(ShardRuntimeError):
    """The pinned execution provider is not available here; the message says why."""

    code = "FAILED_PRECONDITION"


class BadInput(ShardRuntimeError):
    """The tensors do not match the shard's inputs (missing name, wrong shape or type)."""

    code = "INVALID_ARGUMENT"


class RuntimeLost(ShardRuntimeError):
    """The runtime died under the call (browser crashed, page gone, socket closed)."""

    code = "UNAVAILABLE"


@dataclass(frozen=True)
class LoadResult:
    """A shard loaded into a runtime."""

    handle: str
    execution_provider: int  # common_pb2.ExecutionProvider value
    reason: str  # why that provider was chosen
    load_ms: float


@dataclass(frozen=True)
class RunResult:
    """One activation through a loaded shard."""

    outputs: Tensors
    compute_ms: float


class ShardRuntime(Protocol):
    """A browser or the native runtime, as the agent drives it."""

    @property
    def runtime_id(self) -> str:
        """The browser id (``browser-0``) or ``native``."""
        ...

    @property
    def engine(self) -> str:
        """``chromium`` or ``firefox`` for a browser, ``native`` for the native runtime."""
        ...

    def info(self) -> common_pb2.BrowserInfo:
        """State, capabilities, pid, process-tree memory and loaded shards."""
        ...

    async def load(self, sha256: str, path: str, provider: int) -> LoadResult:
        """Load the shard stored at ``path`` (bytes hashing to ``sha256``).

        ``provider`` is a common_pb2.ExecutionProvider value; UNSPECIFIED lets the
        runtime choose from its capabilities and say why.
        """
        ...

    async def run(self, handle: str, inputs: Tensors) -> RunResult:
        """Run one activation through a loaded shard."""
        ...

    async def unload(self, handle: str) -> None:
        """Release a loaded shard."""
        ...

    async def close(self) -> None:
        """Stop the runtime and reap everything it started."""
        ...
