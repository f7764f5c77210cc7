"""Running a campaign: deploy, load, inject, wait for recovery, check every answer.

For each recovery strategy the model is deployed with that strategy; then each
scenario is injected ``iterations`` times while ``concurrency`` clients keep
sending requests, each answer compared with the reference embedding computed on
the CPU. An iteration ends when its fault has reverted by itself, every recovery
it caused has finished, and the cluster is whole again (every shard has its
replicas, no browser is still launching); the next one starts from there.

What the campaign observed is sent to the metrics service (recoveries with their
phases, every request), which renders the reports; the services send the rest
themselves as it happens (the fault-injector every fault, the recovery service
every breaker transition).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.aio import Client, FaultInjectorClient, MetricsClient, RecoveryClient
from webshard.common.v1 import common_pb2
from webshard.errors import FailedPreconditionError, NotFoundError, RPCError
from webshard.fault_injector.v1 import fault_injector_pb2 as fi
from webshard.metrics.v1 import metrics_pb2
from webshard.options import CLUSTER_TOKEN_ENV, FAULT_TOKEN_ENV
from webshard.recovery.v1 import recovery_pb2

from services.campaign.scenarios import NoTarget, fault_spec
from services.common.durations import duration
from services.models import prepare_inputs, reference_session

if TYPE_CHECKING:
    from webshard.cli.local import LocalCluster

log = logging.getLogger(__name__)

SENTENCES = (
    "The cat sits on the mat.",
    "A fleet of browsers runs the model.",
    "Recovery must be measured, not assumed.",
    "WebGPU exposes the GPU to web pages.",
    "Shards are cut at block boundaries.",
    "The coordinator keeps boundary activations.",
    "Circuit breakers stop cascading failures.",
    "Headless Chromium hosts the shards.",
)
MIN_COSINE = 0.99999
"""An answer is correct when its cosine similarity to the reference is at least this."""

TERMINAL_FAULT_STATES = (
    fi.FAULT_STATE_REVERTED,
    fi.FAULT_STATE_FAILED,
    fi.FAULT_STATE_REFUSED,
)


@dataclass(frozen=True)
class Addresses:
    """Where the cluster's services listen."""

    coordinators: list[str]
    fault_injector: str
    recovery: str
    metrics: str
    breakers_enabled: bool = True
    """The recovery service's breaker setting (``--breakers-enabled``), which labels
    every recovery record of the run. ``of`` reads it from what the local cluster
    started recovery with; whoever builds Addresses by hand says what it is (the
    recovery service's own default is on)."""

    @classmethod
    def of(cls, cluster: LocalCluster) -> Addresses:
        """The services of a local cluster, and its recovery service's breaker setting."""
        recovery = next(p for p in cluster.processes if p.service == "recovery")
        return cls(
            coordinators=cluster.coordinators(),
            fault_injector=cluster.address("fault-injector"),
            recovery=recovery.address,
            metrics=cluster.address("metrics"),
            breakers_enabled=breakers_setting(recovery.args, os.environ),
        )


def breakers_setting(args: Sequence[str], env: Mapping[str, str]) -> bool:
    """The breaker setting a recovery service started with ``args`` and ``env`` runs with:
    the last ``--breakers-enabled`` flag, else ``WEBSHARD_BREAKERS_ENABLED``, else on (its
    default). Raises ValueError for a value the service itself would refuse."""
    raw = None
    for flag, value in itertools.pairwise(args):
        if flag == "--breakers-enabled":
            raw = value
    for arg in args:
        if arg.startswith("--breakers-enabled="):
            raw = arg.partition("=")[2]
    if raw is None:
        raw = env.get("WEBSHARD_BREAKERS_ENABLED")
    if raw is None:
        return True
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"the recovery service's breakers-enabled value {raw[:20]!r} is not a boolean")


