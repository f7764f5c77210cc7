"""Wires the metrics servicer into the common bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

from webshard.metrics.v1 import metrics_pb2_grpc as pb_grpc

from services.common.auth import fault_token
from services.common.server import BasicApp, Lifecycle
from services.metrics.dashboard import ClusterSources, Dashboard, RequestStats, request_stats
from services.metrics.servicer import GUARDED_METHODS, SERVICE, MetricsServicer
from services.metrics.settings import MetricsSettings
from services.metrics.store import MetricsStore

log = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0
"""How often rows past the retention period are dropped."""


def make_app(settings: MetricsSettings, lifecycle: Lifecycle) -> BasicApp:
    """The metrics service.

    Raises StoreError (the service refuses to start) when the database file is
    not a DuckDB database or another process holds it; the file is left as it is.
    """
    owned_dir = None
    if settings.db_path:
        db_path = Path(settings.db_path)
    elif settings.data_dir:
        db_path = Path(settings.data_dir) / "metrics.duckdb"
    else:
        owned_dir = tempfile.mkdtemp(prefix="webshard-metrics-")
        log.warning(
            "no data directory: the database lives in a temporary one", extra={"dir": owned_dir}
        )
        db_path = Path(owned_dir) / "metrics.duckdb"
    store = MetricsStore.open(db_path)
    dropped = store.drop_expired(settings.retention_days)
    log.info("metrics database open", extra={"path": str(db_path), "expired_rows_dropped": dropped})
    servicer = MetricsServicer(
        store,
        lifecycle,
        batch_events=settings.ingest_batch_events,
        flush_s=settings.ingest_flush_ms / 1000,
    )
    tasks: list[asyncio.Task[None]] = []
    dashboard: Dashboard | None = None
    sources: ClusterSources | None = None
    if settings.http_port:

        async def requests() -> RequestStats:
            return await servicer.run(request_stats, store)

        sources = ClusterSources(
            coordinators=settings.coordinators,
            recovery=settings.recovery,
            fault_injector=settings.fault_injector,
            fault_token=fault_token(settings.fault_token, settings.cluster_token),
            requests=requests,
        )
        dashboard = Dashboard(sources, host=settings.host, port=settings.http_port)

    async def retain() -> None:
        while True:
            await asyncio.sleep(RETENTION_INTERVAL_S)
            try:
                dropped = await servicer.run(store.drop_expired, settings.retention_days)
            except Exception:
                log.exception("dropping expired rows failed; trying again in an hour")
                continue
            log.info("expired rows dropped", extra={"rows": dropped})

    async def start() -> None:
        tasks.append(asyncio.create_task(retain()))
        if dashboard is not None:
            try:
                await dashboard.start()
            except OSError as exc:
                # The events matter more than the page: the service keeps ingesting.
                log.error(
                    "the dashboard cannot listen; the service runs without it",
                    extra={"address": f"{settings.host}:{settings.http_port}", "error": str(exc)},
                )

    async def stop() -> None:
        if dashboard is not None:
            await dashboard.stop()
        if sources is not None:
            await sources.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(servicer.close)
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)

    return BasicApp(
        service_names=(SERVICE,),
        registrations=[(pb_grpc.add_MetricsServiceServicer_to_server, servicer)],
        on_start=start,
        on_stop=stop,
        guarded_methods=GUARDED_METHODS,
    )
