"""The live dashboard: one HTML page, a JSON snapshot and Server-Sent Events, over HTTP.

A poller reads the cluster every ``interval_s`` while someone is watching: each
coordinator replica's own ``ClusterStatus`` (its role, term and, from the
leader, the agents and placements), the fault-injector's faults in progress,
recovery's recent recoveries and circuit breakers (all through the SDK), and
the request rate and latency of the last minute from the store. A source that
cannot be reached shows as "unreachable" in its sections; the others go on.
The snapshot is pushed to the page only when it changed.

Routes:

    GET /              the page: inline CSS and JS, nothing fetched from the network
    GET /api/snapshot  the snapshot as JSON
    GET /events        text/event-stream: ``data: <snapshot JSON>`` on every change,
                       a comment line every ``heartbeat_s`` in between
    GET /healthz       ``ok``
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.aio import Client, FaultInjectorClient, RecoveryClient
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import RPCError
from webshard.fault_injector.v1 import fault_injector_pb2
from webshard.recovery.v1 import recovery_pb2

from services.metrics.store import MetricsStore, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_INTERVAL_S = 0.5
"""How often the sources are read while someone watches."""
POLL_TIMEOUT_S = 2.0
"""Deadline of each call to a source."""
HEARTBEAT_S = 15.0
"""Longest quiet spell on an event stream before a comment line keeps it open."""
DEMAND_S = 30.0
"""How long a request for the snapshot keeps the poller running with no stream open."""
REQUEST_WINDOW = dt.timedelta(minutes=1)
"""The span the request rate and latency are taken over."""
RECOVERIES_SHOWN = 20
"""Most recent recoveries shown."""
RETRY_MS = 2000
"""How soon a browser reconnects a broken event stream."""
MAX_ERROR_CHARS = 300


class NotConfigured(Exception):
    """A source has no address."""


@dataclass(frozen=True)
class ReplicaAnswer:
    """One coordinator replica's answer to ClusterStatus, or why there was none."""

    address: str
    status: coordinator_pb2.ClusterStatusResponse | None
    error: str = ""


@dataclass(frozen=True)
class RequestStats:
    """Inference requests that started within the last ``window_s`` seconds."""

    window_s: float
    count: int
    rate_per_s: float
    p50_ms: float | None
    p95_ms: float | None


class Sources(Protocol):
    """Where the dashboard's data comes from; each method may raise when its source fails."""

    async def coordinators(self) -> list[ReplicaAnswer]:
        """Every configured replica's ClusterStatus, or its error."""
        ...

    async def faults(self) -> list[fault_injector_pb2.Fault]:
        """The faults in progress."""
        ...

    async def recoveries(self) -> list[recovery_pb2.Recovery]:
        """Recent recoveries, newest first."""
        ...

    async def breakers(self) -> list[recovery_pb2.Breaker]:
        """Every circuit breaker."""
        ...

    async def requests(self) -> RequestStats:
        """The request rate and latency of the last minute."""
        ...


def request_stats(
    store: MetricsStore, window: dt.timedelta = REQUEST_WINDOW, now: dt.datetime | None = None
) -> RequestStats:
    """Requests that started in ``window`` before ``now``: count, rate and latency percentiles.

    Read-only; like every store call, run it on the store's own thread.
    """
    end = now or utc_now()
    start = end - window

    def value(metric: str) -> float | None:
        points = store.time_series(metric, bucket=window, start=start, end=end)
        return points[0].value if points else None

    rate = value("request_rate") or 0.0
    return RequestStats(
        window_s=window.total_seconds(),
        count=round(rate * window.total_seconds()),
        rate_per_s=round(rate, 3),
        p50_ms=_round(value("request_latency_p50_ms")),
        p95_ms=_round(value("request_latency_p95_ms")),
    )


