"""The actuator the running service uses: the coordinator, through the SDK.

Every action is a real call that changes or probes the cluster:

- ``retry_in_place`` runs one inference with the failed shard pinned to the failed
  replica (no replay elsewhere): it passes only when that replica answers again;
- ``reconnect`` reopens the coordinator's activation stream to the agent and waits
  (briefly) for the browser's page to be connected to its agent;
- ``replace_on_standby`` moves the shard's replica off the failed browser onto an
  idle browser or a warm standby (CoordinatorService.ReplaceShard);
- ``restart_browser`` has the agent put a standby (or a fresh launch) in the
  browser's place and reload its shards (CoordinatorService.RestartBrowser);
- ``barrier`` / ``resume`` hold and release new requests for the model on the
  leader (PauseModel / ResumeModel);
- ``verify`` checks each replica this actuator moved the target's shards to with one
  hop from the boundary activation the coordinator kept (VerifyShard); after any
  other action, or when the coordinator kept nothing, it runs one inference through
  the whole model. Either way it then checks that no replica on the failed browser
  (or agent) is still marked unhealthy in the placement.

Restarting an agent needs its workload controller (a Kubernetes pod delete, a
local supervisor); this actuator has none, so that action reports itself
unavailable and the strategy treats the level as failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from webshard.aio import Client, InferResult
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RPCError,
    UnavailableError,
    UnimplementedError,
)

from services.common.tracing import client_interceptors
from services.recovery.execution import ActionFailed, ActionResult, ActionUnavailable
from services.recovery.probes import ClusterView, HeldShard, InputUnavailable
from services.recovery.strategies import ModelPlacement, Replica, Strategy, Target

log = logging.getLogger(__name__)

MAX_REMEMBERED_MOVES = 1024
"""Moves kept for the verify that follows them, at most: a move whose verify never
runs (its rung failed on another shard) is dropped, oldest first."""

Runtime = tuple[str, str]
"""An (agent_id, browser_id) pair."""


def placement_from_proto(placement: coordinator_pb2.Placement) -> ModelPlacement:
    """The parts of a coordinator placement recovery plans with."""
    strategy = (
        Strategy(placement.recovery_strategy)
        if placement.recovery_strategy in {s.value for s in Strategy}
        else None
    )
    return ModelPlacement(
        model=placement.model,
        strategy=strategy,
        replicas={
            shard.shard.index: tuple(
                Replica(r.agent_id, r.browser_id, r.healthy) for r in shard.replicas
            )
            for shard in placement.shards
        },
        spares={
            shard.shard.index: tuple(
                Replica(r.agent_id, r.browser_id, r.healthy) for r in shard.spares
            )
            for shard in placement.shards
        },
    )


class CoordinatorActuator:
    """Acts through the coordinator replicas at ``coordinators``.

    Args:
        coordinators: the coordinator replica addresses; the client finds the leader.
        verify_text: the text a verify inference sends to a text model.
        timeout_s: the deadline of each coordinator call.
        reconnect_wait_s: how long a reconnect waits for the browser's page.
        max_pause_s: the longest a barrier holds a model if its resume never comes.
        token: the cluster token, which the coordinator requires of the calls that act.
        client: a client to use instead of one made from ``coordinators`` (tests).
        avoid: the runtimes (agent, browser) a shard must not move to now (recoveries
            under way, open breakers); browser "" names a whole agent.
    """

    def __init__(
        self,
        coordinators: Sequence[str],
        *,
        verify_text: str = "webshard recovery check",
        timeout_s: float = 30.0,
        reconnect_wait_s: float = 2.0,
        max_pause_s: float = 10.0,
        token: str = "",
        client: Client | None = None,
        avoid: Callable[[], Sequence[tuple[str, str]]] = lambda: (),
    ) -> None:
        self.avoid = avoid
        # The client's calls carry the current span (a recovery's phase) as their
        # parent, so what the coordinator and its agents do belongs to the recovery's trace.
        self._client = client or Client(
            list(coordinators),
            token=token or None,
            timeout=timeout_s,
            interceptors=client_interceptors(),
        )
        self._verify_text = verify_text
        self._timeout_s = timeout_s
        self._reconnect_wait_s = reconnect_wait_s
        self._max_pause_s = max_pause_s
        self._barriers: dict[str, str] = {}
        """model -> the barrier id this actuator holds on it."""
        # Models that refused text once are verified with example tensors from then on.
        self._tensor_models: set[str] = set()
        self._moves: OrderedDict[tuple[str, int, Runtime], Runtime] = OrderedDict()
        """(model, shard, failed runtime) -> the replica ReplaceShard put in its place,
        until a verify of that target checks it."""

    async def close(self) -> None:
        """Close the coordinator client."""
        await self._client.close()

    async def placement(self, model: str) -> ModelPlacement | None:
        """The model's placement; None when it is not deployed."""
        try:
            placement = await self._client.placement(model, timeout=self._timeout_s)
        except NotFoundError:
            return None
        return placement_from_proto(placement)

    async def cluster_status(self) -> ClusterView:
        """Every shard replica and every registered agent, as a breaker probe plans with."""
        status = await self._client.cluster_status(timeout=self._timeout_s)
        return ClusterView(
            shards=[
                HeldShard(placement.model, shard.shard.index, r.agent_id, r.browser_id)
                for placement in sorted(status.placements, key=lambda p: p.model)
                for shard in sorted(placement.shards, key=lambda s: s.shard.index)
                for r in shard.replicas
            ],
            agents={agent.agent_id: agent.address for agent in status.agents},
        )

    async def infer_pinned(self, model: str, shard_index: int, where: str) -> float:
        """One inference of ``model`` with its shard pinned to ``where`` (a probe of that
        replica); the coordinator's total milliseconds.

        Raises:
            RPCError: the inference failed.
            InputUnavailable: the model takes no text and has no example inputs.
        """
        try:
            result = await self._infer(model, pins={shard_index: where})
        except KeyError as exc:
            raise InputUnavailable(f"{model} takes no text and has no example inputs") from exc
        return result.total_ms

    async def retry_in_place(self, target: Target) -> ActionResult:
        """Probe the failed replica: one inference with its shard pinned there."""
        if not target.model or target.shard_index < 0:
            raise ActionUnavailable("the report names no model and shard to retry")
        where = f"{target.agent_id}/{target.browser_id}" if target.browser_id else target.agent_id
        try:
            result = await self._infer(target.model, pins={target.shard_index: where})
        except RPCError as exc:
            raise ActionFailed(
                f"shard {target.shard_index} on {where} still fails: {exc}",
                failed_on=[(target.agent_id, target.browser_id)],
            ) from exc
        return ActionResult(
            f"shard {target.shard_index} answered on {where} in {result.total_ms:.1f} ms",
            served_by=((target.agent_id, target.browser_id),),
        )

    async def reconnect(self, target: Target) -> ActionResult:
        """Reopen the activation stream to the agent; wait for the browser's page."""
        try:
            detail = await self._client.reconnect_agent(
                target.agent_id,
                target.browser_id,
                wait_s=self._reconnect_wait_s,
                timeout=self._timeout_s,
            )
        except RPCError as exc:
            raise ActionFailed(f"reconnecting {target.agent_id}: {exc}") from exc
        return ActionResult(detail)

    async def replace_on_standby(self, target: Target) -> ActionResult:
        """Move the shard's replica off the failed browser onto an idle browser or standby."""
        if not target.model or target.shard_index < 0:
            raise ActionUnavailable("the report names no model and shard to re-place")
        try:
            moved = await self._client.replace_shard(
                target.model,
                target.shard_index,
                target.agent_id,
                target.browser_id,
                avoid=self.avoid(),
                timeout=self._timeout_s,
            )
        except RPCError as exc:
            raise ActionFailed(f"shard {target.shard_index} of {target.model}: {exc}") from exc
        if not moved.HasField("replica"):
            return ActionResult(
                f"shard {target.shard_index} of {target.model} had already moved off "
                f"{target.agent_id}/{target.browser_id or '*'}"
            )
        self._remember_move(target, (moved.replica.agent_id, moved.replica.browser_id))
        to = f"{moved.replica.agent_id}/{moved.replica.browser_id}"
        return ActionResult(
            f"shard {target.shard_index} of {target.model} moved to {to}"
            + (" (a warm standby)" if moved.from_standby else "")
        )

    async def restart_browser(self, target: Target) -> ActionResult:
        """Put a standby (or a fresh launch) in the browser's place, its shards reloaded."""
        if not target.browser_id:
            raise ActionUnavailable("the report names no browser to restart")
        try:
            restarted = await self._client.restart_browser(
                target.agent_id, target.browser_id, timeout=self._timeout_s
            )
        except RPCError as exc:
            raise ActionFailed(f"restarting {target.agent_id}/{target.browser_id}: {exc}") from exc
        how = "a warm standby" if restarted.from_standby else "a cold launch"
        return ActionResult(
            f"{target.agent_id}/{target.browser_id} replaced by {restarted.browser_id} "
            f"({how}), {restarted.moved_shards} shard(s) reloaded"
        )

    async def restart_agent(self, target: Target) -> ActionResult:
        """Unavailable: restarting an agent needs its workload controller."""
        raise ActionUnavailable(
            "restarting an agent needs its workload controller (a pod delete in Kubernetes)"
        )

    async def barrier(self, target: Target) -> ActionResult:
        """Hold new requests for the model on the leader."""
        if not target.model:
            raise ActionUnavailable("the report names no model to hold")
        try:
            self._barriers[target.model] = await self._client.pause_model(
                target.model, max_pause_s=self._max_pause_s, timeout=self._timeout_s
            )
        except RPCError as exc:
            raise ActionFailed(f"pausing {target.model}: {exc}") from exc
        return ActionResult(f"new requests for {target.model} held")

    async def resume(self, target: Target) -> ActionResult:
        """Release the model's barrier; the held requests run."""
        barrier_id = self._barriers.pop(target.model, "")
        try:
            resumed = await self._client.resume_model(
                target.model, barrier_id, timeout=self._timeout_s
            )
        except RPCError as exc:
            raise ActionFailed(f"resuming {target.model}: {exc}") from exc
        if resumed.already_lifted:
            return ActionResult(f"the barrier on {target.model} had already lifted")
        return ActionResult(
            f"{target.model} resumed after {resumed.paused.ToMilliseconds()} ms; "
            f"{resumed.held_requests} request(s) had waited"
        )

    def _remember_move(self, target: Target, to: Runtime) -> None:
        key = (target.model, target.shard_index, (target.agent_id, target.browser_id))
        self._moves[key] = to
        self._moves.move_to_end(key)
        while len(self._moves) > MAX_REMEMBERED_MOVES:
            self._moves.popitem(last=False)

    def _take_moves(self, target: Target) -> list[tuple[int, Runtime]]:
        """The moves of the target's shards (every shard of its model on its browser when
        it names none), in chain order; forgotten here, as their verify is running."""
        failed = (target.agent_id, target.browser_id)
        keys = [
            key
            for key in self._moves
            if key[0] == target.model and key[2] == failed and target.shard_index in (-1, key[1])
        ]
        return sorted((key[1], self._moves.pop(key)) for key in keys)

    async def verify(self, target: Target) -> ActionResult:
        """Check that the target's model answers correctly again.

        When this actuator moved the target's shards (``replace_on_standby``), run each
        once on its new replica from the activation the coordinator kept, and pass when
        every answer matches it. Otherwise (the shard was retried, reconnected or
        restarted in place), or when the coordinator kept no activation, run one
        inference through the whole model and pass when it returns finite outputs.
        """
        if not target.model:
            return ActionResult("the report names no model; nothing to verify")
        moves = self._take_moves(target)
        checked = await self._verify_moves(target.model, moves) if moves else None
        if checked is not None:
            still_unhealthy = await self._unhealthy_on(target)
            if still_unhealthy:
                raise ActionFailed(
                    f"the moved shard(s) answered, but replica(s) of shard(s) "
                    f"{', '.join(map(str, still_unhealthy))} of {target.model} on "
                    f"{target.agent_id}/{target.browser_id or '*'} are still unhealthy",
                    failed_on=[(target.agent_id, target.browser_id)],
                )
            return checked
        try:
            result = await self._infer(target.model)
        except RPCError as exc:
            raise ActionFailed(f"{target.model} did not answer: {exc}") from exc
        except KeyError as exc:  # a deployed model the catalogue has no example inputs for
            raise ActionFailed(f"{target.model} takes no text and has no example inputs") from exc
        still_unhealthy = await self._unhealthy_on(target)
        if still_unhealthy:
            raise ActionFailed(
                f"{target.model} answered, but its replica(s) of shard(s) "
                f"{', '.join(map(str, still_unhealthy))} on "
                f"{target.agent_id}/{target.browser_id or '*'} are still unhealthy",
                failed_on=[(target.agent_id, target.browser_id)],
            )
        bad = _non_finite(result.outputs)
        hops = {(hop.agent_id, hop.browser_id) for hop in result.trail}
        if bad:
            raise ActionFailed(
                f"{target.model} answered with non-finite values in {', '.join(bad)}",
                failed_on=sorted(hops),
            )
        trail = ", ".join(
            f"{hop.shard_index}@{hop.agent_id}/{hop.browser_id}"
            + (f" ({hop.attempts} tries)" if hop.attempts > 1 else "")
            for hop in result.trail
        )
        return ActionResult(
            f"{target.model} answered in {result.total_ms:.1f} ms; shards {trail}",
            served_by=tuple(sorted(hops)),
        )

    async def _verify_moves(
        self, model: str, moves: Sequence[tuple[int, Runtime]]
    ) -> ActionResult | None:
        """Each moved shard run once on its new replica from the kept activation (one
        VerifyShard each); None when the coordinator cannot (nothing kept, the replica
        is no longer there, a coordinator older than VerifyShard): the caller verifies
        with a whole inference then.

        Raises ActionFailed naming the replica when its hop fails or it answers
        differently from the kept outputs.
        """
        # The shards run at once (each on its own replica); answers are read in order.
        checks = await asyncio.gather(
            *(
                self._client.verify_shard(
                    model, shard_index, agent_id, browser_id, timeout=self._timeout_s
                )
                for shard_index, (agent_id, browser_id) in moves
            ),
            return_exceptions=True,
        )
        passed: list[str] = []
        for (shard_index, (agent_id, browser_id)), check in zip(moves, checks, strict=True):
            where = f"{agent_id}/{browser_id}"
            if isinstance(check, FailedPreconditionError | NotFoundError | UnimplementedError):
                log.info(
                    "no one-hop verify; verifying with a whole inference",
                    extra={"model": model, "shard": shard_index, "on": where, "reason": str(check)},
                )
                return None
            if isinstance(check, UnavailableError):  # the hop failed
                raise ActionFailed(
                    f"shard {shard_index} of {model} failed on {where}: {check}",
                    failed_on=[(agent_id, browser_id)],
                ) from check
            if isinstance(check, RPCError):
                raise ActionFailed(
                    f"shard {shard_index} of {model} on {where} was not verified: {check}"
                ) from check
            if isinstance(check, BaseException):
                raise check
            if not check.passed:
                raise ActionFailed(
                    f"shard {shard_index} of {model} on {where} answered differently from "
                    f"the kept activation: max |difference| {check.max_abs_difference:.3g} > "
                    f"{check.tolerance:.3g}",
                    failed_on=[(agent_id, browser_id)],
                )
            passed.append(
                f"shard {shard_index} on {where} in "
                f"{check.timing.hop.ToNanoseconds() / 1e6:.1f} ms "
                f"(compute {check.timing.compute.ToNanoseconds() / 1e6:.1f} ms, "
                f"max |difference| {check.max_abs_difference:.2g})"
            )
        return ActionResult(
            f"{model}: {', '.join(passed)} matched the kept activation(s)",
            served_by=tuple(sorted({runtime for _, runtime in moves})),
        )

    async def _unhealthy_on(self, target: Target) -> list[int]:
        """Shards checked (the target's, or all of its model) with an unhealthy replica on
        the failed browser."""
        if not target.agent_id:
            return []
        try:
            placement = await self.placement(target.model)
        except RPCError as exc:
            raise ActionFailed(f"placement of {target.model} unreadable: {exc}") from exc
        if placement is None:
            return []
        return sorted(
            index
            for index, replicas in placement.replicas.items()
            if target.shard_index in (-1, index)
            and any(
                not r.healthy and r.on(Target(target.agent_id, target.browser_id)) for r in replicas
            )
        )

    async def _infer(self, model: str, pins: Mapping[int, str] | None = None) -> InferResult:
        if model not in self._tensor_models:
            try:
                return await self._client.infer(
                    model, texts=[self._verify_text], pins=pins, timeout=self._timeout_s
                )
            except InvalidArgumentError:
                # Image and audio models take no text; clip-tiny wants pixels too.
                self._tensor_models.add(model)
        return await self._client.infer(
            model, inputs=_example_inputs(model), pins=pins, timeout=self._timeout_s
        )


def _example_inputs(model: str) -> Mapping[str, npt.NDArray[Any]]:
    # Imported here: the model library loads onnx, which only non-text models need.
    from services.models import example_inputs

    return example_inputs(model)


def _non_finite(outputs: Mapping[str, npt.NDArray[Any]]) -> list[str]:
    return sorted(
        name
        for name, value in outputs.items()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
    )
