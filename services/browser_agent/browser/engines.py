"""Browser engines: how one headless browser is started, driven and stopped.

``BrowserRuntime`` owns what every engine shares (the page, its WebSocket, the
shards, supervision, reaping); an engine owns only the life cycle it alone
knows: launching with a fresh profile in the launch's working folder, opening
the page, asking whether the page crashed, crashing it, taking it offline, and
quitting. Chromium is driven by Selenium and chromedriver (CDP for the fault
hooks); Firefox by the W3C WebDriver BiDi protocol it speaks itself (no
geckodriver). Every method blocks: the runtime calls them in worker threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from services.common.engines import unknown_engine

from .errors import LaunchFailed
from .options import CHROMIUM_FLAGS, FIREFOX_PREFS, BrowserOptions
from .processes import browser_main_pid
from .watchdog import LAUNCH_ENV

log = logging.getLogger(__name__)


class PageGone(Exception):
    """The engine cannot reach the page any more (its driver or connection is gone)."""


class Engine(Protocol):
    """One browser's life cycle, as the runtime drives it."""

    name: str
    """``chromium`` or ``firefox``."""

    @property
    def version(self) -> str:
        """The browser's version, once started."""
        ...

    @property
    def group(self) -> int | None:
        """The process group the launch runs in (one killpg reaps it)."""
        ...

    @property
    def browser_pid(self) -> int | None:
        """The browser's main process."""
        ...

    def start(self, workdir: Path) -> None:
        """Launch the browser with a fresh profile under ``workdir``; every process of
        the launch names it on its command line or carries it in its environment
        (``LAUNCH_ENV``), which is how it is reaped."""
        ...

    def open(self, url: str) -> None:
        """Open ``url`` in the browser's one page."""
        ...

    def crash_message(self) -> str | None:
        """Why the page is gone for good (its content process crashed), or None when it
        still answers a script."""
        ...

    def crash_page(self) -> None:
        """Crash the page's content process, as a renderer crash would."""
        ...

    def emulate_offline(self, offline: bool) -> None:
        """Take the page off the network (or back on) with the engine's own emulation."""
        ...

    def quit(self) -> None:
        """End the session and the browser gracefully."""
        ...

    def collect(self) -> None:
        """Collect the exit status of the launch's own child process (no zombie)."""
        ...

    def log_tail(self) -> str:
        """The end of the launch's own log, for an error message ("" when empty)."""
        ...


def make_engine(options: BrowserOptions) -> Engine:
    """The engine ``options.engine`` names; ValueError listing the engines otherwise."""
    if options.engine == "chromium":
        return ChromiumEngine(options)
    if options.engine == "firefox":
        return FirefoxEngine(options)
    raise ValueError(unknown_engine(options.engine))


def missing_binaries(options: BrowserOptions) -> list[str]:
    """The binaries ``options.engine`` needs that are not there."""
    needed = (
        [options.chromium, options.chromedriver]
        if options.engine == "chromium"
        else [options.firefox]
    )
    return [path for path in needed if not Path(path).is_file()]


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip()
        if text:
            return text[-2000:]
    return ""


