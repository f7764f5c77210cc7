"""One agent's circuit breaker walks closed -> open -> half-open -> closed, and the
fault-injector's adaptation follows each state (DESIGN §6, §7).

Real processes on loopback: one coordinator replica (a replica with no peers elects
itself), two agents on the native runtime holding the two shards of minilm-l6, the
recovery service with short breaker knobs, and the fault-injector pointed at both.
The coordinator and the agents are not told where recovery is, so the only failures
recovery counts are the ones this test reports.

What drives each transition, through the services' own APIs only:

- closed -> open: three failure reports naming the victim agent and no model, each
  recovery finished before the next report (a report joined to a running recovery is
  not counted again). Without a model there is nothing to verify, so no recovery
  shows the victim working and the failures run consecutively.
- open -> half-open: the open duration passing; recovery turns the breaker half-open
  the first time anyone looks after it, and records it at the moment it ended.
- half-open -> closed: two successful probes. Recovery counts a verify inference
  whose trail passes through an agent as that agent working. A failure reported on
  the victim itself would reopen the breaker, so each probe is a recovery of the
  other agent's shard: its verify runs the whole model, the victim's shard included.
  Recovery's own active probes are off for this walk, so traffic alone decides.

The second walk leaves the half-open breaker to recovery's active probes: pinned
inferences of the victim's shard close it with no traffic at all, and once the
victim is killed, a probe that finds it gone reopens it.

The injector's decisions are dry runs of a latency fault on the victim: they resolve
the target and consult the breaker exactly as a real injection does, without slowing
the verify inferences that close the breaker.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import webshard
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.aio import Client, FaultInjectorClient, RecoveryClient
from webshard.common.v1 import common_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as fi_pb
from webshard.recovery.v1 import recovery_pb2 as pb

from tests.conftest import ServiceProcess, wait_for

MODEL = "minilm-l6"
CONSECUTIVE_FAILURES = 3
OPEN_S = 3.0
"""Long enough for the OPEN checks to finish on a busy machine, short enough to wait out."""
HALF_OPEN_PROBES = 2

CLOSED = common_pb2.BREAKER_STATE_CLOSED
OPEN = common_pb2.BREAKER_STATE_OPEN
HALF_OPEN = common_pb2.BREAKER_STATE_HALF_OPEN

T = TypeVar("T")


@dataclass
class Walk:
    """The processes of the walk."""

    coordinator: ServiceProcess
    recovery: ServiceProcess
    injector: ServiceProcess
    agents: dict[str, ServiceProcess]
    """By agent id."""


PROBE_INTERVAL_S = 0.5
"""Between the probes of the second walk's half-open breaker."""


@pytest.fixture
def walk(
    request: pytest.FixtureRequest, start_service: Callable[..., ServiceProcess]
) -> Iterator[Walk]:
    """The processes; ``walk`` parametrized with True turns recovery's active probes on."""
    probes = bool(getattr(request, "param", False))
    coordinator = start_service("coordinator", wait=False)
    agents = [
        start_service(
            "browser_agent",
            "--agent-id",
            f"agent-{i}",
            "--browsers",
            "0",
            "--coordinators",
            coordinator.address,
            wait=False,
        )
        for i in range(2)
    ]
    recovery = start_service(
        "recovery",
        "--coordinators",
        coordinator.address,
        "--breaker-consecutive-failures",
        str(CONSECUTIVE_FAILURES),
        "--breaker-open-s",
        str(OPEN_S),
        "--breaker-half-open-probes",
        str(HALF_OPEN_PROBES),
        "--action-timeout-s",
        "20",
        # The probes' retry in place must pass however busy the machine: their verify
        # runs the whole model, through the victim's shard.
        "--in-place-budget-s",
        "20",
        "--breaker-probes",
        "on" if probes else "off",
        "--breaker-probe-interval-s",
        str(PROBE_INTERVAL_S),
        wait=False,
    )
    injector = start_service(
        "fault_injector",
        "--coordinators",
        coordinator.address,
        "--recovery",
        recovery.address,
        wait=False,
    )
    for proc in (coordinator, *agents, recovery, injector):
        proc.wait_serving()
    with webshard.Client(coordinator.address, timeout=10) as client:
        wait_for(lambda: len(client.list_agents()) == 2, 30, "both agents to register")
    yield Walk(coordinator, recovery, injector, {f"agent-{i}": a for i, a in enumerate(agents)})


