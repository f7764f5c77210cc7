"""Agent workloads: peers from StatefulSet pod names, pods through a fake Kubernetes API,
and real local processes."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

import pytest

from services.common.settings import SettingsError
from services.common.workloads import (
    AGENT_LABELS,
    AgentNotFound,
    KubernetesWorkloads,
    LocalWorkloads,
    WorkloadController,
    WorkloadError,
    WorkloadEvent,
    WorkloadEventKind,
    format_peers,
    statefulset_peers,
)
from tests.conftest import REPO

# --- coordinator peers -------------------------------------------------------------------


def test_peers_come_from_the_pod_name_and_the_headless_service() -> None:
    replica_id, peers = statefulset_peers(
        "coordinator-1", "coordinator-headless", "webshard", 3, 50051
    )
    assert replica_id == "coordinator-1"
    assert peers == {
        "coordinator-0": "coordinator-0.coordinator-headless.webshard.svc.cluster.local:50051",
        "coordinator-2": "coordinator-2.coordinator-headless.webshard.svc.cluster.local:50051",
    }
    assert format_peers(peers) == [
        "coordinator-0=coordinator-0.coordinator-headless.webshard.svc.cluster.local:50051",
        "coordinator-2=coordinator-2.coordinator-headless.webshard.svc.cluster.local:50051",
    ]


def test_peers_follow_the_set_name_domain_and_replica_count() -> None:
    replica_id, peers = statefulset_peers(
        "web-shard-coord-10", "peers", "team-a", 12, 7000, cluster_domain="corp.internal"
    )
    assert replica_id == "web-shard-coord-10"
    assert len(peers) == 11
    assert "web-shard-coord-10" not in peers
    assert peers["web-shard-coord-11"] == "web-shard-coord-11.peers.team-a.svc.corp.internal:7000"
    assert statefulset_peers("coordinator-0", "h", "ns", 1, 1) == ("coordinator-0", {})


@pytest.mark.parametrize(
    ("pod_name", "replicas", "port", "complaint"),
    [
        ("coordinator", 3, 50051, "<statefulset>-<ordinal>"),
        ("coordinator-01", 3, 50051, "<statefulset>-<ordinal>"),
        ("Coordinator-1", 3, 50051, "<statefulset>-<ordinal>"),
        ("coordinator-3", 3, 50051, "WEBSHARD_REPLICAS"),
        ("coordinator-0", 0, 50051, "at least 1"),
        ("coordinator-0", 3, 0, "outside"),
    ],
)
def test_a_pod_name_or_count_that_cannot_be_a_replica_is_refused(
    pod_name: str, replicas: int, port: int, complaint: str
) -> None:
    with pytest.raises(SettingsError, match=complaint):
        statefulset_peers(pod_name, "coordinator-headless", "webshard", replicas, port)


# --- Kubernetes, through a fake CoreV1Api -------------------------------------------------


@pytest.fixture
def kube() -> Any:
    """The official client's models and ApiException (no cluster is contacted)."""
    return pytest.importorskip(
        "kubernetes.client", reason="the kubernetes package (a dev dependency) is not installed"
    )


def make_pod(
    kube: Any,
    name: str,
    *,
    uid: str = "",
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    ready: bool = True,
    terminating: bool = False,
    resource_version: str = "1",
) -> Any:
    return kube.V1Pod(
        metadata=kube.V1ObjectMeta(
            name=name,
            namespace="webshard",
            uid=uid or f"uid-{name}",
            labels=dict(AGENT_LABELS) if labels is None else labels,
            resource_version=resource_version,
            deletion_timestamp="2026-01-01T00:00:00Z" if terminating else None,
        ),
        status=kube.V1PodStatus(
            phase=phase,
            pod_ip="10.0.0.7",
            conditions=[kube.V1PodCondition(type="Ready", status="True" if ready else "False")],
        ),
    )