@dataclass(frozen=True)
class Plan:
    """What a campaign runs."""

    model: str = "minilm-l6"
    sharding: str = "layer"
    shards: int = 3
    replicas: int = 2
    spares: int | None = None
    """Hot spares per shard; None asks for the deploy's default (one where the fleet has
    room). Two keep multiple_failures, which takes two browsers at once, off the load path."""
    runtime: str = "browser"
    ep: str | None = "wasm"
    scenarios: tuple[str, ...] = ()
    strategies: tuple[str, ...] = ()
    iterations: int = 2
    concurrency: int = 2
    intensity: str = "moderate"
    fault_duration_s: float = 3.0
    settle_timeout_s: float = 90.0
    request_timeout_s: float = 30.0

    def validate(self) -> None:
        """Raise ValueError naming the first value out of range."""
        if self.model != "minilm-l6":
            raise ValueError(
                f"the campaign checks answers against minilm-l6's reference; {self.model!r} "
                "has no sentence reference"
            )
        if self.iterations < 1 or self.concurrency < 1:
            raise ValueError("iterations and concurrency must be at least 1")
        if self.shards < 1 or self.replicas < 1:
            raise ValueError("shards and replicas must be at least 1")
        if self.spares is not None and self.spares < 0:
            raise ValueError("spares must be 0 or more")
        if not self.scenarios or not self.strategies:
            raise ValueError("a campaign needs at least one scenario and one strategy")
        if self.fault_duration_s <= 0:
            raise ValueError("the fault duration must be positive")

    @property
    def cells(self) -> int:
        """Scenario x strategy cells."""
        return len(self.scenarios) * len(self.strategies)


@dataclass(frozen=True)
class Answer:
    """One request of the load."""

    request_id: str
    started_at: float
    latency_s: float
    ok: bool
    correct: bool
    recovered: bool
    ep: str
    error: str = ""
    engines: str = ""
    """The engines its shards ran on, sorted and comma-separated."""


@dataclass
class Iteration:
    """One injected fault and what followed it."""

    scenario: str
    strategy: str
    started_at: float
    fault: fi.Fault | None = None
    recoveries: list[recovery_pb2.Recovery] = field(default_factory=list)
    ended_at: float = 0.0
    problem: str = ""
    """Why the iteration did not run as planned (refused, never settled); empty when it did."""


@dataclass
class Cell:
    """A scenario x strategy cell's figures."""

    scenario: str
    strategy: str
    faults: int = 0
    recoveries: int = 0
    succeeded: int = 0
    failures: int = 0
    """Failures recovery took on: its first attempts (a failed attempt is started again,
    and the retry is an attempt of the same failure)."""
    recovered: int = 0
    """Failures whose attempts ended in one that succeeded."""
    durations_ms: list[float] = field(default_factory=list)
    """Succeeded recoveries, detection to the verified answer."""
    effect_ms: list[float] = field(default_factory=list)
    """Succeeded recoveries, from the fault's first effect (as the agent's hook stamped
    it) to the verified answer: detection included."""
    restored_ms: list[float] = field(default_factory=list)
    """Succeeded recoveries, detection until every shard had its replicas and spares
    back (a new spare loaded after a takeover)."""
    detect_ms: list[float] = field(default_factory=list)
    """Per fault: its first effect to the first failure report of a recovery."""
    phase_ms: dict[str, list[float]] = field(default_factory=dict)
    """Succeeded recoveries' phases by name (replace, verify, ...)."""
    after_fault_ms: list[float] = field(default_factory=list)
    """Latencies of the requests started within AFTER_FAULT_S of one of its faults."""
    p99_ratio: float | None = None
    """p99 of ``after_fault_ms`` over the run's fault-free p99: what clients feel."""
    answers: int = 0
    wrong: int = 0
    lost: int = 0
    ep: str = ""
    engines: dict[str, int] = field(default_factory=dict)
    """Recoveries by the engine of the browser that failed."""
    problems: list[str] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        """Failures recovered (their attempts ended in success) over failures; 0 with none."""
        return self.recovered / self.failures if self.failures else 0.0

    def percentile(self, q: float) -> float | None:
        """The q-th percentile of recovery time in ms; None with no recovery."""
        return percentile(self.durations_ms, q)

    def phase_p50(self, name: str) -> float | None:
        """The median of the succeeded recoveries' ``name`` phases in ms."""
        return percentile(self.phase_ms.get(name, []), 50)


AFTER_FAULT_S = 5.0
"""The window after a fault's first effect whose requests count as near it."""

