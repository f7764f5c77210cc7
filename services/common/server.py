"""The one server bootstrap every webshard service runs on.

``run_service`` wires a service's servicers into a ``grpc.aio`` server with the
standard health service, server reflection, OpenTelemetry instrumentation, the
error interceptor (``services.common.interceptor``: INVALID_ARGUMENT for requests
that cannot be decoded or hold undefined enum values, ``DomainError`` to status,
short messages), JSON logs and a graceful shutdown:

    SIGTERM/SIGINT -> health NOT_SERVING -> ``Lifecycle.draining`` set (long streams
    end with UNAVAILABLE so clients reconnect elsewhere) -> in-flight unary calls get
    ``drain_grace_s`` to finish -> ``ServiceApp.stop`` -> exit 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from services.common.auth import CLUSTER_TOKEN_ENV, TokenInterceptor
from services.common.interceptor import ErrorInterceptor
from services.common.logs import configure_logging
from services.common.settings import ServerSettings, SettingsError, load_settings
from services.common.tracing import configure_tracing

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest gRPC message either way. An activation of BERT-base at batch 32 and
sequence 128 is 12.6 MB; shard weights travel in chunks of 1 MiB, so anything
larger than this is a mistake and is refused with RESOURCE_EXHAUSTED."""

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Agent sessions and watches stay open for hours with long quiet spells. The
    # server pings every 20 s and drops a peer that does not answer within 10 s,
    # so a vanished agent is noticed by the transport even without heartbeats.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Clients may ping as often as every 5 s (the SDK pings every 20 s); faster
    # pings are treated as abuse by gRPC and answered with GOAWAY.
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC sets SO_REUSEPORT by default, so a second service started on a taken port
    # binds it too and the kernel splits connections between the two. Off: a taken
    # port fails the start ("cannot listen", exit code 2).
    ("grpc.so_reuseport", 0),
]


@dataclass
class Lifecycle:
    """Shared shutdown state: long-running handlers watch ``draining``."""

    draining: asyncio.Event = field(default_factory=asyncio.Event)

    async def stream(
        self, source: AsyncIterator[T], context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[T]:
        """Yield from ``source`` until the server drains, then end the call with UNAVAILABLE."""
        iterator = aiter(source)
        drained = asyncio.ensure_future(self.draining.wait())
        step: asyncio.Future[T] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({step, drained}, return_when=asyncio.FIRST_COMPLETED)
                if step in done:
                    finished, step = step, None
                    try:
                        yield finished.result()
                    except StopAsyncIteration:
                        return
                    continue
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down; reconnect (to another replica if there is one)",
                )
        finally:
            drained.cancel()
            # Closed by its consumer (or aborted) while a read was pending: the read
            # must not finish unseen later.
            if step is not None and not step.cancel() and not step.cancelled():
                step.exception()


class ServiceApp(Protocol):
    """What a service gives the bootstrap."""

    @property
    def service_names(self) -> Sequence[str]:
        """Full names of the gRPC services it serves (health and reflection list them)."""
        ...

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register its servicers."""
        ...

    async def start(self) -> None:
        """Start background work after the server is listening."""
        ...

    async def stop(self) -> None:
        """Release what it holds, after the server stopped taking calls."""
        ...


def unimplemented(full_method: str, what: str) -> Any:
    """A handler that answers UNIMPLEMENTED, naming the method and what it will do.

    Typed ``Any`` so it can stand in for any generated servicer method.
    """

    async def handler(
        self: object, request: object, context: grpc.aio.ServicerContext[object, object]
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{full_method} is not implemented in this version of webshard ({what})",
        )

    return handler


def server_interceptors(
    token: str = "", guarded: frozenset[str] = frozenset()
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors every server runs, outermost first: OpenTelemetry's (a span per
    call), the token check of the ``guarded`` methods (a refusal is recorded on the
    span and runs nothing else), then the error interceptor, which so runs inside the
    span and aborts through the context that records the status on it."""
    tracing: grpc.aio.ServerInterceptor = aio_server_interceptor()  # type: ignore[no-untyped-call]
    return [tracing, TokenInterceptor(token, guarded), ErrorInterceptor()]