class ClusterSources:
    """The real sources: the services through the SDK, and the store through ``requests``."""

    def __init__(
        self,
        *,
        coordinators: Sequence[str],
        recovery: str,
        fault_injector: str,
        requests: Callable[[], Awaitable[RequestStats]],
        fault_token: str = "",
        timeout_s: float = POLL_TIMEOUT_S,
    ) -> None:
        self._timeout = timeout_s
        self._coordinators = {
            address: Client(address, timeout=timeout_s)
            for address in dict.fromkeys(a.strip() for a in coordinators if a.strip())
        }
        self._recovery = RecoveryClient(recovery, timeout=timeout_s) if recovery else None
        self._injector = (
            FaultInjectorClient(fault_injector, token=fault_token or None, timeout=timeout_s)
            if fault_injector
            else None
        )
        self._requests = requests

    async def coordinators(self) -> list[ReplicaAnswer]:
        """Ask every replica at once; one that fails is an answer with its error."""
        if not self._coordinators:
            raise NotConfigured("no coordinator addresses are configured")

        async def ask(address: str, client: Client) -> ReplicaAnswer:
            try:
                return ReplicaAnswer(address, await client.cluster_status(timeout=self._timeout))
            except Exception as exc:
                return ReplicaAnswer(address, None, describe(exc))

        return list(await asyncio.gather(*(ask(a, c) for a, c in self._coordinators.items())))

    async def faults(self) -> list[fault_injector_pb2.Fault]:
        """Pending and active faults, oldest first."""
        if self._injector is None:
            raise NotConfigured("no fault-injector address is configured")
        return await self._injector.list_faults(states=("pending", "active"), timeout=self._timeout)

    async def recoveries(self) -> list[recovery_pb2.Recovery]:
        """The most recent recoveries, newest first."""
        if self._recovery is None:
            raise NotConfigured("no recovery address is configured")
        return await self._recovery.list_recoveries(limit=RECOVERIES_SHOWN, timeout=self._timeout)

    async def breakers(self) -> list[recovery_pb2.Breaker]:
        """Every circuit breaker recovery keeps."""
        if self._recovery is None:
            raise NotConfigured("no recovery address is configured")
        return await self._recovery.list_breakers(timeout=self._timeout)

    async def requests(self) -> RequestStats:
        """The store's figures for the last minute."""
        return await self._requests()

    async def close(self) -> None:
        """Close every client's channels."""
        clients: list[Client | RecoveryClient | FaultInjectorClient] = [
            *self._coordinators.values()
        ]
        if self._recovery is not None:
            clients.append(self._recovery)
        if self._injector is not None:
            clients.append(self._injector)
        for client in clients:
            await client.close()


# --------------------------------------------------------------------------- snapshot


def describe(exc: BaseException) -> str:
    """A short, stable description of why a source failed."""
    if isinstance(exc, RPCError):
        text = f"{exc.code.name}: {exc.message}" if exc.message else exc.code.name
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_ERROR_CHARS]


async def _attempt(call: Awaitable[T]) -> tuple[T | None, str, str]:
    """(value, status, error): status is "ok", "not configured" or "unreachable"."""
    try:
        return await call, "ok", ""
    except NotConfigured as exc:
        return None, "not configured", str(exc)
    except Exception as exc:
        return None, "unreachable", describe(exc)


