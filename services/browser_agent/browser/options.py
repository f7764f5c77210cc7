"""How a browser runtime starts its browser and where it finds onnxruntime-web."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

ORT_DIST_ENV = "WEBSHARD_ORT_DIST"
"""Environment variable naming onnxruntime-web's ``dist`` folder, overriding the search."""

ORT_MODULE = "ort.min.mjs"
"""The onnxruntime-web bundle the page imports: wasm, webgpu and webnn execution providers."""

# Flags that make headless Chromium usable here: a WebGPU adapter even without a
# GPU (SwiftShader), no network traffic of its own, and /tmp instead of a small
# /dev/shm in containers. --no-sandbox because agents run as root in CI and in
# containers without user namespaces. WebNN is behind a feature flag: with it the
# page can use WebNN where the platform has it, and where it does not,
# createContext() fails with the browser's own reason, which is what we report.
# --expose-gc lets the page give back the memory a memory_pressure fault held.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--enable-unsafe-webgpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--enable-features=WebMachineLearningNeuralNetwork",
    "--js-flags=--expose-gc",
)


# A fresh Firefox profile's preferences: nothing of its own on the network (updates,
# telemetry, safe browsing, captive-portal checks), no first-run pages, and WebGPU on
# (with Mesa's software Vulkan adapter where there is no GPU).
FIREFOX_PREFS: tuple[tuple[str, bool | int | str], ...] = (
    ("app.update.disabledForTesting", True),
    ("browser.shell.checkDefaultBrowser", False),
    ("browser.startup.homepage_override.mstone", "ignore"),
    ("browser.safebrowsing.update.enabled", False),
    ("datareporting.policy.dataSubmissionEnabled", False),
    ("datareporting.healthreport.uploadEnabled", False),
    ("toolkit.telemetry.enabled", False),
    ("network.captive-portal-service.enabled", False),
    ("network.connectivity-service.enabled", False),
    ("extensions.update.enabled", False),
    # One page, so one content process: none prelaunched for tabs that never come.
    ("dom.ipc.processPrelaunch.enabled", False),
    ("dom.ipc.processCount", 1),
    ("dom.webgpu.enabled", True),
    ("gfx.webgpu.ignore-blocklist", True),
)


@dataclasses.dataclass(frozen=True)
class BrowserOptions:
    """How to start one headless browser and its page."""

    engine: str = "chromium"
    """The browser engine: ``chromium`` (Selenium + chromedriver) or ``firefox``
    (WebDriver BiDi)."""

    chromium: str = "/usr/bin/chromium"
    """The Chromium binary; Selenium Manager is never asked for one."""

    chromedriver: str = "/usr/bin/chromedriver"
    """The chromedriver binary matching ``chromium``."""

    firefox: str = "/usr/bin/firefox-esr"
    """The Firefox binary (Debian's ``firefox-esr``)."""

    ort_dist: str = ""
    """onnxruntime-web's ``dist`` folder; empty: $WEBSHARD_ORT_DIST, else the repository's
    ``node_modules/onnxruntime-web/dist``."""

    extra_args: tuple[str, ...] = ()
    """Command-line flags added after the engine's built-in ones."""

    temp_root: str = ""
    """Where each browser's working folder (profile, driver log) is made; empty: the system's."""

    launch_timeout_s: float = 60.0
    """How long a launch may take until the page has reported its capabilities."""

    call_timeout_s: float = 60.0
    """How long one page call (load, run) may take before CallTimedOut; generous, because
    a software WebGPU adapter takes seconds where a GPU takes milliseconds."""

    quit_timeout_s: float = 5.0
    """How long ``close`` waits for a graceful quit before killing the processes."""

    process_poll_s: float = 0.25
    """How often the browser's main process is checked for having exited."""


def find_ort_dist(configured: str = "") -> Path:
    """onnxruntime-web's ``dist`` folder: ``configured``, $WEBSHARD_ORT_DIST, or node_modules.

    The search walks up from this package to the first ``node_modules`` holding
    onnxruntime-web, which is the repository root in a checkout.
    """
    explicit = configured or os.environ.get(ORT_DIST_ENV, "")
    candidates: list[Path]
    if explicit:
        candidates = [Path(explicit)]
    else:
        here = Path(__file__).resolve()
        candidates = [p / "node_modules" / "onnxruntime-web" / "dist" for p in here.parents]
    for candidate in candidates:
        if (candidate / ORT_MODULE).is_file():
            return candidate
    where = explicit or f"any node_modules above {Path(__file__).parent}"
    raise FileNotFoundError(
        f"onnxruntime-web is not at {where} (no {ORT_MODULE}); run `npm ci` at the repository "
        f"root or set {ORT_DIST_ENV} to its dist folder"
    )
