"""The agent's fault hooks over fake browsers, and the session's cut and partition over an
in-process coordinator (real gRPC on loopback, no browser)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.browser_agent.v1 import browser_agent_pb2_grpc as agent_grpc
from webshard.cli.local import plan
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as coord_pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as coord_grpc
from webshard.fault_injector.v1 import fault_injector_pb2 as fi_pb

from services.browser_agent.agent import LoadedEntry, ShardHost
from services.browser_agent.browser.runtime import BrowserRuntime
from services.browser_agent.hooks import (
    CAUSE_WINDOW_S,
    FaultHooks,
    HookError,
    HookRequest,
    Link,
)
from services.browser_agent.runtime import LoadResult, RuntimeLost
from services.browser_agent.servicer import BrowserAgentServicer
from services.browser_agent.session import CoordinatorSession
from services.browser_agent.settings import AgentSettings
from services.common.failures import FaultCause
from services.common.server import Lifecycle
from services.fault_injector.actions import AgentAction
from services.fault_injector.agents import GrpcAgentHooks
from services.fault_injector.injector import ActionError
from tests.conftest import until

H = agent_pb.FaultHook
READY = common_pb2.BROWSER_STATE_READY
EP = common_pb2.ExecutionProvider


class FakeBrowser:
    """A browser runtime that records the fault methods called on it."""

    def __init__(self, browser_id: str, provider: int = EP.EXECUTION_PROVIDER_WASM) -> None:
        self.runtime_id = browser_id
        self.state: int = READY
        self.pid: int | None = os.getpid()  # a process that exists, never signalled
        self.provider = provider
        self.handles: list[str] = []
        self.calls: list[tuple[str, object]] = []
        self.held = 0

    def info(self) -> common_pb2.BrowserInfo:
        return common_pb2.BrowserInfo(
            browser_id=self.runtime_id,
            state=self.state,
            shards=[
                common_pb2.LoadedShard(handle=h, execution_provider=self.provider)
                for h in self.handles
            ],
        )

    async def crash_page(self) -> None:
        self.calls.append(("crash_page", None))
        self.state = common_pb2.BROWSER_STATE_FAILED

    async def kill(self) -> None:
        self.calls.append(("kill", self.pid))
        self.state = common_pb2.BROWSER_STATE_FAILED

    async def set_offline(self, offline: bool) -> None:
        self.calls.append(("set_offline", offline))

    async def allocate_memory(self, size_bytes: int) -> int:
        self.calls.append(("allocate_memory", size_bytes))
        self.held += size_bytes
        return self.held

    async def release_memory(self) -> int:
        self.calls.append(("release_memory", self.held))
        released, self.held = self.held, 0
        return released

    async def fail_session(self, handle: str) -> None:
        self.calls.append(("fail_session", handle))

    async def lose_device(self) -> None:
        self.calls.append(("lose_device", None))

    async def load(self, sha256: str, path: str, provider: int) -> LoadResult:
        raise NotImplementedError

    async def run(self, handle: str, inputs: object) -> object:
        raise NotImplementedError

    async def unload(self, handle: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class FakeNative:
    """The native runtime: it has none of the browser's fault methods."""

    runtime_id = "native"
    state = READY

    def info(self) -> common_pb2.BrowserInfo:
        return common_pb2.BrowserInfo(browser_id="native", runtime=common_pb2.RUNTIME_NATIVE)


class FakeSession:
    def __init__(self) -> None:
        self.link = Link()
        self.cuts = 0
        self.reports = 0

    def cut(self) -> bool:
        self.cuts += 1
        return True

    def report_status(self) -> None:
        self.reports += 1