SPARES_WAIT_S = 30.0
"""How long an iteration waits, once settled, for the spares to be back (as many per
shard as the deploy placed) before the next fault: a fault that finds no spare measures
a load, not a takeover. Spares that take longer are logged, not a failure."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile of ``values``; None when there are none."""
    return float(np.percentile(values, q)) if len(values) else None


@dataclass(frozen=True)
class Thresholds:
    """What a campaign must show to pass."""

    min_success_rate: float = 1.0
    """Every cell's recoveries must succeed at least this often."""
    max_p95_ms: float | None = None
    """Every cell's recovery p95 must be at most this, when set."""


def failures(cells: Sequence[Cell], thresholds: Thresholds) -> list[str]:
    """Every threshold a cell breaks, one line each; empty when the campaign passed."""
    broken = []
    for cell in cells:
        name = f"{cell.scenario} x {cell.strategy}"
        if cell.wrong:
            broken.append(f"{name}: {cell.wrong} wrong answer(s)")
        if cell.lost:
            broken.append(f"{name}: {cell.lost} request(s) failed")
        if cell.recoveries == 0:
            broken.append(f"{name}: no recovery was recorded for its {cell.faults} fault(s)")
        elif cell.success_rate < thresholds.min_success_rate:
            broken.append(
                f"{name}: success rate {cell.success_rate:.0%} below "
                f"{thresholds.min_success_rate:.0%}"
            )
        p95 = cell.percentile(95)
        if thresholds.max_p95_ms is not None and p95 is not None and p95 > thresholds.max_p95_ms:
            broken.append(f"{name}: recovery p95 {p95:.0f} ms above {thresholds.max_p95_ms:.0f} ms")
        broken.extend(f"{name}: {problem}" for problem in cell.problems)
    return broken


Progress = Callable[[int, int, str], None]
"""Told (done, total, what is running) after each iteration."""