async def serve(
    *,
    settings: ServerSettings,
    default_port: int,
    make_app: Callable[[Lifecycle], ServiceApp],
    started: Callable[[str], None] | None = None,
) -> int:
    """Run a service until SIGTERM or SIGINT, then shut down gracefully; return the exit code."""
    # Signals are caught from the start: a SIGTERM while the service is still
    # starting stops it gracefully once the start is done, never by the default
    # action (which would exit without draining or cleaning up).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    lifecycle = Lifecycle()
    try:
        app = make_app(lifecycle)
    except Exception as exc:
        # A service that cannot be built (a corrupt log, a bad directory) says why and exits.
        log.error("service cannot start", extra={"error": f"{type(exc).__name__}: {exc}"})
        return 1
    guarded: frozenset[str] = getattr(app, "guarded_methods", frozenset())
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=server_interceptors(settings.cluster_token, guarded)
    )
    app.add_to_server(server)
    if guarded and not settings.cluster_token:
        log.warning(
            "no cluster token: state-changing calls are unauthenticated; anyone who can "
            "reach this port may make them",
            extra={"setting": CLUSTER_TOKEN_ENV, "methods": sorted(guarded)},
        )

    health_servicer = health.aio.HealthServicer()
    # The library's servicer starts with the server ("") SERVING; nothing is served
    # until the app has started, so say so until then.
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *app.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )

    port = settings.port or default_port
    address = f"{settings.host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("cannot listen", extra={"address": address, "error": str(exc)})
        return 2
    if bound == 0:
        log.error("cannot listen: port in use or address unavailable", extra={"address": address})
        return 2
    await server.start()
    try:
        await app.start()
    except Exception:
        log.exception("service failed to start")
        await server.stop(0)
        return 1

    for service in ["", *app.service_names]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        extra={"address": f"{settings.host}:{bound}", "services": list(app.service_names)},
    )
    if started is not None:
        started(f"{settings.host}:{bound}")

    await stop.wait()

    log.info("shutting down", extra={"grace_s": settings.drain_grace_s})
    await health_servicer.enter_graceful_shutdown()
    lifecycle.draining.set()
    await server.stop(settings.drain_grace_s)
    try:
        await app.stop()
    except Exception:
        log.exception("service did not stop cleanly")
    log.info("stopped")
    return 0


S = TypeVar("S", bound=ServerSettings)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Under a launcher that set WEBSHARD_PARENT_PID, get SIGTERM when the launcher dies.

    A local cluster must leave no process behind even when its launcher is
    SIGKILLed; the kernel's parent-death signal does that without a watchdog.
    """
    parent = os.environ.get("WEBSHARD_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(
    *,
    name: str,
    settings_type: type[S],
    default_port: int,
    make_app: Callable[[S, Lifecycle], ServiceApp],
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """A service's entry point: settings from env and flags, logs, tracing, then ``serve``."""
    try:
        settings = load_settings(
            settings_type, argv, prog=f"webshard-{name}", description=description
        )
    except SettingsError as exc:
        print(f"webshard-{name}: {exc}", file=sys.stderr)
        return 2
    die_with_parent()
    configure_logging(name, settings.log_level)
    configure_tracing(name, settings.otlp_endpoint)
    return asyncio.run(
        serve(
            settings=settings,
            default_port=default_port,
            make_app=lambda lifecycle: make_app(settings, lifecycle),
        )
    )


@dataclass
class BasicApp:
    """A ServiceApp made of servicers and optional start and stop hooks."""

    service_names: Sequence[str]
    registrations: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], object]]
    on_start: Callable[[], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None
    guarded_methods: frozenset[str] = frozenset()
    """Full names of the methods that change state: with a cluster token they need it."""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register every servicer."""
        for add, servicer in self.registrations:
            add(servicer, server)

    async def start(self) -> None:
        """Run the start hook, if any."""
        if self.on_start is not None:
            await self.on_start()

    async def stop(self) -> None:
        """Run the stop hook, if any."""
        if self.on_stop is not None:
            await self.on_stop()
