"""Deployed models: cutting, placing and loading shards on agents, and the pipelines.

A deploy is prepared on the leader (cut, place, load every replica) and only
then proposed to the replicated log; the placement serves once it is applied.
A deploy that fails at any step, or whose proposal is not committed, unloads
what it loaded: the registry and the placements are left as they were.

Hot spares are loaded with the replicas and warmed (one real inference with the
spare pinned) before the placement is proposed; requests are never routed to them.
A takeover swaps a failed replica for a spare in one placement change; the spare
that follows it is loaded, warmed and committed in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from webshard.browser_agent.v1 import browser_agent_pb2 as agent_pb
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.recovery.v1 import recovery_pb2
from webshard.tensors import encode_tensor

from services.common.engines import ENGINES, unknown_engine
from services.common.errors import DomainError
from services.common.failures import FailureReporter, failure_kind
from services.common.pulse import Pulse
from services.coordinator.links import AgentLink, HopError
from services.coordinator.pipeline import (
    FailureSink,
    HopRunner,
    InferError,
    KeptActivation,
    Pin,
    Pipeline,
    Replica,
    ShardCheck,
    Stage,
)
from services.coordinator.placement import (
    DEFAULT_SPARES,
    Load,
    PlacementError,
    Slot,
    candidates_from,
    choose_takeover,
    crowded_spare,
    engine_of,
    place,
    place_spares,
    spare_slot,
    swap_roles,
)
from services.coordinator.registry import AgentRegistry
from services.models import Shard, UnknownModel, cut_model, model_info
from services.models.inputs import example_inputs

log = logging.getLogger(__name__)

NATIVE_RUNTIME_ID = "native"
"""The browser id an agent's native runtime reports."""

MAX_REPLACE_TRIES = 3
"""How many destinations ReplaceShard tries before it gives up."""

UNLOAD_RETRY_WAITS_S = (1.0, 2.0, 4.0, 8.0, 16.0)
"""The waits between tries of a background unload its agent could not do yet."""

SPARE_RETRY_WAITS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
"""The waits between tries of loading a new spare after a takeover, about two minutes
in all (then it gives up): a busy fleet may have no runtime free until a standby has
launched."""

WARM_UP_TIMEOUT_S = 60.0
"""How long a spare's warm-up inference may take."""

SPARE_CHECK_INTERVAL_S = 5.0
"""How often the leader runs every spare once from its shard's kept activation: a spare
takes no traffic, so nothing else would notice that it broke."""

SPARE_CHECK_TIMEOUT_S = 10.0
"""How long one spare's check may take before the spare counts as failed."""

SPARE_CHECKS_AT_ONCE = 8
"""Spares checked at the same time (each on its own browser, taking no traffic)."""

MOVE_VERIFY_GRACE_S = 5.0
"""How long a new spare's load waits for the verify of the replicas that just took failed
ones' places: a load takes the browsers' CPU, and a page creating a session answers
nothing meanwhile, so a load beside a verify makes the recovery seconds longer. After
that the load goes ahead (the verify was a whole inference, or none came)."""

RECENT_FAILURE_S = 5.0
"""A runtime whose hop failed this recently takes no spare, takeover or replacement."""

# Commits a placement built (from the state at that moment) under the coordinator's
# write lock; False when the builder found nothing to commit.
PlacementCommitter = Callable[[Callable[[], pb.Placement | None]], Awaitable[bool]]

STRATEGY_NAMES = {
    common_pb2.SHARDING_STRATEGY_LAYER: "layer",
    common_pb2.SHARDING_STRATEGY_ATTENTION_FEEDFORWARD: "attention_feedforward",
    common_pb2.SHARDING_STRATEGY_COMPONENT: "component",
}


class DeployError(DomainError):
    """A deploy that cannot be done; ``code`` is the gRPC status."""


@dataclass(frozen=True)
class Replacement:
    """A shard's replica loaded elsewhere, not yet committed (see ``placement_after``)."""

    model: str
    shard_index: int
    replica: pb.ShardReplica
    replaced: pb.ShardReplica
    from_standby: bool


@dataclass(frozen=True)
class Takeover:
    """A failed replica swapped for a hot spare: the placement to commit, no load."""

    placement: pb.Placement
    promoted: pb.ShardReplica | None
    """The spare now serving; None when the failed copy was itself a spare (dropped)."""
    replaced: pb.ShardReplica
    """The failed copy, to unload once the placement is committed."""


@dataclass
class Deployment:
    """A model as deployed: its placement and the pipeline that serves it."""

    placement: pb.Placement
    pipeline: Pipeline
    input_names: list[str]


def loaded_replica(
    agent_id: str, loaded: agent_pb.LoadShardResponse, *, spare: bool = False
) -> pb.ShardReplica:
    """The placement's record of a shard copy an agent loaded."""
    return pb.ShardReplica(
        agent_id=agent_id,
        browser_id=loaded.browser_id,
        handle=loaded.shard.handle,
        execution_provider=loaded.shard.execution_provider,
        execution_provider_reason=loaded.shard.execution_provider_reason,
        healthy=True,
        spare=spare,
        engine=loaded.shard.engine,
    )


def spec_of(shard: Shard, strategy: int) -> common_pb2.ShardSpec:
    """The contract's description of a shard."""
    return common_pb2.ShardSpec(
        model=shard.model,
        index=shard.index,
        sha256=shard.sha256,
        size_bytes=shard.size_bytes,
        input_names=list(shard.input_names),
        output_names=list(shard.output_names),
        sharding=strategy,  # type: ignore[arg-type]
        shard_count=shard.count,
    )


def deployment_of(
    placement: pb.Placement, run_hop: HopRunner, on_failure: FailureSink
) -> Deployment:
    """The pipeline that serves a placement: one stage per shard, its replicas in order."""
    info = model_info(placement.model)

    def replica(r: pb.ShardReplica) -> Replica:
        return Replica(
            agent_id=r.agent_id,
            browser_id=r.browser_id,
            handle=r.handle,
            execution_provider=r.execution_provider,
            engine=r.engine,
        )

    stages = [
        Stage(
            index=shard.shard.index,
            input_names=list(shard.shard.input_names),
            output_names=list(shard.shard.output_names),
            replicas=[replica(r) for r in shard.replicas],
            spares=[replica(r) for r in shard.spares],
            sha256=shard.shard.sha256,
        )
        for shard in placement.shards
    ]
    return Deployment(
        placement=placement,
        pipeline=Pipeline(
            model=placement.model,
            stages=stages,
            run_hop=run_hop,
            on_failure=on_failure,
            outputs=[o.name for o in info.outputs],
            output_shapes={o.name: o.shape for o in info.outputs},
        ),
        input_names=[i.name for i in info.inputs],
    )