class Campaign:
    """One campaign run against a running cluster."""

    def __init__(
        self,
        plan: Plan,
        addresses: Addresses,
        *,
        run_id: str = "",
        progress: Progress | None = None,
        cluster_token: str | None = None,
        fault_token: str | None = None,
    ) -> None:
        plan.validate()
        # The tokens the cluster's services were started with; None reads them from the
        # environment (WEBSHARD_CLUSTER_TOKEN, WEBSHARD_FAULT_TOKEN), as the services do.
        if cluster_token is None:
            cluster_token = os.environ.get(CLUSTER_TOKEN_ENV, "")
        if fault_token is None:
            fault_token = os.environ.get(FAULT_TOKEN_ENV, "")
        token = cluster_token or None
        self.plan = plan
        self.run_id = (
            run_id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
        )
        self._addresses = addresses
        self._progress = progress or (lambda done, total, what: None)
        self._client = Client(addresses.coordinators, token=token, timeout=plan.request_timeout_s)
        self._injector = FaultInjectorClient(
            addresses.fault_injector, token=fault_token or token, timeout=30
        )
        self._recovery = RecoveryClient(addresses.recovery, token=token, timeout=30)
        self._metrics = MetricsClient(addresses.metrics, token=token, timeout=60)
        self._expected = _reference(SENTENCES)
        self.answers: list[Answer] = []
        self.iterations: list[Iteration] = []
        self._seen_recoveries: set[str] = set()
        self._ep = ""
        self._spares: dict[int, int] = {}
        """Spares per shard as deployed."""
        self._engines: dict[str, str] = {}
        """Each agent's engine (an agent runs one): what a recovery on it ran on."""

    async def close(self) -> None:
        """Close every client."""
        for client in (self._client, self._injector, self._recovery, self._metrics):
            await client.close()

    async def run(self) -> list[Cell]:
        """Run every strategy x scenario x iteration; return the cells."""
        plan = self.plan
        total = plan.cells * plan.iterations
        for strategy in plan.strategies:
            await self._deploy(strategy)
            stop = asyncio.Event()
            load = [asyncio.create_task(self._load(i, stop)) for i in range(plan.concurrency)]
            try:
                for scenario in plan.scenarios:
                    for iteration in range(plan.iterations):
                        self._progress(len(self.iterations), total, f"{scenario} x {strategy}")
                        self.iterations.append(await self._iteration(scenario, strategy, iteration))
            finally:
                stop.set()
                await asyncio.gather(*load)
        self._progress(total, total, "done")
        await self._ingest()
        return self.cells()

    def cells(self) -> list[Cell]:
        """The figures of every scenario x strategy cell, in plan order."""
        return cells_of(self.plan, self.iterations, self.answers, self._ep, self._engines)

    # --- steps ----------------------------------------------------------------

    async def _deploy(self, strategy: str) -> None:
        plan = self.plan
        placement = await self._client.deploy(
            plan.model,
            sharding=plan.sharding,
            shards=plan.shards,
            replicas=plan.replicas,
            spares=plan.spares,
            runtime=plan.runtime,
            ep=plan.ep,
            recovery_strategy=strategy,
            timeout=300,
        )
        providers = {
            common_pb2.ExecutionProvider.Name(r.execution_provider)
            .removeprefix("EXECUTION_PROVIDER_")
            .lower()
            for shard in placement.shards
            for r in shard.replicas
        }
        self._ep = ",".join(sorted(providers))
        self._spares = {shard.shard.index: len(shard.spares) for shard in placement.shards}
        for agent in await self._client.list_agents():
            found = {b.capabilities.engine for b in agent.browsers} - {""}
            self._engines[agent.agent_id] = ",".join(sorted(found)) or "native"
        # A recovery still running from the cell before may take a spare over at once:
        # the first fault waits for the spares as every later one does.
        await self._settle(time.monotonic() + plan.settle_timeout_s)
        await self._spares_back(time.monotonic() + SPARES_WAIT_S)

    async def _load(self, worker: int, stop: asyncio.Event) -> None:
        index = worker
        while not stop.is_set():
            sentence = index % len(SENTENCES)
            index += self.plan.concurrency
            request_id = uuid.uuid4().hex
            started = time.time()
            clock = time.monotonic()
            try:
                result = await self._client.infer(
                    self.plan.model, texts=[SENTENCES[sentence]], request_id=request_id
                )
            except RPCError as exc:
                self.answers.append(
                    Answer(
                        request_id,
                        started,
                        time.monotonic() - clock,
                        False,
                        False,
                        False,
                        "",
                        str(exc),
                    )
                )
                await asyncio.sleep(0.05)
                continue
            embedding = result.outputs.get("sentence_embedding")
            expected = self._expected[sentence]
            cosine = -1.0  # an answer of another shape is a wrong answer, counted as such
            if embedding is not None and embedding.shape == (1, *expected.shape):
                row = embedding[0]
                cosine = float(row @ expected / (np.linalg.norm(row) * np.linalg.norm(expected)))
            else:
                log.error(
                    "answer of the wrong shape",
                    extra={
                        "request_id": request_id,
                        "shape": None if embedding is None else list(embedding.shape),
                        "trail": [
                            f"{h.shard_index}@{h.agent_id}/{h.browser_id}" for h in result.trail
                        ],
                    },
                )
            self.answers.append(
                Answer(
                    request_id,
                    started,
                    time.monotonic() - clock,
                    True,
                    cosine >= MIN_COSINE,
                    result.recovered,
                    ",".join(sorted({hop.execution_provider for hop in result.trail})),
                    engines=",".join(sorted({hop.engine for hop in result.trail} - {""})),
                )
            )

    async def _iteration(self, scenario: str, strategy: str, iteration: int) -> Iteration:
        plan = self.plan
        record = Iteration(scenario, strategy, time.time())
        deadline = time.monotonic() + plan.settle_timeout_s + plan.fault_duration_s
        labels = {"run_id": self.run_id, "scenario": scenario, "strategy": strategy}
        intensity = common_pb2.Intensity.Value(f"INTENSITY_{plan.intensity.upper()}")
        attempt = 0
        fault = fi.Fault()
        while True:
            placement = await self._client.placement(plan.model)
            try:
                spec = fault_spec(
                    scenario,
                    placement,
                    iteration + attempt,
                    intensity=intensity,
                    duration_s=plan.fault_duration_s,
                    labels=labels,
                )
            except NoTarget as exc:
                # The shard's copies crowd onto one agent (placed while the others were
                # faulty): the coordinator spreads them again once they are trusted.
                refused = str(exc)
            else:
                try:
                    refused = await self._refused_children(spec)
                    if not refused:
                        fault = await self._injector.inject(spec)
                        break
                except (FailedPreconditionError, NotFoundError) as exc:
                    refused = exc.message
            # A breaker on a target is open (or half-open for this intensity): the
            # injector adapts by refusing; or the target went away since the placement
            # was read. Try the next target a little later.
            if time.monotonic() > deadline:
                record.problem = f"no target would take the fault until the deadline: {refused}"
                break
            attempt += 1
            await asyncio.sleep(1.0)
        if not record.problem:
            record.fault = await self._wait_fault(fault, deadline)
            if record.fault.state != fi.FAULT_STATE_REVERTED:
                state = fi.FaultState.Name(record.fault.state).removeprefix("FAULT_STATE_").lower()
                record.problem = f"fault {fault.fault_id} ended {state}: {record.fault.detail}"
            elif any(c.state != fi.FAULT_STATE_REVERTED for c in record.fault.children):
                record.problem = (
                    f"fault {fault.fault_id} ran without all of its children: {record.fault.detail}"
                )
            if not await self._settle(deadline):
                record.problem = record.problem or "the cluster did not become whole again in time"
            elif not await self._spares_back(time.monotonic() + SPARES_WAIT_S):
                log.info(
                    "spares not back before the next fault",
                    extra={"scenario": scenario, "strategy": strategy, "waited_s": SPARES_WAIT_S},
                )
        record.recoveries = await self._recoveries_since(record.started_at)
        if not record.problem and not record.recoveries:
            record.problem = f"fault {fault.fault_id} caused no recovery (was it detected?)"
        record.ended_at = time.time()
        return record

    async def _refused_children(self, spec: fi.FaultSpec) -> str:
        """Why some child of a composite fault would be refused now, or "" (a dry run:
        nothing is injected). A composite with a refused child would still run, with
        fewer failures than its scenario names."""
        if not spec.children:
            return ""
        probe = fi.FaultSpec()
        probe.CopyFrom(spec)
        probe.dry_run = True
        resolved = await self._injector.inject(probe)
        return "; ".join(c.detail for c in resolved.children if c.state == fi.FAULT_STATE_REFUSED)

    async def _wait_fault(self, fault: fi.Fault, deadline: float) -> fi.Fault:
        while fault.state not in TERMINAL_FAULT_STATES and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            fault = await self._injector.get_fault(fault.fault_id)
        return fault

    async def _settle(self, deadline: float) -> bool:
        """Wait until no recovery runs or waits to be started again, every shard has its
        replicas, and no browser launches. (Spares may still be loading: their time is
        each recovery's ``redundancy_restored``.)"""
        quiet_since = None
        while time.monotonic() < deadline:
            if await self._whole():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= 1.0:
                    return True
            else:
                quiet_since = None
            await asyncio.sleep(0.2)
        return False

    async def _spares_back(self, deadline: float) -> bool:
        """Wait until every shard has as many healthy spares as its deploy placed."""
        while time.monotonic() < deadline:
            try:
                placement = await self._client.placement(self.plan.model)
            except RPCError:
                placement = None
            if placement is not None and all(
                sum(r.healthy for r in shard.spares) >= self._spares.get(shard.shard.index, 0)
                for shard in placement.shards
            ):
                return True
            await asyncio.sleep(0.2)
        return False

    async def _whole(self) -> bool:
        try:
            recoveries = await self._recovery.list_recoveries(limit=50)
            placement = await self._client.placement(self.plan.model)
            agents = await self._client.list_agents()
        except RPCError:
            return False
        # A failed recovery about to be started again is not over either.
        running = recovery_pb2.RECOVERY_STATE_RUNNING
        if any(r.state == running or r.retry_pending for r in recoveries):
            return False
        if any(
            len([r for r in shard.replicas if r.healthy]) < self.plan.replicas
            for shard in placement.shards
        ):
            return False
        return not any(
            b.state == common_pb2.BROWSER_STATE_STARTING for a in agents for b in a.browsers
        )

    async def _recoveries_since(self, since: float) -> list[recovery_pb2.Recovery]:
        found = []
        for recovery in await self._recovery.list_recoveries(limit=500):
            started = _seconds(recovery.started_at)
            if recovery.recovery_id in self._seen_recoveries or started < since - 0.5:
                continue
            self._seen_recoveries.add(recovery.recovery_id)
            found.append(recovery)
        return sorted(found, key=lambda r: r.started_at.ToNanoseconds())

    # --- metrics --------------------------------------------------------------

    async def _ingest(self) -> None:
        """Send the run's recoveries and requests to metrics.

        Faults are not sent from here: the fault-injector records every fault as it
        ends, refused ones included, with the run id the campaign put in its labels.
        Breaker transitions come from the recovery service as they happen; the
        report takes them from this run's time window.
        """
        events = []
        for it in self.iterations:
            for recovery in it.recoveries:
                events.append(
                    metrics_pb2.Event(
                        recovery=_recovery_record(
                            recovery,
                            it,
                            self.plan.model,
                            self._ep,
                            self.run_id,
                            breakers_enabled=self._addresses.breakers_enabled,
                            engine=self._engines.get(recovery.report.agent_id, ""),
                        )
                    )
                )
        for answer in self.answers:
            events.append(
                metrics_pb2.Event(request=_request_record(answer, self.plan.model, self.run_id))
            )
        await self._metrics.ingest(events)

    async def report(self, fmt: str) -> bytes:
        """The metrics service's report of this run, in ``fmt``."""
        return await self._metrics.report(format=fmt, run_id=self.run_id)