class FakeCoreV1Api:
    """The three CoreV1Api calls KubernetesWorkloads makes, over an in-memory pod table."""

    def __init__(self, kube: Any, pods: list[Any]) -> None:
        self.kube = kube
        self.pods = {pod.metadata.name: pod for pod in pods}
        self.deletes: list[tuple[str, str, dict[str, Any]]] = []
        self.selectors: list[str] = []

    def _matches(self, pod: Any, selector: str) -> bool:
        wanted = dict(term.split("=", 1) for term in selector.split(","))
        labels = pod.metadata.labels or {}
        return all(labels.get(key) == value for key, value in wanted.items())

    def list_namespaced_pod(self, namespace: str, *, label_selector: str, **_: Any) -> Any:
        assert namespace == "webshard"
        self.selectors.append(label_selector)
        items = [pod for pod in self.pods.values() if self._matches(pod, label_selector)]
        return self.kube.V1PodList(items=items)

    def read_namespaced_pod(self, name: str, namespace: str) -> Any:
        assert namespace == "webshard"
        if name not in self.pods:
            raise self.kube.ApiException(status=404, reason="Not Found")
        return self.pods[name]

    def delete_namespaced_pod(self, name: str, namespace: str, *, body: dict[str, Any]) -> Any:
        assert namespace == "webshard"
        pod = self.pods.get(name)
        if pod is None:
            raise self.kube.ApiException(status=404, reason="Not Found")
        if body["preconditions"]["uid"] != pod.metadata.uid:
            raise self.kube.ApiException(status=409, reason="Conflict")
        self.deletes.append((name, namespace, body))
        return pod


class FakeWatch:
    """kubernetes.watch.Watch's stream/stop: scripted rounds, then blocks until stopped."""

    def __init__(self, rounds: list[list[dict[str, Any]] | Exception]) -> None:
        self.rounds = list(rounds)
        self.calls: list[dict[str, Any]] = []
        self.stopped = threading.Event()

    def stream(self, func: Callable[..., Any], namespace: str, **kwargs: Any) -> Iterator[Any]:
        assert namespace == "webshard"
        assert getattr(func, "__name__", "") == "list_namespaced_pod"
        self.calls.append(kwargs)
        if not self.rounds:
            self.stopped.wait(timeout=30)
            return
        step = self.rounds.pop(0)
        if isinstance(step, Exception):
            raise step
        yield from step

    def stop(self) -> None:
        self.stopped.set()


def workloads(api: FakeCoreV1Api, watch: FakeWatch | None = None) -> KubernetesWorkloads:
    return KubernetesWorkloads(
        api, "webshard", watch_factory=(lambda: watch) if watch is not None else None
    )


async def test_agents_are_the_labelled_pods_with_their_phase_and_readiness(kube: Any) -> None:
    api = FakeCoreV1Api(
        kube,
        [
            make_pod(kube, "browser-agent-1", ready=False, phase="Pending"),
            make_pod(kube, "browser-agent-0"),
            make_pod(kube, "browser-agent-2", terminating=True),
            make_pod(kube, "coordinator-0", labels={"app.kubernetes.io/name": "coordinator"}),
        ],
    )
    controller: WorkloadController = workloads(api)
    agents = await controller.list_agents()
    assert [a.agent_id for a in agents] == [
        "browser-agent-0",
        "browser-agent-1",
        "browser-agent-2",
    ]
    first, pending, leaving = agents
    assert (first.alive, first.ready, first.detail) == (True, True, "Running")
    assert (first.instance, first.address) == ("uid-browser-agent-0", "10.0.0.7")
    assert (pending.alive, pending.ready, pending.detail) == (True, False, "Pending")
    assert (leaving.alive, leaving.ready, leaving.detail) == (False, False, "Terminating")
    assert api.selectors == [
        "app.kubernetes.io/name=browser-agent,app.kubernetes.io/part-of=webshard"
    ]


async def test_restart_deletes_the_pod_gracefully_and_kill_almost_at_once(kube: Any) -> None:
    api = FakeCoreV1Api(kube, [make_pod(kube, "browser-agent-0", uid="u-0")])
    controller = workloads(api)
    await controller.restart_agent("browser-agent-0")
    await controller.kill_agent("browser-agent-0")
    assert api.deletes == [
        ("browser-agent-0", "webshard", {"preconditions": {"uid": "u-0"}}),
        (
            "browser-agent-0",
            "webshard",
            {"preconditions": {"uid": "u-0"}, "gracePeriodSeconds": 1},
        ),
    ]