async def eventually(
    fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, timeout: float
) -> T:
    """Fetch until ``done`` holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {value}")
        await asyncio.sleep(0.05)


def logged(log: Path, message: str) -> list[dict[str, Any]]:
    """The entries the recovery process logged with ``message``."""
    found = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("message") == message:
            found.append(entry)
    return found


def logged_transitions(log: Path) -> list[tuple[str, str, str, float]]:
    """The breaker transitions the recovery process logged: (breaker, from, to, at)."""
    return [(e["breaker"], e["from"], e["to"], e["at"]) for e in logged(log, "breaker transition")]


def seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


async def test_one_failing_agent_walks_its_breaker_and_the_injector_follows(walk: Walk) -> None:
    async with (
        Client(walk.coordinator.address, timeout=120) as coordinator,
        RecoveryClient(walk.recovery.address, timeout=10) as recovery,
        FaultInjectorClient(walk.injector.address, timeout=10) as injector,
    ):
        placement = await coordinator.deploy(MODEL, shards=2, runtime="native")
        holders = {s.shard.index: s.replicas[0].agent_id for s in placement.shards}
        assert sorted(holders) == [0, 1] and len(set(holders.values())) == 2, placement
        victim, other = holders[0], holders[1]

        async def breaker() -> pb.Breaker:
            return await recovery.get_breaker(victim)

        async def finished(recovery_id: str) -> pb.Recovery:
            return await eventually(
                lambda: recovery.get_recovery(recovery_id),
                lambda r: r.state != pb.RECOVERY_STATE_RUNNING,
                f"recovery {recovery_id} to finish",
                30,
            )

        async def accepted(intensity: str) -> fi_pb.Fault:
            fault = await injector.inject(
                kind="latency",
                intensity=intensity,
                target=f"agent:{victim}",
                duration_s=5,
                dry_run=True,
            )
            assert fault.state == fi_pb.FAULT_STATE_DRY_RUN, fault
            assert [t.id for t in fault.targets] == [victim], fault
            # The injector did ask recovery; it did not fall back to "treated as CLOSED".
            assert "breakers unknown" not in fault.detail, fault
            return fault

        async def refused(intensity: str, state: str, allows: str) -> str:
            with pytest.raises(webshard.FailedPreconditionError) as refusal:
                await accepted(intensity)
            message = refusal.value.message
            assert "refused by circuit breakers" in message, message
            assert (
                f"breaker {victim} is {state} ({intensity} refused; it allows {allows})" in message
            ), message
            return message.removeprefix("fault ").split(":", 1)[0]

        # 1. closed: every intensity goes, severe included.
        assert (await breaker()).state == CLOSED
        await accepted("severe")

        # 2. the victim fails, again and again, until its breaker opens.
        for n in range(1, CONSECUTIVE_FAILURES + 1):
            report = pb.FailureReport(
                source=pb.FAILURE_SOURCE_HEARTBEAT,
                kind=pb.FAILURE_KIND_AGENT_GONE,
                agent_id=victim,
                message=f"missed heartbeats, failure {n}",
            )
            reported = await recovery.report_failure(report)
            assert not reported.deduplicated
            done = await finished(reported.recovery_id)
            # A live agent reconnects, so the first recoveries succeed; with no model there
            # is no answer to show the agent working, so each report still counts against
            # it. Once the breaker is open, the in-place levels are skipped and the rest
            # have nothing to act on.
            opens = n == CONSECUTIVE_FAILURES
            expected = pb.RECOVERY_STATE_FAILED if opens else pb.RECOVERY_STATE_SUCCEEDED
            assert done.state == expected, done
            state = await breaker()
            assert state.consecutive_failures == n, state
            assert state.state == (OPEN if n == CONSECUTIVE_FAILURES else CLOSED), (n, state)
        # The last recovery already saw the breaker open and left the victim alone in place.
        retry = next(p for p in done.phases if p.name == "retry")
        assert retry.detail == f"skipped: breaker {victim} is open", done
        opened = await breaker()
        assert opened.state == OPEN
        assert seconds(opened.next_probe_at) == pytest.approx(seconds(opened.changed_at) + OPEN_S)

        refusals = [
            await refused(intensity, "OPEN", "nothing")
            for intensity in ("mild", "moderate", "severe")
        ]
        # The premise: the breaker was open for all of that, not half-open already.
        assert time.time() < seconds(opened.next_probe_at), "the machine is too slow for OPEN_S"
        assert (await breaker()).state == OPEN

        # 3. the open duration passes: half-open, recorded at the moment it ended.
        half = await eventually(breaker, lambda b: b.state != OPEN, "the breaker to half-open", 30)
        assert time.time() >= seconds(opened.next_probe_at)
        assert half.state == HALF_OPEN, half
        assert half.changed_at == opened.next_probe_at
        await accepted("mild")
        await accepted("moderate")
        refusals.append(await refused("severe", "HALF_OPEN", "mild and moderate only"))

        listed = await injector.list_faults(states=["refused"])
        assert [f.fault_id for f in listed] == refusals
        assert all("refused by circuit breakers" in f.detail for f in listed), listed
        assert [f.spec.intensity for f in listed] == [
            common_pb2.INTENSITY_MILD,
            common_pb2.INTENSITY_MODERATE,
            common_pb2.INTENSITY_SEVERE,
            common_pb2.INTENSITY_SEVERE,
        ]

        # 4. probes: recoveries of the other agent's shard, whose verify runs through the
        # victim's shard too. The first leaves the breaker half-open, the second closes it.
        for n in range(1, HALF_OPEN_PROBES + 1):
            report = pb.FailureReport(
                source=pb.FAILURE_SOURCE_DATA_PATH,
                kind=pb.FAILURE_KIND_SHARD_ERROR,
                agent_id=other,
                model=MODEL,
                shard_index=1,
                message=f"shard error, probe {n}",
            )
            reported = await recovery.report_failure(report, strategy="progressive")
            done = await finished(reported.recovery_id)
            assert done.state == pb.RECOVERY_STATE_SUCCEEDED, done
            verify = [p for p in done.phases if p.name == "verify" and p.ok]
            assert verify and f"0@{victim}/" in verify[-1].detail, done
            state = await breaker()
            assert state.state == (CLOSED if n == HALF_OPEN_PROBES else HALF_OPEN), (n, state)
        closed = await breaker()
        assert closed.consecutive_failures == 0 and closed.failure_rate == 0.0, closed
        await accepted("severe")
        # No refusal since the half-open one.
        assert len(await injector.list_faults(states=["refused"])) == len(refusals)

    transitions = logged_transitions(walk.recovery.log)
    assert [(b, f, t) for b, f, t, _ in transitions] == [
        (victim, "closed", "open"),
        (victim, "open", "half_open"),
        (victim, "half_open", "closed"),
    ]
    ats = [at for *_, at in transitions]
    assert ats == [
        pytest.approx(seconds(opened.changed_at), abs=1e-6),
        pytest.approx(seconds(half.changed_at), abs=1e-6),
        pytest.approx(seconds(closed.changed_at), abs=1e-6),
    ]


async def open_the_breaker(recovery: RecoveryClient, victim: str) -> pb.Breaker:
    """Report the victim gone until its breaker opens; each recovery finished first."""
    for n in range(1, CONSECUTIVE_FAILURES + 1):
        report = pb.FailureReport(
            source=pb.FAILURE_SOURCE_HEARTBEAT,
            kind=pb.FAILURE_KIND_AGENT_GONE,
            agent_id=victim,
            message=f"missed heartbeats, failure {n}",
        )
        reported = await recovery.report_failure(report)
        await eventually(
            functools.partial(recovery.get_recovery, reported.recovery_id),
            lambda r: r.state != pb.RECOVERY_STATE_RUNNING,
            f"recovery {reported.recovery_id} to finish",
            30,
        )
    return await recovery.get_breaker(victim)


@pytest.mark.parametrize("walk", [True], indirect=True)
async def test_active_probes_close_a_breaker_whose_agent_answers_and_reopen_it_once_gone(
    walk: Walk,
) -> None:
    async with (
        Client(walk.coordinator.address, timeout=120) as coordinator,
        RecoveryClient(walk.recovery.address, timeout=10) as recovery,
    ):
        placement = await coordinator.deploy(MODEL, shards=2, runtime="native")
        holders = {s.shard.index: s.replicas[0] for s in placement.shards}
        victim = holders[0].agent_id
        where = f"{victim}/{holders[0].browser_id}"

        async def victim_transitions() -> list[tuple[str, str, str, str]]:
            entries = logged(walk.recovery.log, "breaker transition")
            return [
                (e["from"], e["to"], e["cause"], e["reason"])
                for e in entries
                if e["breaker"] == victim
            ]

        # 1. Opened by traffic; then no request and no report reaches recovery again.
        opened = await open_the_breaker(recovery, victim)
        assert opened.state == OPEN, opened

        # 2. Its open time ends; the probes (pinned inferences of the victim's shard)
        # close it with nothing else happening.
        closed = await eventually(
            lambda: recovery.get_breaker(victim),
            lambda b: b.state == CLOSED,
            "the probes to close the breaker",
            60,
        )
        assert seconds(closed.changed_at) >= seconds(opened.next_probe_at)
        walked = [t[:3] for t in await victim_transitions()]
        assert walked[:2] == [
            ("closed", "open", "traffic"),
            ("open", "half_open", "open_duration"),
        ], walked
        assert walked[-1] == ("half_open", "closed", "probe"), walked
        # A probe may fail on the way (the first run through a link the recoveries'
        # reconnects just replaced can be cancelled, or hang past the probe's deadline);
        # each failure is a probe's reopening, and the open time ending again.
        assert set(walked[2:-1]) <= {
            ("half_open", "open", "probe"),
            ("open", "half_open", "open_duration"),
        }, walked
        probes = [e for e in logged(walk.recovery.log, "breaker probe") if e["breaker"] == victim]
        assert [p["outcome"] for p in probes[-HALF_OPEN_PROBES:]] == ["passed"] * HALF_OPEN_PROBES
        passed = [p["detail"] for p in probes if p["outcome"] == "passed"]
        assert all(f"probe of shard 0 of {MODEL} on {where} answered" in d for d in passed)
        before = len(walked)

        # 3. The victim dies: traffic opens its breaker again, and the probe finds it
        # gone and reopens it.
        walk.agents[victim].stop()
        assert (await open_the_breaker(recovery, victim)).state == OPEN
        after = await eventually(
            victim_transitions,
            lambda ts: len(ts) >= before + 3,
            "a probe to reopen the breaker",
            60,
        )

    assert [t[:3] for t in after[before : before + 3]] == [
        ("closed", "open", "traffic"),
        ("open", "half_open", "open_duration"),
        ("half_open", "open", "probe"),
    ], after
    assert after[before + 2][3].startswith("a half-open probe failed: probe of "), after
