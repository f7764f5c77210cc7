"""Wires the browser agent into the common bootstrap."""

from __future__ import annotations

import asyncio
import contextlib

from webshard.browser_agent.v1 import browser_agent_pb2_grpc as pb_grpc

from services.browser_agent.servicer import SERVICE, BrowserAgentServicer
from services.browser_agent.session import CoordinatorSession
from services.browser_agent.settings import DEFAULT_PORT, AgentSettings
from services.common.server import BasicApp, Lifecycle


def make_app(settings: AgentSettings, lifecycle: Lifecycle) -> BasicApp:
    """One browser agent and its coordinator session."""
    session = CoordinatorSession(
        agent_id=settings.agent_id,
        address=settings.advertise_address or f"{settings.host}:{settings.port or DEFAULT_PORT}",
        coordinators=settings.coordinators,
        memory_budget_bytes=settings.memory_budget_mb * 1024 * 1024,
        browsers=list,
        max_backoff_s=settings.reconnect_max_backoff_s,
    )
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        tasks.append(asyncio.create_task(session.run(), name="coordinator-session"))

    async def stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return BasicApp(
        service_names=(SERVICE,),
        registrations=[
            (
                pb_grpc.add_BrowserAgentServiceServicer_to_server,
                BrowserAgentServicer(settings, session),
            )
        ],
        on_start=start,
        on_stop=stop,
    )
