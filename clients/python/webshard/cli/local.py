"""A local webshard cluster: every service as a process on loopback.

``LocalCluster`` starts three coordinator replicas, N browser agents, the
fault-injector, recovery and metrics; waits until each answers SERVING on the
standard health service; writes ``<data_dir>/cluster.json`` so ``webshard
status`` can find them; and stops every process it started, by PID and by process
group, so nothing (a browser included) is left behind.

Each child is told its parent's PID (``WEBSHARD_PARENT_PID``) and asks the kernel
for SIGTERM when that parent dies, so even a SIGKILLed ``webshard up`` takes its
services with it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from webshard.options import CLUSTER_TOKEN_ENV

STATE_FILE = "cluster.json"
COORDINATOR_REPLICAS = 3

# Default ports: the service's own (DESIGN.md §1), plus 10 per extra replica or agent.
DEFAULT_PORTS = {
    "coordinator": 50051,
    "browser_agent": 50052,
    "fault_injector": 50053,
    "recovery": 50054,
    "metrics": 50055,
}
DASHBOARD_PORT = 8080
ENGINES = ("chromium", "firefox")
"""The browser engines an agent runs (``--engine``)."""


def parse_engines(text: str) -> list[str]:
    """A comma-separated list of engines (``--engines``); ArgumentTypeError naming the
    engines for an unknown one."""
    engines = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if not engines or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown engine {(unknown or [text])[0]!r}; engines: {', '.join(ENGINES)}"
        )
    return engines


def default_data_dir() -> Path:
    """``$WEBSHARD_HOME`` or ``$XDG_STATE_HOME/webshard`` or ``~/.local/state/webshard``."""
    if home := os.environ.get("WEBSHARD_HOME"):
        return Path(home)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "webshard"


@dataclass
class ProcessInfo:
    """One process of a local cluster."""

    name: str
    service: str
    address: str
    log: str
    pid: int = 0
    args: list[str] = field(default_factory=list)


class ClusterError(RuntimeError):
    """The local cluster could not start."""


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port(host: str) -> int:
    """A free port below the ephemeral range where there is room for one.

    A port the kernel picks (bind to 0) is an ephemeral one, and until the service
    binds it an outgoing connection (another service dialling its peers) may be given
    it as its source port: the service would then fail to listen.
    """
    low = _ephemeral_low()
    if low > 11_000:
        pick = random.SystemRandom()
        for _ in range(100):
            port = pick.randrange(10_000, low)
            if not _port_in_use(host, port):
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def plan(
    *,
    agents: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    auto_ports: bool = False,
    extra_args: dict[str, list[str]] | None = None,
    engines: Sequence[str] = (),
) -> list[ProcessInfo]:
    """The processes of a cluster, with their ports and command-line arguments. Agents
    take ``engines`` in turn (none given: each agent's own default, Chromium)."""
    if agents < 1:
        raise ClusterError("a cluster needs at least one agent")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ClusterError(f"unknown browser engine {unknown[0]!r}; engines: {', '.join(ENGINES)}")
    used: set[int] = set()

    def port_for(service: str, index: int) -> int:
        if auto_ports:
            while (port := _free_port(host)) in used:
                pass
        else:
            port = DEFAULT_PORTS[service] + 10 * index
            if _port_in_use(host, port):
                raise ClusterError(
                    f"port {port} on {host} is in use (is another cluster running? "
                    "`webshard status` tells); use --ports auto to pick free ports"
                )
        used.add(port)
        return port

    logs = data_dir / "logs"
    procs: list[ProcessInfo] = []

    def add(name: str, service: str, index: int, args: list[str]) -> ProcessInfo:
        port = port_for(service, index)
        info = ProcessInfo(
            name=name,
            service=service,
            address=f"{host}:{port}",
            log=str(logs / f"{name}.log"),
            args=["--host", host, "--port", str(port), *args],
        )
        procs.append(info)
        return info

    coordinators = [
        add(f"coordinator-{i}", "coordinator", i, ["--replica-id", f"coordinator-{i}"])
        for i in range(COORDINATOR_REPLICAS)
    ]
    for c in coordinators:
        peers = [f"{o.name}={o.address}" for o in coordinators if o is not c]
        c.args += ["--peers", ",".join(peers), "--data-dir", str(data_dir / c.name)]
    coordinator_list = ",".join(c.address for c in coordinators)
    for i in range(agents):
        add(
            f"agent-{i}",
            "browser_agent",
            i,
            [
                "--agent-id",
                f"agent-{i}",
                "--coordinators",
                coordinator_list,
                "--data-dir",
                str(data_dir / f"agent-{i}"),
                *(["--engine", engines[i % len(engines)]] if engines else []),
            ],
        )
    injector = add("fault-injector", "fault_injector", 0, ["--coordinators", coordinator_list])
    recovery = add("recovery", "recovery", 0, ["--coordinators", coordinator_list])
    for proc in procs:
        if proc.service in ("coordinator", "browser_agent"):
            proc.args += ["--recovery", recovery.address]
    injector.args += ["--recovery", recovery.address, "--cluster-state", str(data_dir / STATE_FILE)]
    http_port = _free_port(host) if auto_ports else DASHBOARD_PORT
    if not auto_ports and _port_in_use(host, http_port):
        raise ClusterError(
            f"port {http_port} on {host} (the dashboard) is in use; "
            "use --ports auto to pick free ports"
        )
    metrics = add(
        "metrics",
        "metrics",
        0,
        [
            "--data-dir",
            str(data_dir / "metrics"),
            "--http-port",
            str(http_port),
            "--coordinators",
            coordinator_list,
            "--recovery",
            recovery.address,
            "--fault-injector",
            injector.address,
        ],
    )
    # Breaker transitions and faults (refused ones too) go to metrics as they happen.
    for proc in (injector, recovery):
        proc.args += ["--metrics", metrics.address]
    for proc in procs:
        proc.args += (extra_args or {}).get(proc.service, [])
    # Agents given the injector's fault token require it of its fault hooks; one set in
    # the environment (WEBSHARD_FAULT_TOKEN) reaches every process already.
    given = (extra_args or {}).get("fault_injector", [])
    tokens = [v for f, v in itertools.pairwise(given) if f == "--fault-token"]
    tokens += [a.split("=", 1)[1] for a in given if a.startswith("--fault-token=")]
    for proc in procs:
        if (
            tokens
            and proc.service == "browser_agent"
            and not any(a.startswith("--fault-token") for a in proc.args)
        ):
            proc.args += ["--fault-token", tokens[-1]]
    return procs


class LocalCluster:
    """Starts, watches and stops a local cluster. Use as a context manager."""

    def __init__(
        self,
        *,
        agents: int = 2,
        data_dir: Path | None = None,
        host: str = "127.0.0.1",
        auto_ports: bool = False,
        python: str = sys.executable,
        extra_args: dict[str, list[str]] | None = None,
        engines: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cluster_token: str | None = None,
    ) -> None:
        """``cluster_token`` (else $WEBSHARD_CLUSTER_TOKEN, inherited) goes to every process in
        its environment, never on a command line, where ``ps`` and cluster.json would show it."""
        self.data_dir = (data_dir or default_data_dir()).resolve()
        self.processes = plan(
            agents=agents,
            data_dir=self.data_dir,
            host=host,
            auto_ports=auto_ports,
            extra_args=extra_args,
            engines=engines,
        )
        self._python = python
        tokens = {CLUSTER_TOKEN_ENV: cluster_token} if cluster_token else {}
        self._env = {
            **os.environ,
            **(env or {}),
            **tokens,
            "WEBSHARD_PARENT_PID": str(os.getpid()),
        }
        self._popen: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def state_file(self) -> Path:
        """Where ``webshard status`` finds the cluster."""
        return self.data_dir / STATE_FILE

    def address(self, name: str) -> str:
        """The address of the process called ``name`` (for example ``coordinator-0``)."""
        for proc in self.processes:
            if proc.name == name:
                return proc.address
        raise KeyError(name)

    def coordinators(self) -> list[str]:
        """The coordinator replicas' addresses."""
        return [p.address for p in self.processes if p.service == "coordinator"]

    def dashboard_url(self) -> str | None:
        """The metrics service's dashboard page, or None when it is turned off."""
        metrics = next((p for p in self.processes if p.service == "metrics"), None)
        if metrics is None:
            return None
        ports = [v for f, v in itertools.pairwise(metrics.args) if f == "--http-port"]
        if not ports or int(ports[-1]) == 0:
            return None
        host = metrics.address.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{int(ports[-1])}/"

    def start(self, *, timeout: float = 60.0) -> None:
        """Start every process and wait until each is SERVING; stop them all on failure."""
        if self.state_file.exists():
            owner = read_state(self.data_dir)
            if owner is not None and _alive(int(str(owner.get("pid", 0)))):
                raise ClusterError(
                    f"a cluster is already running from {self.data_dir} (pid {owner['pid']})"
                )
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            # Coordinators first, so agents find a replica to attach to at once.
            coordinators = [p.name for p in self.processes if p.service == "coordinator"]
            for proc in self.processes:
                if proc.name in coordinators:
                    self._spawn(proc)
            self._write_state()
            self.wait_serving(timeout=timeout, names=coordinators)
            for proc in self.processes:
                if proc.name not in coordinators:
                    self._spawn(proc)
            self._write_state()
            self.wait_serving(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, proc: ProcessInfo) -> None:
        with open(proc.log, "ab") as log:
            popen = subprocess.Popen(
                [self._python, "-m", f"services.{proc.service}", *proc.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )
        proc.pid = popen.pid
        self._popen[proc.name] = popen

    def restart(self, name: str, *, timeout: float = 60.0) -> None:
        """Start a process of this cluster again (after it exited or was killed)."""
        proc = next(p for p in self.processes if p.name == name)
        old = self._popen.get(name)
        if old is not None and old.poll() is None:
            raise ClusterError(f"{name} is still running (pid {old.pid})")
        self._spawn(proc)
        self._write_state()
        self.wait_serving(timeout=timeout, names=[name])

    def popen(self, name: str) -> subprocess.Popen[bytes]:
        """The process handle of ``name``."""
        return self._popen[name]

    def wait_serving(self, *, timeout: float, names: Sequence[str] | None = None) -> None:
        """Wait until the named processes (all by default) answer SERVING."""
        deadline = time.monotonic() + timeout
        pending = [
            p
            for p in self.processes
            if p.name in self._popen and (names is None or p.name in names)
        ]
        while pending:
            for proc in list(pending):
                popen = self._popen[proc.name]
                if popen.poll() is not None:
                    raise ClusterError(
                        f"{proc.name} exited with status {popen.returncode} before it was "
                        f"ready; its log: {proc.log}\n{_tail(proc.log)}"
                    )
                if health(proc.address, timeout=1.0) == "SERVING":
                    pending.remove(proc)
            if pending and time.monotonic() > deadline:
                names_left = ", ".join(p.name for p in pending)
                raise ClusterError(f"not SERVING after {timeout:.0f} s: {names_left}")
            if pending:
                time.sleep(0.1)

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM every process (agents first), wait, SIGKILL what is left, reap the groups."""
        order = sorted(self._popen.items(), key=lambda kv: kv[0].startswith("agent-"), reverse=True)
        for _, popen in order:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, popen in order:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            if popen.poll() is None:
                popen.kill()
                popen.wait()
            # Anything still in the child's process group (a browser it failed to
            # reap) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
        self._popen.clear()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "dashboard": self.dashboard_url(),
            "processes": [asdict(p) for p in self.processes],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_state(data_dir: Path) -> dict[str, object] | None:
    """The state file of a cluster started from ``data_dir``, or None."""
    try:
        state: dict[str, object] = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state


def local_coordinators(data_dir: Path) -> list[str]:
    """The coordinator addresses of the local cluster in ``data_dir``, if one runs."""
    state = read_state(data_dir) or {}
    processes = state.get("processes")
    return [
        str(p["address"])
        for p in (processes if isinstance(processes, list) else [])
        if p.get("service") == "coordinator"
    ]


def health(address: str, *, service: str = "", timeout: float = 2.0) -> str:
    """``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN`` or ``UNREACHABLE``."""
    from webshard.client import Client  # the SDK; imported late to keep `--help` fast
    from webshard.errors import RPCError

    try:
        with Client(address, timeout=timeout) as client:
            return "SERVING" if client.check_health(service=service) else "NOT_SERVING"
    except RPCError as exc:
        return "SERVICE_UNKNOWN" if exc.code.name == "NOT_FOUND" else "UNREACHABLE"


def status(data_dir: Path) -> list[dict[str, object]]:
    """Each process of the cluster in ``data_dir`` with its pid, liveness and health."""
    state = read_state(data_dir)
    if state is None:
        return []
    rows = []
    processes = state.get("processes")
    for proc in processes if isinstance(processes, list) else []:
        alive = _alive(int(proc["pid"]))
        rows.append(
            {
                "name": proc["name"],
                "service": proc["service"].replace("_", "-"),
                "address": proc["address"],
                "pid": proc["pid"],
                "alive": alive,
                "health": health(proc["address"]) if alive else "EXITED",
            }
        )
    return rows