class Deployments:
    """Every deployed model, the agent links, and the hop runner the pipelines share."""

    def __init__(
        self,
        registry: AgentRegistry,
        cache_dir: Path | None,
        *,
        reporter: FailureReporter,
        load_timeout_s: float = 120.0,
        replace_wait_s: float = 5.0,
        token: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._failed_at: dict[tuple[str, str], float] = {}
        """(agent, browser) -> when a hop there last failed."""
        self._token = token
        self._reporter = reporter
        self._cache_dir = cache_dir
        self._load_timeout = load_timeout_s
        self._replace_wait_s = replace_wait_s
        self._links: dict[str, AgentLink] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.models: dict[str, Deployment] = {}
        """Deployed models, as the replicated log has applied them."""
        self.changed = Pulse()
        """Fires whenever a model's placement is applied or removed."""
        self._unverified: dict[tuple[str, int, str, str], tuple[asyncio.Event, float]] = {}
        """(model, shard, agent, browser) of a replica that took a failed one's place ->
        (set once it was verified, when it took the place)."""
        self._loading: list[Slot] = []
        """Runtimes new spares are loading onto now."""
        self._warmed: dict[str, list[Stage]] = {}
        """model -> the stages of its last spare warm-up, whose kept activations the
        placement that follows takes over (a warm-up's pipeline is its own)."""

    def link(self, agent_id: str) -> AgentLink:
        """The link to an agent, reopened when its address changed."""
        record = self._registry.get(agent_id)
        if record is None:
            raise HopError(
                agent_id,
                grpc.StatusCode.NOT_FOUND,
                f"no agent {agent_id[:64]!r} is known to the cluster",
            )
        link = self._links.get(agent_id)
        if link is None or link.address != record.address:
            if link is not None:
                asyncio.get_running_loop().create_task(link.close())
            link = AgentLink(agent_id, record.address, token=self._token)
            self._links[agent_id] = link
        return link

    async def run_hop(
        self, replica: Replica, request_id: str, inputs: Sequence[common_pb2.Tensor], timeout: float
    ) -> tuple[Sequence[common_pb2.Tensor], float]:
        """One hop over the agent's shared RunShard stream."""
        reply = await self.link(replica.agent_id).run(replica.handle, request_id, inputs, timeout)
        return reply.outputs, reply.compute.ToNanoseconds() / 1e6

    def on_failure(self, model: str, stage: Stage, replica: Replica, error: HopError) -> None:
        """Report a failed hop to recovery; the pipeline replays it on the next replica."""
        self._failed_at[(replica.agent_id, replica.browser_id)] = self._clock()
        self._reporter.report(
            source=recovery_pb2.FAILURE_SOURCE_DATA_PATH,
            kind=failure_kind(error.code),
            agent_id=replica.agent_id,
            browser_id=replica.browser_id,
            model=model,
            shard_index=stage.index,
            message=error.message,
        )
        log.warning(
            "hop failed; replaying the shard on another replica",
            extra={
                "shard": stage.index,
                "agent_id": replica.agent_id,
                "code": error.code.name,
                "error": error.message,
            },
        )

    def agent_lost(self, agent_id: str) -> None:
        """An agent's session broke: stop routing to it, and report each copy it held,
        replica or spare (a lost spare is dropped and another loaded in its place)."""
        self.mark_agent(agent_id, healthy=False)
        lost = sorted(
            {
                (model, stage.index, copy.browser_id)
                for model, deployment in self.models.items()
                for stage in deployment.pipeline.stages
                for copy in [*stage.replicas, *stage.spares]
                if copy.agent_id == agent_id
            }
        )
        for model, shard_index, browser_id in lost or [("", -1, "")]:
            self._reporter.report(
                source=recovery_pb2.FAILURE_SOURCE_HEARTBEAT,
                kind=recovery_pb2.FAILURE_KIND_AGENT_GONE,
                agent_id=agent_id,
                browser_id=browser_id,
                model=model,
                shard_index=shard_index,
                message="the agent's session with the coordinator ended",
            )

    def mark_agent(self, agent_id: str, healthy: bool) -> None:
        """Flag every replica on an agent (after its session ended or it re-registered)."""
        for deployment in self.models.values():
            for stage in deployment.pipeline.stages:
                for replica in [*stage.replicas, *stage.spares]:
                    if replica.agent_id == agent_id:
                        replica.healthy = healthy

    def used_bytes(self) -> dict[str, int]:
        """Shard bytes placed on each agent (replicas and spares)."""
        used: dict[str, int] = {}
        for deployment in self.models.values():
            for shard in deployment.placement.shards:
                for replica in [*shard.replicas, *shard.spares]:
                    used[replica.agent_id] = used.get(replica.agent_id, 0) + shard.shard.size_bytes
        return used

    def apply_placement(self, model: str, placement: pb.Placement | None) -> None:
        """Serve ``placement`` for ``model`` (None removes it): called as the log applies.

        Replicas the previous placement also had keep the health it had seen; each
        stage keeps the activation the previous placement's stage of the same shard
        file kept (or, failing that, the last spare warm-up's).
        """
        previous = self.models.pop(model, None)
        warmed = self._warmed.pop(model, [])
        if placement is None:
            self.changed.fire()
            return
        deployment = deployment_of(placement, self.run_hop, self.on_failure)
        kept: dict[tuple[int, str], KeptActivation] = {
            (stage.index, stage.sha256): stage.kept for stage in warmed if stage.kept is not None
        }
        if previous is not None:
            health = {
                (r.agent_id, r.browser_id, r.handle): r.healthy
                for stage in previous.pipeline.stages
                for r in [*stage.replicas, *stage.spares]
            }
            for stage in deployment.pipeline.stages:
                for r in [*stage.replicas, *stage.spares]:
                    r.healthy = health.get((r.agent_id, r.browser_id, r.handle), True)
            kept.update(
                ((stage.index, stage.sha256), stage.kept)
                for stage in previous.pipeline.stages
                if stage.kept is not None
            )
        for stage in deployment.pipeline.stages:
            stage.kept = kept.get((stage.index, stage.sha256))
        self.models[model] = deployment
        self.changed.fire()

    def _failed_shard(
        self, model: str, shard_index: int, agent_id: str, base: pb.Placement | None = None
    ) -> tuple[pb.Placement, pb.ShardPlacement]:
        """The model's placement (``base``, else a copy of the current one) and the shard
        a failure names; DeployError (NOT_FOUND) for an unknown model, shard or agent."""
        current = base if base is not None else self.placement(model)
        if self._registry.get(agent_id) is None:
            raise DeployError(
                grpc.StatusCode.NOT_FOUND, f"no agent {agent_id[:64]!r} is known to the cluster"
            )
        shard = next((s for s in current.shards if s.shard.index == shard_index), None)
        if shard is None:
            raise DeployError(grpc.StatusCode.NOT_FOUND, f"{model} has no shard {shard_index}")
        return current, shard

    async def prepare_replacement(
        self,
        model: str,
        shard_index: int,
        agent_id: str,
        browser_id: str,
        avoid: Iterable[tuple[str, str]] = (),
    ) -> Replacement | None:
        """Load a shard's replica off a failed browser (or agent) elsewhere.

        Returns the replica loaded (its placement comes from ``placement_after``), or
        None when no replica of the shard is on the failed browser any more (moved
        already). The destination is, in order of
        preference, an idle ready browser, a warm standby, the least loaded ready
        browser; on an agent holding no other replica of the shard first, then on
        another agent before the failed one's; never a browser that already holds
        the shard, nor one ``unhealthy`` names (``avoid`` among them). Raises
        DeployError when none can take it.
        """
        current, shard = self._failed_shard(model, shard_index, agent_id)
        failed = [
            r for r in shard.replicas if r.agent_id == agent_id and browser_id in ("", r.browser_id)
        ]
        if not failed:
            return None
        old = failed[0]
        # Never beside another copy: a spare it could not take over from counts too.
        holding = {(r.agent_id, r.browser_id) for r in [*shard.replicas, *shard.spares]}
        # Agents holding another replica of the shard come last: one agent lost must
        # not take every replica of a shard with it.
        sharing = {
            r.agent_id for r in shard.replicas if (r.agent_id, r.handle) != (agent_id, old.handle)
        }
        native = old.browser_id == NATIVE_RUNTIME_ID
        paths = await self._shard_paths(current)
        # A standby launching in the failed browser's place is worth a short wait. A
        # destination that fails the load (it died too, say, in a multiple failure) is
        # passed over for the next one.
        deadline = time.monotonic() + self._replace_wait_s
        failures: list[str] = []
        while True:
            destination = self._destination(
                native,
                holding | self.unhealthy(avoid),
                sharing,
                old,
                whole_agent=not browser_id,
                engines=current.engines,
            )
            if destination is None and time.monotonic() < deadline:
                # The registry learns of browsers from the agents' status reports; a
                # recent failure ages out.
                await self._registry.changed.wait(
                    min(deadline - time.monotonic(), self._until_a_failure_ages_out())
                )
                continue
            if destination is None:
                # Nothing above suspicion: a ready runtime that is only suspect (a recent
                # failure, an open breaker, a recovery under way) beats leaving the shard
                # a replica short; one with a fault in force never takes it.
                destination = self._destination(
                    native,
                    holding | self._faulty(),
                    sharing,
                    old,
                    whole_agent=not browser_id,
                    engines=current.engines,
                )
            if destination is None:
                raise DeployError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"no ready browser or standby can take shard {shard_index} of {model} "
                    f"off {agent_id}/{browser_id or '*'}"
                    + (f" ({'; '.join(failures)})" if failures else ""),
                )
            dest_agent, dest_browser, standby = destination
            try:
                loaded = await self.link(dest_agent).load(
                    shard.shard,
                    paths[shard_index],
                    runtime=common_pb2.RUNTIME_NATIVE if native else common_pb2.RUNTIME_BROWSER,
                    provider=old.execution_provider,
                    browser_id=dest_browser,
                    timeout=self._load_timeout,
                )
            except HopError as exc:
                failures.append(f"loading on {dest_agent}/{dest_browser} failed: {exc.message}")
                if len(failures) >= MAX_REPLACE_TRIES:
                    raise
                holding.add((dest_agent, dest_browser))  # not again
                continue
            break
        return Replacement(model, shard_index, loaded_replica(dest_agent, loaded), old, standby)

    def placement_after(self, replacement: Replacement) -> pb.Placement | None:
        """The model's placement as it is now, with the replacement swapped in; None when
        the replaced replica is no longer in it (moved meanwhile, or the model redeployed).

        Loads run outside the coordinator's write lock, so several shards move at once;
        each commit then starts from the placement the one before it committed.
        """
        deployment = self.models.get(replacement.model)
        if deployment is None:
            return None
        old = replacement.replaced
        placement = pb.Placement()
        placement.CopyFrom(deployment.placement)
        for candidate in placement.shards:
            if candidate.shard.index != replacement.shard_index:
                continue
            kept = [
                r
                for r in candidate.replicas
                if (r.agent_id, r.handle) != (old.agent_id, old.handle)
            ]
            if len(kept) == len(candidate.replicas):
                return None
            del candidate.replicas[:]
            candidate.replicas.extend([*kept, replacement.replica])
            self._await_verify(replacement.model, replacement.shard_index, replacement.replica)
            return placement
        return None

    def _await_verify(self, model: str, shard_index: int, replica: pb.ShardReplica) -> None:
        """Note a replica that takes a failed one's place: new spares' loads wait for its
        verify (see MOVE_VERIFY_GRACE_S)."""
        now = self._clock()
        for key, (_, since) in list(self._unverified.items()):
            if now - since > MOVE_VERIFY_GRACE_S:
                del self._unverified[key]  # never verified one hop at a time
        key = (model, shard_index, replica.agent_id, replica.browser_id)
        self._unverified[key] = (asyncio.Event(), now)

    async def verify_shard(
        self, model: str, shard_index: int, pin: Pin, deadline: float
    ) -> ShardCheck:
        """The deployed model's ``Pipeline.verify_shard``; a verify that ends (passed or
        not) lets the new spares' loads waiting on it go ahead. DeployError (NOT_FOUND)
        unless ``model`` is deployed."""
        self.placement(model)  # NOT_FOUND naming the deployed
        try:
            return await self.models[model].pipeline.verify_shard(shard_index, pin, deadline)
        finally:
            for key in list(self._unverified):
                if key[:3] == (model, shard_index, pin.agent_id) and pin.browser_id in (
                    "",
                    key[3],
                ):
                    self._unverified.pop(key)[0].set()

    async def _moves_verified(self, model: str) -> None:
        """Wait, MOVE_VERIFY_GRACE_S at most, until every replica of ``model`` that took
        a failed one's place has been verified."""
        pending = {key: entry for key, entry in self._unverified.items() if key[0] == model}
        if not pending:
            return
        try:
            async with asyncio.timeout(MOVE_VERIFY_GRACE_S):
                await asyncio.gather(*(event.wait() for event, _ in pending.values()))
        except TimeoutError:
            for key, entry in pending.items():
                if self._unverified.get(key) is entry:
                    del self._unverified[key]  # verified by a whole inference, or not at all

    def _destination(
        self,
        native: bool,
        excluded: set[tuple[str, str]],
        sharing: set[str],
        old: pb.ShardReplica,
        *,
        whole_agent: bool,
        engines: Collection[str] = (),
    ) -> tuple[str, str, bool] | None:
        load: dict[tuple[str, str], int] = {}
        for deployment in self.models.values():
            for shard in deployment.placement.shards:
                for r in shard.replicas:
                    load[(r.agent_id, r.browser_id)] = load.get((r.agent_id, r.browser_id), 0) + 1
        ranked = []
        for record in self._registry.agents():
            if whole_agent and record.agent_id == old.agent_id:
                continue
            for browser in record.browsers:
                key = (record.agent_id, browser.browser_id)
                if key in excluded or (record.agent_id, "") in excluded:
                    continue
                if key == (old.agent_id, old.browser_id):
                    continue
                if engines and engine_of(browser) not in engines:
                    continue  # the deploy asked for other engines
                if native:
                    if browser.runtime != common_pb2.RUNTIME_NATIVE:
                        continue
                    rank = 0
                elif browser.runtime == common_pb2.RUNTIME_NATIVE:
                    continue
                elif browser.state == common_pb2.BROWSER_STATE_READY:
                    rank = 0 if load.get(key, 0) == 0 else 2
                elif browser.state == common_pb2.BROWSER_STATE_STANDBY:
                    rank = 1
                else:
                    continue
                same_agent = record.agent_id == old.agent_id
                beside = record.agent_id in sharing
                ranked.append((beside, rank, same_agent, load.get(key, 0), key, rank == 1))
        if not ranked:
            return None
        *_, (agent_id, browser_id), standby = min(ranked)
        return agent_id, browser_id, standby

    async def _shard_paths(self, placement: pb.Placement) -> dict[int, Path]:
        """Each shard's file, as the placement cut them (from the cache: no work twice)."""
        strategy = STRATEGY_NAMES[placement.sharding]
        shards = await asyncio.to_thread(
            cut_model, placement.model, strategy, len(placement.shards), self._cache_dir
        )
        return {s.index: s.path for s in shards}

    async def restart_browser(
        self, agent_id: str, browser_id: str, timeout: float
    ) -> tuple[agent_pb.RestartBrowserResponse, list[pb.Placement]]:
        """Have the agent restart a browser; return its answer and the placements to commit."""
        reply = await self.link(agent_id).restart_browser(browser_id, timeout)
        moved = {s.previous_handle: s.shard for s in reply.shards}
        changed = []
        for deployment in self.models.values():
            placement = pb.Placement()
            placement.CopyFrom(deployment.placement)
            touched = False
            for shard in placement.shards:
                for r in shard.replicas:
                    if r.agent_id == agent_id and r.handle in moved:
                        loaded = moved[r.handle]
                        r.browser_id = reply.browser_id
                        r.handle = loaded.handle
                        r.execution_provider = loaded.execution_provider
                        r.execution_provider_reason = loaded.execution_provider_reason
                        touched = True
            if touched:
                changed.append(placement)
        return reply, changed

    async def reconnect(self, agent_id: str, browser_id: str, wait_s: float) -> float:
        """Reopen the activation stream to an agent and wait for a browser's page."""
        return await self.link(agent_id).reconnect(browser_id, wait_s)

    async def prepare(self, request: pb.DeployModelRequest) -> pb.Placement:
        """Cut, place and load a model; return its placement, not yet committed.

        Raises DeployError and leaves nothing loaded when any step fails.
        """
        strategy = STRATEGY_NAMES.get(request.sharding)
        if strategy is None:
            raise DeployError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "sharding must be one of layer, attention_feedforward, component",
            )
        shard_count = request.shard_count or 1
        replicas = request.replicas or 1
        if shard_count < 1 or replicas < 1 or request.standby_count < 0:
            raise DeployError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "shard_count and replicas must be positive and standby_count not negative",
            )
        unknown = [e for e in request.engines if e not in ENGINES]
        if unknown:
            raise DeployError(grpc.StatusCode.INVALID_ARGUMENT, unknown_engine(unknown[0]))
        try:
            model_info(request.model)
        except UnknownModel as exc:
            raise DeployError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        try:
            shards = await asyncio.to_thread(
                cut_model, request.model, strategy, shard_count, self._cache_dir
            )
        except ValueError as exc:
            raise DeployError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc

        agents = [self._registry.to_proto(r) for r in self._registry.agents()]
        used = self.used_bytes()
        previous = self.models.get(request.model)
        if previous is not None:  # its memory is given back when the new one commits
            for shard in previous.placement.shards:
                for replica in shard.replicas:
                    used[replica.agent_id] -= shard.shard.size_bytes
        # Unset and -1 ask for the default (best effort); 0 for none, as before spares.
        asked = request.spares if request.HasField("spares") and request.spares != -1 else None
        try:
            candidates = candidates_from(agents, used)
            sizes = [s.size_bytes for s in shards]
            slots = place(
                sizes,
                replicas=replicas,
                runtime=request.runtime,
                provider=request.execution_provider,
                candidates=candidates,
                engines=request.engines,
            )
            spare_slots = place_spares(
                sizes,
                slots,
                spares=asked,
                runtime=request.runtime,
                provider=request.execution_provider,
                candidates=candidates,
                engines=request.engines,
            )
        except PlacementError as exc:
            raise DeployError(grpc.StatusCode[exc.code], str(exc)) from exc

        specs = [spec_of(s, request.sharding) for s in shards]
        jobs = [
            (index, slot, spare)
            for index, (shard_slots, extra) in enumerate(zip(slots, spare_slots, strict=True))
            for slot, spare in [*((s, False) for s in shard_slots), *((s, True) for s in extra)]
        ]
        results = await asyncio.gather(
            *(self._load(specs[i], shards[i].path, slot, request) for i, slot, _ in jobs),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for (_, slot, _), result in zip(jobs, results, strict=True):
                if not isinstance(result, BaseException):
                    with contextlib.suppress(HopError):
                        await self.link(slot.agent_id).unload(result.shard.handle, timeout=10)
            first = failures[0]
            if isinstance(first, HopError):
                raise DeployError(
                    first.code, f"loading on agent {first.agent_id} failed: {first.message}"
                )
            raise first

        placement = pb.Placement(
            model=request.model,
            sharding=request.sharding,
            runtime=request.runtime,
            recovery_strategy=request.recovery_strategy,
            deploy_id=request.request_id,
            spares=DEFAULT_SPARES if asked is None else asked,
            engines=request.engines,
        )
        copies = [
            (i, spare, loaded_replica(slot.agent_id, r, spare=spare))
            for (i, slot, spare), r in zip(jobs, results, strict=True)
            if not isinstance(r, BaseException)
        ]
        for index, spec in enumerate(specs):
            placement.shards.append(
                pb.ShardPlacement(
                    shard=spec,
                    replicas=[r for i, spare, r in copies if i == index and not spare],
                    spares=[r for i, spare, r in copies if i == index and spare],
                )
            )
        return await self._warm_spares(placement)

    async def _warm_spares(self, placement: pb.Placement) -> pb.Placement:
        """Run one inference with each spare pinned (its session's first run, off the
        request path); a spare that fails it is unloaded and left out."""
        if not any(shard.spares for shard in placement.shards):
            return placement
        deployment = deployment_of(placement, self.run_hop, self.on_failure)
        cold: set[tuple[int, str]] = set()
        for stage, shard in zip(deployment.pipeline.stages, placement.shards, strict=True):
            for spare in stage.spares:
                error = await self._warm(deployment, stage.index, spare)
                if error is not None:
                    cold.add((stage.index, spare.handle))
                    log.warning(
                        "spare failed its warm-up; deployed without it",
                        extra={
                            "model": placement.model,
                            "shard": shard.shard.index,
                            "agent_id": spare.agent_id,
                            "browser_id": spare.browser_id,
                            "error": error,
                        },
                    )
        if not cold:
            return placement
        for shard in placement.shards:
            dropped = [r for r in shard.spares if (shard.shard.index, r.handle) in cold]
            kept = [r for r in shard.spares if (shard.shard.index, r.handle) not in cold]
            del shard.spares[:]
            shard.spares.extend(kept)
            for r in dropped:
                await self.unload(r)
        return placement

    async def _warm(self, deployment: Deployment, shard_index: int, spare: Replica) -> str | None:
        """One inference through the model with ``spare`` pinned; the error, or None."""
        model = deployment.placement.model
        inputs = [
            encode_tensor(name, value)
            for name, value in example_inputs(model, batch=1, seq_len=8).items()
        ]
        try:
            await deployment.pipeline.run(
                f"warm-up-{uuid.uuid4().hex}",
                inputs,
                time.monotonic() + WARM_UP_TIMEOUT_S,
                {shard_index: Pin(spare.agent_id, spare.browser_id)},
            )
        except (InferError, HopError) as exc:
            return str(exc)
        # Its unpinned stages ran on serving replicas: what they kept is worth carrying
        # into the placement that follows (apply_placement).
        self._warmed[model] = deployment.pipeline.stages
        return None

    def unhealthy(self, avoid: Iterable[tuple[str, str]] = ()) -> set[tuple[str, str]]:
        """Runtimes (agent, browser) and whole agents (agent, "") not to trust now:
        agents without a live session, browsers not ready or with a fault in force,
        copies whose last run failed, runtimes with a failed hop in the last
        RECENT_FAILURE_S, and ``avoid`` (what the caller knows: open breakers,
        recoveries under way)."""
        bad: set[tuple[str, str]] = set(avoid) | self._faulty()
        for record in self._registry.agents(include_unhealthy=True):
            if not self._registry.healthy(record):
                bad.add((record.agent_id, ""))
            for browser in record.browsers:
                if browser.state not in (
                    common_pb2.BROWSER_STATE_READY,
                    common_pb2.BROWSER_STATE_STANDBY,
                ):
                    bad.add((record.agent_id, browser.browser_id))
        for deployment in self.models.values():
            for stage in deployment.pipeline.stages:
                for r in [*stage.replicas, *stage.spares]:
                    if not r.healthy:
                        bad.add((r.agent_id, r.browser_id))
        now = self._clock()
        for key, at in list(self._failed_at.items()):
            if now - at < RECENT_FAILURE_S:
                bad.add(key)
            else:
                del self._failed_at[key]
        return bad

    def _faulty(self) -> set[tuple[str, str]]:
        """Browsers with an injected fault in force."""
        return {
            (record.agent_id, browser.browser_id)
            for record in self._registry.agents(include_unhealthy=True)
            for browser in record.browsers
            if browser.faults_in_force
        }

    def _until_a_failure_ages_out(self) -> float:
        """Seconds until the oldest recent failure stops counting (inf when none)."""
        if not self._failed_at:
            return float("inf")
        return max(0.0, min(self._failed_at.values()) + RECENT_FAILURE_S - self._clock())

    def takeover(
        self,
        model: str,
        shard_index: int,
        agent_id: str,
        browser_id: str,
        *,
        avoid: Iterable[tuple[str, str]] = (),
        base: pb.Placement | None = None,
    ) -> Takeover | None:
        """The placement in which a healthy spare serves in place of the failed replica.

        None when no spare may (none left, or all untrusted: the load path follows),
        or when no copy of the shard is on the failed browser (moved already). A spare
        on the failed browser is simply dropped (``promoted`` None). A spare on an agent
        that ``avoid`` names as a whole is promoted only when no other may. Raises DeployError
        (NOT_FOUND) for an unknown model, shard or agent. Call it under the write lock
        and commit what it returns before anything else changes the placement. ``base``
        (changed in place) is the placement to start from: an earlier takeover's, so
        that the shards of one failed browser move in one commit.
        """
        current, shard = self._failed_shard(model, shard_index, agent_id, base)

        def on_failed(r: pb.ShardReplica) -> bool:
            return r.agent_id == agent_id and browser_id in ("", r.browser_id)

        failed = next((r for r in shard.replicas if on_failed(r)), None)
        if failed is None:
            dead_spare = next((r for r in shard.spares if on_failed(r)), None)
            if dead_spare is None:
                return None
            dropped = pb.ShardReplica()
            dropped.CopyFrom(dead_spare)
            kept = [r for r in shard.spares if r is not dead_spare]
            del shard.spares[:]
            shard.spares.extend(kept)
            return Takeover(current, None, dropped)
        avoid = list(avoid)

        def choose(untrusted: Iterable[tuple[str, str]]) -> Slot | None:
            return choose_takeover(
                [Slot(r.agent_id, r.browser_id) for r in shard.spares],
                failed=Slot(agent_id, browser_id),
                serving=[Slot(r.agent_id, r.browser_id) for r in shard.replicas],
                unhealthy=self.unhealthy(untrusted) | {(agent_id, browser_id)},
            )

        # Last resort: a spare whose whole agent the caller distrusts (an agent's breaker
        # opens on its browsers' failures) but whose own browser nothing speaks against
        # beats a load of seconds; the verify that follows a takeover runs on it at once.
        chosen = choose(avoid) or choose([a for a in avoid if a[1]])
        if chosen is None:
            return None
        promoted = next(r for r in shard.spares if (r.agent_id, r.browser_id) == chosen.key)
        spares = [r for r in shard.spares if r is not promoted]
        serving = pb.ShardReplica()
        serving.CopyFrom(promoted)
        serving.spare = False
        serving.healthy = True
        replicas = [serving if r is failed else r for r in shard.replicas]
        self._await_verify(model, shard_index, serving)
        replaced = pb.ShardReplica()
        replaced.CopyFrom(failed)
        del shard.replicas[:]
        shard.replicas.extend(replicas)
        del shard.spares[:]
        shard.spares.extend(spares)
        return Takeover(current, serving, replaced)

    def replenish_later(
        self,
        model: str,
        shard_index: int,
        commit: PlacementCommitter,
        avoid: Iterable[tuple[str, str]] = (),
    ) -> bool:
        """Load a new spare for a shard in the background, if it has fewer than its
        placement asks; True when one is on its way. ``avoid`` (the recovery service's
        open breakers and recoveries under way) is kept clear of when anywhere else
        can take it: a spare there could not take over. Failures are logged and tried
        again a few times, never raised."""
        deployment = self.models.get(model)
        if deployment is None or not self._spare_wanted(deployment.placement, shard_index):
            return False
        task = asyncio.get_running_loop().create_task(
            self._replenish(
                model, shard_index, commit, deployment.placement.deploy_id, frozenset(avoid)
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def check_spares(self, commit: PlacementCommitter) -> list[pb.ShardReplica]:
        """Run each spare once from its shard's kept activation (SPARE_CHECKS_AT_ONCE at a
        time); one whose hop fails or that answers otherwise is dropped from the placement
        (committed), unloaded, and another loaded in the background. Returns the spares
        dropped.

        A shard with nothing kept yet (no small request has run through it) is skipped.
        """
        at_once = asyncio.Semaphore(SPARE_CHECKS_AT_ONCE)

        async def check(
            model: str, shard_index: int, key: tuple[str, str]
        ) -> pb.ShardReplica | None:
            async with at_once:
                return await self._check_and_drop(model, shard_index, key, commit)

        dropped = await asyncio.gather(
            *(
                check(model, stage.index, (spare.agent_id, spare.handle))
                for model, deployment in self.models.items()
                for stage in deployment.pipeline.stages
                for spare in stage.spares
            )
        )
        return [spare for spare in dropped if spare is not None]

    async def _check_and_drop(
        self, model: str, shard_index: int, key: tuple[str, str], commit: PlacementCommitter
    ) -> pb.ShardReplica | None:
        """Check one spare (agent, handle); the spare dropped, or None (sound, unchecked,
        or gone meanwhile)."""
        deployment = self.models.get(model)
        spare = self._spare(model, shard_index, key)
        if deployment is None or spare is None:
            return None  # taken over or dropped meanwhile
        problem = await self._check_spare(deployment, shard_index, spare)
        if problem is None:
            return None
        still = self._spare(model, shard_index, key)
        if still is not None:
            still.healthy = False  # no takeover picks it before the commit
        build = functools.partial(
            self._without_spare, model, shard_index, key, deployment.placement.deploy_id
        )
        if not await commit(build):
            return None  # taken over, dropped or redeployed meanwhile
        gone = pb.ShardReplica(
            agent_id=spare.agent_id, browser_id=spare.browser_id, handle=spare.handle
        )
        self.unload_later(gone)
        self.replenish_later(model, shard_index, commit)
        log.warning(
            "spare failed its check; dropped, another is loading",
            extra={
                "model": model,
                "shard": shard_index,
                "agent_id": spare.agent_id,
                "browser_id": spare.browser_id,
                "error": problem,
            },
        )
        return gone

    def _spare(self, model: str, shard_index: int, key: tuple[str, str]) -> Replica | None:
        """The spare (agent, handle) of a shard as served now; None when it has gone."""
        deployment = self.models.get(model)
        if deployment is None:
            return None
        stage = next((s for s in deployment.pipeline.stages if s.index == shard_index), None)
        spares = stage.spares if stage is not None else []
        return next((r for r in spares if (r.agent_id, r.handle) == key), None)

    async def _check_spare(
        self, deployment: Deployment, shard_index: int, spare: Replica
    ) -> str | None:
        """What is wrong with a spare (its hop failed, or it answered otherwise), or None
        (sound, or nothing to check it against)."""
        try:
            check = await deployment.pipeline.verify_shard(
                shard_index,
                Pin(spare.agent_id, spare.browser_id),
                time.monotonic() + SPARE_CHECK_TIMEOUT_S,
            )
        except InferError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                return None  # moved meanwhile, or nothing kept to check against
            return exc.message
        if check.passed:
            return None
        return (
            f"it answered otherwise than shard {shard_index}'s kept outputs (max |difference| "
            f"{check.max_abs_difference:.3g}, tolerance {check.tolerance:.3g})"
        )

    def _editable(
        self, model: str, shard_index: int, deploy_id: str
    ) -> tuple[pb.Placement, pb.ShardPlacement] | None:
        """A copy of the model's current placement and its shard ``shard_index``, to
        change and commit; None when the model is no longer deployed by ``deploy_id``."""
        deployment = self.models.get(model)
        if deployment is None or deployment.placement.deploy_id != deploy_id:
            return None
        placement = pb.Placement()
        placement.CopyFrom(deployment.placement)
        return placement, next(s for s in placement.shards if s.shard.index == shard_index)

    def _without_spare(
        self, model: str, shard_index: int, key: tuple[str, str], deploy_id: str
    ) -> pb.Placement | None:
        """The model's current placement without the spare ``key`` (agent, handle) names;
        None when it has gone already
        (taken over, dropped) or the model was redeployed."""
        editable = self._editable(model, shard_index, deploy_id)
        if editable is None:
            return None
        placement, shard = editable
        kept = [r for r in shard.spares if (r.agent_id, r.handle) != key]
        if len(kept) == len(shard.spares):
            return None
        del shard.spares[:]
        shard.spares.extend(kept)
        return placement

    async def check_spares_forever(
        self, is_leader: Callable[[], bool], commit: PlacementCommitter
    ) -> None:
        """Check the spares, then spread crowded shards, every SPARE_CHECK_INTERVAL_S
        while this replica leads."""
        while True:
            await asyncio.sleep(SPARE_CHECK_INTERVAL_S)
            if not is_leader():
                continue
            try:
                await self.check_spares(commit)
                await self.spread(commit)
            except Exception:  # logged; the next round tries again
                log.exception("checking the spares failed")

    async def spread(self, commit: PlacementCommitter) -> None:
        """Spread each shard whose copies crowd onto one agent (placed while the other
        agents were untrusted) over agents that are trusted now, one step a shard: a
        spare on an agent of its own serves in place of a replica beside another (one
        commit, nothing loaded: the replica stays as a spare), or a spare beside another
        copy is loaded again on an agent that holds none and then dropped. Each step
        leaves the shard on more agents, so the rounds come to rest."""
        for model, deployment in list(self.models.items()):
            deploy_id = deployment.placement.deploy_id
            for shard in list(deployment.placement.shards):
                index = shard.shard.index
                serving = [Slot(r.agent_id, r.browser_id) for r in shard.replicas]
                spares = [Slot(r.agent_id, r.browser_id) for r in shard.spares if r.healthy]
                # Read afresh for each shard: a move before it may have taken seconds.
                pair = swap_roles(serving, spares, self.unhealthy())
                if pair is not None:
                    build = functools.partial(self._swapped, model, index, *pair, deploy_id)
                    if await commit(build):
                        log.info(
                            "spare serves in place of a replica beside another",
                            extra={
                                "model": model,
                                "shard": index,
                                "from": f"{pair[0].agent_id}/{pair[0].browser_id}",
                                "to": f"{pair[1].agent_id}/{pair[1].browser_id}",
                            },
                        )
                    continue
                crowded = crowded_spare(serving, spares)
                if crowded is None:
                    continue
                try:
                    await self._replenish_once(model, index, commit, deploy_id, instead_of=crowded)
                except Exception as exc:  # logged; the next round tries again
                    log.warning(
                        "crowded spare not moved",
                        extra={"model": model, "shard": index, "error": repr(exc)},
                    )

    def _swapped(
        self, model: str, shard_index: int, replica: Slot, spare: Slot, deploy_id: str
    ) -> pb.Placement | None:
        """The model's current placement with the spare on ``spare`` serving and the
        replica on ``replica`` kept as a spare; None when either has moved meanwhile."""
        editable = self._editable(model, shard_index, deploy_id)
        if editable is None:
            return None
        placement, shard = editable
        old = next((r for r in shard.replicas if (r.agent_id, r.browser_id) == replica.key), None)
        new = next(
            (r for r in shard.spares if (r.agent_id, r.browser_id) == spare.key and r.healthy),
            None,
        )
        if old is None or new is None:
            return None
        serving, kept = pb.ShardReplica(), pb.ShardReplica()
        serving.CopyFrom(new)
        serving.spare = False
        kept.CopyFrom(old)
        kept.spare = True
        replicas = [serving if r is old else r for r in shard.replicas]
        spares = [kept if r is new else r for r in shard.spares]
        del shard.replicas[:]
        shard.replicas.extend(replicas)
        del shard.spares[:]
        shard.spares.extend(spares)
        return placement

    @staticmethod
    def _spare_wanted(
        placement: pb.Placement, shard_index: int, instead_of: Slot | None = None
    ) -> bool:
        """Whether the shard lacks a spare; with ``instead_of``, whether that spare is
        still one of its spares (to be loaded again elsewhere)."""
        shard = next((s for s in placement.shards if s.shard.index == shard_index), None)
        if shard is None:
            return False
        if instead_of is not None:
            return any((r.agent_id, r.browser_id) == instead_of.key for r in shard.spares)
        return len(shard.spares) < placement.spares

    async def _replenish(
        self,
        model: str,
        shard_index: int,
        commit: PlacementCommitter,
        deploy_id: str,
        avoid: frozenset[tuple[str, str]],
    ) -> None:
        for attempt, wait_s in enumerate(SPARE_RETRY_WAITS_S, start=1):
            try:
                if await self._replenish_once(model, shard_index, commit, deploy_id, avoid):
                    return
            except Exception as exc:  # logged, never raised: the takeover already answered
                log.warning(
                    "new spare not loaded; trying again",
                    extra={
                        "model": model,
                        "shard": shard_index,
                        "attempt": attempt,
                        "error": repr(exc),
                    },
                )
            await asyncio.sleep(wait_s)
        log.warning("shard left without a new spare", extra={"model": model, "shard": shard_index})

    async def _replenish_once(
        self,
        model: str,
        shard_index: int,
        commit: PlacementCommitter,
        deploy_id: str,
        avoid: Iterable[tuple[str, str]] = frozenset(),
        *,
        instead_of: Slot | None = None,
    ) -> bool:
        """One try; True when done (committed, or nothing left to do). With
        ``instead_of`` (a spare crowded beside another copy) the new spare takes its
        place, and only on an agent that holds no copy of the shard."""
        await self._moves_verified(model)  # the recovery's verify first, then the load
        deployment = self.models.get(model)
        if deployment is None or deployment.placement.deploy_id != deploy_id:
            return True  # undeployed or redeployed meanwhile
        if not self._spare_wanted(deployment.placement, shard_index, instead_of):
            return True
        shard = next(s for s in deployment.placement.shards if s.shard.index == shard_index)
        holding = [Slot(r.agent_id, r.browser_id) for r in [*shard.replicas, *shard.spares]]
        native = any(r.browser_id == NATIVE_RUNTIME_ID for r in shard.replicas)
        kind = common_pb2.RUNTIME_NATIVE if native else common_pb2.RUNTIME_BROWSER
        agents = [self._registry.to_proto(r) for r in self._registry.agents()]
        engines = deployment.placement.engines
        candidates = [
            c
            for c in candidates_from(agents, self.used_bytes())
            if c.runtime == kind and (not engines or c.engine in engines)
        ]
        load = Load.of(
            [
                *(
                    (Slot(r.agent_id, r.browser_id), 0)
                    for d in self.models.values()
                    for s in d.placement.shards
                    for r in [*s.replicas, *s.spares]
                ),
                *((slot, 0) for slot in self._loading),
            ]
        )

        def clear_of(untrusted: Iterable[tuple[str, str]]) -> Slot | None:
            return spare_slot(
                shard.shard.size_bytes,
                holding=holding,
                candidates=candidates,
                load=load,
                unhealthy=self.unhealthy(untrusted),
            )

        if instead_of is not None:
            slot = clear_of(avoid)
            if slot is None or slot.agent_id in {s.agent_id for s in holding}:
                return True  # no agent of its own is free for it now
        else:
            slot = clear_of(avoid) or clear_of(())
        if slot is None:
            raise DeployError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no runtime beside shard {shard_index}'s copies can take a spare",
            )
        self._loading.append(slot)  # refills at once see each other's runtimes
        try:
            return await self._load_spare(
                deployment.placement, shard, slot, kind, commit=commit, instead_of=instead_of
            )
        finally:
            self._loading.remove(slot)

    async def _load_spare(
        self,
        placement: pb.Placement,
        shard: pb.ShardPlacement,
        slot: Slot,
        kind: int,
        *,
        commit: PlacementCommitter,
        instead_of: Slot | None,
    ) -> bool:
        """Load a spare of ``shard`` on ``slot``, warm it, commit it (in place of the
        spare ``instead_of`` names, if given); as ``_replenish_once``."""
        model, shard_index, deploy_id = placement.model, shard.shard.index, placement.deploy_id
        provider = shard.replicas[0].execution_provider if shard.replicas else 0
        paths = await self._shard_paths(placement)
        loaded = await self.link(slot.agent_id).load(
            shard.shard,
            paths[shard_index],
            runtime=kind,
            provider=provider,
            browser_id=slot.browser_id,
            timeout=self._load_timeout,
        )
        spare = loaded_replica(slot.agent_id, loaded, spare=True)
        with_it = functools.partial(
            self._with_spare, model, shard_index, spare, deploy_id, instead_of
        )
        trial = with_it()
        if trial is None:
            # Undeployed, refilled by another task, or a replica moved onto its runtime
            # meanwhile: done in the first two cases, another runtime in the last.
            await self.unload(spare)
            return not self._still_short(model, shard_index, deploy_id, instead_of)
        warmed = deployment_of(trial, self.run_hop, self.on_failure)
        stage = next(s for s in warmed.pipeline.stages if s.index == shard_index)
        error = await self._warm(warmed, shard_index, stage.spares[-1])
        if error is not None:
            await self.unload(spare)
            raise DeployError(grpc.StatusCode.UNAVAILABLE, f"the spare's warm-up failed: {error}")
        moved = None
        if instead_of is not None:
            moved = next(r for r in shard.spares if (r.agent_id, r.browser_id) == instead_of.key)
        try:
            committed = await commit(with_it)
        except BaseException:
            await self.unload(spare)
            raise
        if not committed:
            await self.unload(spare)
            return not self._still_short(model, shard_index, deploy_id, instead_of)
        if moved is not None:
            self.unload_later(moved)
        log.info(
            "new spare loaded" if moved is None else "spare moved to an agent of its own",
            extra={
                "model": model,
                "shard": shard_index,
                "agent_id": spare.agent_id,
                "browser_id": spare.browser_id,
                **({"from": f"{moved.agent_id}/{moved.browser_id}"} if moved else {}),
            },
        )
        return True

    def _still_short(
        self, model: str, shard_index: int, deploy_id: str, instead_of: Slot | None = None
    ) -> bool:
        """Whether the shard of this deploy of ``model`` still lacks a spare (or still
        has the crowded one ``instead_of`` names)."""
        deployment = self.models.get(model)
        return (
            deployment is not None
            and deployment.placement.deploy_id == deploy_id
            and self._spare_wanted(deployment.placement, shard_index, instead_of)
        )

    def _with_spare(
        self,
        model: str,
        shard_index: int,
        spare: pb.ShardReplica,
        deploy_id: str,
        instead_of: Slot | None = None,
    ) -> pb.Placement | None:
        """The model's current placement with ``spare`` added to a shard, in place of
        the spare ``instead_of`` names if given; None when it no longer fits there
        (redeployed, enough spares, the one to replace gone, or a copy on that runtime)."""
        editable = self._editable(model, shard_index, deploy_id)
        if editable is None:
            return None
        placement, shard = editable
        if not self._spare_wanted(placement, shard_index, instead_of):
            return None
        if any(
            (r.agent_id, r.browser_id) == (spare.agent_id, spare.browser_id)
            for r in [*shard.replicas, *shard.spares]
        ):
            return None
        if instead_of is not None:
            kept = [r for r in shard.spares if (r.agent_id, r.browser_id) != instead_of.key]
            del shard.spares[:]
            shard.spares.extend(kept)
        shard.spares.append(spare)
        return placement

    async def release(self, placement: pb.Placement) -> None:
        """Unload every replica of a placement that no longer serves (or never committed)."""
        for shard in placement.shards:
            for replica in [*shard.replicas, *shard.spares]:
                await self.unload(replica)

    async def unload(self, replica: pb.ShardReplica) -> bool:
        """Unload one replica; False when its agent could not (an offline page, an
        agent gone), which is not an error here."""
        try:
            await self.link(replica.agent_id).unload(replica.handle, timeout=10)
        except HopError:
            return False
        return True

    def unload_later(self, replica: pb.ShardReplica) -> None:
        """Unload a replica that no longer serves, in the background (its agent may be gone).

        A page that is offline (connection_lost) cannot unload until it reconnects, so
        an unload the agent could not do is tried again for a while; otherwise its
        browser would hold the session for good.
        """

        async def unload() -> None:
            for wait_s in UNLOAD_RETRY_WAITS_S:
                if await self.unload(replica):
                    return
                await asyncio.sleep(wait_s)
            log.warning(
                "replica not unloaded",
                extra={"agent_id": replica.agent_id, "handle": replica.handle},
            )

        task = asyncio.get_running_loop().create_task(unload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _load(
        self, spec: common_pb2.ShardSpec, path: Path, slot: Slot, request: pb.DeployModelRequest
    ) -> agent_pb.LoadShardResponse:
        return await self.link(slot.agent_id).load(
            spec,
            path,
            runtime=request.runtime,
            provider=request.execution_provider,
            browser_id=slot.browser_id,
            timeout=self._load_timeout,
        )

    def placement(self, model: str) -> pb.Placement:
        """The placement of a deployed model, with each replica's current health."""
        deployment = self.models.get(model)
        if deployment is None:
            deployed = ", ".join(sorted(self.models)) or "none"
            raise DeployError(
                grpc.StatusCode.NOT_FOUND,
                f"model {model!r} is not deployed (deployed: {deployed})",
            )
        placement = pb.Placement()
        placement.CopyFrom(deployment.placement)
        for shard_placement, stage in zip(
            placement.shards, deployment.pipeline.stages, strict=True
        ):
            for replica_pb, replica in zip(shard_placement.replicas, stage.replicas, strict=True):
                replica_pb.healthy = replica.healthy
            for spare_pb, spare in zip(shard_placement.spares, stage.spares, strict=True):
                spare_pb.healthy = spare.healthy
        return placement

    async def close(self) -> None:
        """Close every agent link."""
        for link in self._links.values():
            await link.close()
        self._links.clear()
