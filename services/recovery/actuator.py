"""The actuator the running service uses: the coordinator, through the SDK.

What the coordinator offers today is enough for the actions that need no new RPC:

- ``verify`` runs one inference and checks that it returns finite outputs;
- ``retry_in_place`` relies on the coordinator's pipeline, which replays a failed
  hop by itself (on the same shard's next replica), and leaves the proof to the
  verify that follows;
- ``replace_on_standby`` checks in the placement that the shard has a healthy
  replica off the failed browser, which the pipeline routes to, and leaves the
  proof to the verify that follows.

Reconnecting, restarting a browser or an agent, and holding a barrier on a model
need RPCs the coordinator and the agent do not have yet; those actions raise
ActionUnavailable, which the strategies treat as "this level failed, escalate".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from webshard.aio import Client, InferResult
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import InvalidArgumentError, NotFoundError, RPCError

from services.recovery.execution import ActionFailed, ActionResult, ActionUnavailable
from services.recovery.strategies import ModelPlacement, Replica, Strategy, Target

log = logging.getLogger(__name__)


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
    )


class CoordinatorActuator:
    """Acts through the coordinator replicas at ``coordinators``.

    Args:
        coordinators: the coordinator replica addresses; the client finds the leader.
        verify_text: the text a verify inference sends to a text model.
        timeout_s: the deadline of each coordinator call.
        client: a client to use instead of one made from ``coordinators`` (tests).
    """

    def __init__(
        self,
        coordinators: Sequence[str],
        *,
        verify_text: str = "webshard recovery check",
        timeout_s: float = 10.0,
        client: Client | None = None,
    ) -> None:
        self._client = client or Client(list(coordinators), timeout=timeout_s)
        self._verify_text = verify_text
        self._timeout_s = timeout_s
        # Models that refused text once are verified with example tensors from then on.
        self._tensor_models: set[str] = set()

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

    async def retry_in_place(self, target: Target) -> ActionResult:
        """Nothing to do: the coordinator's pipeline already replays the failed hop."""
        if not target.model or target.shard_index < 0:
            raise ActionUnavailable(
                "the report names no model and shard, so there is no hop to replay"
            )
        return ActionResult(
            f"the coordinator's pipeline replays shard {target.shard_index} of "
            f"{target.model} on its next replica; the verify checks it"
        )

    async def replace_on_standby(self, target: Target) -> ActionResult:
        """Check that the shard has a healthy replica off the failed target to route to."""
        if not target.model or target.shard_index < 0:
            raise ActionUnavailable("the report names no model and shard to re-place")
        try:
            placement = await self.placement(target.model)
        except RPCError as exc:
            raise ActionFailed(f"placement of {target.model} unreadable: {exc}") from exc
        if placement is None:
            raise ActionFailed(f"{target.model} is not deployed")
        replicas = placement.replicas.get(target.shard_index, ())
        others = [r for r in replicas if r.healthy and not r.on(target)]
        if not others:
            # Loading the shard on a warm standby needs the coordinator's ReplaceShard.
            raise ActionFailed(
                f"shard {target.shard_index} of {target.model} has no healthy replica off "
                f"{target.agent_id}/{target.browser_id or '*'} (loading one on a warm standby "
                "needs CoordinatorService.ReplaceShard)"
            )
        chosen = others[0]
        return ActionResult(
            f"the coordinator's pipeline routes shard {target.shard_index} to "
            f"{chosen.agent_id}/{chosen.browser_id}"
        )

    async def reconnect(self, target: Target) -> ActionResult:
        """Unavailable: needs BrowserAgentService.ReconnectBrowser."""
        raise ActionUnavailable(
            "reconnecting needs BrowserAgentService.ReconnectBrowser "
            "(or CoordinatorService.ReconnectAgent)"
        )

    async def restart_browser(self, target: Target) -> ActionResult:
        """Unavailable: needs BrowserAgentService.RestartBrowser."""
        raise ActionUnavailable("restarting a browser needs BrowserAgentService.RestartBrowser")

    async def restart_agent(self, target: Target) -> ActionResult:
        """Unavailable: needs CoordinatorService.RestartAgent (or the workloads API)."""
        raise ActionUnavailable(
            "restarting an agent needs CoordinatorService.RestartAgent "
            "(or services.common.workloads wired into recovery)"
        )

    async def barrier(self, target: Target) -> ActionResult:
        """Unavailable: needs CoordinatorService.PauseModel."""
        raise ActionUnavailable("a barrier on a model needs CoordinatorService.PauseModel")

    async def resume(self, target: Target) -> ActionResult:
        """Unavailable: needs CoordinatorService.ResumeModel."""
        raise ActionUnavailable("resuming a model needs CoordinatorService.ResumeModel")

    async def verify(self, target: Target) -> ActionResult:
        """Run one inference through the model; pass when it returns finite outputs."""
        if not target.model:
            return ActionResult("the report names no model; nothing to verify")
        try:
            result = await self._infer(target.model)
        except RPCError as exc:
            raise ActionFailed(f"{target.model} did not answer: {exc}") from exc
        except KeyError as exc:  # a deployed model the catalogue has no example inputs for
            raise ActionFailed(f"{target.model} takes no text and has no example inputs") from exc
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

    async def _infer(self, model: str) -> InferResult:
        if model not in self._tensor_models:
            try:
                return await self._client.infer(
                    model, texts=[self._verify_text], timeout=self._timeout_s
                )
            except InvalidArgumentError:
                # Image and audio models take no text; clip-tiny wants pixels too.
                self._tensor_models.add(model)
        return await self._client.infer(
            model, inputs=_example_inputs(model), timeout=self._timeout_s
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
