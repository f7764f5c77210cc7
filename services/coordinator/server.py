"""Wires a coordinator replica: Raft, the replicated cluster state, the servicers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

from services.common.failures import FailureReporter
from services.common.server import BasicApp, Lifecycle
from services.coordinator.cluster_state import AgentEntry, ClusterState
from services.coordinator.consensus import Replicator, StateMachine
from services.coordinator.deployments import Deployments
from services.coordinator.raft import Config, FileStorage
from services.coordinator.registry import AgentRegistry
from services.coordinator.servicer import (
    GUARDED_METHODS,
    RAFT_SERVICE,
    SERVICE,
    CoordinatorServicer,
    RaftServicer,
)
from services.coordinator.settings import DEFAULT_PORT, CoordinatorSettings

log = logging.getLogger(__name__)


def make_app(settings: CoordinatorSettings, lifecycle: Lifecycle) -> BasicApp:
    """One coordinator replica.

    Raises CorruptLog (the replica refuses to start) when its Raft log on disk is
    damaged: entries are never dropped silently.
    """
    owned_dir = None if settings.data_dir else tempfile.mkdtemp(prefix="webshard-coordinator-")
    if owned_dir is not None:
        log.warning(
            "no data directory: the Raft log lives in a temporary one", extra={"dir": owned_dir}
        )
    data_dir = Path(settings.data_dir or owned_dir or ".")
    registry = AgentRegistry(settings.heartbeat_timeout_s)
    reporter = FailureReporter(settings.recovery, token=settings.cluster_token)
    deployments = Deployments(
        registry,
        Path(settings.cache_dir) if settings.cache_dir else None,
        reporter=reporter,
        token=settings.cluster_token,
    )

    def on_agent(entry: AgentEntry) -> None:
        registry.upsert(entry.agent_id, entry.address, entry.memory_budget_bytes, entry.browsers)

    state = ClusterState(on_agent=on_agent, on_placement=deployments.apply_placement)
    storage = FileStorage(data_dir / "raft")
    replicator = Replicator(
        replica_id=settings.replica_id,
        peers=settings.peer_addresses(),
        address=f"{settings.host}:{settings.port or DEFAULT_PORT}",
        storage=storage,
        state=StateMachine(apply=state.apply, snapshot=state.snapshot, restore=state.restore),
        config=Config(
            election_ticks=settings.election_ticks, heartbeat_ticks=settings.heartbeat_ticks
        ),
        tick_s=settings.raft_tick_ms / 1000,
        snapshot_every=settings.snapshot_every,
        token=settings.cluster_token,
    )

    servicer = CoordinatorServicer(
        settings=settings,
        registry=registry,
        deployments=deployments,
        state=state,
        replicator=replicator,
        lifecycle=lifecycle,
    )
    background: list[asyncio.Task[None]] = []

    async def start() -> None:
        await replicator.start()
        background.append(
            asyncio.create_task(
                deployments.check_spares_forever(
                    lambda: replicator.is_leader, servicer.commit_in_background
                )
            )
        )

    async def stop() -> None:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await deployments.close()
        await reporter.close()
        await replicator.stop()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)

    return BasicApp(
        service_names=(SERVICE, RAFT_SERVICE),
        registrations=[
            (pb_grpc.add_CoordinatorServiceServicer_to_server, servicer),
            (pb_grpc.add_RaftServiceServicer_to_server, RaftServicer(replicator)),
        ],
        on_start=start,
        on_stop=stop,
        guarded_methods=GUARDED_METHODS,
    )