def hooks_with(*browsers: FakeBrowser) -> tuple[FaultHooks, FakeSession, ShardHost]:
    host = ShardHost(FakeNative(), lambda: list(browsers))
    for browser in browsers:
        for handle in browser.handles:
            host._loaded[handle] = LoadedEntry(  # the host's own bookkeeping, as load() fills it
                spec=common_pb2.ShardSpec(),
                runtime=browser,
                result=LoadResult(handle, browser.provider, "", 0.0),
            )
    session = FakeSession()
    return FaultHooks(host, session), session, host


def request(hook: int, **fields: object) -> HookRequest:
    return HookRequest(fault_id=str(fields.pop("fault_id", "f-1")), hook=hook, **fields)


async def refused(hooks: FaultHooks, req: HookRequest) -> HookError:
    with pytest.raises(HookError) as caught:
        await hooks.apply(req)
    return caught.value


async def test_bad_input_is_refused_with_the_right_code() -> None:
    hooks, _, _ = hooks_with(FakeBrowser("browser-0"))
    assert (await refused(hooks, request(99, browser_id="browser-0"))).code == "INVALID_ARGUMENT"
    assert (await refused(hooks, request(0, browser_id="browser-0"))).code == "INVALID_ARGUMENT"
    zero = request(H.FAULT_HOOK_ALLOCATE_MEMORY, browser_id="browser-0", memory_bytes=0)
    assert (await refused(hooks, zero)).code == "INVALID_ARGUMENT"
    assert (await refused(hooks, request(H.FAULT_HOOK_DELAY))).code == "INVALID_ARGUMENT"
    nameless = request(H.FAULT_HOOK_KILL_BROWSER)
    assert "browser_id or a shard_handle" in (await refused(hooks, nameless)).args[0]
    unknown = await refused(hooks, request(H.FAULT_HOOK_KILL_BROWSER, browser_id="browser-7"))
    assert unknown.code == "NOT_FOUND" and "browser-0" in unknown.args[0]
    handle = await refused(hooks, request(H.FAULT_HOOK_FAIL_SESSION, shard_handle="nope"))
    assert handle.code == "NOT_FOUND"
    native = await refused(hooks, request(H.FAULT_HOOK_CRASH_PAGE, browser_id="native"))
    assert native.code == "FAILED_PRECONDITION"
    no_fault = await refused(hooks, request(H.FAULT_HOOK_CUT_SESSION, fault_id=""))
    assert no_fault.code == "INVALID_ARGUMENT"


async def test_lose_device_needs_a_webgpu_shard() -> None:
    wasm, gpu = FakeBrowser("browser-0"), FakeBrowser("browser-1", EP.EXECUTION_PROVIDER_WEBGPU)
    wasm.handles, gpu.handles = ["w"], ["g"]
    hooks, _, _ = hooks_with(wasm, gpu)
    lose = await refused(hooks, request(H.FAULT_HOOK_LOSE_DEVICE, browser_id="browser-0"))
    assert lose.code == "FAILED_PRECONDITION" and "webgpu" in lose.args[0]
    result = await hooks.apply(request(H.FAULT_HOOK_LOSE_DEVICE, shard_handle="g"))
    assert result.browser_id == "browser-1" and not result.revertible
    assert gpu.calls == [("lose_device", None)]


async def test_kill_and_crash_are_not_revertible_and_leave_the_browser_failed() -> None:
    first, second = FakeBrowser("browser-0"), FakeBrowser("browser-1")
    hooks, _, _ = hooks_with(first, second)
    killed = await hooks.apply(request(H.FAULT_HOOK_KILL_BROWSER, browser_id="browser-0"))
    assert not killed.revertible and f"pid {os.getpid()}" in killed.detail
    assert first.calls == [("kill", os.getpid())]
    await hooks.apply(request(H.FAULT_HOOK_CRASH_PAGE, browser_id="browser-1", fault_id="f-2"))
    assert second.calls == [("crash_page", None)]
    # Nothing to undo; the browsers stay FAILED until recovery replaces them.
    assert await hooks.revert("f-1") is False
    assert first.state == common_pb2.BROWSER_STATE_FAILED
    again = await refused(hooks, request(H.FAULT_HOOK_CRASH_PAGE, browser_id="browser-1"))
    assert again.code == "FAILED_PRECONDITION"
    exited = await asyncio.create_subprocess_exec("true")
    await exited.wait()
    first.pid = exited.pid  # the browser's process is gone: there is nothing left to kill
    dead = await refused(hooks, request(H.FAULT_HOOK_KILL_BROWSER, browser_id="browser-0"))
    assert dead.code == "FAILED_PRECONDITION" and "exited" in dead.args[0]


