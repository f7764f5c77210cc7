"""Boundary activations the coordinator keeps, and VerifyShard: one shard run again on
one replica from them, its answer compared with the kept one.

The deployments, pipelines and servicer are real; the hop runner is a fake that
computes two small shards in numpy, so no agent runs.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import pytest
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.tensors import decode_tensor, encode_tensor

from services.common.errors import DomainError
from services.common.server import Lifecycle
from services.coordinator.cluster_state import ClusterState
from services.coordinator.consensus import NotLeaderError
from services.coordinator.deployments import Deployments
from services.coordinator.links import HopError
from services.coordinator.pipeline import (
    MAX_KEPT_ACTIVATION_BYTES,
    VERIFY_TOLERANCE,
    InferError,
    Pin,
    Replica,
    compare_outputs,
)
from services.coordinator.registry import AgentRegistry
from services.coordinator.servicer import CoordinatorServicer
from services.coordinator.settings import CoordinatorSettings
from services.models.inputs import example_inputs

MODEL = "minilm-l6"
NATIVE = "native"


_COLUMNS = np.zeros((1, 384), np.float32)


class Shards:
    """A hop runner for a two-shard chain: shard 0 turns the ids into "hidden", shard 1
    squashes it into "sentence_embedding" [batch, 384] (values within ±1). A runtime in
    ``dead`` fails its hops; one in ``skew`` adds that much to every output; one in
    ``misshapen`` answers a 3-D "sentence_embedding"."""

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.skew: dict[str, float] = {}
        self.misshapen: set[str] = set()
        self.ran: list[tuple[str, str]] = []
        """(agent, request id) of every hop tried."""

    async def __call__(
        self, replica: Replica, request_id: str, inputs: Sequence[common_pb2.Tensor], _: float
    ) -> tuple[list[common_pb2.Tensor], float]:
        self.ran.append((replica.agent_id, request_id))
        if replica.agent_id in self.dead:
            raise HopError(replica.agent_id, grpc.StatusCode.UNAVAILABLE, "socket closed")
        feeds = {t.name: decode_tensor(t) for t in inputs}
        if replica.handle.startswith("s0"):
            name, value = "hidden", feeds["input_ids"].astype(np.float32) * 2.0
        elif replica.agent_id in self.misshapen:  # another graph's hidden states, say
            name, value = "sentence_embedding", np.tanh(feeds["hidden"][..., None] / 1e4)
        else:  # [batch, 384], as minilm-l6 declares
            name, value = "sentence_embedding", np.tanh(feeds["hidden"][:, :1] / 1e4) + _COLUMNS
        value = value + np.float32(self.skew.get(replica.agent_id, 0.0))
        return [encode_tensor(name, value.astype(np.float32))], 1.5


class Reports:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, **fields: Any) -> None:
        self.reports.append(fields)


def placement(*, shard1_sha: str = "sha-1", spare: bool = False) -> pb.Placement:
    """Shard 0 on agent-0, shard 1 on agent-1 (and a spare of it on agent-2)."""
    placement = pb.Placement(model=MODEL, version=1, deploy_id="deploy-1")
    first = placement.shards.add()
    first.shard.CopyFrom(
        common_pb2.ShardSpec(
            index=0,
            sha256="sha-0",
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["hidden"],
        )
    )
    first.replicas.add(agent_id="agent-0", browser_id=NATIVE, handle="s0-a0", healthy=True)
    second = placement.shards.add()
    second.shard.CopyFrom(
        common_pb2.ShardSpec(
            index=1, sha256=shard1_sha, input_names=["hidden"], output_names=["sentence_embedding"]
        )
    )
    second.replicas.add(agent_id="agent-1", browser_id=NATIVE, handle="s1-a1", healthy=True)
    if spare:
        second.spares.add(
            agent_id="agent-2", browser_id=NATIVE, handle="s1-a2", healthy=True, spare=True
        )
    return placement


def rig(**kw: Any) -> tuple[Deployments, Shards, Reports]:
    """Deployments serving ``placement(**kw)`` with the fake hop runner."""
    reports = Reports()
    deployments = Deployments(AgentRegistry(heartbeat_timeout_s=60), None, reporter=reports)  # type: ignore[arg-type]
    shards = Shards()
    deployments.run_hop = shards  # type: ignore[method-assign]
    deployments.apply_placement(MODEL, placement(**kw))
    return deployments, shards, reports


def inputs(batch: int = 1, seq_len: int = 8) -> list[common_pb2.Tensor]:
    feeds = example_inputs(MODEL, batch=batch, seq_len=seq_len)
    return [encode_tensor(name, value) for name, value in feeds.items()]


async def infer(deployments: Deployments, feeds: list[common_pb2.Tensor], **kw: Any) -> Any:
    pipeline = deployments.models[MODEL].pipeline
    return await pipeline.run(f"req-{uuid.uuid4().hex}", feeds, time.monotonic() + 10, **kw)


def stages(deployments: Deployments) -> list[Any]:
    return deployments.models[MODEL].pipeline.stages


# ----------------------------------------------------------------------------- kept


async def test_each_stage_keeps_its_last_successful_hop_on_a_serving_replica() -> None:
    deployments, shards, _ = rig(spare=True)
    assert [s.kept for s in stages(deployments)] == [None, None]
    feeds = inputs()
    answer = await infer(deployments, feeds)
    first, second = (s.kept for s in stages(deployments))
    assert first is not None and second is not None
    assert list(first.feeds) == feeds
    # Copies: a kept tensor must not hold the request it came in (which may be big) alive.
    assert all(kept is not sent for kept, sent in zip(first.feeds, feeds, strict=True))
    assert [t.name for t in first.outputs] == ["hidden"]
    assert second.feeds == first.outputs
    assert list(second.outputs) == list(answer.outputs)
    assert (second.agent_id, second.browser_id) == ("agent-1", NATIVE)

    # A run with shard 1 pinned to its spare keeps shard 0's hop, not the spare's.
    await infer(deployments, inputs(seq_len=6), pins={1: Pin("agent-2")})
    assert shards.ran[-1][0] == "agent-2"
    now_first, now_second = (s.kept for s in stages(deployments))
    assert now_first is not None and now_first is not first
    assert now_second is second

    # A failed hop keeps nothing: the request fails over, and the stage keeps what it had.
    shards.dead.add("agent-1")
    with pytest.raises(InferError):
        await infer(deployments, inputs(seq_len=5))
    assert stages(deployments)[1].kept is second


async def test_a_big_activation_is_not_kept_and_the_last_small_one_stays() -> None:
    deployments, _, _ = rig()
    await infer(deployments, inputs())
    small = stages(deployments)[0].kept
    assert small is not None
    big = inputs(batch=200, seq_len=512)  # 200 x 512 int64 ids: 800 KiB each, three of them
    assert sum(t.ByteSize() for t in big) > MAX_KEPT_ACTIVATION_BYTES
    await infer(deployments, big)
    assert stages(deployments)[0].kept is small
    # Each stage has its own bound: shard 1's feeds and outputs from the same request
    # (two 200 x 512 float32 tensors, 400 KiB each) are kept.
    kept = stages(deployments)[1].kept
    assert kept is not None and kept.feeds[0].shape == [200, 512]


async def test_kept_activations_carry_over_a_new_placement_of_the_same_shard_files() -> None:
    deployments, _, _ = rig(spare=True)
    await infer(deployments, inputs())
    first, second = (s.kept for s in stages(deployments))
    assert first is not None and second is not None

    # A takeover: the spare serves shard 1 now; the shard files are the same.
    moved = placement()
    moved.shards[1].replicas[0].CopyFrom(
        pb.ShardReplica(agent_id="agent-2", browser_id=NATIVE, handle="s1-a2", healthy=True)
    )
    deployments.apply_placement(MODEL, moved)
    assert [s.kept for s in stages(deployments)] == [first, second]

    # A redeploy that cut shard 1 differently: its kept activation does not fit it.
    deployments.apply_placement(MODEL, placement(shard1_sha="sha-other"))
    assert [s.kept for s in stages(deployments)] == [first, None]

    deployments.apply_placement(MODEL, None)
    deployments.apply_placement(MODEL, placement())
    assert [s.kept for s in stages(deployments)] == [None, None]


async def test_a_spare_warm_up_keeps_what_its_unpinned_stages_ran() -> None:
    deployments, shards, _ = rig()
    deployments.apply_placement(MODEL, None)
    prepared = await deployments._warm_spares(placement(spare=True))
    assert [len(s.spares) for s in prepared.shards] == [0, 1]  # warmed, kept in
    assert any(agent == "agent-2" for agent, _ in shards.ran)
    deployments.apply_placement(MODEL, prepared)
    first, second = (s.kept for s in stages(deployments))
    assert first is not None and (first.agent_id, first.browser_id) == ("agent-0", NATIVE)
    assert second is None  # shard 1 ran pinned to the spare: not a serving replica's hop


# ----------------------------------------------------------------------------- verify


async def verify(deployments: Deployments, shard: int, where: str) -> Any:
    pipeline = deployments.models[MODEL].pipeline
    agent, _, browser = where.partition("/")
    return await pipeline.verify_shard(shard, Pin(agent, browser), time.monotonic() + 10)


async def test_verify_runs_one_hop_on_the_replica_from_the_kept_activation() -> None:
    deployments, shards, reports = rig(spare=True)
    await infer(deployments, inputs())
    tried = len(shards.ran)
    check = await verify(deployments, 1, "agent-2/native")
    [(agent, request_id)] = shards.ran[tried:]  # one hop, on the replica asked for
    assert agent == "agent-2" and request_id.startswith("verify-")
    assert check.passed and check.max_abs_difference == 0.0
    assert check.tolerance == VERIFY_TOLERANCE  # outputs within ±1
    assert (check.timing.shard_index, check.timing.agent_id, check.timing.browser_id) == (
        1,
        "agent-2",
        NATIVE,
    )
    assert check.timing.compute.ToMilliseconds() == 1
    assert (check.kept.agent_id, check.kept.browser_id) == ("agent-1", NATIVE)

    shards.skew["agent-2"] = 1e-4  # float rounding of another provider: passes
    assert (await verify(deployments, 1, "agent-2")).passed
    shards.skew["agent-2"] = 0.01
    wrong = await verify(deployments, 1, "agent-2")
    assert not wrong.passed
    assert wrong.max_abs_difference == pytest.approx(0.01, rel=1e-3)
    assert not reports.reports  # a verify's hops are no data-path failures


async def test_verify_errors_name_what_is_missing_or_what_failed() -> None:
    deployments, shards, reports = rig()
    with pytest.raises(InferError, match="verify with a whole inference") as nothing_kept:
        await verify(deployments, 1, "agent-1")
    assert nothing_kept.value.code == grpc.StatusCode.FAILED_PRECONDITION
    await infer(deployments, inputs())
    with pytest.raises(InferError, match="has no shard 7") as no_shard:
        await verify(deployments, 7, "agent-1")
    assert no_shard.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InferError, match="no replica on agent-9/\\*") as no_replica:
        await verify(deployments, 1, "agent-9")
    assert no_replica.value.code == grpc.StatusCode.NOT_FOUND

    shards.dead.add("agent-1")
    with pytest.raises(InferError, match="on agent-1/native: the hop failed") as failed:
        await verify(deployments, 1, "agent-1/native")
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert not reports.reports  # pinned: not reported as a data-path failure
    assert not stages(deployments)[1].replicas[0].healthy  # but the probe is believed


def test_the_tolerance_follows_the_outputs_scale_and_a_missing_output_never_passes() -> None:
    def tensors(**values: Any) -> dict[str, common_pb2.Tensor]:
        return {k: encode_tensor(k, np.asarray(v, np.float32)) for k, v in values.items()}

    kept = list(tensors(a=[2000.0, -1.0], b=[0.5]).values())
    assert compare_outputs(kept, tensors(a=[2001.0, -1.0], b=[0.5])) == (1.0, 2.0)
    difference, tolerance = compare_outputs(kept, tensors(a=[2003.0, -1.0], b=[0.5]))
    assert difference > tolerance
    assert compare_outputs(kept, tensors(a=[2000.0, -1.0]))[0] == math.inf  # b missing
    assert compare_outputs(kept, tensors(a=[2000.0], b=[0.5]))[0] == math.inf  # shape
    assert compare_outputs(kept, tensors(a=[2000.0, math.nan], b=[0.5]))[0] == math.inf
    # Small outputs: the bound is absolute, 1e-3.
    assert compare_outputs(list(tensors(c=[0.01]).values()), tensors(c=[0.0]))[1] == 1e-3


async def test_an_answer_of_another_shape_than_the_model_declares_is_a_failed_hop() -> None:
    deployments, shards, reports = rig()
    second = placement()
    second.shards[1].replicas.add(agent_id="agent-3", browser_id=NATIVE, handle="s1-a3")
    deployments.apply_placement(MODEL, second)
    shards.misshapen.add("agent-1")
    for _ in range(4):  # the replicas take turns: agent-1 is tried first at least once
        answer = await infer(deployments, inputs())
        [embedding] = answer.outputs
        assert list(embedding.shape) == [1, 384]
        assert answer.trail[1].agent_id == "agent-3"
    assert reports.reports
    for failure in reports.reports:
        assert (failure["agent_id"], failure["shard_index"]) == ("agent-1", 1)
        assert "answered sentence_embedding of shape [1, 8, 1]" in failure["message"]
    assert stages(deployments)[1].kept.agent_id == "agent-3"  # the misshapen answer is not kept


# ----------------------------------------------------------------------------- spare checks


async def test_a_spare_that_fails_its_check_or_answers_otherwise_is_dropped() -> None:
    deployments, shards, reports = rig(spare=True)
    committed: list[pb.Placement] = []
    unloaded: list[str] = []

    async def commit(build: Any) -> bool:
        placement = build()
        if placement is None:
            return False
        committed.append(placement)
        deployments.apply_placement(MODEL, placement)
        return True

    async def unload(replica: pb.ShardReplica) -> bool:
        unloaded.append(replica.handle)
        return True

    deployments.unload = unload  # type: ignore[method-assign]
    shards.dead.add("agent-2")
    assert await deployments.check_spares(commit) == []  # nothing kept: nothing to check
    assert not any(agent == "agent-2" for agent, _ in shards.ran)

    shards.dead.clear()
    await infer(deployments, inputs())
    assert await deployments.check_spares(commit) == []  # sound
    assert any(agent == "agent-2" for agent, _ in shards.ran)
    assert not committed

    shards.skew["agent-2"] = 0.01  # a session answering for another graph, say
    [dropped] = await deployments.check_spares(commit)
    assert (dropped.agent_id, dropped.handle) == ("agent-2", "s1-a2")
    assert [len(s.spares) for s in committed[-1].shards] == [0, 0]
    assert stages(deployments)[1].spares == []
    await asyncio.sleep(0)  # the background unload
    assert unloaded == ["s1-a2"]
    assert not reports.reports  # a spare's check is no data-path failure

    deployments.apply_placement(MODEL, placement(spare=True))
    await infer(deployments, inputs())
    shards.dead.add("agent-2")  # its hop fails
    assert [r.handle for r in await deployments.check_spares(commit)] == ["s1-a2"]

    deployments.apply_placement(MODEL, placement(spare=True))
    await infer(deployments, inputs())
    shards.dead.clear()
    shards.misshapen.add("agent-2")  # it runs another graph
    assert [r.handle for r in await deployments.check_spares(commit)] == ["s1-a2"]


# ----------------------------------------------------------------------------- servicer


class Replicator:
    def __init__(self, leader: bool) -> None:
        self.is_leader = leader

    def not_leader(self) -> NotLeaderError:
        return NotLeaderError("coordinator-1", "127.0.0.1:50061")


class Context:
    def time_remaining(self) -> float:
        return 10.0


def servicer(deployments: Deployments, *, leader: bool) -> CoordinatorServicer:
    return CoordinatorServicer(
        settings=CoordinatorSettings(),
        registry=AgentRegistry(heartbeat_timeout_s=60),
        deployments=deployments,
        state=ClusterState(),
        replicator=Replicator(leader),  # type: ignore[arg-type]
        lifecycle=Lifecycle(),
    )


async def test_verify_shard_answers_on_the_leader_only_and_checks_its_request() -> None:
    deployments, shards, _ = rig()
    await infer(deployments, inputs())
    request = pb.VerifyShardRequest(model=MODEL, shard_index=1, agent_id="agent-1")
    answer = await servicer(deployments, leader=True).VerifyShard(request, Context())  # type: ignore[arg-type]
    assert answer.passed and answer.max_abs_difference == 0.0
    assert answer.tolerance == VERIFY_TOLERANCE
    assert (answer.timing.agent_id, answer.timing.browser_id) == ("agent-1", NATIVE)
    assert (answer.kept_from.agent_id, answer.kept_from.browser_id) == ("agent-1", NATIVE)
    shards.skew["agent-1"] = 0.5
    wrong = await servicer(deployments, leader=True).VerifyShard(request, Context())  # type: ignore[arg-type]
    assert not wrong.passed and wrong.max_abs_difference == pytest.approx(0.5, rel=1e-3)

    with pytest.raises(DomainError) as follower:
        await servicer(deployments, leader=False).VerifyShard(request, Context())  # type: ignore[arg-type]
    assert follower.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert follower.value.trailers == (("webshard-leader", "127.0.0.1:50061"),)

    for bad in (
        pb.VerifyShardRequest(shard_index=1, agent_id="agent-1"),
        pb.VerifyShardRequest(model=MODEL, shard_index=-1, agent_id="agent-1"),
        pb.VerifyShardRequest(model=MODEL, shard_index=1),
    ):
        with pytest.raises(DomainError) as refused:
            await servicer(deployments, leader=True).VerifyShard(bad, Context())  # type: ignore[arg-type]
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(Exception, match="'vit-tiny' is not deployed") as unknown:
        await servicer(deployments, leader=True).VerifyShard(
            pb.VerifyShardRequest(model="vit-tiny", agent_id="agent-1"),
            Context(),  # type: ignore[arg-type]
        )
    assert getattr(unknown.value, "code", None) == grpc.StatusCode.NOT_FOUND
