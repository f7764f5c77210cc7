"""The processes of one browser launch: finding them, measuring them, reaping them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import psutil

from .watchdog import MARKER_ENV, sweep

log = logging.getLogger(__name__)

_WATCHDOG = Path(__file__).with_name("watchdog.py")


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants that still exist."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int) -> int:
    """Resident memory summed over ``pid`` and its descendants, in bytes."""
    total = 0
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def kill_tree(pid: int, timeout: float = 2.0) -> None:
    """SIGKILL ``pid`` and its descendants (collected first, so none escapes by re-parenting).

    Returns once none of them runs; a zombie has exited (its parent, chromedriver
    for the browser, collects it), so it is not waited for.
    """
    victims = process_tree(pid)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + timeout
    while any(is_alive(p.pid) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.02)


def browser_main_pid(chromedriver_pid: int) -> int:
    """The Chromium main process chromedriver started (its child without a ``--type=``)."""
    try:
        children = psutil.Process(chromedriver_pid).children()
    except psutil.Error as exc:
        raise ProcessLookupError(f"chromedriver {chromedriver_pid} is gone: {exc}") from exc
    for child in children:
        with contextlib.suppress(psutil.Error):
            cmdline = child.cmdline()
            if cmdline and not any(part.startswith("--type=") for part in cmdline):
                return child.pid
    raise ProcessLookupError(f"chromedriver {chromedriver_pid} has no browser child")


def reap(marker: str, pgids: set[int], pids: set[int]) -> int:
    """SIGKILL every process of a launch (groups, trees, command lines naming ``marker``)."""
    return sweep(marker, pgids, pids)


class Watchdog:
    """A separate process that reaps a launch when this process dies.

    See ``watchdog.py``: it holds the read end of a pipe whose write end only
    this process has, so it learns of this process's death from the kernel even
    after a SIGKILL, and then kills everything the launch started.
    """

    def __init__(self, marker: Path) -> None:
        self._marker = marker
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The watchdog's pid once started."""
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        """Start the watchdog in its own session (signals to the agent's group skip it)."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(_WATCHDOG),
            "--agent-pid",
            str(os.getpid()),
            env={**os.environ, MARKER_ENV: str(self._marker)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None or self._proc.stdin.is_closing():
            return
        self._proc.stdin.write(line.encode() + b"\n")

    def watch_pid(self, pid: int) -> None:
        """Have the watchdog kill ``pid`` and its descendants if this process dies."""
        self._send(f"pid {pid}")

    def watch_group(self, pgid: int) -> None:
        """Have the watchdog kill process group ``pgid`` if this process dies."""
        self._send(f"pgid {pgid}")

    def forget(self) -> None:
        """The registered processes are reaped: their ids may be reused, so kill none by id."""
        self._send("clear")

    async def stop(self, timeout: float = 15.0) -> None:
        """Close the pipe (the watchdog sweeps by marker, removes the folder, exits); wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("browser watchdog did not exit; killing it", extra={"pid": proc.pid})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