async def test_a_failure_names_the_fault_whose_effect_explains_it() -> None:
    first, second = FakeBrowser("browser-0"), FakeBrowser("browser-1")
    host = ShardHost(FakeNative(), lambda: [first, second])
    now = [100.0]
    hooks = FaultHooks(host, FakeSession(), clock=lambda: now[0])
    moderate, severe = common_pb2.INTENSITY_MODERATE, common_pb2.INTENSITY_SEVERE
    assert hooks.cause("browser-0") is None

    # An effect in force on the whole agent explains any browser's failure ...
    await hooks.apply(request(H.FAULT_HOOK_DELAY, delay_s=0.1, fault_id="lag", intensity=moderate))
    assert hooks.cause("browser-1") == FaultCause("lag", moderate)
    # ... but one on the failed browser itself comes first, with the hook call's trace,
    # and from the moment the hook acts: the browser's exit may be reported before the
    # hook returns.
    injection = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    seen: list[FaultCause | None] = []
    killing = first.kill

    async def kill() -> None:
        seen.append(hooks.cause("browser-0"))
        await killing()

    first.kill = kill  # type: ignore[method-assign]
    await hooks.apply(
        request(
            H.FAULT_HOOK_KILL_BROWSER,
            browser_id="browser-0",
            fault_id="crash",
            intensity=severe,
            traceparent=injection,
        )
    )
    assert hooks.cause("browser-0") == FaultCause("crash", severe, injection)
    assert seen == [hooks.cause("browser-0")]
    assert hooks.cause("browser-1") == FaultCause("lag", moderate)
    # A hook that could not act names nothing.
    with pytest.raises(HookError):
        await hooks.apply(request(H.FAULT_HOOK_LOSE_DEVICE, browser_id="browser-1", fault_id="x"))
    assert hooks.cause("browser-1") == FaultCause("lag", moderate)

    # A revertible effect explains failures while in force and for a while after.
    await hooks.apply(request(H.FAULT_HOOK_OFFLINE, browser_id="browser-1", fault_id="off"))
    now[0] += 3 * CAUSE_WINDOW_S
    assert hooks.cause("browser-1") == FaultCause("off")
    assert await hooks.revert("off") and await hooks.revert("lag")
    now[0] += CAUSE_WINDOW_S / 2
    assert hooks.cause("browser-1") == FaultCause("off")
    # The kill ended (at once) long ago; the revert of the others ends their window.
    assert hooks.cause("browser-0") == FaultCause("lag", moderate)
    now[0] += CAUSE_WINDOW_S
    assert hooks.cause("browser-0") is None and hooks.cause("browser-1") is None


async def test_a_hook_says_when_its_effect_began_before_it_acted() -> None:
    browser = FakeBrowser("browser-0")
    host = ShardHost(FakeNative(), lambda: [browser])
    wall = [1_700_000_000.0]
    hooks = FaultHooks(host, FakeSession(), wall_clock=lambda: wall[0])
    killing = browser.kill

    async def slow_kill() -> None:
        await killing()
        wall[0] += 1.67  # the browser takes its time to die; the effect began before

    browser.kill = slow_kill  # type: ignore[method-assign]
    killed = await hooks.apply(request(H.FAULT_HOOK_KILL_BROWSER, browser_id="browser-0"))
    assert killed.began_at == 1_700_000_000.0
    # A retried apply of an effect in force keeps the first one's time.
    wall[0] += 5
    await hooks.apply(request(H.FAULT_HOOK_OFFLINE, browser_id="browser-0", fault_id="off"))
    again = await hooks.apply(request(H.FAULT_HOOK_OFFLINE, browser_id="browser-0", fault_id="off"))
    assert again.began_at == 1_700_000_000.0 + 1.67 + 5


