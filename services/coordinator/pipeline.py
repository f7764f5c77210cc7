"""Running one request through a deployed model's chain of shards.

The request keeps every tensor it has produced (its inputs and each shard's
outputs: the boundary activations) for its whole life. Each shard takes the
tensors it names from that set, so when a hop fails the shard is re-run on
another replica from its own input, not the whole model from the start.

Every hop (every attempt of a shard on one replica) is a span "hop", a child of
the request's span; the agent's span for the activation is a child of it.

Each stage also keeps, past the request, the feeds and outputs of its last
successful hop on a serving replica when they are small (``KeptActivation``): a
recovery then checks a replica that took a failed one's place by running that one
shard from them (``Pipeline.verify_shard``), not the whole model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.tensors import decode_tensor

from services.common.durations import duration
from services.common.errors import DomainError
from services.coordinator.links import HopError

log = logging.getLogger(__name__)

_tracer = trace.get_tracer(__name__)

MAX_KEPT_ACTIVATION_BYTES = 1 << 20
"""The most a stage keeps of a hop for VerifyShard: its feeds and outputs together, as
encoded. A bigger request is not held in memory after it ends; the stage keeps the
last small one instead."""

VERIFY_TOLERANCE = 1e-3
"""A verify passes when max |answer - kept| <= VERIFY_TOLERANCE x max(1, max |kept|).
Execution providers (native CPU, wasm, webgpu) round floats differently, so one shard's
outputs agree closely across them (within 4e-6 measured on MiniLM) but not bit for bit;
relative to the outputs' scale, so large activations are not held to an absolute bound."""


class InferError(DomainError):
    """A request that cannot be answered; ``code`` is the gRPC status."""


@dataclass
class Replica:
    """One copy of a shard the pipeline may run."""

    agent_id: str
    browser_id: str
    handle: str
    execution_provider: int
    healthy: bool = True
    engine: str = ""
    """``chromium``, ``firefox`` or ``native``; empty where a placement predates it."""


@dataclass(frozen=True)
class KeptActivation:
    """A shard's feeds and outputs from one successful hop on a serving replica."""

    feeds: tuple[common_pb2.Tensor, ...]
    outputs: tuple[common_pb2.Tensor, ...]
    agent_id: str
    browser_id: str
    """The replica whose hop produced ``outputs``."""


@dataclass
class Stage:
    """One shard of the chain, its replicas and its hot spares."""

    index: int
    input_names: Sequence[str]
    output_names: Sequence[str]
    replicas: list[Replica]
    turns: int = 0
    """Requests routed so far; the healthy replicas take turns."""
    spares: list[Replica] = field(default_factory=list)
    """Hot spares: never routed to (``order`` leaves them out), only run when pinned
    (their warm-up, a probe)."""
    sha256: str = ""
    """The shard file's digest: a kept activation carries over to a stage of the same file."""
    kept: KeptActivation | None = None
    """The last small boundary activation a serving replica answered (see ``keep``)."""

    def keep(
        self,
        feeds: Sequence[common_pb2.Tensor],
        outputs: Sequence[common_pb2.Tensor],
        replica: Replica,
    ) -> bool:
        """Keep a successful hop's feeds and outputs, unless together they are larger
        than MAX_KEPT_ACTIVATION_BYTES (the previous one stays then); True when kept.

        Copies: a tensor that is part of a bigger message (a request's input beside a
        large one it does not feed) would keep that whole message alive.
        """
        size = 0
        for tensor in (*feeds, *outputs):
            size += tensor.ByteSize()
            if size > MAX_KEPT_ACTIVATION_BYTES:
                return False
        self.kept = KeptActivation(
            tuple(_copy(t) for t in feeds),
            tuple(_copy(t) for t in outputs),
            replica.agent_id,
            replica.browser_id,
        )
        return True

    def order(self) -> list[Replica]:
        """The replicas to try for the next request: the healthy ones in turn (so each
        shares the load, and a failed one is found by the next request it gets), then
        the unhealthy ones as a last resort."""
        healthy = [r for r in self.replicas if r.healthy]
        self.turns += 1
        if healthy:
            start = self.turns % len(healthy)
            healthy = healthy[start:] + healthy[:start]
        return healthy + [r for r in self.replicas if not r.healthy]


def _copy(tensor: common_pb2.Tensor) -> common_pb2.Tensor:
    copy = common_pb2.Tensor()
    copy.CopyFrom(tensor)
    return copy


