"""Headless browser pages (Chromium or Firefox) that run shards with onnxruntime-web, and a pool
of them."""

from .errors import CallTimedOut, LaunchFailed, NoStandby, ShardNotLoaded
from .events import BrowserEvent, BrowserEventKind, EventCallback
from .options import BrowserOptions, find_ort_dist
from .pool import BrowserPool
from .runtime import BrowserRuntime

__all__ = [
    "BrowserEvent",
    "BrowserEventKind",
    "BrowserOptions",
    "BrowserPool",
    "BrowserRuntime",
    "CallTimedOut",
    "EventCallback",
    "LaunchFailed",
    "NoStandby",
    "ShardNotLoaded",
    "find_ort_dist",
]