async def test_fail_session_fails_one_handle_or_every_session_of_the_browser() -> None:
    browser = FakeBrowser("browser-0")
    browser.handles = ["a", "b"]
    hooks, _, _ = hooks_with(browser)
    await hooks.apply(request(H.FAULT_HOOK_FAIL_SESSION, shard_handle="b"))
    await hooks.apply(request(H.FAULT_HOOK_FAIL_SESSION, browser_id="browser-0", fault_id="f-2"))
    assert browser.calls == [("fail_session", "b"), ("fail_session", "a"), ("fail_session", "b")]


async def test_offline_and_memory_are_held_per_fault_and_reverted_by_fault_id() -> None:
    browser = FakeBrowser("browser-0")
    hooks, _, _ = hooks_with(browser)
    off = await hooks.apply(request(H.FAULT_HOOK_OFFLINE, browser_id="browser-0", fault_id="a"))
    assert off.revertible
    await hooks.apply(request(H.FAULT_HOOK_OFFLINE, browser_id="browser-0", fault_id="b"))
    await hooks.apply(
        request(
            H.FAULT_HOOK_ALLOCATE_MEMORY, browser_id="browser-0", memory_bytes=100, fault_id="a"
        )
    )
    await hooks.apply(
        request(H.FAULT_HOOK_ALLOCATE_MEMORY, browser_id="browser-0", memory_bytes=30, fault_id="b")
    )
    # A retried apply does not stack.
    await hooks.apply(
        request(H.FAULT_HOOK_ALLOCATE_MEMORY, browser_id="browser-0", memory_bytes=30, fault_id="b")
    )
    assert browser.held == 130
    assert await hooks.revert("a") is True
    # Fault b still holds the page offline and its own 30 bytes.
    assert ("set_offline", False) not in browser.calls
    assert browser.held == 30
    assert await hooks.revert("b") is True
    assert browser.calls[-2:] == [("set_offline", False), ("release_memory", 30)]
    assert browser.held == 0
    assert await hooks.revert("b") is False


async def test_a_duration_makes_the_agent_revert_by_itself() -> None:
    browser = FakeBrowser("browser-0")
    hooks, _, _ = hooks_with(browser)
    await hooks.apply(request(H.FAULT_HOOK_OFFLINE, browser_id="browser-0", duration_s=0.05))
    await until(lambda: ("set_offline", False) in browser.calls, "the agent's own revert")
    assert hooks.active() == []


async def test_delay_and_drop_set_the_data_path_and_the_session_link() -> None:
    hooks, session, _ = hooks_with(FakeBrowser("browser-0"))
    await hooks.apply(request(H.FAULT_HOOK_DELAY, delay_s=0.2, fault_id="d"))
    assert hooks.data_path.delay_s == 0.2 and session.link.delay_s == 0.2
    await hooks.apply(request(H.FAULT_HOOK_DROP, data_path_only=True, fault_id="grey"))
    assert hooks.data_path.dropped and not session.link.dropped and session.cuts == 0
    await hooks.apply(request(H.FAULT_HOOK_DROP, fault_id="p"))
    assert session.link.dropped and session.cuts == 1
    await hooks.revert("p")
    assert hooks.data_path.dropped and not session.link.dropped  # "grey" still drops
    await hooks.revert("grey")
    await hooks.revert("d")
    assert not hooks.data_path.dropped and hooks.data_path.delay_s == 0
    assert session.link.delay_s == 0