async def test_pods_that_are_not_agents_are_never_deleted(kube: Any) -> None:
    api = FakeCoreV1Api(
        kube,
        [
            make_pod(kube, "coordinator-0", labels={"app.kubernetes.io/name": "coordinator"}),
            make_pod(kube, "impostor", labels={"app.kubernetes.io/name": "browser-agent"}),
        ],
    )
    controller = workloads(api)
    for name in ("coordinator-0", "impostor", "browser-agent-9"):
        with pytest.raises(AgentNotFound):
            await controller.kill_agent(name)
    assert api.deletes == []


async def test_a_pod_replaced_between_check_and_delete_is_left_alone(kube: Any) -> None:
    api = FakeCoreV1Api(kube, [make_pod(kube, "browser-agent-0", uid="old")])
    checked = api.read_namespaced_pod

    def read_then_replace(name: str, namespace: str) -> Any:
        pod = checked(name, namespace)
        api.pods[name] = make_pod(kube, name, uid="new")
        return pod

    api.read_namespaced_pod = read_then_replace  # type: ignore[method-assign]
    await workloads(api).restart_agent("browser-agent-0")
    assert api.deletes == []


async def test_api_failures_surface_as_workload_errors(kube: Any) -> None:
    api = FakeCoreV1Api(kube, [make_pod(kube, "browser-agent-0")])

    def forbidden(*_: Any, **__: Any) -> Any:
        raise kube.ApiException(status=403, reason="Forbidden")

    api.delete_namespaced_pod = forbidden  # type: ignore[method-assign]
    api.list_namespaced_pod = forbidden  # type: ignore[method-assign]
    controller = workloads(api)
    with pytest.raises(WorkloadError, match="Forbidden"):
        await controller.kill_agent("browser-agent-0")
    with pytest.raises(WorkloadError, match="Forbidden"):
        await controller.list_agents()


async def next_events(
    stream: AsyncGenerator[WorkloadEvent, None], count: int
) -> list[WorkloadEvent]:
    events: list[WorkloadEvent] = []
    async with asyncio.timeout(10):
        while len(events) < count:
            events.append(await anext(stream))
    return events


async def test_watch_reports_pod_changes_and_resumes_after_an_expired_version(
    kube: Any,
) -> None:
    api = FakeCoreV1Api(kube, [])
    pod_v1 = make_pod(kube, "browser-agent-0", ready=False, resource_version="11")
    pod_v2 = make_pod(kube, "browser-agent-0", resource_version="12")
    pod_v3 = make_pod(kube, "browser-agent-0", resource_version="13", terminating=True)
    watch = FakeWatch(
        [
            [{"type": "ADDED", "object": pod_v1}, {"type": "MODIFIED", "object": pod_v2}],
            [{"type": "BOOKMARK", "object": pod_v2}],
            kube.ApiException(status=410, reason="Gone"),
            [{"type": "DELETED", "object": pod_v3}],
        ]
    )
    stream = workloads(api, watch).watch()
    events = await next_events(stream, 3)
    await stream.aclose()
    assert [(e.kind, e.agent.ready, e.agent.alive) for e in events] == [
        (WorkloadEventKind.ADDED, False, True),
        (WorkloadEventKind.MODIFIED, True, True),
        (WorkloadEventKind.DELETED, False, False),
    ]
    assert watch.stopped.is_set()
    selector = "app.kubernetes.io/name=browser-agent,app.kubernetes.io/part-of=webshard"
    assert all(call["label_selector"] == selector for call in watch.calls)
    # Resumed from the last version seen, then from scratch once that version expired.
    assert [call.get("resource_version") for call in watch.calls[:4]] == [None, "12", "12", None]


async def test_a_failing_watch_ends_with_a_workload_error(kube: Any) -> None:
    watch = FakeWatch([kube.ApiException(status=403, reason="Forbidden")])
    stream = workloads(FakeCoreV1Api(kube, []), watch).watch()
    with pytest.raises(WorkloadError, match="Forbidden"):
        await next_events(stream, 1)