def _enum(wrapper: Any, prefix: str, value: int) -> str:
    """The enum value's short lowercase name ("ready" for BROWSER_STATE_READY)."""
    try:
        name: str = wrapper.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _time(stamp: Timestamp) -> str | None:
    """An ISO 8601 UTC time, or None when unset."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    moment = stamp.ToDatetime(tzinfo=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(duration: Duration) -> float:
    return round(duration.ToNanoseconds() / 1e6, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _section(status: str, error: str = "", **fields: Any) -> dict[str, Any]:
    return {"status": status, "error": error, **fields}


def _replica_row(answer: ReplicaAnswer) -> dict[str, Any]:
    row: dict[str, Any] = {"address": answer.address, "reachable": answer.status is not None}
    if answer.status is None:
        row.update(
            replica_id="", role="unreachable", term=None, commit_index=None, error=answer.error
        )
        return row
    status = answer.status
    me = next((r for r in status.replicas if r.replica_id == status.replica_id), None)
    row.update(
        replica_id=status.replica_id,
        role=_enum(coordinator_pb2.ReplicaRole, "REPLICA_ROLE_", me.role) if me else "unknown",
        term=me.term if me else None,
        commit_index=me.commit_index if me else None,
        leader_id=status.leader_id,
        error="",
    )
    return row


def coordinators_section(
    answers: Sequence[ReplicaAnswer],
) -> tuple[dict[str, Any], ReplicaAnswer | None]:
    """The replicas and the leader, and the answer whose agents and placements to show.

    The leader is the replica that says it leads (the highest term among several);
    failing that, the leader most replicas name. Agents and placements come from
    the leader's answer, or from any replica that answered when the leader did not.
    """
    rows = [_replica_row(a) for a in answers]
    answered = [a for a in answers if a.status is not None]
    leaders = [
        (row["term"] or 0, row["replica_id"], answer)
        for row, answer in zip(rows, answers, strict=True)
        if row["role"] == "leader"
    ]
    view: ReplicaAnswer | None = None
    leader = ""
    if leaders:
        _, leader, view = max(leaders, key=lambda item: (item[0], item[1]))
    else:
        named = [a.status.leader_id for a in answered if a.status and a.status.leader_id]
        if named:
            leader = max(set(named), key=lambda name: (named.count(name), name))
    if view is None and answered:
        view = answered[0]
    for row in rows:
        row["is_leader"] = bool(leader) and row["replica_id"] == leader
    if not answered:
        section = _section(
            "unreachable", "no coordinator replica answered", leader="", replicas=rows
        )
    else:
        section = _section("ok", leader=leader, replicas=rows)
    return section, view


def _browser(browser: common_pb2.BrowserInfo) -> dict[str, Any]:
    caps = browser.capabilities
    webgpu = caps.webgpu
    return {
        "browser_id": browser.browser_id,
        "state": _enum(common_pb2.BrowserState, "BROWSER_STATE_", browser.state),
        "runtime": _enum(common_pb2.Runtime, "RUNTIME_", browser.runtime),
        "engine": " ".join(p for p in (caps.engine, caps.engine_version) if p),
        "execution_providers": [
            _enum(common_pb2.ExecutionProvider, "EXECUTION_PROVIDER_", ep)
            for ep in caps.execution_providers
        ],
        "webgpu": {
            "available": webgpu.available,
            "fallback": webgpu.is_fallback_adapter,
            "adapter": " ".join(p for p in (webgpu.vendor, webgpu.architecture) if p),
            "reason": webgpu.reason,
        },
        "webnn": {"available": caps.webnn.available, "reason": caps.webnn.reason},
        "wasm_threads": caps.wasm.threads,
        "memory_bytes": browser.memory_bytes,
        "shards": [
            {
                "model": shard.spec.model,
                "index": shard.spec.index,
                "execution_provider": _enum(
                    common_pb2.ExecutionProvider, "EXECUTION_PROVIDER_", shard.execution_provider
                ),
            }
            for shard in browser.shards
        ],
    }


def agents_section(view: ReplicaAnswer | None, leader: str) -> dict[str, Any]:
    """Every registered agent with its browsers, as ``view``'s replica knows them."""
    if view is None or view.status is None:
        return _section("unreachable", "no coordinator replica answered", source="", items=[])
    status = view.status
    items = [
        {
            "agent_id": agent.agent_id,
            "address": agent.address,
            "healthy": agent.healthy,
            "memory_used_bytes": agent.memory_used_bytes,
            "memory_budget_bytes": agent.memory_budget_bytes,
            "in_flight": agent.in_flight,
            "browsers": [_browser(b) for b in agent.browsers],
        }
        for agent in sorted(status.agents, key=lambda a: a.agent_id)
    ]
    return _section(
        "ok",
        source=status.replica_id,
        from_leader=bool(leader) and status.replica_id == leader,
        items=items,
    )


def placements_section(view: ReplicaAnswer | None) -> dict[str, Any]:
    """Where each deployed model's shards live."""
    if view is None or view.status is None:
        return _section("unreachable", "no coordinator replica answered", items=[])
    items = [
        {
            "model": placement.model,
            "sharding": _enum(
                common_pb2.ShardingStrategy, "SHARDING_STRATEGY_", placement.sharding
            ),
            "runtime": _enum(common_pb2.Runtime, "RUNTIME_", placement.runtime),
            "recovery_strategy": _enum(
                common_pb2.RecoveryStrategy, "RECOVERY_STRATEGY_", placement.recovery_strategy
            ),
            "version": placement.version,
            "shards": [
                {
                    "index": shard.shard.index,
                    "size_bytes": shard.shard.size_bytes,
                    "replicas": [
                        {
                            "agent_id": r.agent_id,
                            "browser_id": r.browser_id,
                            "execution_provider": _enum(
                                common_pb2.ExecutionProvider,
                                "EXECUTION_PROVIDER_",
                                r.execution_provider,
                            ),
                            "healthy": r.healthy,
                        }
                        for r in shard.replicas
                    ],
                }
                for shard in placement.shards
            ],
        }
        for placement in sorted(view.status.placements, key=lambda p: p.model)
    ]
    return _section("ok", items=items)


