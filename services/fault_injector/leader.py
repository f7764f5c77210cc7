"""leader_loss: acting on the coordinator leader's workload, locally or in Kubernetes.

Locally the replicas are processes of a cluster started by ``webshard up``; its
state file (``<data_dir>/cluster.json``, the ``cluster_state`` setting) maps each
replica id to its pid, address, arguments and log. Kills and restarts go through
``services.common.workloads.LocalWorkloads``; a stop is SIGSTOP, with a small
guardian process that sends SIGCONT when the duration ends even if this injector
has died by then. A killed replica that is to come back is started again from
its recorded arguments, as this injector's child (it then dies with the injector,
as the launcher's children die with the launcher), and its new pid is written
back to the state file.

In Kubernetes a replica is a StatefulSet pod named by its replica id; a kill
deletes the pod and the StatefulSet recreates it. SIGSTOP is not possible there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from services.common.workloads import (
    SERVICE_ACCOUNT_NAMESPACE,
    AgentNotFound,
    KubernetesWorkloads,
    LocalWorkloads,
    WorkloadError,
)
from services.fault_injector.actions import LeaderAction, LeaderMode
from services.fault_injector.injector import ActionError

log = logging.getLogger(__name__)

COORDINATOR_LABELS: Mapping[str, str] = {
    "app.kubernetes.io/name": "coordinator",
    "app.kubernetes.io/part-of": "webshard",
}
"""Labels of the coordinator pods (k8s/base/coordinator.yaml)."""


class LocalLeaderControl:
    """LeaderControl over the processes of a local cluster, found in its state file."""

    def __init__(self, cluster_state: Path | str, *, stop_timeout_s: float = 10.0) -> None:
        self._state_file = Path(cluster_state)
        self._stop_timeout = stop_timeout_s
        self._guardians: dict[str, asyncio.subprocess.Process] = {}
        self._started: list[asyncio.subprocess.Process] = []

    def _processes(self) -> list[dict[str, Any]]:
        try:
            state = json.loads(self._state_file.read_text())
        except (OSError, ValueError) as exc:
            raise ActionError(f"cannot read the cluster state {self._state_file}: {exc}") from exc
        processes = state.get("processes") if isinstance(state, dict) else None
        return [p for p in processes or [] if isinstance(p, dict)]

    def _entry(self, replica_id: str) -> dict[str, Any]:
        for entry in self._processes():
            if entry.get("name") == replica_id and entry.get("service") == "coordinator":
                return entry
        raise ActionError(f"{self._state_file} lists no coordinator {replica_id}")

    def _workloads(self, replica_id: str) -> LocalWorkloads:
        pid = int(self._entry(replica_id).get("pid") or 0)
        return LocalWorkloads(
            {replica_id: pid}, restart=self._respawn, stop_timeout_s=self._stop_timeout
        )

    async def act(self, action: LeaderAction, duration_s: float) -> str:
        """SIGSTOP (with a guardian to SIGCONT) or SIGKILL the leader's process."""
        replica = action.replica_id
        pid = int(self._entry(replica).get("pid") or 0)
        if action.mode is LeaderMode.STOP:
            try:
                psutil.Process(pid).suspend()
            except psutil.Error as exc:
                raise ActionError(f"cannot stop {replica} (pid {pid}): {exc}") from exc
            self._guardians[replica] = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                f"sleep {max(duration_s, 0.0):.3f}; kill -CONT {pid}",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return f"SIGSTOP sent to leader {replica} (pid {pid}) for {duration_s:g} s"
        try:
            await self._workloads(replica).kill_agent(replica)
        except (WorkloadError, AgentNotFound) as exc:
            raise ActionError(str(exc)) from exc
        after = "it is started again when the duration ends"
        if action.mode is LeaderMode.KILL_FOR_GOOD:
            after = "it is left dead"
        return f"SIGKILL sent to leader {replica} (pid {pid}); {after}"

    async def undo(self, action: LeaderAction) -> str:
        """SIGCONT a stopped leader, or start a killed one again."""
        replica = action.replica_id
        if action.mode is LeaderMode.STOP:
            guardian = self._guardians.pop(replica, None)
            if guardian is not None and guardian.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    guardian.kill()
                await guardian.wait()
            pid = int(self._entry(replica).get("pid") or 0)
            try:
                psutil.Process(pid).resume()
            except psutil.Error as exc:
                raise ActionError(f"cannot resume {replica} (pid {pid}): {exc}") from exc
            return f"SIGCONT sent to {replica} (pid {pid})"
        if action.mode is LeaderMode.KILL_FOR_GOOD:
            return f"{replica} is left dead"
        try:
            await self._workloads(replica).restart_agent(replica)
        except (WorkloadError, AgentNotFound) as exc:
            raise ActionError(str(exc)) from exc
        return f"{replica} started again (pid {self._entry(replica).get('pid')})"

    async def _respawn(self, replica_id: str) -> int:
        entry = self._entry(replica_id)
        service = str(entry.get("service"))
        args = [str(a) for a in entry.get("args") or []]
        env = {**os.environ, "WEBSHARD_PARENT_PID": str(os.getpid())}
        out = await asyncio.to_thread(open, str(entry.get("log") or os.devnull), "ab")
        with out:
            # Spawned from the event loop's thread: the parent-death signal the child
            # asks for follows the thread that forked it.
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"services.{service}",
                *args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._started.append(process)
        self._record_pid(replica_id, process.pid)
        log.info("coordinator started again", extra={"replica": replica_id, "pid": process.pid})
        return process.pid

    def _record_pid(self, replica_id: str, pid: int) -> None:
        """Write the new pid into the state file, so ``webshard status`` finds it."""
        try:
            state = json.loads(self._state_file.read_text())
            for entry in state.get("processes", []):
                if entry.get("name") == replica_id:
                    entry["pid"] = pid
            tmp = self._state_file.with_suffix(".injector.tmp")
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(self._state_file)
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("cluster state not updated", extra={"error": str(exc)})

    async def close(self) -> None:
        """Resume what is stopped (its guardian would, later) and reap the guardians."""
        for replica, guardian in list(self._guardians.items()):
            with contextlib.suppress(ActionError):
                await self.undo(LeaderAction(replica, "", LeaderMode.STOP))
            if guardian.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    guardian.kill()
                await guardian.wait()
        self._guardians.clear()