def _reference(texts: Sequence[str]) -> np.ndarray:
    session = reference_session("minilm-l6")
    return np.asarray(
        session.run(["sentence_embedding"], prepare_inputs("minilm-l6", list(texts)))[0]
    )


def _timestamp(seconds: float) -> Timestamp:
    value = Timestamp()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _provider(eps: str) -> common_pb2.ExecutionProvider.ValueType:
    """The first of a comma-separated list of provider names, as the enum."""
    name = eps.split(",", maxsplit=1)[0].upper() if eps else "UNSPECIFIED"
    return common_pb2.ExecutionProvider.Value(f"EXECUTION_PROVIDER_{name}")


def _recovery_record(
    recovery: recovery_pb2.Recovery,
    it: Iteration,
    model: str,
    ep: str,
    run_id: str,
    *,
    breakers_enabled: bool,
    engine: str = "",
) -> metrics_pb2.RecoveryRecord:
    return metrics_pb2.RecoveryRecord(
        recovery_id=recovery.recovery_id,
        fault_id=it.fault.fault_id if it.fault is not None else "",
        scenario=it.scenario,
        strategy=common_pb2.RecoveryStrategy.Value(f"RECOVERY_STRATEGY_{it.strategy.upper()}"),
        model=model,
        execution_provider=_provider(ep),
        succeeded=recovery.state == recovery_pb2.RECOVERY_STATE_SUCCEEDED,
        started_at=recovery.started_at,
        duration=recovery.duration,
        phases=[
            metrics_pb2.PhaseRecord(
                name=phase.name,
                level=recovery_pb2.EscalationLevel.Name(phase.level)
                .removeprefix("ESCALATION_LEVEL_")
                .lower(),
                duration=phase.duration,
                ok=phase.ok,
            )
            for phase in recovery.phases
        ],
        trace_id=recovery.trace_id,
        run_id=run_id,
        breakers_enabled=breakers_enabled,
        redundancy_restored=recovery.redundancy_restored
        if recovery.HasField("redundancy_restored")
        else None,
        engine=engine,
    )


