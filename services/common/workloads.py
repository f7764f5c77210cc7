"""Where browser agents run, and how recovery and the fault-injector act on them.

Two deployments, one interface:

- In Kubernetes each agent is a pod of the ``browser-agent`` StatefulSet, its agent id
  the pod's name. Restarting an agent deletes its pod gracefully (the StatefulSet
  recreates it under the same name); killing it deletes the pod with the shortest
  grace period, so its containers are killed a second later.
  :class:`KubernetesWorkloads` does this with the official ``kubernetes`` client,
  imported only when it is used, so a service outside a cluster never needs it.
- Locally (``webshard up``) each agent is a process. :class:`LocalWorkloads` signals
  it by PID and asks the supervisor that launched it to start it again.

Coordinator replicas in a StatefulSet find each other by name:
:func:`statefulset_peers` turns a pod name and the headless Service into the
replica id and the peer addresses the coordinator's settings expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import importlib
import re
import signal
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import psutil

from services.common.settings import SettingsError

DEFAULT_CLUSTER_DOMAIN = "cluster.local"
"""The cluster's DNS domain unless the cluster was set up with another one."""

AGENT_LABELS: Mapping[str, str] = {
    "app.kubernetes.io/name": "browser-agent",
    "app.kubernetes.io/part-of": "webshard",
}
"""Labels every browser-agent pod carries (k8s/base/browser-agent.yaml)."""

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where a pod with a mounted ServiceAccount token finds its own namespace."""

# A StatefulSet pod is named <statefulset>-<ordinal>; the name is a DNS label.
_STATEFULSET_POD = re.compile(
    r"^(?P<set>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)-(?P<ordinal>0|[1-9][0-9]*)$"
)

KILL_GRACE_PERIOD_S = 1
"""The shortest grace period that is not a force deletion."""

_HTTP_NOT_FOUND = 404
_HTTP_CONFLICT = 409
_HTTP_GONE = 410


def statefulset_peers(
    pod_name: str,
    service: str,
    namespace: str,
    replicas: int,
    port: int,
    *,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
) -> tuple[str, dict[str, str]]:
    """This replica's id and its peers' addresses, from a StatefulSet pod's name.

    Pod ``coordinator-1`` of three behind the headless Service ``coordinator-headless``
    in ``webshard`` is replica ``coordinator-1``; its peers are ``coordinator-0`` and
    ``coordinator-2`` at
    ``coordinator-<n>.coordinator-headless.webshard.svc.cluster.local:<port>``. Each
    pod's DNS record exists before the pod is ready because the headless Service
    publishes not-ready addresses, so replicas can elect a leader while none is ready.

    Raises SettingsError when the pod name is not ``<name>-<ordinal>``, the ordinal is
    not below ``replicas``, or a number is out of range.
    """
    match = _STATEFULSET_POD.match(pod_name)
    if match is None:
        raise SettingsError(
            f"pod name {pod_name!r} is not <statefulset>-<ordinal>; "
            "set WEBSHARD_REPLICA_ID and WEBSHARD_PEERS instead"
        )
    if replicas < 1:
        raise SettingsError(f"replica count {replicas} must be at least 1")
    if not 0 < port <= 65535:
        raise SettingsError(f"peer port {port} is outside 1..65535")
    for label, value in (("service", service), ("namespace", namespace)):
        if not value:
            raise SettingsError(f"the headless Service's {label} must not be empty")
    name, ordinal = match["set"], int(match["ordinal"])
    if ordinal >= replicas:
        raise SettingsError(
            f"pod {pod_name} has ordinal {ordinal}, but the StatefulSet has {replicas} "
            "replicas; WEBSHARD_REPLICAS must match spec.replicas"
        )
    suffix = f"{service}.{namespace}.svc.{cluster_domain}"
    peers = {
        f"{name}-{index}": f"{name}-{index}.{suffix}:{port}"
        for index in range(replicas)
        if index != ordinal
    }
    return pod_name, peers


def format_peers(peers: Mapping[str, str]) -> list[str]:
    """Peers as the ``id=host:port`` entries of the coordinator's ``peers`` setting."""
    return [f"{peer_id}={address}" for peer_id, address in sorted(peers.items())]


class WorkloadError(RuntimeError):
    """The platform refused or failed an action on an agent's workload."""


class AgentNotFound(LookupError):
    """No agent workload has this id."""


@dataclasses.dataclass(frozen=True)
class AgentWorkload:
    """One agent's workload as the platform sees it: a pod or a process."""

    agent_id: str
    """The agent's id: the pod's name, or the id the local supervisor gave it."""

    instance: str
    """This incarnation: the pod's UID or the process id; a restart changes it."""

    alive: bool
    """The pod is pending or running and not being deleted; the process has not exited."""

    ready: bool
    """The pod's Ready condition holds; a live process counts as ready."""

    address: str = ""
    """The pod's IP address; empty for a local process."""

    detail: str = ""
    """The pod's phase (or Terminating), or the process's status."""


