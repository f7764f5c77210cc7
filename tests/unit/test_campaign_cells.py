"""A campaign cell's figures from its faults, recoveries and answers: recovery time
from detection and from the fault's first effect, detection, phases, and what clients
felt near each fault."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.fault_injector.v1 import fault_injector_pb2 as fi
from webshard.recovery.v1 import recovery_pb2

from services.campaign.cli import table
from services.campaign.runner import AFTER_FAULT_S, Answer, Iteration, Plan, cells_of

T0 = 1_800_000_000.0


def stamp(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def span(seconds: float) -> Duration:
    out = Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def recovery(started: float, finished: float, *, ok: bool = True) -> recovery_pb2.Recovery:
    state = recovery_pb2.RECOVERY_STATE_SUCCEEDED if ok else recovery_pb2.RECOVERY_STATE_FAILED
    return recovery_pb2.Recovery(
        state=state,
        started_at=stamp(started),
        finished_at=stamp(finished),
        duration=span(finished - started),
        phases=[
            recovery_pb2.RecoveryPhase(name="replace", duration=span(0.02)),
            recovery_pb2.RecoveryPhase(name="verify", duration=span(0.03)),
        ],
    )


def answer(at: float, latency_s: float, *, ok: bool = True) -> Answer:
    return Answer("r", at, latency_s, ok, ok, False, "wasm")


def test_a_cells_times_count_from_detection_and_from_the_faults_first_effect() -> None:
    plan = Plan(scenarios=("browser_crash",), strategies=("simple",))
    fault = fi.Fault(injected_at=stamp(T0 + 1.0))
    iteration = Iteration(
        "browser_crash",
        "simple",
        T0,
        fault=fault,
        recoveries=[
            recovery(T0 + 1.010, T0 + 1.100),
            recovery(T0 + 1.050, T0 + 1.300),
            recovery(T0 + 1.060, T0 + 9.0, ok=False),
        ],
        ended_at=T0 + 20,
    )
    # Clients: 10 ms away from the fault, 40 ms in the 5 s after it (one failed).
    answers = [answer(T0 + 0.5, 0.010), answer(T0 + 15, 0.010), answer(T0 + 30, 0.010)]
    answers += [answer(T0 + 1.5, 0.040), answer(T0 + 2.0, 0.040), answer(T0 + 3.0, 9, ok=False)]
    answers.append(answer(T0 + 1.0 + AFTER_FAULT_S + 0.1, 0.010))  # past the window
    [cell] = cells_of(plan, [iteration], answers, "wasm")
    assert (cell.recoveries, cell.succeeded) == (3, 2)
    assert [round(d) for d in cell.durations_ms] == [90, 250]
    assert [round(d) for d in cell.effect_ms] == [100, 300]  # detection included
    assert [round(d) for d in cell.detect_ms] == [10]  # to the first failure report
    assert round(cell.phase_p50("replace") or 0) == 20
    assert round(cell.phase_p50("verify") or 0) == 30
    assert cell.p99_ratio is not None and round(cell.p99_ratio, 1) == 4.0
    assert (cell.answers, cell.lost) == (6, 1)
    printed = table([cell])
    assert "from effect p50" in printed and "4.0x" in printed


def test_a_fault_that_never_took_effect_counts_from_detection() -> None:
    plan = Plan(scenarios=("browser_crash",), strategies=("simple",))
    iteration = Iteration(
        "browser_crash",
        "simple",
        T0,
        fault=fi.Fault(),  # refused: no injected_at
        recoveries=[recovery(T0 + 1.0, T0 + 1.2)],
        ended_at=T0 + 5,
    )
    [cell] = cells_of(plan, [iteration], [], "wasm")
    assert [round(d) for d in cell.effect_ms] == [200]
    assert cell.detect_ms == [] and cell.p99_ratio is None


def test_redundancy_restored_counts_where_the_recovery_recorded_it() -> None:
    plan = Plan(scenarios=("browser_crash",), strategies=("simple",))
    restored = recovery(T0 + 1.0, T0 + 1.1)
    restored.redundancy_restored.CopyFrom(span(2.5))
    iteration = Iteration(
        "browser_crash",
        "simple",
        T0,
        fault=fi.Fault(injected_at=stamp(T0 + 0.99)),
        recoveries=[restored, recovery(T0 + 1.0, T0 + 1.2)],
        ended_at=T0 + 5,
    )
    [cell] = cells_of(plan, [iteration], [], "wasm")
    assert cell.restored_ms == [2500.0]
    assert "restored p50" in table([cell]) and "2500" in table([cell])


def test_a_failure_counts_as_recovered_when_its_retry_succeeded() -> None:
    plan = Plan(scenarios=("multiple_failures",), strategies=("simple",))
    failed = recovery(T0 + 1.0, T0 + 2.0, ok=False)
    failed.recovery_id, failed.retried_by = "a1", "a2"
    retry = recovery(T0 + 3.0, T0 + 3.5)
    retry.recovery_id = "a2"
    lost = recovery(T0 + 1.0, T0 + 2.0, ok=False)
    lost.recovery_id = "b1"  # retries ran out
    iteration = Iteration(
        "multiple_failures", "simple", T0, recoveries=[failed, retry, lost], ended_at=T0 + 9
    )
    [cell] = cells_of(plan, [iteration], [], "wasm")
    assert (cell.recoveries, cell.failures, cell.recovered) == (3, 2, 1)
    assert cell.success_rate == 0.5


def test_recoveries_count_for_the_engine_of_the_agent_whose_browser_failed() -> None:
    plan = Plan(scenarios=("browser_crash",), strategies=("simple",))
    on = []
    for agent in ("agent-0", "agent-1", "agent-1", "agent-9"):
        r = recovery(T0 + 1.0, T0 + 1.1)
        r.report.agent_id = agent
        on.append(r)
    iteration = Iteration("browser_crash", "simple", T0, recoveries=on, ended_at=T0 + 5)
    engines = {"agent-0": "chromium", "agent-1": "firefox"}  # agent-9: not known
    [cell] = cells_of(plan, [iteration], [], "wasm", engines)
    assert cell.engines == {"chromium": 1, "firefox": 2}
    assert "chromium 1, firefox 2" in table([cell])
    [unknown] = cells_of(plan, [iteration], [], "wasm")
    assert unknown.engines == {}