def _fault(fault: fault_injector_pb2.Fault) -> dict[str, Any]:
    spec = fault.spec
    return {
        "fault_id": fault.fault_id,
        "kind": _enum(common_pb2.FaultKind, "FAULT_KIND_", spec.kind),
        "intensity": _enum(common_pb2.Intensity, "INTENSITY_", spec.intensity),
        "state": _enum(fault_injector_pb2.FaultState, "FAULT_STATE_", fault.state),
        "targets": [t.id for t in fault.targets] or list(spec.target.ids),
        "injected_at": _time(fault.injected_at),
        "reverts_at": _time(fault.reverts_at),
        "children": len(fault.children),
        "detail": fault.detail,
    }


def _recovery(recovery: recovery_pb2.Recovery) -> dict[str, Any]:
    report = recovery.report
    state = _enum(recovery_pb2.RecoveryState, "RECOVERY_STATE_", recovery.state)
    return {
        "recovery_id": recovery.recovery_id,
        "state": state,
        "strategy": _enum(common_pb2.RecoveryStrategy, "RECOVERY_STRATEGY_", recovery.strategy),
        "failure": _enum(recovery_pb2.FailureKind, "FAILURE_KIND_", report.kind),
        "agent_id": report.agent_id,
        "browser_id": report.browser_id,
        "model": report.model,
        "fault_id": report.fault_id,
        "started_at": _time(recovery.started_at),
        "duration_ms": None if state == "running" else _ms(recovery.duration),
        "highest_level": _enum(
            recovery_pb2.EscalationLevel, "ESCALATION_LEVEL_", recovery.highest_level
        ),
        "detail": recovery.detail,
    }


def _breaker(breaker: recovery_pb2.Breaker) -> dict[str, Any]:
    return {
        "target_id": breaker.target_id,
        "scope": _enum(recovery_pb2.BreakerScope, "BREAKER_SCOPE_", breaker.scope),
        "state": _enum(common_pb2.BreakerState, "BREAKER_STATE_", breaker.state),
        "consecutive_failures": breaker.consecutive_failures,
        "failure_rate": round(breaker.failure_rate, 4),
        "changed_at": _time(breaker.changed_at),
        "next_probe_at": _time(breaker.next_probe_at),
    }


async def build_snapshot(sources: Sources) -> dict[str, Any]:
    """Read every source at once and lay the results out by section.

    Each section carries ``status`` ("ok", "unreachable", "not configured") and
    ``error``; a source that fails empties only its own sections. Nothing in it
    changes unless the cluster does (no read times), so two snapshots compare
    equal when nothing happened.
    """
    replicas, faults, recoveries, breakers, requests = await asyncio.gather(
        _attempt(sources.coordinators()),
        _attempt(sources.faults()),
        _attempt(sources.recoveries()),
        _attempt(sources.breakers()),
        _attempt(sources.requests()),
    )
    answers, status, error = replicas
    if answers is None:
        coordinators = _section(status, error, leader="", replicas=[])
        agents = _section(status, error, source="", items=[])
        placements = _section(status, error, items=[])
    else:
        coordinators, view = coordinators_section(answers)
        agents = agents_section(view, coordinators["leader"])
        placements = placements_section(view)

    def listing(outcome: tuple[list[Any] | None, str, str], row: Callable[[Any], Any]) -> Any:
        items, status, error = outcome
        return _section(status, error, items=[row(i) for i in items or []])

    stats, status, error = requests
    return {
        "coordinators": coordinators,
        "agents": agents,
        "placements": placements,
        "faults": listing(faults, _fault),
        "recoveries": listing(recoveries, _recovery),
        "breakers": _section(
            breakers[1],
            breakers[2],
            items=sorted((_breaker(b) for b in breakers[0] or []), key=lambda b: b["target_id"]),
        ),
        "requests": _section(
            status,
            error,
            **(
                {
                    "window_s": stats.window_s,
                    "count": stats.count,
                    "rate_per_s": stats.rate_per_s,
                    "p50_ms": stats.p50_ms,
                    "p95_ms": stats.p95_ms,
                }
                if stats is not None
                else {"window_s": REQUEST_WINDOW.total_seconds()}
            ),
        ),
    }