class WorkloadEventKind(enum.Enum):
    """What happened to an agent's workload."""

    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"


@dataclasses.dataclass(frozen=True)
class WorkloadEvent:
    """A change to one agent's workload."""

    kind: WorkloadEventKind
    agent: AgentWorkload


class WorkloadController(Protocol):
    """What recovery and the fault-injector may do to agent workloads, and nothing more."""

    async def restart_agent(self, agent_id: str) -> None:
        """Stop the agent gracefully and have it started again.

        Raises AgentNotFound for an unknown agent and WorkloadError when the platform
        refuses.
        """
        ...

    async def kill_agent(self, agent_id: str) -> None:
        """Stop the agent at once, as a crash would, with no time to drain.

        A local process gets SIGKILL; a pod gets SIGKILL one second after SIGTERM.
        """
        ...

    async def list_agents(self) -> list[AgentWorkload]:
        """Every agent workload, sorted by agent id."""
        ...

    def watch(self) -> AsyncGenerator[WorkloadEvent, None]:
        """Changes to agent workloads as they happen, starting with an ADDED for each.

        After a reconnection the current agents may be reported as ADDED again, so a
        consumer treats ADDED for a known agent as an update. Close the generator
        (``aclose`` or ``contextlib.aclosing``) to stop watching.
        """
        ...


