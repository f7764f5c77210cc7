"""Kills one browser's processes when the agent that launched them dies, however it dies.

Run as ``python watchdog.py --agent-pid PID`` in its own session, with DIR in
the environment variable WEBSHARD_WATCHDOG_MARKER (not on the command line, so
the watchdog never matches its own marker), and its stdin a pipe whose only
writer is the agent. The agent writes ``pid N`` and ``pgid N`` lines as it
learns the processes of its launch, and ``clear`` once it reaped them itself.
When the pipe reaches end of file (the agent closed it, exited, or was
SIGKILLed: the kernel closes its end either way) or the agent's pid is gone,
the watchdog SIGKILLs the registered process groups and trees and every process
whose command line names DIR (the browser's working folder, which holds its
profile and chromedriver's log, so both chromedriver's and Chromium's command
lines contain it) or whose environment has WEBSHARD_BROWSER_LAUNCH=DIR (Firefox's
content processes name no profile; they inherit the variable from Firefox),
repeats until none is left, removes DIR and exits.

Chromium does not die with chromedriver (it is re-parented to init), and
PR_SET_PDEATHSIG is no answer either: it fires when the launching *thread*
exits, and Selenium launches from a worker thread. Hence this process.

This file imports only the standard library and psutil, so it starts quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import sys
import time

import psutil

MARKER_ENV = "WEBSHARD_WATCHDOG_MARKER"
"""The environment variable that carries the launch's working folder to the watchdog."""

LAUNCH_ENV = "WEBSHARD_BROWSER_LAUNCH"
"""The environment variable a browser is started with, set to its launch's working folder,
for browsers whose child processes do not name it on their command lines."""

_SWEEP_DEADLINE_S = 10.0
_PARENT_POLL_S = 1.0


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["pid"] == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = proc.info["cmdline"] or []
        if any(marker in part for part in cmdline) or _launched_in(proc) == marker:
            found.append(proc)
    return found


def _launched_in(proc: psutil.Process) -> str | None:
    with contextlib.suppress(psutil.Error):
        return proc.environ().get(LAUNCH_ENV)
    return None


def sweep(marker: str, pgids: set[int], pids: set[int]) -> int:
    """SIGKILL every process of the launch until none is left; returns how many were killed."""
    killed = 0
    deadline = time.monotonic() + _SWEEP_DEADLINE_S
    while time.monotonic() < deadline:
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        victims = _marked(marker)
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                victims.extend([proc, *proc.children(recursive=True)])
        alive = [p for p in victims if _running(p)]
        if not alive:
            return killed
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
        # Not psutil.wait_procs: it waitpid()s the caller's own children (the agent's
        # chromedriver), and a Popen whose child was reaped behind its back reports exit
        # status 0, so Selenium would take a killed chromedriver for a live one.
        settle = time.monotonic() + 1.0
        while any(_running(p) for p in alive) and time.monotonic() < settle:
            time.sleep(0.02)
    return killed


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main() -> None:
    """Watch the agent; sweep the launch when it goes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agent-pid", type=int, required=True, help="the agent's pid")
    args = parser.parse_args()
    marker = os.environ[MARKER_ENV]
    # The agent's own signals (Ctrl-C to its process group) must not stop the watchdog
    # before it has swept; it runs in its own session, and ignores SIGINT for good measure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pgids: set[int] = set()
    pids: set[int] = set()
    stdin = sys.stdin.buffer
    pending = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], _PARENT_POLL_S)
        if not ready:
            if not psutil.pid_exists(args.agent_pid) or os.getppid() != args.agent_pid:
                break
            continue
        chunk = os.read(stdin.fileno(), 4096)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            kind, _, value = line.decode().partition(" ")
            if kind == "pid":
                pids.add(int(value))
            elif kind == "pgid":
                pgids.add(int(value))
            elif kind == "clear":
                # The agent reaped them itself; their ids may be reused from now on.
                pids.clear()
                pgids.clear()
    sweep(marker, pgids, pids)
    shutil.rmtree(marker, ignore_errors=True)


if __name__ == "__main__":
    main()
