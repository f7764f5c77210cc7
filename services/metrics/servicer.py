"""The metrics service's gRPC servicer.

Every database call runs on one worker thread: a DuckDB connection is not safe
to share between threads, and a single writer keeps the event loop free to
receive the next batches while the previous one is committed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.common.v1 import common_pb2
from webshard.metrics.v1 import metrics_pb2 as pb
from webshard.metrics.v1 import metrics_pb2_grpc as pb_grpc

from services.common.auth import methods
from services.common.server import Lifecycle
from services.metrics import reports
from services.metrics.events import EventBuffer, InvalidEvent, time_us
from services.metrics.store import EVENT_TIME, MetricsStore, QueryError

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["MetricsService"].full_name
GUARDED_METHODS = methods(SERVICE, "Ingest")
"""The calls that need the cluster token when one is set: writes; queries and reports
stay open."""

T = TypeVar("T")

Context = grpc.aio.ServicerContext[Any, Any]

_EPOCH = dt.datetime(1970, 1, 1)


class MetricsServicer(pb_grpc.MetricsServiceServicer):
    """Ingests events and answers queries.

    Ingest commits a stream's events in transactions of up to ``batch_events``
    events, or whatever has arrived after ``flush_s``. A malformed request is
    refused whole with INVALID_ARGUMENT; the requests before it in the same
    stream are committed first, and the error says how many events that was.
    """

    def __init__(
        self,
        store: MetricsStore,
        lifecycle: Lifecycle,
        *,
        batch_events: int = 10_000,
        flush_s: float = 0.05,
    ) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._batch_events = batch_events
        self._flush_s = flush_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``call`` on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: call(*args, **kwargs))

    def close(self) -> None:
        """Wait for database work in progress, then close the database."""
        self._executor.shutdown(wait=True)
        self._store.close()

    async def Ingest(
        self, request_iterator: AsyncIterator[pb.IngestRequest], context: Context
    ) -> pb.IngestResponse:
        """Commit a stream of event batches; answer with the count once all are committed."""
        buffer = EventBuffer()
        committed = 0
        received = 0
        writing: asyncio.Future[int] | None = None
        loop = asyncio.get_running_loop()
        due = 0.0  # when the oldest buffered event must be committed

        async def flush() -> None:
            # One write in flight at a time; the next batch is read while it runs.
            nonlocal writing, committed
            if writing is not None:
                committed += await writing
                writing = None
            if buffer.events:
                count, batches = buffer.take()
                writing = asyncio.ensure_future(self.run(_write, self._store, count, batches))

        requests = aiter(self._lifecycle.stream(request_iterator, context))
        step: asyncio.Future[pb.IngestRequest] | None = None
        try:
            while True:
                if step is None:
                    step = asyncio.ensure_future(anext(requests))
                timeout = max(0.0, due - loop.time()) if buffer.events else None
                done, _ = await asyncio.wait({step}, timeout=timeout)
                if not done:
                    await flush()
                    continue
                finished, step = step, None
                try:
                    request = finished.result()
                except StopAsyncIteration:
                    break
                if not buffer.events:
                    due = loop.time() + self._flush_s
                try:
                    buffer.add(request.events, first_index=received)
                except InvalidEvent as exc:
                    # add() kept nothing of this request; the earlier ones are committed.
                    await flush()
                    await flush()
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{exc}; the request holding it was refused, the {committed} events "
                        "before it in this stream were committed",
                    )
                received += len(request.events)
                if buffer.events >= self._batch_events:
                    await flush()
            await flush()
            await flush()
        finally:
            if step is not None:
                step.cancel()
        return pb.IngestResponse(committed=committed)

    async def QueryRecoverySummary(
        self, request: pb.QueryRecoverySummaryRequest, context: Context
    ) -> pb.QueryRecoverySummaryResponse:
        """Recovery percentiles and success rates, grouped."""
        try:
            start, end = _time_range(request.time_range, request.HasField("time_range"))
            rows = await self.run(
                self._store.recovery_summary,
                list(request.group_by),
                run_id=request.run_id,
                start=start,
                end=end,
            )
        except QueryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.QueryRecoverySummaryResponse(
            rows=[
                pb.RecoverySummaryRow(
                    group=row.group,
                    count=row.count,
                    success_rate=row.success_rate,
                    p50_ms=row.p50_ms,
                    p95_ms=row.p95_ms,
                    max_ms=row.max_ms,
                    redundancy_restored=row.redundancy_restored,
                    redundancy_restored_p50_ms=row.redundancy_restored_p50_ms or 0.0,
                    redundancy_restored_p95_ms=row.redundancy_restored_p95_ms or 0.0,
                    engines=row.engines,
                )
                for row in rows
            ]
        )

    async def QueryTimeSeries(
        self, request: pb.QueryTimeSeriesRequest, context: Context
    ) -> pb.QueryTimeSeriesResponse:
        """One metric in time buckets."""
        try:
            start, end = _time_range(request.time_range, request.HasField("time_range"))
            points = await self.run(
                self._store.time_series,
                request.metric,
                bucket=_bucket(request.bucket, request.HasField("bucket")),
                start=start,
                end=end,
            )
        except QueryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = pb.QueryTimeSeriesResponse()
        for point in points:
            at = Timestamp()
            at.FromDatetime(point.at.replace(tzinfo=dt.UTC))
            response.points.add(at=at, value=point.value)
        return response

    async def GetReport(
        self, request: pb.GetReportRequest, context: Context
    ) -> pb.GetReportResponse:
        """A report in JSON, Markdown, HTML (with charts) or JUnit XML."""
        if request.format == pb.REPORT_FORMAT_UNSPECIFIED:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "format must be REPORT_FORMAT_JSON, REPORT_FORMAT_MARKDOWN, "
                "REPORT_FORMAT_HTML or REPORT_FORMAT_JUNIT_XML",
            )
        summary = await self.run(
            self._store.recovery_summary, list(reports.CELL), run_id=request.run_id
        )
        if request.format == pb.REPORT_FORMAT_JSON:
            tables = await self._tables(EVENT_TIME, request.run_id)
            content, kind = reports.render_json(request.run_id, summary, tables), "application/json"
        elif request.format == pb.REPORT_FORMAT_MARKDOWN:
            tables = await self._tables(reports.MARKDOWN_TABLES, request.run_id)
            content = reports.render_markdown(request.run_id, summary, tables)
            kind = "text/markdown"
        elif request.format == pb.REPORT_FORMAT_HTML:
            tables = await self._tables(reports.HTML_TABLES, request.run_id)
            content = await asyncio.to_thread(reports.render_html, request.run_id, summary, tables)
            kind = "text/html; charset=utf-8"
        else:
            content, kind = reports.render_junit(request.run_id, summary), "application/xml"
        return pb.GetReportResponse(content=content, content_type=kind)

    async def _tables(self, names: Iterable[str], run_id: str) -> dict[str, list[dict[str, Any]]]:
        """Each table in ``names``: its rows (of ``run_id``'s run, where a table records runs)."""
        return {table: await self.run(self._store.rows, table, run_id=run_id) for table in names}


def _write(store: MetricsStore, count: int, batches: Any) -> int:
    store.write(batches)
    return count


def _datetime(stamp: Timestamp, what: str) -> dt.datetime:
    try:
        micros = time_us(stamp, what)
    except InvalidEvent as exc:
        raise QueryError(str(exc)) from None
    return _EPOCH + dt.timedelta(microseconds=micros)


def _time_range(
    time_range: common_pb2.TimeRange, present: bool
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """A TimeRange as naive UTC (start, end), None for an open side; raises QueryError."""
    if not present:
        return None, None
    start = (
        _datetime(time_range.start, "time_range.start") if time_range.HasField("start") else None
    )
    end = _datetime(time_range.end, "time_range.end") if time_range.HasField("end") else None
    return start, end


def _bucket(bucket: Duration, present: bool) -> dt.timedelta:
    if not present:
        raise QueryError("bucket is required and must be positive")
    if bucket.seconds < 0 or bucket.nanos < 0 or abs(bucket.nanos) >= 1_000_000_000:
        raise QueryError(f"bucket must be positive, not {bucket.seconds + bucket.nanos / 1e9} s")
    return dt.timedelta(seconds=bucket.seconds, microseconds=bucket.nanos // 1000)
