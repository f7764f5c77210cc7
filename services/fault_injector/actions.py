"""What a fault does to each of its targets: the intensity table turned into actions.

Every action is one agent hook (performed by the agent that holds the target)
or one signal to the coordinator leader's workload. The table itself is in
``spec.py``'s docstring; the numbers it names are defined here.
"""

from __future__ import annotations

import dataclasses
import enum

from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.common.v1 import common_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as pb

from services.fault_injector.targets import ClusterView, Target, browsers_of, ready_browsers

Kind = common_pb2.FaultKind
Intensity = common_pb2.Intensity
Hook = agent_pb.FaultHook
TargetKind = pb.TargetKind

MILD, MODERATE, SEVERE = (
    Intensity.INTENSITY_MILD,
    Intensity.INTENSITY_MODERATE,
    Intensity.INTENSITY_SEVERE,
)

MEMORY_FRACTION: dict[int, float] = {MILD: 0.25, MODERATE: 0.50, SEVERE: 0.90}
"""memory_pressure: the share of min(agent budget, cap) allocated in the page."""

LATENCY_S: dict[int, float] = {MILD: 0.1, MODERATE: 0.5, SEVERE: 2.0}
"""latency: the delay on each RunShard activation and session message."""

# Hooks whose effect the agent keeps until it is reverted.
REVERTIBLE_HOOKS = frozenset(
    {
        Hook.FAULT_HOOK_OFFLINE,
        Hook.FAULT_HOOK_ALLOCATE_MEMORY,
        Hook.FAULT_HOOK_DELAY,
        Hook.FAULT_HOOK_DROP,
    }
)


@dataclasses.dataclass(frozen=True)
class AgentAction:
    """One hook an agent performs."""

    agent_id: str
    address: str
    hook: int
    """agent_pb.FaultHook."""
    target_kind: int
    """What the action hits, for the fault's record (pb.TargetKind)."""
    target_id: str
    browser_id: str = ""
    shard_handle: str = ""
    memory_bytes: int = 0
    delay_s: float = 0.0
    data_path_only: bool = False

    @property
    def revertible(self) -> bool:
        """True when the agent keeps the effect until it is reverted."""
        return self.hook in REVERTIBLE_HOOKS

    def describe(self) -> str:
        """The action in words, for dry runs and logs."""
        what = Hook.Name(self.hook).removeprefix("FAULT_HOOK_").lower()  # type: ignore[arg-type]
        parts = [what]
        if self.browser_id:
            parts.append(f"on {self.browser_id}")
        if self.shard_handle:
            parts.append(f"shard {self.shard_handle}")
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes} bytes")
        if self.delay_s:
            parts.append(f"{self.delay_s * 1000:.0f} ms")
        if self.data_path_only:
            parts.append("(RunShard only)")
        return " ".join(parts)


class LeaderMode(enum.Enum):
    """What leader_loss does to the leader's process."""

    STOP = "stop"
    """SIGSTOP for the duration, SIGCONT at the end."""
    KILL = "kill"
    """SIGKILL, started again at the end."""
    KILL_FOR_GOOD = "kill_for_good"
    """SIGKILL, left dead."""


@dataclasses.dataclass(frozen=True)
class LeaderAction:
    """One signal to the coordinator leader's workload."""

    replica_id: str
    address: str
    mode: LeaderMode

    @property
    def revertible(self) -> bool:
        """Stopping is undone, and so is a kill that is to be restarted."""
        return self.mode is not LeaderMode.KILL_FOR_GOOD

    def describe(self) -> str:
        """The action in words."""
        return {
            LeaderMode.STOP: f"SIGSTOP leader {self.replica_id} for the duration",
            LeaderMode.KILL: f"SIGKILL leader {self.replica_id}, restart it at the end",
            LeaderMode.KILL_FOR_GOOD: f"SIGKILL leader {self.replica_id}, leave it dead",
        }[self.mode]


Action = AgentAction | LeaderAction

_BROWSER_KINDS = frozenset(
    {
        Kind.FAULT_KIND_BROWSER_CRASH,
        Kind.FAULT_KIND_MEMORY_PRESSURE,
        Kind.FAULT_KIND_COMPONENT_FAILURE,
    }
)


def _browser(view: ClusterView, target: Target) -> common_pb2.BrowserInfo | None:
    """The browser a target focuses on: the one named or holding the shard, or an agent's
    first ready one."""
    agent = view.agent(target.agent_id)
    if agent is None:
        return None
    if target.browser_id:
        return next((b for b in agent.browsers if b.browser_id == target.browser_id), None)
    ready = ready_browsers(agent)
    return ready[0] if ready else None


def _needs_browser(kind: int, intensity: int) -> bool:
    if kind in _BROWSER_KINDS:
        return True
    if kind == Kind.FAULT_KIND_CONNECTION_LOST:
        return intensity != MILD
    return False


def ineligible(kind: int, intensity: int, target: Target, view: ClusterView) -> str | None:
    """Why a fault cannot act on a target now (None when it can)."""
    if target.kind == TargetKind.TARGET_KIND_REPLICA:
        return None
    if not _needs_browser(kind, intensity):
        return None
    browser = _browser(view, target)
    if browser is None:
        return f"{target.id}: no ready browser"
    if browser.runtime == common_pb2.RUNTIME_NATIVE:
        return f"{target.id}: runs on the native runtime, not in a browser"
    if browser.state != common_pb2.BROWSER_STATE_READY:
        state = common_pb2.BrowserState.Name(browser.state).removeprefix("BROWSER_STATE_")
        return f"{target.id}: its browser {browser.browser_id} is {state}"
    if kind == Kind.FAULT_KIND_COMPONENT_FAILURE and not (target.shard_handle or browser.shards):
        return f"{target.id}: its browser {browser.browser_id} holds no shard"
    return None