async def test_a_link_delivers_after_its_delay_and_loses_what_is_in_flight() -> None:
    link = Link()
    assert await link.deliver()
    link.delay("slow", 0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await link.deliver()
    assert loop.time() - started >= 0.05
    in_flight = asyncio.create_task(link.deliver())
    await asyncio.sleep(0)
    link.drop("cut")
    assert await in_flight is False


class FakeCoordinator(coord_grpc.CoordinatorServiceServicer):
    """Accepts every agent session and keeps it open; counts them."""

    def __init__(self, reattach_to: str = "") -> None:
        self.sessions = 0
        self.open = 0
        self.reattach_to = reattach_to
        """A follower's answer: reattach to this leader."""

    async def AgentSession(
        self,
        request_iterator: AsyncIterator[coord_pb.AgentSessionRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[coord_pb.AgentSessionResponse]:
        self.sessions += 1
        self.open += 1
        try:
            first = await anext(aiter(request_iterator))
            assert first.HasField("registration")
            if self.reattach_to:
                yield coord_pb.AgentSessionResponse(
                    reattach=coord_pb.Reattach(leader_address=self.reattach_to)
                )
                return
            accepted = coord_pb.SessionAccepted(coordinator_id="c0")
            accepted.heartbeat_interval.FromMilliseconds(50)
            yield coord_pb.AgentSessionResponse(accepted=accepted)
            async for _ in request_iterator:
                pass
        finally:
            self.open -= 1


async def test_the_session_reconnects_after_a_cut_and_stays_away_during_a_partition() -> None:
    coordinator = FakeCoordinator()
    server = grpc.aio.server()
    coord_grpc.add_CoordinatorServiceServicer_to_server(coordinator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    session = CoordinatorSession(
        agent_id="agent-x",
        address="127.0.0.1:1",
        coordinators=[f"127.0.0.1:{port}"],
        memory_budget_bytes=1,
        browsers=list,
        max_backoff_s=0.1,
    )
    task = asyncio.create_task(session.run())
    try:
        await until(session.attached.is_set, "the first session")
        assert session.cut() is True
        await until(lambda: coordinator.sessions == 2 and session.attached.is_set(), "reconnect")
        assert not task.done()  # a cut is not a cancellation of the session task
        session.link.drop("p")
        assert session.cut() is True
        await until(lambda: coordinator.open == 0, "the cut")
        await asyncio.sleep(0.3)  # many backoffs' worth: the partition must refuse them all
        assert coordinator.sessions == 2 and not session.attached.is_set()
        session.link.clear("p")
        await until(lambda: coordinator.sessions == 3 and session.attached.is_set(), "heal")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.stop(0)
    assert session.cut() is False


async def test_a_follower_sends_the_session_to_the_leader_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    leader = FakeCoordinator()
    servers = [grpc.aio.server(), grpc.aio.server()]
    coord_grpc.add_CoordinatorServiceServicer_to_server(leader, servers[0])
    leader_port = servers[0].add_insecure_port("127.0.0.1:0")
    follower = FakeCoordinator(reattach_to=f"127.0.0.1:{leader_port}")
    coord_grpc.add_CoordinatorServiceServicer_to_server(follower, servers[1])
    follower_port = servers[1].add_insecure_port("127.0.0.1:0")
    for server in servers:
        await server.start()
    session = CoordinatorSession(
        agent_id="agent-x",
        address="127.0.0.1:1",
        coordinators=[f"127.0.0.1:{follower_port}"],
        memory_budget_bytes=1,
        browsers=list,
        max_backoff_s=0.1,
    )
    task = asyncio.create_task(session.run())
    try:
        await until(session.attached.is_set, "the session at the leader")
        assert session.attached_to == f"127.0.0.1:{leader_port}"
        assert (follower.sessions, leader.sessions) == (1, 1)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for server in servers:
            await server.stop(0)


async def test_a_session_whose_heartbeats_fail_is_reopened() -> None:
    coordinator = FakeCoordinator()
    server = grpc.aio.server()
    coord_grpc.add_CoordinatorServiceServicer_to_server(coordinator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    calls = 0

    def browsers() -> list[common_pb2.BrowserInfo]:
        # The first heartbeat of the first session cannot read the browsers.
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("browser state unreadable")
        return []

    session = CoordinatorSession(
        agent_id="agent-x",
        address="127.0.0.1:1",
        coordinators=[f"127.0.0.1:{port}"],
        memory_budget_bytes=1,
        browsers=browsers,
        max_backoff_s=0.1,
    )
    task = asyncio.create_task(session.run())
    try:
        await until(lambda: coordinator.sessions == 2 and session.attached.is_set(), "reopen")
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.stop(0)


TOKEN = "agent-s3cret"


class Agent:
    """An agent's servicer on loopback, over fake browsers, with or without a fault token."""

    def __init__(self, address: str, browser: FakeBrowser) -> None:
        self.address = address
        self.browser = browser

    def stub(self, channel: grpc.aio.Channel) -> agent_grpc.BrowserAgentServiceStub:
        return agent_grpc.BrowserAgentServiceStub(channel)


async def serve_agent(token: str) -> tuple[Agent, grpc.aio.Server]:
    browser = FakeBrowser("browser-0")
    hooks, session, host = hooks_with(browser)
    servicer = BrowserAgentServicer(
        AgentSettings(fault_token=token),
        session,  # type: ignore[arg-type]  # hooks and status need only its link and cut
        None,  # type: ignore[arg-type]  # no shard is loaded here
        host,
        Lifecycle(),
        hooks=hooks,
    )
    server = grpc.aio.server()
    agent_grpc.add_BrowserAgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return Agent(f"127.0.0.1:{port}", browser), server


@pytest.fixture
async def guarded_agent() -> AsyncIterator[Agent]:
    agent, server = await serve_agent(TOKEN)
    try:
        yield agent
    finally:
        await server.stop(0)


def kill(fault_id: str = "f-1") -> agent_pb.ApplyFaultHookRequest:
    return agent_pb.ApplyFaultHookRequest(
        fault_id=fault_id, hook=H.FAULT_HOOK_KILL_BROWSER, browser_id="browser-0"
    )


async def test_an_agent_with_a_fault_token_refuses_hooks_without_it(guarded_agent: Agent) -> None:
    async with grpc.aio.insecure_channel(guarded_agent.address) as channel:
        stub = guarded_agent.stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.ApplyFaultHook(kill(), timeout=5)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in (missing.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.ApplyFaultHook(
                kill(), timeout=5, metadata=(("authorization", "Bearer nope"),)
            )
        assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as revert:
            await stub.RevertFaultHook(agent_pb.RevertFaultHookRequest(fault_id="f-1"), timeout=5)
        assert revert.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert guarded_agent.browser.calls == []  # nothing was performed
        before = time.time()
        done = await stub.ApplyFaultHook(
            kill(), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        assert guarded_agent.browser.calls == [("kill", os.getpid())]
        began = done.effect_began_at.ToNanoseconds() / 1e9
        assert before <= began <= time.time()


async def test_an_agent_without_a_token_takes_hooks_from_anyone() -> None:
    agent, server = await serve_agent("")
    try:
        async with grpc.aio.insecure_channel(agent.address) as channel:
            done = await agent.stub(channel).ApplyFaultHook(kill(), timeout=5)
        assert done.HasField("effect_began_at") and agent.browser.calls
    finally:
        await server.stop(0)


async def test_the_injector_sends_its_token_to_the_agents(guarded_agent: Agent) -> None:
    action = AgentAction(
        agent_id="agent-0",
        address=guarded_agent.address,
        hook=H.FAULT_HOOK_OFFLINE,
        target_kind=fi_pb.TARGET_KIND_BROWSER,
        target_id="agent-0/browser-0",
        browser_id="browser-0",
    )
    anonymous, wrong, injector = (
        GrpcAgentHooks(timeout_s=5),
        GrpcAgentHooks(timeout_s=5, token="nope"),
        GrpcAgentHooks(timeout_s=5, token=TOKEN),
    )
    try:
        with pytest.raises(ActionError, match="UNAUTHENTICATED"):
            await anonymous.apply(action, "f-1", 30.0, common_pb2.INTENSITY_MODERATE)
        with pytest.raises(ActionError, match="PERMISSION_DENIED"):
            await wrong.apply(action, "f-1", 30.0, common_pb2.INTENSITY_MODERATE)
        assert guarded_agent.browser.calls == []
        before = time.time()
        outcome = await injector.apply(action, "f-1", 30.0, common_pb2.INTENSITY_MODERATE)
        assert "offline" in outcome.detail
        assert outcome.began_at is not None and before <= outcome.began_at <= time.time()
        with pytest.raises(ActionError, match="UNAUTHENTICATED"):
            await anonymous.revert("agent-0", guarded_agent.address, "f-1")
        assert await injector.revert("agent-0", guarded_agent.address, "f-1") is True
        assert guarded_agent.browser.calls == [("set_offline", True), ("set_offline", False)]
    finally:
        for hooks in (anonymous, wrong, injector):
            await hooks.close()


def test_a_local_cluster_gives_its_agents_the_injectors_fault_token(tmp_path: Path) -> None:
    guarded = plan(
        agents=2,
        data_dir=tmp_path,
        auto_ports=True,
        extra_args={"fault_injector": ["--fault-token", TOKEN]},
    )
    agents = [p for p in guarded if p.service == "browser_agent"]
    assert len(agents) == 2
    assert all(p.args[-2:] == ["--fault-token", TOKEN] for p in agents)
    # Without a token, none is invented (one in the environment reaches them by itself).
    open_cluster = plan(agents=1, data_dir=tmp_path, auto_ports=True)
    assert not any("--fault-token" in p.args for p in open_cluster)


async def test_faults_in_force_are_marked_on_their_browsers_and_told_at_once() -> None:
    hooks, session, _ = hooks_with(FakeBrowser("browser-0"), FakeBrowser("browser-1"))
    await hooks.apply(request(H.FAULT_HOOK_OFFLINE, browser_id="browser-0", fault_id="off"))
    assert session.reports == 1  # the coordinator hears of it before the next heartbeat
    await hooks.apply(request(H.FAULT_HOOK_DELAY, delay_s=0.01, fault_id="lag"))
    infos = [common_pb2.BrowserInfo(browser_id=b) for b in ("browser-0", "browser-1")]
    marked = {i.browser_id: list(i.faults_in_force) for i in hooks.mark(infos)}
    # A fault on the whole agent is in force on each browser.
    assert marked == {"browser-0": ["lag", "off"], "browser-1": ["lag"]}
    await hooks.revert("off")
    await hooks.revert("lag")
    assert session.reports == 4
    assert all(not i.faults_in_force for i in hooks.mark(infos))


async def test_a_cut_whose_browser_closes_under_it_still_took_effect(tmp_path: Path) -> None:
    """connection_lost cuts the page's socket, then emulates the network loss over CDP.
    Cut off, the page can lose its shards to recovery and the agent close the empty
    browser before the emulation runs: the cut happened, so the fault did not fail.
    A browser lost for any other reason still fails the call."""
    runtime = BrowserRuntime("browser-0", tmp_path)
    runtime._server = SimpleNamespace(accept_sockets=True)  # type: ignore[assignment]
    with pytest.raises(RuntimeLost, match="no driver"):
        await runtime.set_offline(True)
    runtime._closing = True  # the agent closing it meanwhile
    await runtime.set_offline(True)
    assert runtime._server.accept_sockets is False