def _import(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise WorkloadError(
            f"acting on pods needs the kubernetes package ({exc}); pip install kubernetes"
        ) from exc


def _api_status(exc: BaseException) -> int | None:
    """The HTTP status of a kubernetes client ApiException, or None for anything else."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _agent_from_pod(pod: Any) -> AgentWorkload:
    metadata, status = pod.metadata, pod.status
    phase = (status.phase if status is not None else None) or "Unknown"
    conditions = (status.conditions if status is not None else None) or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    terminating = metadata.deletion_timestamp is not None
    return AgentWorkload(
        agent_id=metadata.name,
        instance=metadata.uid or "",
        alive=phase in ("Pending", "Running") and not terminating,
        ready=ready and not terminating,
        address=(status.pod_ip if status is not None else None) or "",
        detail="Terminating" if terminating else phase,
    )


class KubernetesWorkloads:
    """Agent workloads as the pods of the browser-agent StatefulSet.

    ``api`` is a ``kubernetes.client.CoreV1Api`` (or anything with its
    ``list_namespaced_pod``, ``read_namespaced_pod`` and ``delete_namespaced_pod``).
    The ServiceAccount's Role lets it get, list, watch and delete any pod in the
    namespace, because RBAC cannot select pods by label; this class acts only on pods
    that carry every one of ``labels``, and an admission policy refuses the rest
    (k8s/admission).
    """

    def __init__(
        self,
        api: Any,
        namespace: str,
        *,
        labels: Mapping[str, str] = AGENT_LABELS,
        watch_factory: Callable[[], Any] | None = None,
        watch_timeout_s: int = 300,
    ) -> None:
        if not namespace:
            raise ValueError("namespace must not be empty")
        if not labels:
            raise ValueError("an empty label set would select every pod in the namespace")
        self._api = api
        self._namespace = namespace
        self._labels = dict(labels)
        self._selector = ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
        self._watch_factory = watch_factory or self._client_watch
        # The server ends each watch after this long; the watch then resumes from the
        # last resource version, so a dead connection is noticed within this time.
        self._watch_timeout_s = watch_timeout_s

    @classmethod
    def in_cluster(
        cls, namespace: str = "", *, labels: Mapping[str, str] = AGENT_LABELS
    ) -> KubernetesWorkloads:
        """From inside a pod: its ServiceAccount's token, and its own namespace by default."""
        config = _import("kubernetes.config")
        client = _import("kubernetes.client")
        try:
            config.load_incluster_config()
        except Exception as exc:  # kubernetes.config.ConfigException, or a missing file
            raise WorkloadError(
                f"not in a pod with a ServiceAccount token, so no API access: {exc}"
            ) from exc
        if not namespace:
            try:
                namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
            except OSError as exc:
                raise WorkloadError(
                    f"no namespace given and {SERVICE_ACCOUNT_NAMESPACE} is unreadable: {exc}"
                ) from exc
        return cls(client.CoreV1Api(), namespace, labels=labels)

    @property
    def selector(self) -> str:
        """The label selector that finds agent pods."""
        return self._selector

    @staticmethod
    def _client_watch() -> Any:
        return _import("kubernetes.watch").Watch()

    async def list_agents(self) -> list[AgentWorkload]:
        """The agent pods in the namespace, sorted by name."""
        try:
            pods = await asyncio.to_thread(
                self._api.list_namespaced_pod, self._namespace, label_selector=self._selector
            )
        except Exception as exc:
            if _api_status(exc) is None:
                raise
            raise WorkloadError(f"listing agent pods in {self._namespace}: {exc}") from exc
        agents = [_agent_from_pod(pod) for pod in pods.items]
        return sorted(agents, key=lambda agent: agent.agent_id)

    async def restart_agent(self, agent_id: str) -> None:
        """Delete the agent's pod with its grace period; the StatefulSet recreates it."""
        await self._delete(agent_id, grace_period_s=None)

    async def kill_agent(self, agent_id: str) -> None:
        """Delete the agent's pod with a one-second grace period, then SIGKILL.

        Not zero: the API server takes zero as a force deletion, which removes the pod
        object before its containers have stopped, and the StatefulSet could then run
        a second pod under the same name beside the first.
        """
        await self._delete(agent_id, grace_period_s=KILL_GRACE_PERIOD_S)

    async def _delete(self, agent_id: str, grace_period_s: int | None) -> None:
        pod = await self._agent_pod(agent_id)
        # The UID precondition makes the delete hit exactly the pod that was checked,
        # never a replacement created under the same name in between.
        body: dict[str, Any] = {"preconditions": {"uid": pod.metadata.uid}}
        if grace_period_s is not None:
            body["gracePeriodSeconds"] = grace_period_s
        try:
            await asyncio.to_thread(
                self._api.delete_namespaced_pod, agent_id, self._namespace, body=body
            )
        except Exception as exc:
            status = _api_status(exc)
            if status in (_HTTP_NOT_FOUND, _HTTP_CONFLICT):
                return  # that pod is already gone: what was asked has happened
            if status is None:
                raise
            raise WorkloadError(f"deleting pod {agent_id}: {exc}") from exc

    async def _agent_pod(self, agent_id: str) -> Any:
        try:
            pod = await asyncio.to_thread(self._api.read_namespaced_pod, agent_id, self._namespace)
        except Exception as exc:
            status = _api_status(exc)
            if status == _HTTP_NOT_FOUND:
                raise AgentNotFound(f"no pod {agent_id} in {self._namespace}") from exc
            if status is None:
                raise
            raise WorkloadError(f"reading pod {agent_id}: {exc}") from exc
        labels = pod.metadata.labels or {}
        if any(labels.get(key) != value for key, value in self._labels.items()):
            raise AgentNotFound(
                f"pod {agent_id} in {self._namespace} is not a browser agent "
                f"(it lacks the labels {self._selector})"
            )
        return pod

    async def watch(self) -> AsyncGenerator[WorkloadEvent, None]:
        """Agent pod changes, from a watch that resumes where it left off.

        The client's watch blocks, so it runs on a daemon thread that hands events to
        the event loop; closing this iterator stops it.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[WorkloadEvent | Exception | None] = asyncio.Queue()
        stopping = threading.Event()
        watcher = self._watch_factory()

        def hand_over(item: WorkloadEvent | Exception | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            resource_version = ""
            try:
                while not stopping.is_set():
                    options: dict[str, Any] = {
                        "label_selector": self._selector,
                        "timeout_seconds": self._watch_timeout_s,
                    }
                    if resource_version:
                        options["resource_version"] = resource_version
                    try:
                        for event in watcher.stream(
                            self._api.list_namespaced_pod, self._namespace, **options
                        ):
                            if stopping.is_set():
                                return
                            kind = _EVENT_KINDS.get(event.get("type", ""))
                            if kind is None:
                                continue  # BOOKMARK
                            pod = event["object"]
                            resource_version = pod.metadata.resource_version or resource_version
                            hand_over(WorkloadEvent(kind, _agent_from_pod(pod)))
                    except Exception as exc:
                        if _api_status(exc) != _HTTP_GONE:
                            raise
                        # The resource version is too old: watch afresh, which reports
                        # every current pod as ADDED.
                        resource_version = ""
            except Exception as exc:
                if not stopping.is_set():
                    hand_over(exc)
            finally:
                hand_over(None)

        thread = threading.Thread(target=pump, name="webshard-agent-watch", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise WorkloadError(f"watching agent pods: {item}") from item
                yield item
        finally:
            stopping.set()
            watcher.stop()


_EVENT_KINDS = {
    "ADDED": WorkloadEventKind.ADDED,
    "MODIFIED": WorkloadEventKind.MODIFIED,
    "DELETED": WorkloadEventKind.DELETED,
}

RestartCallback = Callable[[str], Awaitable[int | None]]
"""Starts an agent again; returns its new process id, or None when the supervisor
will report it through :meth:`LocalWorkloads.track`."""


class LocalWorkloads:
    """Agent workloads as local processes, by process id.

    A kill sends SIGKILL. A restart sends SIGTERM (the agent drains), waits for the
    process to exit (SIGKILL after ``stop_timeout_s``, as the kubelet does after a
    pod's grace period), then awaits ``restart`` so the supervisor starts it again.
    Processes are held as ``psutil.Process`` objects, so a PID that the system has
    reused for another process is never signalled.
    """

    def __init__(
        self,
        pids: Mapping[str, int],
        *,
        restart: RestartCallback,
        stop_timeout_s: float = 10.0,
        poll_s: float = 0.1,
    ) -> None:
        self._processes: dict[str, psutil.Process | None] = {}
        self._restart = restart
        self._stop_timeout_s = stop_timeout_s
        self._poll_s = poll_s
        for agent_id, pid in pids.items():
            self.track(agent_id, pid)

    def track(self, agent_id: str, pid: int) -> None:
        """Record (or replace) the process that runs ``agent_id``."""
        try:
            self._processes[agent_id] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._processes[agent_id] = None

    def forget(self, agent_id: str) -> None:
        """Stop tracking ``agent_id``; it no longer appears in lists or events."""
        self._processes.pop(agent_id, None)

    async def list_agents(self) -> list[AgentWorkload]:
        """Every tracked agent, sorted by id, alive or not."""
        return [self._describe(agent_id) for agent_id in sorted(self._processes)]

    async def kill_agent(self, agent_id: str) -> None:
        """SIGKILL the agent's process and wait until it has exited."""
        process = self._process(agent_id)
        if process is None or _exited(process):
            return
        _signal(process, signal.SIGKILL)
        if not await self._wait_exited(process, self._stop_timeout_s):
            raise WorkloadError(f"agent {agent_id} (pid {process.pid}) survived SIGKILL")

    async def restart_agent(self, agent_id: str) -> None:
        """SIGTERM the agent's process, wait for it to exit, then have it started again."""
        process = self._process(agent_id)
        if process is not None and not _exited(process):
            _signal(process, signal.SIGTERM)
            if not await self._wait_exited(process, self._stop_timeout_s):
                _signal(process, signal.SIGKILL)
                if not await self._wait_exited(process, self._stop_timeout_s):
                    raise WorkloadError(
                        f"agent {agent_id} (pid {process.pid}) survived SIGTERM and SIGKILL"
                    )
        new_pid = await self._restart(agent_id)
        if new_pid is not None:
            self.track(agent_id, new_pid)

    async def watch(self) -> AsyncGenerator[WorkloadEvent, None]:
        """Changes to tracked agents, found by looking every ``poll_s`` seconds."""
        previous: dict[str, AgentWorkload] = {}
        while True:
            current = {agent.agent_id: agent for agent in await self.list_agents()}
            for agent_id, agent in current.items():
                before = previous.get(agent_id)
                if before is None:
                    yield WorkloadEvent(WorkloadEventKind.ADDED, agent)
                elif before != agent:
                    yield WorkloadEvent(WorkloadEventKind.MODIFIED, agent)
            for agent_id, agent in previous.items():
                if agent_id not in current:
                    yield WorkloadEvent(WorkloadEventKind.DELETED, agent)
            previous = current
            await asyncio.sleep(self._poll_s)

    def _process(self, agent_id: str) -> psutil.Process | None:
        try:
            return self._processes[agent_id]
        except KeyError:
            raise AgentNotFound(f"no local agent {agent_id}") from None

    def _describe(self, agent_id: str) -> AgentWorkload:
        process = self._processes[agent_id]
        if process is None:
            return AgentWorkload(agent_id, instance="", alive=False, ready=False, detail="exited")
        status = _status(process)
        alive = status not in _EXITED
        return AgentWorkload(
            agent_id,
            instance=str(process.pid),
            alive=alive,
            ready=alive,
            # Not the scheduler's state (sleeping, running, ...), which flickers.
            detail="exited" if not alive else "running",
        )

    async def _wait_exited(self, process: psutil.Process, timeout_s: float) -> bool:
        # Polled rather than waited on: waiting would reap a child that belongs to the
        # supervisor, which then could not learn its exit status.
        deadline = time.monotonic() + timeout_s
        while not _exited(process):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self._poll_s)
        return True


_EXITED = frozenset(("exited", psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD))


def _exited(process: psutil.Process) -> bool:
    """True once the process is gone or a zombie waiting for its parent to reap it."""
    return _status(process) in _EXITED


def _status(process: psutil.Process) -> str:
    try:
        if not process.is_running():
            return "exited"
        return str(process.status())
    except psutil.NoSuchProcess:
        return "exited"


def _signal(process: psutil.Process, signum: signal.Signals) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):  # it exited on its own meanwhile
        process.send_signal(signum)