def _request_record(answer: Answer, model: str, run_id: str) -> metrics_pb2.RequestRecord:
    return metrics_pb2.RequestRecord(
        request_id=answer.request_id,
        model=model,
        started_at=_timestamp(answer.started_at),
        latency=duration(answer.latency_s),
        ok=answer.ok,
        correct=answer.correct,
        checked=answer.ok,
        recovered=answer.recovered,
        run_id=run_id,
        execution_provider=_provider(answer.ep),
        engines=answer.engines,
    )


def cells_of(
    plan: Plan,
    iterations: Sequence[Iteration],
    answers: Sequence[Answer],
    ep: str,
    engines: Mapping[str, str] | None = None,
) -> list[Cell]:
    """The figures of every scenario x strategy cell of a run, in plan order; ``engines``
    names each agent's engine (a recovery counts for its failed browser's agent)."""
    cells = {  # in plan order: by scenario, then strategy
        (scenario, strategy): Cell(scenario, strategy, ep=ep)
        for scenario in plan.scenarios
        for strategy in plan.strategies
    }
    attempts = {r.recovery_id: r for it in iterations for r in it.recoveries}
    retries = {r.retried_by for r in attempts.values() if r.retried_by}
    near: set[int] = set()  # answers started within AFTER_FAULT_S of a fault
    for it in iterations:
        cell = cells[(it.scenario, it.strategy)]
        cell.faults += 1
        if it.problem:
            cell.problems.append(it.problem)
        effect = (
            _seconds(it.fault.injected_at)
            if it.fault is not None and it.fault.HasField("injected_at")
            else None
        )
        for recovery in it.recoveries:
            cell.recoveries += 1
            engine = (engines or {}).get(recovery.report.agent_id)
            if engine:
                cell.engines[engine] = cell.engines.get(engine, 0) + 1
            if recovery.recovery_id not in retries:
                cell.failures += 1
                cell.recovered += _ends_in_success(recovery, attempts)
            if recovery.state != recovery_pb2.RECOVERY_STATE_SUCCEEDED:
                continue
            cell.succeeded += 1
            cell.durations_ms.append(recovery.duration.ToNanoseconds() / 1e6)
            if recovery.HasField("redundancy_restored"):
                cell.restored_ms.append(recovery.redundancy_restored.ToNanoseconds() / 1e6)
            start = effect if effect is not None else _seconds(recovery.started_at)
            cell.effect_ms.append((_seconds(recovery.finished_at) - start) * 1000)
            for phase in recovery.phases:
                cell.phase_ms.setdefault(phase.name, []).append(
                    phase.duration.ToNanoseconds() / 1e6
                )
        if effect is not None and it.recoveries:
            first = min(_seconds(r.started_at) for r in it.recoveries)
            cell.detect_ms.append(max(0.0, first - effect) * 1000)
        for i, answer in enumerate(answers):
            if it.started_at <= answer.started_at < it.ended_at:
                cell.answers += 1
                cell.wrong += answer.ok and not answer.correct
                cell.lost += not answer.ok
            if effect is not None and effect <= answer.started_at < effect + AFTER_FAULT_S:
                near.add(i)
                if answer.ok:
                    cell.after_fault_ms.append(answer.latency_s * 1000)
    quiet = percentile(
        [a.latency_s * 1000 for i, a in enumerate(answers) if i not in near and a.ok],
        99,
    )
    for cell in cells.values():
        loud = percentile(cell.after_fault_ms, 99)
        if loud is not None and quiet:
            cell.p99_ratio = loud / quiet
    return list(cells.values())


def summary_line(cells: Sequence[Cell]) -> str:
    """Totals over every cell."""
    answers = sum(c.answers for c in cells)
    durations = [d for c in cells for d in c.durations_ms]
    median = f"{statistics.median(durations):.0f} ms" if durations else "-"
    return (
        f"{sum(c.faults for c in cells)} faults, {sum(c.recoveries for c in cells)} recoveries "
        f"(median {median}), {answers} answers checked, "
        f"{sum(c.wrong for c in cells)} wrong, {sum(c.lost for c in cells)} failed"
    )


def _ends_in_success(
    recovery: recovery_pb2.Recovery, attempts: Mapping[str, recovery_pb2.Recovery]
) -> bool:
    """Whether this attempt, or the retries that followed it, succeeded."""
    seen: set[str] = set()
    while recovery.state == recovery_pb2.RECOVERY_STATE_FAILED and recovery.retried_by:
        if recovery.retried_by in seen or recovery.retried_by not in attempts:
            return False
        seen.add(recovery.retried_by)
        recovery = attempts[recovery.retried_by]
    return recovery.state == recovery_pb2.RECOVERY_STATE_SUCCEEDED


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9