def sse_frame(data: str, *, event_id: str | None = None) -> bytes:
    """One Server-Sent Events message carrying ``data`` (each line its own ``data:`` field)."""
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


HEARTBEAT_FRAME = b": heartbeat\n\n"


# --------------------------------------------------------------------------- server


class Dashboard:
    """The HTTP server and its poller. ``start`` binds ``host:port`` (0 picks a free port)."""

    def __init__(
        self,
        sources: Sources,
        *,
        host: str,
        port: int,
        interval_s: float = POLL_INTERVAL_S,
        heartbeat_s: float = HEARTBEAT_S,
        demand_s: float = DEMAND_S,
    ) -> None:
        self._sources = sources
        self._host = host
        self._port = port
        self._interval = interval_s
        self._heartbeat = heartbeat_s
        self._demand_s = demand_s
        self._runner: web.AppRunner | None = None
        self._poller: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._closing = False
        self._watchers = 0
        self._demand_until = 0.0
        self._checked = float("-inf")
        self._encoded = ""
        self._payload: str | None = None
        self.version = 0
        """Incremented each time the snapshot changes."""
        self.port = 0
        """The port bound, once started."""

    @property
    def url(self) -> str:
        """The page's address, once started."""
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    @property
    def watchers(self) -> int:
        """Event streams open now."""
        return self._watchers

    def make_app(self) -> web.Application:
        """The aiohttp application with the dashboard's routes."""
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/events", self._events)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self) -> None:
        """Listen, and start the poller. Raises OSError when the address cannot be bound."""
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._poller = asyncio.create_task(self._poll())
        log.info("dashboard serving", extra={"url": self.url})

    async def stop(self) -> None:
        """End every event stream, stop the poller and the server."""
        self._closing = True
        self._notify()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def refresh(self) -> bool:
        """Read the sources now; True when the snapshot changed (and was pushed)."""
        async with self._lock:
            return await self._refresh()

    async def current(self) -> str:
        """The snapshot as JSON, read afresh first when it is older than two intervals."""
        loop = asyncio.get_running_loop()
        self._demand_until = loop.time() + self._demand_s
        self._wake.set()
        if self._payload is None or loop.time() - self._checked > 2 * self._interval:
            async with self._lock:
                if self._payload is None or loop.time() - self._checked > 2 * self._interval:
                    await self._refresh()
        assert self._payload is not None
        return self._payload

    async def _refresh(self) -> bool:
        content = await build_snapshot(self._sources)
        self._checked = asyncio.get_running_loop().time()
        encoded = json.dumps(content, sort_keys=True, separators=(",", ":"))
        if encoded == self._encoded:
            return False
        self._encoded = encoded
        self.version += 1
        changed_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        self._payload = json.dumps(
            {"version": self.version, "changed_at": changed_at.replace("+00:00", "Z"), **content},
            separators=(",", ":"),
        )
        self._notify()
        return True

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _wanted(self) -> bool:
        return self._watchers > 0 or asyncio.get_running_loop().time() < self._demand_until

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._wanted():
                self._wake.clear()
                await self._wake.wait()
                continue
            started = loop.time()
            try:
                await self.refresh()
            except Exception:
                log.exception("the dashboard's poll failed; trying again")
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=PAGE,
            content_type="text/html",
            headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": (
                    "default-src 'none'; script-src 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:"
                ),
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def _snapshot(self, request: web.Request) -> web.Response:
        return web.Response(
            text=await self.current(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        self._watchers += 1
        self._wake.set()
        try:
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            payload = await self.current()
            sent = self.version
            await response.write(sse_frame(payload, event_id=str(sent)))
            while not self._closing:
                changed = self._changed
                if self.version == sent:
                    try:
                        await asyncio.wait_for(changed.wait(), self._heartbeat)
                    except TimeoutError:
                        await response.write(HEARTBEAT_FRAME)
                        continue
                if self._closing:
                    break
                if self.version != sent and self._payload is not None:
                    sent = self.version
                    await response.write(sse_frame(self._payload, event_id=str(sent)))
        except ConnectionResetError:
            log.debug("a dashboard viewer went away")
        finally:
            self._watchers -= 1
        return response


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>webshard dashboard</title>
<style>
:root { --bg:#0f1419; --panel:#182029; --line:#263241; --text:#d8e0e8; --dim:#8a99a8;
  --ok:#3fb950; --warn:#d29922; --bad:#f85149; --info:#58a6ff; }
* { box-sizing:border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
  background:var(--bg); color:var(--text); }
header { display:flex; align-items:center; gap:16px; padding:12px 20px;
  border-bottom:1px solid var(--line); position:sticky; top:0; background:var(--bg); z-index:1; }
header h1 { font-size:18px; margin:0; font-weight:600; }
#connection { padding:2px 10px; border-radius:10px; font-weight:600; font-size:12px; }
#connection.live { background:rgba(63,185,80,.15); color:var(--ok); }
#connection.disconnected { background:rgba(248,81,73,.15); color:var(--bad); }
#changed { color:var(--dim); font-size:12px; }
main { display:grid; grid-template-columns:repeat(auto-fit, minmax(620px, 1fr)); gap:16px;
  padding:16px 20px; }
section { background:var(--panel); border:1px solid var(--line); border-radius:8px;
  padding:12px 14px; overflow:auto; }
section h2 { font-size:14px; margin:0 0 8px; display:flex; gap:8px; align-items:center;
  text-transform:uppercase; letter-spacing:.04em; color:var(--dim); }
section.wide { grid-column:1 / -1; }
.source { font-size:11px; text-transform:none; letter-spacing:0; padding:1px 8px;
  border-radius:8px; }
.source.ok { display:none; }
.source.unreachable, .source.error { background:rgba(248,81,73,.15); color:var(--bad); }
.source.not-configured { background:rgba(138,153,168,.15); color:var(--dim); }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:4px 8px; border-bottom:1px solid var(--line);
  vertical-align:top; white-space:nowrap; }
td.wrap { white-space:normal; }
th { color:var(--dim); font-weight:500; font-size:12px; }
.pill { display:inline-block; padding:0 8px; border-radius:8px; font-size:12px;
  background:rgba(138,153,168,.15); color:var(--dim); }
.pill.good { background:rgba(63,185,80,.15); color:var(--ok); }
.pill.warn { background:rgba(210,153,34,.15); color:var(--warn); }
.pill.bad { background:rgba(248,81,73,.15); color:var(--bad); }
.pill.info { background:rgba(88,166,255,.15); color:var(--info); }
.dim { color:var(--dim); }
.empty { color:var(--dim); font-style:italic; }
.error-text { color:var(--bad); }
.browser { margin:2px 0; }
.figures { display:flex; gap:32px; }
.figure .value { font-size:26px; font-weight:600; }
.figure .label { color:var(--dim); font-size:12px; }
code { font-size:12px; }
</style>
</head>
<body>
<header>
  <h1>webshard</h1>
  <span id="connection" class="disconnected">disconnected</span>
  <span id="changed"></span>
</header>
<main>
  <section id="coordinators"><h2>Coordinators <span class="source"></span></h2>
    <div class="body"></div></section>
  <section id="requests"><h2>Requests <span class="source"></span></h2>
    <div class="body"></div></section>
  <section id="agents" class="wide"><h2>Agents <span class="source"></span></h2>
    <div class="body"></div></section>
  <section id="placements" class="wide"><h2>Placements <span class="source"></span></h2>
    <div class="body"></div></section>
  <section id="faults"><h2>Faults in progress <span class="source"></span></h2>
    <div class="body"></div></section>
  <section id="breakers"><h2>Circuit breakers <span class="source"></span></h2>
    <div class="body"></div></section>
  <section id="recoveries" class="wide"><h2>Recent recoveries <span class="source"></span></h2>
    <div class="body"></div></section>
</main>
<script>
"use strict";
const DASH = "\u2013";
const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const esc = (v) => String(v == null ? "" : v).replace(/[&<>"']/g, (c) => ENTITIES[c]);
const pill = (text, tone) => `<span class="pill ${tone || ""}">${esc(text)}</span>`;
const TONES = {
  leader: "good", follower: "", candidate: "warn", pre_candidate: "warn", unreachable: "bad",
  ready: "good", standby: "info", starting: "warn", failed: "bad", stopped: "",
  active: "bad", pending: "warn", running: "warn", succeeded: "good",
  closed: "good", open: "bad", half_open: "warn",
};
const tone = (s) => TONES[s] || "";
const mb = (bytes) => (bytes ? (bytes / 1048576).toFixed(0) + " MiB" : "0");
const ms = (v) => (v == null ? DASH : Number(v).toFixed(1) + " ms");
const cell = (html, cls) => `<td${cls ? ` class="${cls}"` : ""}>${html}</td>`;
const code = (text) => `<code>${esc(text)}</code>`;
const since = (iso) => (iso ? `<span data-since="${esc(iso)}"></span>` : DASH);
const until = (iso) => (iso ? `<span data-until="${esc(iso)}"></span>` : DASH);

function table(head, rows) {
  if (!rows.length) return `<p class="empty">none</p>`;
  const th = head.map((h) => `<th>${esc(h)}</th>`).join("");
  return `<table><thead><tr>${th}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

function coordinators(s) {
  const leader = s.leader
    ? `<p>leader: <b>${esc(s.leader)}</b></p>`
    : `<p class="error-text">no leader</p>`;
  const rows = s.replicas.map((r) =>
    `<tr data-replica="${esc(r.address)}">` +
    cell(esc(r.replica_id || "?") + (r.is_leader ? " \u2605" : "")) +
    cell(code(r.address)) +
    cell(pill(r.role, tone(r.role))) +
    cell(esc(r.term ?? DASH)) +
    cell(esc(r.commit_index ?? DASH)) +
    cell(esc(r.error || ""), "wrap error-text") +
    `</tr>`);
  return leader + table(["replica", "address", "role", "term", "commit", ""], rows);
}

function browser(b) {
  const gpu = b.webgpu.available
    ? `webgpu${b.webgpu.fallback ? " (software)" : ""} ${esc(b.webgpu.adapter)}`
    : `<span class="dim" title="${esc(b.webgpu.reason)}">no webgpu</span>`;
  const nn = b.webnn.available
    ? "webnn"
    : `<span class="dim" title="${esc(b.webnn.reason)}">no webnn</span>`;
  const shards = b.shards
    .map((s) => `${esc(s.model)}/${esc(s.index)} (${esc(s.execution_provider)})`)
    .join(", ");
  const parts = [
    ...(b.engine ? [esc(b.engine)] : []),
    `EPs: ${esc(b.execution_providers.join(", ") || "none")}`,
    gpu,
    nn,
    ...(b.wasm_threads ? ["wasm threads"] : []),
    mb(b.memory_bytes),
    ...(shards ? [`shards: ${shards}`] : []),
  ];
  return `<div class="browser" data-browser-id="${esc(b.browser_id)}">` +
    `<b>${esc(b.browser_id)}</b> ${pill(b.state, tone(b.state))} ` +
    `<span class="dim">${esc(b.runtime)}</span> ${parts.join(" \u00b7 ")}</div>`;
}

function agents(s) {
  const note = s.from_leader === false && s.source
    ? `<p class="dim">as replica ${esc(s.source)} sees them (the leader did not answer)</p>`
    : "";
  const rows = s.items.map((a) =>
    `<tr data-agent-id="${esc(a.agent_id)}">` +
    cell(`<b>${esc(a.agent_id)}</b>`) +
    cell(code(a.address)) +
    cell(pill(a.healthy ? "healthy" : "unhealthy", a.healthy ? "good" : "bad")) +
    cell(`${mb(a.memory_used_bytes)} / ${mb(a.memory_budget_bytes)}`) +
    cell(esc(a.in_flight)) +
    cell(a.browsers.map(browser).join("") || `<span class="empty">none</span>`, "wrap") +
    `</tr>`);
  return note + table(["agent", "address", "health", "memory", "in flight", "browsers"], rows);
}

function placements(s) {
  const replica = (r) =>
    pill(`${r.agent_id}/${r.browser_id} ${r.execution_provider}`, r.healthy ? "" : "bad");
  const shard = (sh) => `<div>#${esc(sh.index)}: ${sh.replicas.map(replica).join(" ")}</div>`;
  const rows = s.items.map((p) =>
    `<tr data-model="${esc(p.model)}">` +
    cell(`<b>${esc(p.model)}</b>`) +
    cell(esc(p.sharding)) +
    cell(esc(p.runtime)) +
    cell(esc(p.recovery_strategy)) +
    cell(esc(p.version)) +
    cell(p.shards.map(shard).join(""), "wrap") +
    `</tr>`);
  return table(["model", "sharding", "runtime", "strategy", "version", "shards"], rows);
}

function faults(s) {
  const rows = s.items.map((f) =>
    `<tr data-fault-id="${esc(f.fault_id)}">` +
    cell(code(f.fault_id)) +
    cell(`${esc(f.kind)} <span class="dim">${esc(f.intensity)}</span>`) +
    cell(pill(f.state, tone(f.state))) +
    cell(esc(f.targets.join(", ")), "wrap") +
    cell(since(f.injected_at)) +
    cell(until(f.reverts_at)) +
    `</tr>`);
  return table(["fault", "kind", "state", "targets", "active for", "reverts in"], rows);
}

function recoveries(s) {
  const rows = s.items.map((r) =>
    `<tr data-recovery-id="${esc(r.recovery_id)}">` +
    cell(code(r.recovery_id)) +
    cell(pill(r.state, tone(r.state))) +
    cell(esc(r.strategy)) +
    cell(esc(r.failure)) +
    cell(esc([r.agent_id, r.browser_id].filter(Boolean).join("/"))) +
    cell(r.duration_ms == null ? since(r.started_at) : ms(r.duration_ms)) +
    cell(esc(r.highest_level)) +
    cell(code(r.fault_id)) +
    `</tr>`);
  const head = ["recovery", "state", "strategy", "failure", "where", "duration", "level", "fault"];
  return table(head, rows);
}

function breakers(s) {
  const rows = s.items.map((b) =>
    `<tr data-breaker="${esc(b.target_id)}">` +
    cell(esc(b.target_id)) +
    cell(esc(b.scope)) +
    cell(pill(b.state, tone(b.state))) +
    cell(esc(b.consecutive_failures)) +
    cell(`${(b.failure_rate * 100).toFixed(0)} %`) +
    cell(b.changed_at ? `${since(b.changed_at)} ago` : DASH) +
    `</tr>`);
  const head = ["target", "scope", "state", "failures in a row", "failure rate", "changed"];
  return table(head, rows);
}

function requests(s) {
  const figure = (value, label) =>
    `<div class="figure"><div class="value">${esc(value)}</div>` +
    `<div class="label">${esc(label)}</div></div>`;
  const rate = s.rate_per_s == null ? DASH : Number(s.rate_per_s).toFixed(2);
  return `<div class="figures">` +
    figure(rate, "requests / s") +
    figure(ms(s.p50_ms), "latency p50") +
    figure(ms(s.p95_ms), "latency p95") +
    figure(s.count ?? DASH, `requests in the last ${s.window_s} s`) +
    `</div>`;
}

const RENDER = { coordinators, agents, placements, faults, recoveries, breakers, requests };

function render(snapshot) {
  for (const [id, draw] of Object.entries(RENDER)) {
    const section = snapshot[id];
    const root = document.getElementById(id);
    if (!section || !root) continue;
    const badge = root.querySelector(".source");
    badge.className = "source " + section.status.replace(" ", "-");
    badge.textContent = section.status;
    badge.title = section.error || "";
    root.querySelector(".body").innerHTML = section.status === "ok"
      ? draw(section)
      : `<p class="error-text">${esc(section.status)}: ${esc(section.error)}</p>`;
  }
  const changed = new Date(snapshot.changed_at).toLocaleTimeString();
  document.getElementById("changed").textContent =
    `last change ${changed} (v${snapshot.version})`;
  tick();
}

function seconds(delta) {
  const s = Math.max(0, Math.round(delta / 1000));
  return s < 120 ? `${s} s` : `${Math.round(s / 60)} min`;
}

function tick() {
  const now = Date.now();
  for (const el of document.querySelectorAll("[data-since]")) {
    el.textContent = seconds(now - Date.parse(el.dataset.since));
  }
  for (const el of document.querySelectorAll("[data-until]")) {
    el.textContent = seconds(Date.parse(el.dataset.until) - now);
  }
}
setInterval(tick, 1000);

function connected(live) {
  const el = document.getElementById("connection");
  el.className = live ? "live" : "disconnected";
  el.textContent = live ? "live" : "disconnected";
}

const events = new EventSource("events");
events.onopen = () => connected(true);
events.onerror = () => connected(false);
events.onmessage = (message) => {
  connected(true);
  try {
    render(JSON.parse(message.data));
  } catch (err) {
    console.error(err);
  }
};
</script>
</body>
</html>
"""