def test_the_module_imports_kubernetes_only_when_asked_to() -> None:
    probe = (
        "import sys, services.common.workloads as w\n"
        "assert 'kubernetes' not in sys.modules, 'imported at module load'\n"
        "sys.modules['kubernetes'] = None\n"
        "try:\n"
        "    w.KubernetesWorkloads.in_cluster('webshard')\n"
        "except w.WorkloadError as exc:\n"
        "    assert 'pip install kubernetes' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no error without the kubernetes package')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --- local processes ----------------------------------------------------------------------

SLEEPER = "import sys, time; print('up', flush=True); time.sleep(120)"
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('up', flush=True); time.sleep(120)"
)


@pytest.fixture
def spawn() -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    """Start throwaway Python processes that have reported they are up; reap them all."""
    children: list[subprocess.Popen[str]] = []

    def start(code: str) -> subprocess.Popen[str]:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "up"
        return child

    yield start
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


async def test_kill_sends_sigkill_to_the_agent_process(
    spawn: Callable[[str], subprocess.Popen[str]],
) -> None:
    child = spawn(SLEEPER)

    async def never(agent_id: str) -> int | None:
        raise AssertionError("a kill does not restart")

    controller: WorkloadController = LocalWorkloads({"agent-0": child.pid}, restart=never)
    [before] = await controller.list_agents()
    assert (before.agent_id, before.instance, before.alive) == ("agent-0", str(child.pid), True)
    await controller.kill_agent("agent-0")
    assert child.wait(timeout=10) == -9
    [after] = await controller.list_agents()
    assert not after.alive
    await controller.kill_agent("agent-0")  # already dead: nothing to do
    with pytest.raises(AgentNotFound):
        await controller.kill_agent("agent-7")


async def test_restart_terminates_then_the_supervisor_starts_a_new_process(
    spawn: Callable[[str], subprocess.Popen[str]],
) -> None:
    first = spawn(SLEEPER)
    started: list[subprocess.Popen[str]] = []

    async def supervisor(agent_id: str) -> int | None:
        assert agent_id == "agent-0"
        assert first.poll() == -15, "the old process must be gone before the new one starts"
        started.append(spawn(SLEEPER))
        return started[-1].pid

    controller = LocalWorkloads({"agent-0": first.pid}, restart=supervisor)
    await controller.restart_agent("agent-0")
    [agent] = await controller.list_agents()
    assert (agent.instance, agent.alive) == (str(started[0].pid), True)


async def test_restart_escalates_to_sigkill_when_sigterm_is_ignored(
    spawn: Callable[[str], subprocess.Popen[str]],
) -> None:
    stubborn = spawn(STUBBORN)

    async def supervisor_reports_later(agent_id: str) -> int | None:
        return None

    controller = LocalWorkloads(
        {"agent-0": stubborn.pid}, restart=supervisor_reports_later, stop_timeout_s=0.5
    )
    await controller.restart_agent("agent-0")
    assert stubborn.wait(timeout=10) == -9
    replacement = spawn(SLEEPER)
    controller.track("agent-0", replacement.pid)
    [agent] = await controller.list_agents()
    assert (agent.instance, agent.alive) == (str(replacement.pid), True)


async def test_watch_reports_local_agents_coming_and_going(
    spawn: Callable[[str], subprocess.Popen[str]],
) -> None:
    child = spawn(SLEEPER)

    async def never(agent_id: str) -> int | None:
        raise AssertionError("not restarted here")

    controller = LocalWorkloads({"agent-0": child.pid}, restart=never, poll_s=0.02)
    stream = controller.watch()
    [added] = await next_events(stream, 1)
    assert (added.kind, added.agent.agent_id, added.agent.alive) == (
        WorkloadEventKind.ADDED,
        "agent-0",
        True,
    )
    await controller.kill_agent("agent-0")
    [died] = await next_events(stream, 1)
    assert (died.kind, died.agent.alive) == (WorkloadEventKind.MODIFIED, False)
    controller.forget("agent-0")
    [gone] = await next_events(stream, 1)
    assert gone.kind is WorkloadEventKind.DELETED
    await stream.aclose()