# Runs one hop: (replica, request id, input tensors, timeout) -> agent's reply outputs,
# compute time in ms.
HopRunner = Callable[
    [Replica, str, Sequence[common_pb2.Tensor], float],
    Awaitable[tuple[Sequence[common_pb2.Tensor], float]],
]
# Told about every failed hop: (model, stage, replica, error).
FailureSink = Callable[[str, Stage, Replica, HopError], None]


@dataclass
class Pipeline:
    """A deployed model's stages and the hooks that run and report hops."""

    model: str
    stages: list[Stage]
    run_hop: HopRunner
    on_failure: FailureSink
    outputs: Sequence[str] = field(default_factory=list)
    output_shapes: Mapping[str, Sequence[int | str]] = field(default_factory=dict)
    """The model's outputs' declared shapes (a str dim is dynamic): a hop that answers
    one in another shape failed, whatever its status said."""

    async def run(
        self,
        request_id: str,
        inputs: Sequence[common_pb2.Tensor],
        deadline: float,
        pins: Mapping[int, Pin] | None = None,
    ) -> pb.InferResponse:
        """Run every stage in order; replay a failed stage on its next replica.

        A pinned stage runs on its pinned replica only: a failure there ends the
        request (a probe of that replica), and is not reported as a failure.
        """
        started = time.monotonic()
        tensors = {t.name: t for t in inputs}
        trail: list[common_pb2.ShardTiming] = []
        recovered = False
        for stage in self.stages:
            feeds = [tensors[name] for name in stage.input_names]
            pin = (pins or {}).get(stage.index)
            if pin is not None:
                probed, timing = await self._probe(stage, pin, request_id, feeds, deadline)
                tensors.update(probed)
                trail.append(timing)
                continue
            order = stage.order()
            errors: list[str] = []
            for attempt, replica in enumerate(order, start=1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InferError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"deadline passed before shard {stage.index} could run",
                    )
                hop_started = time.monotonic()
                try:
                    outputs, compute_ms = await self._hop(
                        stage, replica, feeds, remaining, request_id=request_id, attempt=attempt
                    )
                except HopError as exc:
                    errors.append(str(exc))
                    if not exc.retryable_elsewhere:
                        raise InferError(exc.code, f"shard {stage.index}: {exc.message}") from exc
                    replica.healthy = False
                    self.on_failure(self.model, stage, replica, exc)
                    recovered = True
                    continue
                replica.healthy = True
                stage.keep(feeds, outputs, replica)
                for tensor in outputs:
                    tensors[tensor.name] = tensor
                trail.append(_timing(stage, replica, compute_ms, hop_started, attempt))
                break
            else:
                raise InferError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"shard {stage.index} of {self.model}: every replica failed: "
                    + "; ".join(errors),
                )
        missing = [name for name in self.outputs if name not in tensors]
        if missing:
            raise InferError(grpc.StatusCode.INTERNAL, f"the chain produced no {missing}")
        return pb.InferResponse(
            request_id=request_id,
            outputs=[tensors[name] for name in self.outputs],
            trail=trail,
            total=duration(time.monotonic() - started),
            recovered=recovered,
        )

    async def verify_shard(self, shard_index: int, pin: Pin, deadline: float) -> ShardCheck:
        """Run one shard once on the copy ``pin`` names, from the stage's kept activation,
        and compare its outputs with the kept ones.

        The hop is pinned: a failure is not reported as a data-path failure (as a probe,
        it marks the copy unhealthy). A different answer is a ShardCheck that did not
        pass. Raises InferError: NOT_FOUND for an unknown shard or copy,
        FAILED_PRECONDITION when nothing is kept, UNAVAILABLE when the hop failed.
        """
        stage = next((s for s in self.stages if s.index == shard_index), None)
        if stage is None:
            raise InferError(
                grpc.StatusCode.NOT_FOUND,
                f"{self.model} has no shard {shard_index} (it has {len(self.stages)})",
            )
        if not any(pin.matches(r) for r in [*stage.replicas, *stage.spares]):
            raise InferError(
                grpc.StatusCode.NOT_FOUND,
                f"shard {shard_index} of {self.model} has no replica on {pin}",
            )
        kept = stage.kept
        if kept is None:
            raise InferError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no activation of shard {shard_index} of {self.model} is kept (no small "
                "request has run through it on this leader): verify with a whole inference",
            )
        try:
            outputs, timing = await self._probe(
                stage, pin, f"verify-{uuid.uuid4().hex}", kept.feeds, deadline
            )
        except InferError as exc:
            raise InferError(
                grpc.StatusCode.UNAVAILABLE,
                f"verifying shard {shard_index} of {self.model} on {pin}: the hop failed "
                f"({exc.code.name}): {exc.message}",
            ) from exc
        difference, tolerance = compare_outputs(kept.outputs, outputs)
        return ShardCheck(timing, difference, tolerance, kept)

    async def _hop(
        self,
        stage: Stage,
        replica: Replica,
        feeds: Sequence[common_pb2.Tensor],
        timeout: float,
        *,
        request_id: str,
        attempt: int,
        pinned: bool = False,
    ) -> tuple[Sequence[common_pb2.Tensor], float]:
        """One hop, in its own span (current while it runs, so the agent's span is its child)."""
        with _tracer.start_as_current_span(
            "hop",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "model.name": self.model,
                "shard.index": stage.index,
                "agent.id": replica.agent_id,
                "browser.id": replica.browser_id,
                "hop.attempt": attempt,
                "hop.pinned": pinned,
                "request.id": request_id,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                outputs, compute_ms = await self.run_hop(replica, request_id, feeds, timeout)
                self._check_shapes(stage, replica, outputs)
                return outputs, compute_ms
            except HopError as exc:
                span.set_attribute("rpc.grpc.status_code", exc.code.value[0])
                span.set_status(Status(StatusCode.ERROR, exc.message))
                raise

    def _check_shapes(
        self, stage: Stage, replica: Replica, outputs: Sequence[common_pb2.Tensor]
    ) -> None:
        """Raise HopError when a model output a hop answered has another rank or fixed dim
        than the model declares (a runtime that ran another graph, say)."""
        for tensor in outputs:
            declared = self.output_shapes.get(tensor.name)
            if declared is None:
                continue
            shape = list(tensor.shape)
            if len(shape) != len(declared) or any(
                isinstance(want, int) and got != want
                for got, want in zip(shape, declared, strict=True)
            ):
                raise HopError(
                    replica.agent_id,
                    grpc.StatusCode.INTERNAL,
                    f"shard {stage.index} on {replica.browser_id} answered {tensor.name} "
                    f"of shape {shape}; {self.model} declares {list(declared)}",
                )

    async def _probe(
        self,
        stage: Stage,
        pin: Pin,
        request_id: str,
        feeds: Sequence[common_pb2.Tensor],
        deadline: float,
    ) -> tuple[dict[str, common_pb2.Tensor], common_pb2.ShardTiming]:
        replica = next((r for r in [*stage.replicas, *stage.spares] if pin.matches(r)), None)
        if replica is None:
            raise InferError(
                grpc.StatusCode.NOT_FOUND,
                f"shard {stage.index} of {self.model} has no replica on {pin}",
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise InferError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline passed before shard {stage.index} could run",
            )
        hop_started = time.monotonic()
        try:
            outputs, compute_ms = await self._hop(
                stage, replica, feeds, remaining, request_id=request_id, attempt=1, pinned=True
            )
        except HopError as exc:
            replica.healthy = False
            raise InferError(
                exc.code, f"shard {stage.index} on {pin} (pinned): {exc.message}"
            ) from exc
        replica.healthy = True
        timing = _timing(stage, replica, compute_ms, hop_started, 1)
        return {tensor.name: tensor for tensor in outputs}, timing


@dataclass(frozen=True)
class ShardCheck:
    """One shard run again from its kept activation, against the kept outputs."""

    timing: common_pb2.ShardTiming
    max_abs_difference: float
    tolerance: float
    kept: KeptActivation

    @property
    def passed(self) -> bool:
        """Whether the answer is the kept one, within the tolerance."""
        return self.max_abs_difference <= self.tolerance


def compare_outputs(
    kept: Sequence[common_pb2.Tensor], answer: Mapping[str, common_pb2.Tensor]
) -> tuple[float, float]:
    """The largest |answer - kept| over every kept output's elements, and the tolerance
    (VERIFY_TOLERANCE x max(1, largest |kept|)). An output missing from ``answer``, of
    another shape, or with a NaN on either side differs by +inf."""
    difference = 0.0
    scale = 1.0
    for tensor in kept:
        expected = decode_tensor(tensor).astype(np.float64)
        if expected.size:
            largest = float(np.max(np.abs(expected)))
            if math.isfinite(largest):
                scale = max(scale, largest)
        got = answer.get(tensor.name)
        actual = None if got is None else decode_tensor(got).astype(np.float64)
        if actual is None or actual.shape != expected.shape:
            difference = math.inf
            continue
        if expected.size:
            apart = float(np.max(np.abs(actual - expected)))
            difference = max(difference, math.inf if math.isnan(apart) else apart)
    return difference, VERIFY_TOLERANCE * scale


@dataclass(frozen=True)
class Pin:
    """A shard routed to one replica: on ``agent_id``, in ``browser_id`` (any when empty)."""

    agent_id: str
    browser_id: str = ""

    def matches(self, replica: Replica) -> bool:
        """True when ``replica`` is the pinned one."""
        return replica.agent_id == self.agent_id and self.browser_id in ("", replica.browser_id)

    def __str__(self) -> str:
        return f"{self.agent_id}/{self.browser_id or '*'}"


def _timing(
    stage: Stage, replica: Replica, compute_ms: float, hop_started: float, attempt: int
) -> common_pb2.ShardTiming:
    return common_pb2.ShardTiming(
        shard_index=stage.index,
        agent_id=replica.agent_id,
        browser_id=replica.browser_id,
        execution_provider=replica.execution_provider,  # type: ignore[arg-type]
        compute=duration(compute_ms / 1000),
        hop=duration(time.monotonic() - hop_started),
        attempts=attempt,
        engine=replica.engine,
    )


class RequestLedger:
    """Makes request ids idempotent: one execution per id, its answer kept for retries.

    A request that failed is forgotten, so a retry runs it again; one that
    succeeded is answered from here for ``ttl_s`` seconds (and up to ``capacity``
    answers), so a retry after a lost response never runs the model twice. As with
    idempotency keys, the id stands for one request: a request that reuses it but
    asks something else (another fingerprint) is refused, never given the other's
    answer.

    ``replicated`` looks an id up among the answers every replica keeps (recorded
    through ``record``, which the leader replicates): so a retry that reaches a new
    leader after the old one answered is answered from there, not run again.
    """

    def __init__(
        self,
        ttl_s: float = 300.0,
        capacity: int = 10_000,
        *,
        replicated: Callable[[str], tuple[bytes, pb.InferResponse] | None] = lambda _: None,
        record: Callable[[str, bytes, pb.InferResponse], None] = lambda *_: None,
    ) -> None:
        self._ttl = ttl_s
        self._capacity = capacity
        self._replicated = replicated
        self._record = record
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    async def answer(
        self,
        request_id: str,
        fingerprint: bytes,
        run: Callable[[], Awaitable[pb.InferResponse]],
        *,
        keep: bool = True,
    ) -> pb.InferResponse:
        """The answer for ``request_id``: from the ledger, or by running ``run`` once.

        ``keep`` False: the id was made up for this request (no retry can name it), so
        its answer is not recorded for other replicas. Raises InferError
        (INVALID_ARGUMENT) when the id is held by a request with another ``fingerprint``.
        """
        self._expire()
        entry = self._entries.get(request_id)
        if entry is not None:
            self._check(request_id, entry.fingerprint, fingerprint)
            return await asyncio.shield(entry.future)
        kept = self._replicated(request_id)
        if kept is not None:
            self._check(request_id, kept[0], fingerprint)
            return kept[1]
        future: asyncio.Future[pb.InferResponse] = asyncio.get_running_loop().create_future()
        self._entries[request_id] = _Entry(time.monotonic(), fingerprint, future)
        try:
            response = await run()
        except BaseException as exc:
            del self._entries[request_id]
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved, so a future nobody awaits logs nothing
            else:
                future.cancel()
            raise
        future.set_result(response)
        if keep:
            self._record(request_id, fingerprint, response)
        return response

    def _check(self, request_id: str, held: bytes, asked: bytes) -> None:
        if held != asked:
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request id {request_id[:64]!r} was used for a different request in "
                f"the last {self._ttl:.0f} s; send a new id for a new request",
            )

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            request_id, entry = next(iter(self._entries.items()))
            if not entry.future.done() or (
                now - entry.at < self._ttl and len(self._entries) <= self._capacity
            ):
                break
            del self._entries[request_id]


@dataclass(frozen=True)
class _Entry:
    at: float
    fingerprint: bytes
    future: asyncio.Future[pb.InferResponse]