def breaker_keys(target: Target, view: ClusterView) -> list[tuple[str, str]]:
    """The breakers that guard a target: (scope, id) with scope "agent" or "browser"."""
    if not target.agent_id:
        return []
    keys = [("agent", target.agent_id)]
    browser = _browser(view, target)
    if browser is not None and browser.runtime != common_pb2.RUNTIME_NATIVE:
        keys.append(("browser", f"{target.agent_id}/{browser.browser_id}"))
    return keys


def _memory_bytes(agent: common_pb2.AgentInfo, intensity: int, cap_bytes: int) -> int:
    base = min(agent.memory_budget_bytes, cap_bytes) if agent.memory_budget_bytes > 0 else cap_bytes
    return int(base * MEMORY_FRACTION[intensity])


def plan_actions(
    kind: int, intensity: int, targets: list[Target], view: ClusterView, *, memory_cap_bytes: int
) -> list[Action]:
    """The actions a leaf fault performs on its targets, without duplicates, in order."""
    actions: list[Action] = []
    for target in targets:
        if target.kind == TargetKind.TARGET_KIND_REPLICA:
            modes: dict[int, LeaderMode] = {
                MILD: LeaderMode.STOP,
                MODERATE: LeaderMode.KILL,
                SEVERE: LeaderMode.KILL_FOR_GOOD,
            }
            actions.append(
                LeaderAction(target.replica_id, target.replica_address, modes[intensity])
            )
            continue
        actions.extend(_agent_actions(kind, intensity, target, view, memory_cap_bytes))
    unique: list[Action] = []
    for action in actions:
        if action not in unique:
            unique.append(action)
    return unique


def _agent_actions(
    kind: int, intensity: int, target: Target, view: ClusterView, memory_cap_bytes: int
) -> list[AgentAction]:
    agent = view.agent(target.agent_id)
    assert agent is not None
    browser = _browser(view, target)

    def on_agent(hook: int) -> AgentAction:
        return AgentAction(
            agent.agent_id, agent.address, hook, TargetKind.TARGET_KIND_AGENT, agent.agent_id
        )

    def on_browser(hook: int, info: common_pb2.BrowserInfo | None = None) -> AgentAction:
        info = info or browser
        assert info is not None
        return AgentAction(
            agent.agent_id,
            agent.address,
            hook,
            TargetKind.TARGET_KIND_BROWSER,
            f"{agent.agent_id}/{info.browser_id}",
            browser_id=info.browser_id,
        )

    def on_shard(handle: str) -> AgentAction:
        assert browser is not None
        return AgentAction(
            agent.agent_id,
            agent.address,
            Hook.FAULT_HOOK_FAIL_SESSION,
            TargetKind.TARGET_KIND_SHARD,
            target.id if target.shard_handle == handle else handle,
            browser_id=browser.browser_id,
            shard_handle=handle,
        )

    if kind == Kind.FAULT_KIND_BROWSER_CRASH:
        if intensity == MILD:
            return [on_browser(Hook.FAULT_HOOK_CRASH_PAGE)]
        if intensity == MODERATE:
            return [on_browser(Hook.FAULT_HOOK_KILL_BROWSER)]
        return [on_browser(Hook.FAULT_HOOK_KILL_BROWSER, b) for b in ready_browsers(agent)]
    if kind == Kind.FAULT_KIND_MEMORY_PRESSURE:
        size = _memory_bytes(agent, intensity, memory_cap_bytes)
        return [dataclasses.replace(on_browser(Hook.FAULT_HOOK_ALLOCATE_MEMORY), memory_bytes=size)]
    if kind == Kind.FAULT_KIND_CONNECTION_LOST:
        if intensity == MILD:
            return [on_agent(Hook.FAULT_HOOK_CUT_SESSION)]
        if intensity == MODERATE:
            return [on_browser(Hook.FAULT_HOOK_OFFLINE)]
        return [on_agent(Hook.FAULT_HOOK_CUT_SESSION), on_browser(Hook.FAULT_HOOK_OFFLINE)]
    if kind == Kind.FAULT_KIND_COMPONENT_FAILURE:
        assert browser is not None
        handles = [s.handle for s in browser.shards]
        one = target.shard_handle or handles[0]
        webgpu = any(
            s.execution_provider == common_pb2.EXECUTION_PROVIDER_WEBGPU for s in browser.shards
        )
        every_session = on_browser(Hook.FAULT_HOOK_FAIL_SESSION)
        lose = on_browser(Hook.FAULT_HOOK_LOSE_DEVICE) if webgpu else every_session
        if intensity == MILD:
            return [on_shard(one)]
        if intensity == MODERATE:
            return [lose]
        return [on_shard(one), lose] if webgpu else [every_session]
    if kind == Kind.FAULT_KIND_LATENCY:
        return [dataclasses.replace(on_agent(Hook.FAULT_HOOK_DELAY), delay_s=LATENCY_S[intensity])]
    if kind == Kind.FAULT_KIND_PARTITION:
        if intensity == MILD:
            return [dataclasses.replace(on_agent(Hook.FAULT_HOOK_DROP), data_path_only=True)]
        drop = on_agent(Hook.FAULT_HOOK_DROP)
        if intensity == MODERATE:
            return [drop]
        pages = [b for b in browsers_of(agent) if b.state != common_pb2.BROWSER_STATE_STOPPED]
        return [drop, *(on_browser(Hook.FAULT_HOOK_OFFLINE, b) for b in pages)]
    raise ValueError(f"no agent actions for fault kind {kind}")
