"""Wires the browser agent into the common bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

from webshard.browser_agent.v1 import browser_agent_pb2_grpc as pb_grpc
from webshard.common.v1 import common_pb2
from webshard.recovery.v1 import recovery_pb2

from services.browser_agent.agent import ShardHost
from services.browser_agent.browser.events import BrowserEventKind
from services.browser_agent.browser.options import BrowserOptions
from services.browser_agent.browser.pool import BrowserPool
from services.browser_agent.hooks import FaultHooks
from services.browser_agent.memory import MemoryWatch, Sample
from services.browser_agent.native import NativeRuntime
from services.browser_agent.servicer import GUARDED_METHODS, SERVICE, BrowserAgentServicer
from services.browser_agent.session import CoordinatorSession
from services.browser_agent.settings import DEFAULT_PORT, AgentSettings
from services.browser_agent.store import ShardStore
from services.common.failures import FailureReporter
from services.common.server import BasicApp, Lifecycle

BROWSER_FAILURES = {
    BrowserEventKind.PROCESS_EXITED: recovery_pb2.FAILURE_KIND_RENDERER_CRASH,
    BrowserEventKind.PAGE_CRASHED: recovery_pb2.FAILURE_KIND_RENDERER_CRASH,
    BrowserEventKind.DEVICE_LOST: recovery_pb2.FAILURE_KIND_DEVICE_LOST,
    BrowserEventKind.PAGE_DISCONNECTED: recovery_pb2.FAILURE_KIND_STREAM_BROKEN,
}
BROWSERS_GONE = frozenset({BrowserEventKind.PROCESS_EXITED, BrowserEventKind.PAGE_CRASHED})


def make_app(settings: AgentSettings, lifecycle: Lifecycle) -> BasicApp:
    """One browser agent: its shard store, runtimes and coordinator session."""
    owned_dir = None if settings.data_dir else tempfile.mkdtemp(prefix="webshard-agent-")
    data_dir = Path(settings.data_dir or owned_dir or ".")
    store = ShardStore(data_dir, settings.max_shard_mb * 1024 * 1024)
    # Browser profiles live under the agent's data directory, so every process of
    # this agent's browsers names it on its command line.
    (data_dir / "browsers").mkdir(parents=True, exist_ok=True)
    pool = BrowserPool(
        store.root,
        active=settings.browsers,
        standby=settings.standby_browsers,
        options=BrowserOptions(engine=settings.engine, temp_root=str(data_dir / "browsers")),
    )
    host = ShardHost(
        NativeRuntime(settings.native_threads) if settings.native else None, pool.active, pool
    )
    session = CoordinatorSession(
        agent_id=settings.agent_id,
        address=settings.advertise_address or f"{settings.host}:{settings.port or DEFAULT_PORT}",
        coordinators=settings.coordinators,
        memory_budget_bytes=settings.memory_budget_mb * 1024 * 1024,
        browsers=lambda: hooks.mark(host.status()),
        max_backoff_s=settings.reconnect_max_backoff_s,
        token=settings.cluster_token,
    )
    hooks = FaultHooks(host, session)
    tasks: list[asyncio.Task[None]] = []
    reporter = FailureReporter(settings.recovery, token=settings.cluster_token)

    async def report_browser_failures() -> None:
        # The page and the browser's supervisor see crashes and lost devices
        # before any request does; recovery hears of them at once.
        while True:
            event = await pool.events.get()
            session.report_status()
            kind = BROWSER_FAILURES.get(event.kind)
            if kind is None:
                continue
            # What it held when it failed: a spare may take over, and the coordinator unload
            # the lost replicas, before this loop gets the event. A standby holds none (the
            # pool replaces it).
            specs = host.shards_held(event.browser_id, event.at)
            for spec in specs:
                reporter.report(
                    source=recovery_pb2.FAILURE_SOURCE_AGENT
                    if event.kind == BrowserEventKind.PROCESS_EXITED
                    else recovery_pb2.FAILURE_SOURCE_PAGE,
                    kind=kind,
                    agent_id=settings.agent_id,
                    browser_id=event.browser_id,
                    model=spec.model,
                    shard_index=spec.index,
                    message=event.message,
                    cause=hooks.cause(event.browser_id),
                )
            if specs and event.kind in BROWSERS_GONE:
                # Its shards are lost with it; a standby launches in its place, so the
                # agent keeps its capacity for the replicas recovery moves.
                await host.retire_failed(event.browser_id)

    async def watch_memory() -> None:
        # A page that outgrows its size after loading (a leak, a huge allocation) is
        # reported before the machine runs out: recovery moves its shards elsewhere.
        watch = MemoryWatch(settings.browser_memory_headroom_mb * 1024 * 1024)
        while True:
            await asyncio.sleep(settings.memory_check_ms / 1000)
            infos = await asyncio.to_thread(lambda: [b.info() for b in pool.active()])
            samples = [
                Sample(
                    info.browser_id,
                    frozenset(spec.sha256 for spec in host.shards_on(info.browser_id)),
                    info.memory_bytes,
                )
                for info in infos
                if info.state == common_pb2.BROWSER_STATE_READY
            ]
            for pressure in watch.observe(samples):
                for spec in host.shards_on(pressure.browser_id):
                    reporter.report(
                        source=recovery_pb2.FAILURE_SOURCE_AGENT,
                        kind=recovery_pb2.FAILURE_KIND_OUT_OF_MEMORY,
                        agent_id=settings.agent_id,
                        browser_id=pressure.browser_id,
                        model=spec.model,
                        shard_index=spec.index,
                        message=pressure.message,
                        cause=hooks.cause(pressure.browser_id),
                    )

    async def start() -> None:
        # Browsers first: the agent reports SERVING, and registers, with its
        # browsers launched and their capabilities known.
        await pool.start()
        tasks.append(asyncio.create_task(session.run(), name="coordinator-session"))
        tasks.append(asyncio.create_task(report_browser_failures(), name="browser-failures"))
        tasks.append(asyncio.create_task(watch_memory(), name="memory-watch"))

    async def stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runtime in host.runtimes():
            await runtime.close()
        await pool.close()
        await reporter.close()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)

    servicer = BrowserAgentServicer(settings, session, store, host, lifecycle, hooks=hooks)
    return BasicApp(
        service_names=(SERVICE,),
        registrations=[(pb_grpc.add_BrowserAgentServiceServicer_to_server, servicer)],
        on_start=start,
        on_stop=stop,
        guarded_methods=GUARDED_METHODS,
    )