class ChromiumEngine:
    """Headless Chromium under chromedriver (Selenium), CDP for the fault hooks."""

    name = "chromium"

    def __init__(self, options: BrowserOptions) -> None:
        self._options = options
        self._driver: webdriver.Chrome | None = None
        self._service: Service | None = None
        self._workdir: Path | None = None
        self._group: int | None = None
        self._browser_pid: int | None = None
        self._version = ""

    @property
    def version(self) -> str:
        return self._version

    @property
    def group(self) -> int | None:
        return self._group

    @property
    def browser_pid(self) -> int | None:
        return self._browser_pid

    def start(self, workdir: Path) -> None:
        self._workdir = workdir
        options = webdriver.ChromeOptions()
        # An explicit binary and driver: Selenium Manager is never run (it would go online).
        options.binary_location = self._options.chromium
        for flag in (*CHROMIUM_FLAGS, *self._options.extra_args):
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={workdir / 'profile'}")
        service = Service(
            executable_path=self._options.chromedriver,
            # The log path puts the working folder on chromedriver's command line, which is
            # how the watchdog finds chromedriver even before it learns its pid.
            log_output=str(workdir / "chromedriver.log"),
            service_args=["--log-level=WARNING"],
            # Its own process group (Chromium inherits it): one killpg reaps the launch,
            # and a Ctrl-C to the agent's group does not kill the browser under a call.
            popen_kw={"start_new_session": True},
            # Chromium's crash handler (chrome_crashpad_handler) daemonizes out of the
            # process group; with its database in the working folder its command line
            # carries the marker too, and crash reports do not pile up in $HOME.
            env={**os.environ, "BREAKPAD_DUMP_LOCATION": str(workdir / "crashes")},
        )
        self._service = service
        driver = webdriver.Chrome(service=service, options=options)
        self._driver = driver
        assert service.process is not None
        self._group = service.process.pid
        self._browser_pid = browser_main_pid(service.process.pid)
        self._version = str(driver.capabilities.get("browserVersion", ""))
        driver.set_page_load_timeout(self._options.launch_timeout_s)

    def _live_driver(self) -> webdriver.Chrome:
        if self._driver is None:
            raise PageGone("the browser has no driver")
        return self._driver

    def open(self, url: str) -> None:
        self._live_driver().get(url)

    def crash_message(self) -> str | None:
        try:
            self._live_driver().execute_script("return 1")
        except WebDriverException as exc:
            if "crash" in str(exc).lower():
                return (exc.msg or str(exc)).splitlines()[0]
        return None

    def _cdp(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._live_driver().execute_cdp_cmd(command, args)
        return result

    def crash_page(self) -> None:
        # The command's own target dies under it: an error is the expected answer.
        with contextlib.suppress(WebDriverException):
            self._cdp("Page.crash", {})

    def emulate_offline(self, offline: bool) -> None:
        self._cdp("Network.enable", {})
        self._cdp(
            "Network.emulateNetworkConditions",
            {"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )

    def quit(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.quit()

    def collect(self) -> None:
        # chromedriver is our child (Chromium is its child).
        if self._service is not None and self._service.process is not None:
            with contextlib.suppress(OSError):
                self._service.process.poll()

    def log_tail(self) -> str:
        if self._workdir is None:
            return ""
        text = _tail(self._workdir / "chromedriver.log")
        return f"chromedriver log: {text}" if text else ""


_BIDI_LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


class FirefoxEngine:
    """Headless Firefox driven over WebDriver BiDi, which it serves itself.

    Firefox is started with ``--remote-debugging-port=0``; it picks a free port
    and says which on stderr, and the engine opens a BiDi session there. The
    profile is made fresh with the preferences in ``FIREFOX_PREFS`` (no updates,
    no telemetry, WebGPU on).
    """

    name = "firefox"

    def __init__(self, options: BrowserOptions) -> None:
        self._options = options
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._socket: ClientConnection | None = None
        self._closing = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._ids = 0
        self._context = ""
        self._page = ""
        self._version = ""

    @property
    def version(self) -> str:
        return self._version

    @property
    def group(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def browser_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, workdir: Path) -> None:
        self._workdir = workdir
        profile = workdir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in FIREFOX_PREFS)
        )
        log = open(workdir / "firefox.log", "wb")  # noqa: SIM115 - the child keeps it
        try:
            self._process = subprocess.Popen(
                [
                    self._options.firefox,
                    "--headless",
                    "--no-remote",
                    "--profile",
                    str(profile),
                    "--remote-debugging-port=0",
                    # Scripts in the browser's own (chrome) scope: how the page's content
                    # process is found. The port listens on loopback only.
                    "--remote-allow-system-access",
                    *self._options.extra_args,
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                # Its content processes name no profile: they carry the launch's
                # folder in their environment instead, for the reap.
                env={**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1", LAUNCH_ENV: str(workdir)},
            )
        finally:
            log.close()
        url = self._listening(workdir / "firefox.log")
        self._socket = self._closing.enter_context(
            connect(f"{url}/session", max_size=None, open_timeout=10)
        )
        session = self._command("session.new", {"capabilities": {}})
        self._version = str(session.get("capabilities", {}).get("browserVersion", ""))
        tree = self._command("browsingContext.getTree", {"maxDepth": 0})
        self._context = tree["contexts"][0]["context"]

    def _listening(self, log: Path) -> str:
        """The BiDi address Firefox prints once it listens."""
        assert self._process is not None
        deadline = time.monotonic() + self._options.launch_timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                found = _BIDI_LISTENING.search(log.read_text(errors="replace"))
                if found:
                    return found.group(1)
            if self._process.poll() is not None:
                raise LaunchFailed(f"firefox exited with {self._process.returncode}")
            time.sleep(0.05)
        raise LaunchFailed("firefox did not start its WebDriver BiDi server in time")

    def _command(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one BiDi command and wait for its answer (events in between are skipped)."""
        with self._lock:
            if self._socket is None:
                raise PageGone("the browser has no BiDi session")
            self._ids += 1
            ident = self._ids
            try:
                self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
                while True:
                    message = json.loads(self._socket.recv(timeout=self._options.call_timeout_s))
                    if message.get("id") == ident:
                        break
            except (WebSocketException, OSError, TimeoutError) as exc:
                raise PageGone(f"BiDi {method}: {exc}") from exc
        if message.get("type") == "error":
            raise BiDiError(method, message.get("error", ""), message.get("message", ""))
        result: dict[str, Any] = message.get("result", {})
        return result

    def open(self, url: str) -> None:
        self._command(
            "browsingContext.navigate", {"context": self._context, "url": url, "wait": "complete"}
        )
        self._page = url

    def crash_message(self) -> str | None:
        # A crashed page's context shows another document in a fresh process: a blank
        # one at first, then Firefox's about:tabcrashed.
        try:
            shown = self._evaluate(self._context, "document.documentURI")
        except BiDiError as exc:
            return str(exc)
        if shown != self._page:
            return f"the page's content process crashed (now showing {str(shown)[:40]})"
        return None

    def _evaluate(self, context: str, expression: str) -> Any:
        answer = self._command(
            "script.evaluate",
            {"expression": expression, "target": {"context": context}, "awaitPromise": False},
        )
        if answer.get("type") == "exception":
            details = answer.get("exceptionDetails", {})
            raise BiDiError("script.evaluate", "exception", str(details.get("text", details)))
        return answer.get("result", {}).get("value")

    def crash_page(self) -> None:
        # Firefox lets no page navigate to about:crashcontent over BiDi, and its content
        # processes handle a SIGSEGV sent to them, so the page's content process (its
        # pid read in the browser's chrome scope) is SIGKILLed, as the OOM killer would.
        tree = self._command("browsingContext.getTree", {"maxDepth": 0, "moz:scope": "chrome"})
        window = tree["contexts"][0]["context"]
        pid = self._evaluate(
            window, "gBrowser.selectedBrowser.browsingContext.currentWindowGlobal.osPid"
        )
        if not isinstance(pid, int) or pid <= 0 or pid == self.browser_pid:
            raise BiDiError("crash", "no content process", f"the page runs in process {pid}")
        os.kill(pid, signal.SIGKILL)

    def emulate_offline(self, offline: bool) -> None:
        try:
            self._command(
                "emulation.setNetworkConditions",
                {
                    "networkConditions": {"type": "offline"} if offline else None,
                    "contexts": [self._context],
                },
            )
        except BiDiError as exc:
            if exc.error != "unknown command":
                raise
            # An older Firefox without the command: the runtime's cut of the page's
            # socket is the whole of the fault there.
            log.info("no BiDi network emulation in this Firefox", extra={"error": str(exc)})

    def quit(self) -> None:
        with contextlib.suppress(BiDiError, PageGone):
            self._command("browser.close", {})
        self._socket = None
        self._closing.close()
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=self._options.quit_timeout_s)

    def collect(self) -> None:
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.poll()

    def log_tail(self) -> str:
        if self._workdir is None:
            return ""
        text = _tail(self._workdir / "firefox.log")
        return f"firefox log: {text}" if text else ""


class BiDiError(Exception):
    """A BiDi command answered with an error."""

    def __init__(self, method: str, error: str, message: str) -> None:
        super().__init__(f"BiDi {method}: {error}: {message}")
        self.error = error
