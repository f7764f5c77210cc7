"""The metrics dashboard: snapshots from fake sources, change detection, the HTTP routes and SSE."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import UnavailableError
from webshard.fault_injector.v1 import fault_injector_pb2
from webshard.metrics.v1 import metrics_pb2 as pb
from webshard.recovery.v1 import recovery_pb2

from services.common.server import Lifecycle
from services.metrics import server
from services.metrics.dashboard import (
    HEARTBEAT_FRAME,
    Dashboard,
    NotConfigured,
    ReplicaAnswer,
    RequestStats,
    build_snapshot,
    request_stats,
    sse_frame,
)
from services.metrics.events import EventBuffer
from services.metrics.settings import MetricsSettings
from services.metrics.store import MetricsStore

ADDRESSES = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


def replica_status(replica_id: str, role: int, leader: str, term: int = 4) -> Any:
    status = coordinator_pb2.ClusterStatusResponse(replica_id=replica_id, leader_id=leader)
    status.replicas.add(replica_id=replica_id, role=role, term=term, commit_index=17)
    for other in ("coordinator-0", "coordinator-1", "coordinator-2"):
        if other != replica_id:
            status.replicas.add(replica_id=other, address="somewhere")
    agent = status.agents.add(agent_id="agent-1", address="127.0.0.1:9", healthy=True)
    browser = agent.browsers.add(
        browser_id="browser-0",
        state=common_pb2.BROWSER_STATE_READY,
        runtime=common_pb2.RUNTIME_BROWSER,
        memory_bytes=300 << 20,
    )
    browser.capabilities.execution_providers.extend(
        [common_pb2.EXECUTION_PROVIDER_WEBGPU, common_pb2.EXECUTION_PROVIDER_WASM]
    )
    browser.capabilities.webgpu.available = True
    browser.capabilities.webgpu.is_fallback_adapter = True
    browser.capabilities.webnn.reason = "WebNN is not supported"
    browser.capabilities.engine = "firefox"
    browser.capabilities.engine_version = "153.8.0"
    status.agents.add(agent_id="agent-0", address="127.0.0.1:8", healthy=False)
    placement = status.placements.add(
        model="minilm-l6",
        sharding=common_pb2.SHARDING_STRATEGY_LAYER,
        runtime=common_pb2.RUNTIME_BROWSER,
        version=3,
    )
    shard = placement.shards.add()
    shard.shard.index = 0
    shard.replicas.add(
        agent_id="agent-1",
        browser_id="browser-0",
        execution_provider=common_pb2.EXECUTION_PROVIDER_WASM,
        healthy=True,
    )
    return status


class FakeSources:
    """Sources whose answers a test sets; an exception set for one is raised by it."""

    def __init__(self) -> None:
        self.answers = [
            ReplicaAnswer(
                ADDRESSES[0],
                replica_status("coordinator-0", coordinator_pb2.REPLICA_ROLE_FOLLOWER, "c-1"),
            ),
            ReplicaAnswer(
                ADDRESSES[1],
                replica_status("coordinator-1", coordinator_pb2.REPLICA_ROLE_LEADER, "c-1"),
            ),
            ReplicaAnswer(ADDRESSES[2], None, "UNAVAILABLE: connection refused"),
        ]
        fault = fault_injector_pb2.Fault(
            fault_id="f-1",
            state=fault_injector_pb2.FAULT_STATE_ACTIVE,
            spec=fault_injector_pb2.FaultSpec(
                kind=common_pb2.FAULT_KIND_LATENCY, intensity=common_pb2.INTENSITY_MILD
            ),
        )
        fault.targets.add(id="agent-1")
        fault.injected_at.FromSeconds(1_900_000_000)
        self.fault_list = [fault]
        self.recovery_error: Exception | None = UnavailableError("failed to connect")
        self.breaker_list = [
            recovery_pb2.Breaker(
                target_id="agent-1",
                scope=recovery_pb2.BREAKER_SCOPE_AGENT,
                state=common_pb2.BREAKER_STATE_OPEN,
                consecutive_failures=5,
                failure_rate=0.5,
            )
        ]
        self.stats = RequestStats(60.0, 30, 0.5, 12.0, 40.0)
        self.coordinator_error: Exception | None = None
        self.reads = 0

    async def coordinators(self) -> list[ReplicaAnswer]:
        self.reads += 1
        if self.coordinator_error is not None:
            raise self.coordinator_error
        return self.answers

    async def faults(self) -> list[fault_injector_pb2.Fault]:
        return self.fault_list

    async def recoveries(self) -> list[recovery_pb2.Recovery]:
        if self.recovery_error is not None:
            raise self.recovery_error
        recovery = recovery_pb2.Recovery(
            recovery_id="r-1",
            state=recovery_pb2.RECOVERY_STATE_SUCCEEDED,
            strategy=common_pb2.RECOVERY_STRATEGY_PROGRESSIVE,
        )
        recovery.duration.FromMilliseconds(250)
        return [recovery]

    async def breakers(self) -> list[recovery_pb2.Breaker]:
        if self.recovery_error is not None:
            raise self.recovery_error
        return self.breaker_list

    async def requests(self) -> RequestStats:
        return self.stats


async def test_a_snapshot_shows_each_source_and_marks_the_unreachable_one() -> None:
    snapshot = await build_snapshot(FakeSources())

    coordinators = snapshot["coordinators"]
    assert coordinators["status"] == "ok"
    assert coordinators["leader"] == "coordinator-1"
    rows = {r["address"]: r for r in coordinators["replicas"]}
    assert rows[ADDRESSES[1]]["role"] == "leader" and rows[ADDRESSES[1]]["is_leader"]
    assert rows[ADDRESSES[0]]["role"] == "follower" and not rows[ADDRESSES[0]]["is_leader"]
    assert rows[ADDRESSES[2]]["role"] == "unreachable"
    assert rows[ADDRESSES[2]]["error"] == "UNAVAILABLE: connection refused"

    agents = snapshot["agents"]
    assert (agents["status"], agents["source"], agents["from_leader"]) == (
        "ok",
        "coordinator-1",
        True,
    )
    assert [a["agent_id"] for a in agents["items"]] == ["agent-0", "agent-1"]
    [browser] = agents["items"][1]["browsers"]
    assert browser["state"] == "ready"
    assert browser["execution_providers"] == ["webgpu", "wasm"]
    assert browser["engine"] == "firefox 153.8.0"
    assert browser["webgpu"]["fallback"] is True
    assert browser["webnn"] == {"available": False, "reason": "WebNN is not supported"}

    [placement] = snapshot["placements"]["items"]
    assert (placement["model"], placement["sharding"], placement["version"]) == (
        "minilm-l6",
        "layer",
        3,
    )
    assert placement["shards"][0]["replicas"][0]["execution_provider"] == "wasm"

    [fault] = snapshot["faults"]["items"]
    assert fault["fault_id"] == "f-1"
    assert (fault["kind"], fault["intensity"], fault["state"]) == ("latency", "mild", "active")
    assert fault["targets"] == ["agent-1"]
    assert fault["injected_at"] == "2030-03-17T17:46:40.000Z"
    assert fault["reverts_at"] is None

    # Recovery is down: its two sections say so, and nothing else is affected.
    for name in ("recoveries", "breakers"):
        assert snapshot[name]["status"] == "unreachable"
        assert snapshot[name]["error"] == "UNAVAILABLE: failed to connect"
        assert snapshot[name]["items"] == []

    requests = snapshot["requests"]
    assert requests["status"] == "ok"
    assert (requests["rate_per_s"], requests["p50_ms"], requests["p95_ms"]) == (0.5, 12.0, 40.0)
    json.dumps(snapshot)  # all of it is JSON


async def test_with_no_coordinator_answering_the_cluster_sections_are_unreachable() -> None:
    sources = FakeSources()
    sources.answers = [ReplicaAnswer(a, None, "DEADLINE_EXCEEDED") for a in ADDRESSES]
    sources.recovery_error = None
    snapshot = await build_snapshot(sources)
    assert snapshot["coordinators"]["status"] == "unreachable"
    assert snapshot["coordinators"]["leader"] == ""
    assert len(snapshot["coordinators"]["replicas"]) == 3
    assert snapshot["agents"]["status"] == "unreachable"
    assert snapshot["placements"]["status"] == "unreachable"
    assert snapshot["recoveries"]["status"] == "ok"
    [recovery] = snapshot["recoveries"]["items"]
    assert (recovery["state"], recovery["strategy"], recovery["duration_ms"]) == (
        "succeeded",
        "progressive",
        250.0,
    )
    [breaker] = snapshot["breakers"]["items"]
    assert (breaker["state"], breaker["scope"], breaker["failure_rate"]) == ("open", "agent", 0.5)


async def test_a_follower_view_is_used_when_the_leader_is_silent() -> None:
    sources = FakeSources()
    sources.answers = [sources.answers[0], ReplicaAnswer(ADDRESSES[1], None, "UNAVAILABLE")]
    snapshot = await build_snapshot(sources)
    # The follower still names the leader it last knew.
    assert snapshot["coordinators"]["leader"] == "c-1"
    assert snapshot["agents"]["source"] == "coordinator-0"
    assert snapshot["agents"]["from_leader"] is False


async def test_a_source_that_raises_anything_is_unreachable_and_one_with_no_address_is_named() -> (
    None
):
    sources = FakeSources()
    sources.coordinator_error = RuntimeError("boom")
    snapshot = await build_snapshot(sources)
    for name in ("coordinators", "agents", "placements"):
        assert snapshot[name]["status"] == "unreachable"
        assert snapshot[name]["error"] == "RuntimeError: boom"
    sources.coordinator_error = NotConfigured("no coordinator addresses are configured")
    snapshot = await build_snapshot(sources)
    assert snapshot["agents"]["status"] == "not configured"


async def test_the_snapshot_is_pushed_only_when_it_changes() -> None:
    sources = FakeSources()
    dashboard = Dashboard(sources, host="127.0.0.1", port=0)
    assert await dashboard.refresh() is True
    assert dashboard.version == 1
    first = await dashboard.current()
    assert await dashboard.refresh() is False
    assert await dashboard.refresh() is False
    assert dashboard.version == 1
    assert await dashboard.current() == first

    sources.fault_list = []
    assert await dashboard.refresh() is True
    assert dashboard.version == 2
    payload = json.loads(await dashboard.current())
    assert payload["version"] == 2
    assert payload["faults"]["items"] == []
    assert payload["changed_at"].endswith("Z")

    sources.recovery_error = None  # recovery came back
    assert await dashboard.refresh() is True
    assert json.loads(await dashboard.current())["breakers"]["status"] == "ok"


def test_sse_frames() -> None:
    assert sse_frame('{"a":1}') == b'data: {"a":1}\n\n'
    assert sse_frame("one\ntwo", event_id="7") == b"id: 7\ndata: one\ndata: two\n\n"
    assert HEARTBEAT_FRAME.startswith(b":") and HEARTBEAT_FRAME.endswith(b"\n\n")


def test_request_stats_cover_the_last_minute_only() -> None:
    now = dt.datetime(2030, 1, 1, 12, 0, 0)
    buffer = EventBuffer()
    for i, (ago_s, latency_ms) in enumerate([(5, 10), (20, 20), (50, 30), (59, 40), (90, 999)]):
        event = pb.Event()
        event.request.request_id = f"q-{i}"
        event.request.started_at.FromDatetime(
            (now - dt.timedelta(seconds=ago_s)).replace(tzinfo=dt.UTC)
        )
        event.request.latency.FromMilliseconds(latency_ms)
        event.request.ok = True
        buffer.add([event])
    store = MetricsStore.open(":memory:")
    try:
        store.write(buffer.take()[1])
        stats = request_stats(store, now=now)
        assert stats.window_s == 60.0
        assert stats.count == 4
        assert stats.rate_per_s == pytest.approx(4 / 60, abs=1e-3)
        assert stats.p50_ms == 25.0
        assert stats.p95_ms is not None and 35.0 < stats.p95_ms <= 40.0
        empty = request_stats(store, now=now + dt.timedelta(hours=1))
        assert (empty.count, empty.rate_per_s, empty.p50_ms, empty.p95_ms) == (0, 0.0, None, None)
    finally:
        store.close()


# --------------------------------------------------------------------------- over HTTP


@contextlib.asynccontextmanager
async def serving(sources: FakeSources, **kwargs: float) -> AsyncIterator[Dashboard]:
    dashboard = Dashboard(sources, host="127.0.0.1", port=0, **kwargs)
    await dashboard.start()
    try:
        yield dashboard
    finally:
        await dashboard.stop()


async def next_event(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """The next SSE message: ("data", payload) or ("comment", text); skips the retry field."""
    lines: list[str] = []
    while True:
        raw = await asyncio.wait_for(response.content.readline(), 10)
        assert raw, "the stream ended"
        line = raw.decode().rstrip("\n")
        if line:
            lines.append(line)
            continue
        data = [ln.removeprefix("data: ") for ln in lines if ln.startswith("data: ")]
        if data:
            return "data", "\n".join(data)
        comments = [ln for ln in lines if ln.startswith(":")]
        if comments:
            return "comment", comments[0]
        lines = []


async def test_the_routes_serve_the_page_the_snapshot_and_health() -> None:
    async with serving(FakeSources()) as dashboard, aiohttp.ClientSession() as http:
        async with http.get(dashboard.url) as page:
            assert page.status == 200
            assert page.content_type == "text/html"
            assert "default-src 'none'" in page.headers["Content-Security-Policy"]
            html = await page.text()
        for section in (
            "coordinators",
            "agents",
            "placements",
            "faults",
            "recoveries",
            "breakers",
            "requests",
        ):
            assert f'<section id="{section}"' in html
        assert 'new EventSource("events")' in html
        assert "http://" not in html.replace(dashboard.url, "")
        assert "https://" not in html

        async with http.get(dashboard.url + "api/snapshot") as snap:
            assert snap.status == 200
            body = await snap.json()
        assert body["version"] == 1
        assert body["coordinators"]["leader"] == "coordinator-1"
        assert body["recoveries"]["status"] == "unreachable"

        async with http.get(dashboard.url + "healthz") as health:
            assert (health.status, await health.text()) == (200, "ok\n")


async def test_events_send_the_snapshot_then_each_change_then_heartbeats() -> None:
    sources = FakeSources()
    async with (
        serving(sources, interval_s=0.05, heartbeat_s=0.3) as dashboard,
        aiohttp.ClientSession() as http,
        http.get(dashboard.url + "events") as stream,
    ):
        assert stream.status == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        kind, payload = await next_event(stream)
        assert kind == "data"
        first = json.loads(payload)
        assert [f["fault_id"] for f in first["faults"]["items"]] == ["f-1"]
        assert dashboard.watchers == 1

        # Nothing changes: only heartbeats, while the poller keeps reading.
        reads = sources.reads
        kind, text = await next_event(stream)
        assert (kind, text) == ("comment", ": heartbeat")
        assert sources.reads > reads
        assert dashboard.version == first["version"]

        second = fault_injector_pb2.Fault(
            fault_id="f-2", state=fault_injector_pb2.FAULT_STATE_PENDING
        )
        sources.fault_list = [*sources.fault_list, second]
        kind, payload = await next_event(stream)
        while kind != "data":
            kind, payload = await next_event(stream)
        changed = json.loads(payload)
        assert changed["version"] == first["version"] + 1
        assert [f["fault_id"] for f in changed["faults"]["items"]] == ["f-1", "f-2"]


async def test_a_viewer_that_leaves_is_let_go_and_the_poller_rests() -> None:
    sources = FakeSources()
    async with serving(sources, interval_s=0.05, heartbeat_s=0.1, demand_s=0.2) as dashboard:
        async with aiohttp.ClientSession() as http, http.get(dashboard.url + "events") as stream:
            await next_event(stream)
            assert dashboard.watchers == 1
        # The next heartbeat finds the connection closed.
        for _ in range(100):
            if dashboard.watchers == 0:
                break
            await asyncio.sleep(0.05)
        assert dashboard.watchers == 0
        await asyncio.sleep(0.4)  # the demand of the last request runs out
        reads = sources.reads
        await asyncio.sleep(0.3)
        assert sources.reads == reads, "nobody watches, so nothing is read"


async def test_stop_ends_open_streams() -> None:
    sources = FakeSources()
    dashboard = Dashboard(sources, host="127.0.0.1", port=0, heartbeat_s=60)
    await dashboard.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(dashboard.url + "events") as stream:
            await next_event(stream)
            await asyncio.wait_for(dashboard.stop(), 5)
            rest = await asyncio.wait_for(stream.content.read(), 5)
            assert rest == b""
    finally:
        await dashboard.stop()


# --------------------------------------------------------------------------- in the service


def busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port: int = sock.getsockname()[1]
    return sock, port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_service_serves_the_dashboard_with_unreachable_sources(tmp_path: Path) -> None:
    nothing = f"127.0.0.1:{free_port()}"
    port = free_port()
    settings = MetricsSettings(
        data_dir=str(tmp_path),
        http_port=port,
        coordinators=[nothing],
        recovery=nothing,
        fault_injector="",
    )
    app = server.make_app(settings, Lifecycle())
    await app.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/api/snapshot") as response,
        ):
            snapshot = await response.json()
    finally:
        await app.stop()
    for name in ("coordinators", "agents", "placements", "recoveries", "breakers"):
        assert snapshot[name]["status"] == "unreachable", name
    assert snapshot["faults"]["status"] == "not configured"
    assert snapshot["requests"]["status"] == "ok"
    assert snapshot["requests"]["count"] == 0


async def test_a_busy_dashboard_port_leaves_the_service_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock, port = busy_port()
    try:
        settings = MetricsSettings(data_dir=str(tmp_path), http_port=port)
        app = server.make_app(settings, Lifecycle())
        await app.start()
        await app.stop()
    finally:
        sock.close()
    assert "the dashboard cannot listen" in caplog.text


async def test_http_port_0_turns_the_dashboard_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    app = server.make_app(MetricsSettings(data_dir=str(tmp_path), http_port=0), Lifecycle())
    await app.start()
    await app.stop()
    assert "metrics database open" in caplog.text
    assert "dashboard" not in caplog.text