class KubernetesLeaderControl:
    """LeaderControl over coordinator pods: a kill deletes the pod."""

    def __init__(self, namespace: str = "") -> None:
        self._namespace = namespace
        self._workloads: KubernetesWorkloads | None = None

    def _pods(self) -> KubernetesWorkloads:
        if self._workloads is None:
            try:
                self._workloads = KubernetesWorkloads.in_cluster(
                    self._namespace, labels=COORDINATOR_LABELS
                )
            except WorkloadError as exc:
                raise ActionError(str(exc)) from exc
        return self._workloads

    async def act(self, action: LeaderAction, duration_s: float) -> str:
        """Delete the leader's pod; a stop cannot be done to a pod."""
        if action.mode is LeaderMode.STOP:
            raise ActionError(
                "a pod cannot be SIGSTOPped from outside; use intensity moderate or severe"
            )
        try:
            await self._pods().kill_agent(action.replica_id)
        except (WorkloadError, AgentNotFound) as exc:
            raise ActionError(str(exc)) from exc
        return f"pod {action.replica_id} deleted; its StatefulSet recreates it"

    async def undo(self, action: LeaderAction) -> str:
        """Nothing: the StatefulSet has already recreated the pod."""
        return f"pod {action.replica_id} is recreated by its StatefulSet"

    async def close(self) -> None:
        """Nothing to release."""


class NoLeaderControl:
    """Where neither a local cluster state nor a pod's ServiceAccount is at hand."""

    async def act(self, action: LeaderAction, duration_s: float) -> str:
        """Refuse, saying what is missing."""
        raise ActionError(
            "leader_loss needs the local cluster's state file (--cluster-state "
            "<data_dir>/cluster.json) or to run in a Kubernetes pod"
        )

    async def undo(self, action: LeaderAction) -> str:
        """Nothing was done."""
        return "nothing to undo"

    async def close(self) -> None:
        """Nothing to release."""


def leader_control(
    cluster_state: str, namespace: str
) -> LocalLeaderControl | KubernetesLeaderControl | NoLeaderControl:
    """The control for where this injector runs."""
    if cluster_state:
        return LocalLeaderControl(cluster_state)
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return KubernetesLeaderControl(namespace)
    return NoLeaderControl()
