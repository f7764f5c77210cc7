"""Errors a browser runtime adds to those every runtime raises (``..runtime``)."""

from __future__ import annotations

from ..runtime import ShardRuntimeError


class ShardNotLoaded(ShardRuntimeError):
    """No shard is loaded under the handle (never loaded, unloaded, or lost with its page)."""

    code = "NOT_FOUND"


class LaunchFailed(ShardRuntimeError):
    """The browser did not start, or its page did not come up with onnxruntime-web."""

    code = "UNAVAILABLE"


class CallTimedOut(ShardRuntimeError):
    """The page did not answer a call within its deadline."""

    code = "DEADLINE_EXCEEDED"


class NoStandby(ShardRuntimeError):
    """A pool was asked for a standby browser and has none ready."""

    code = "UNAVAILABLE"
