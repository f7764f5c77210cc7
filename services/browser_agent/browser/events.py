"""What a browser runtime reports on its own, outside any call: failures and recoveries."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable


class BrowserEventKind(enum.StrEnum):
    """The kinds of things a browser runtime reports."""

    DEVICE_LOST = "device_lost"
    """The page's WebGPU device was lost (GPUDevice.lost resolved)."""

    PAGE_DISCONNECTED = "page_disconnected"
    """The page's socket closed while the browser was meant to be up."""

    PAGE_RECONNECTED = "page_reconnected"
    """The page reconnected its socket; its loaded shards are still there."""

    PAGE_CRASHED = "page_crashed"
    """The page's renderer crashed; its shards are gone."""

    PROCESS_EXITED = "process_exited"
    """The browser's main process exited; its process tree was reaped."""

    PAGE_ERROR = "page_error"
    """The page had an uncaught exception or unhandled rejection."""


@dataclasses.dataclass(frozen=True)
class BrowserEvent:
    """One thing a browser reported, with when it was seen."""

    browser_id: str
    """The browser it happened in."""

    kind: BrowserEventKind
    """What happened."""

    message: str
    """The page's or the process's own words for it."""

    at: float = dataclasses.field(default_factory=time.time)
    """When the agent saw it, in seconds since the epoch."""


EventCallback = Callable[[BrowserEvent], None]
"""Receives events; it runs on the event loop and must not block."""
