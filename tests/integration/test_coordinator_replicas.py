"""Three real coordinator processes: failover, partitions, and what survives on disk."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import webshard
from webshard.cli.local import LocalCluster
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc
from webshard.errors import RPCError

from tests.conftest import free_port, wait_for

MODELS = ["vit-tiny", "whisper-tiny-enc", "clip-tiny", "decoder-tiny"]
REPLICAS = ("coordinator-0", "coordinator-1", "coordinator-2")


def status(address: str) -> pb.ClusterStatusResponse | None:
    """A replica's own view, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.CoordinatorServiceStub(channel).ClusterStatus(
                pb.ClusterStatusRequest(), timeout=1
            )
        except grpc.RpcError:
            return None


def leader(cluster: LocalCluster) -> str | None:
    """The name of the replica that says it leads, if exactly one does."""
    leaders = []
    for name in REPLICAS:
        if cluster.popen(name).poll() is not None:
            continue
        view = status(cluster.address(name))
        if view is not None and view.replicas[0].role == pb.REPLICA_ROLE_LEADER:
            leaders.append(name)
    return leaders[0] if len(leaders) == 1 else None


class LeaderWatch:
    """Polls every replica and records which replica claimed leadership in which term."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.claims: dict[int, set[str]] = defaultdict(set)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in REPLICAS:
                view = status(self.cluster.address(name))
                if view is not None and view.replicas[0].role == pb.REPLICA_ROLE_LEADER:
                    self.claims[view.replicas[0].term].add(name)
            time.sleep(0.01)

    def __enter__(self) -> LeaderWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(
        agents=1,
        data_dir=tmp_path / "cluster",
        auto_ports=True,
        extra_args={"browser_agent": ["--browsers", "0"]},
    )
    local.start(timeout=120)
    try:
        wait_for(lambda: leader(local) is not None, 30, "a leader")
        with webshard.Client(local.coordinators(), timeout=30) as client:
            wait_for(lambda: len(client.list_agents()) == 1, 30, "the agent to attach")
        yield local
    finally:
        local.stop()


def deploy_until_acknowledged(
    client: webshard.Client, model: str, deploy_id: str, deadline_s: float
) -> pb.Placement:
    """Retry one deploy, always with the same request id, until a leader acknowledges it."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return client.deploy(
                model, sharding="layer", shards=1, runtime="native", request_id=deploy_id
            )
        except RPCError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_ten_leader_kills_under_writes_lose_no_acknowledged_write(cluster: LocalCluster) -> None:
    acked: list[tuple[str, int, str]] = []  # model, version, deploy id
    models = itertools.cycle(MODELS)
    with (
        LeaderWatch(cluster) as watch,
        webshard.Client(cluster.coordinators(), timeout=30) as client,
    ):
        for _ in range(10):
            for _ in range(3):
                model = next(models)
                deploy_id = uuid.uuid4().hex
                placement = deploy_until_acknowledged(client, model, deploy_id, 60)
                acked.append((model, placement.version, placement.deploy_id))
                assert placement.deploy_id == deploy_id
            victim = leader(cluster)
            assert victim is not None
            cluster.popen(victim).send_signal(signal.SIGKILL)
            cluster.popen(victim).wait(timeout=10)
            model = next(models)
            deploy_id = uuid.uuid4().hex
            placement = deploy_until_acknowledged(client, model, deploy_id, 60)
            acked.append((model, placement.version, placement.deploy_id))
            cluster.restart(victim)

    # Every replica converges on the same placements.
    def converged() -> bool:
        views = [status(a) for a in cluster.coordinators()]
        if any(v is None for v in views):
            return False
        placements = [{p.model: (p.version, p.deploy_id) for p in v.placements} for v in views]  # type: ignore[union-attr]
        return placements[0] == placements[1] == placements[2]

    wait_for(converged, 30, "every replica to hold the same placements")
    final = {p.model: p for p in status(cluster.address("coordinator-0")).placements}  # type: ignore[union-attr]

    # An acknowledged write that was lost would be overwritten by a later write
    # with the same version: so versions of acknowledged writes never repeat.
    for model in MODELS:
        versions = [v for m, v, _ in acked if m == model]
        assert len(versions) == len(set(versions)), f"{model}: a version was reused: {versions}"
        assert versions == sorted(versions)
        _, last_version, last_id = next(a for a in reversed(acked) if a[0] == model)
        assert final[model].version >= last_version
        if final[model].version == last_version:
            assert final[model].deploy_id == last_id
    for term, claimants in watch.claims.items():
        assert len(claimants) == 1, f"two leaders in term {term}: {claimants}"
    assert len(watch.claims) >= 10  # a new term after every kill


def test_a_partitioned_minority_elects_nobody_and_catches_up(cluster: LocalCluster) -> None:
    first = leader(cluster)
    assert first is not None
    followers = [n for n in REPLICAS if n != first]

    # Cut the leader off from both followers: it must step down, and nobody leads.
    for name in followers:
        os.kill(cluster.popen(name).pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: (
                status(cluster.address(first)).replicas[0].role  # type: ignore[union-attr]
                != pb.REPLICA_ROLE_LEADER
            ),
            10,
            "the isolated leader to step down",
        )
        with webshard.Client(cluster.address(first), timeout=3) as alone:
            with pytest.raises(RPCError) as refused:
                alone.deploy("vit-tiny", sharding="layer", shards=1, runtime="native")
            assert refused.value.code.name in (
                "UNAVAILABLE",
                "FAILED_PRECONDITION",
                "DEADLINE_EXCEEDED",
            )
        view = status(cluster.address(first))
        assert view is not None and view.replicas[0].role != pb.REPLICA_ROLE_LEADER
        assert not view.leader_id
    finally:
        for name in followers:
            os.kill(cluster.popen(name).pid, signal.SIGCONT)

    # Heal; then cut off one replica, write to the majority, heal, and it catches up.
    wait_for(lambda: leader(cluster) is not None, 30, "a leader after healing")
    minority = next(n for n in REPLICAS if n != leader(cluster))
    os.kill(cluster.popen(minority).pid, signal.SIGSTOP)
    try:
        # The client is on the majority's side of the cut.
        majority = [cluster.address(n) for n in REPLICAS if n != minority]
        with webshard.Client(majority, timeout=30) as client:
            wait_for(
                lambda: len(client.list_agents()) == 1, 30, "the agent to attach to the leader"
            )
            written = [
                deploy_until_acknowledged(client, model, uuid.uuid4().hex, 60) for model in MODELS
            ]
    finally:
        os.kill(cluster.popen(minority).pid, signal.SIGCONT)

    def caught_up() -> bool:
        view = status(cluster.address(minority))
        held = {p.model: p.deploy_id for p in view.placements} if view else {}
        return all(held.get(p.model) == p.deploy_id for p in written)

    wait_for(caught_up, 30, f"{minority} to catch up")


def start_coordinator(data_dir: Path) -> subprocess.Popen[bytes]:
    port = free_port()
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.coordinator",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_raft_log_stops_the_replica_with_a_clear_error(
    tmp_path: Path, damage: str
) -> None:
    # A single-replica coordinator elects itself and writes a log with entries.
    first = start_coordinator(tmp_path)
    log_file = tmp_path / "raft" / "raft.log"
    wait_for(
        lambda: log_file.exists() and log_file.stat().st_size > 0,
        30,
        "the leader's first entry (its no-op) to reach the log",
    )
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    data = bytearray(log_file.read_bytes())
    assert data, "the log should hold at least one entry"
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-3]
    log_file.write_bytes(bytes(data))
    before = log_file.read_bytes()

    second = start_coordinator(tmp_path)
    output, _ = second.communicate(timeout=30)
    assert second.returncode != 0
    text = output.decode()
    assert "CorruptLog" in text
    assert log_file.name in text
    assert "offset" in text
    assert log_file.read_bytes() == before  # nothing was repaired or dropped behind our back


def raft_stub(address: str) -> tuple[grpc.Channel, pb_grpc.RaftServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.RaftServiceStub(channel)


def test_a_forged_raft_message_is_refused_and_the_leader_stays(cluster: LocalCluster) -> None:
    first = leader(cluster)
    assert first is not None
    term = status(cluster.address(first)).replicas[0].term  # type: ignore[union-attr]
    follower = next(n for n in REPLICAS if n != first)
    channel, stub = raft_stub(cluster.address(follower))
    with channel:
        # The message that once left every replica PRE_CANDIDATE forever.
        with pytest.raises(grpc.RpcError) as refused:
            stub.AppendEntries(pb.AppendEntriesRequest(term=2**64 - 1, leader_id=first), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "term" in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as stranger:
            stub.RequestVote(
                pb.RequestVoteRequest(term=term + 1, candidate_id="coordinator-9"), timeout=5
            )
        assert stranger.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert all(name in (stranger.value.details() or "") for name in REPLICAS)
    # Nothing reached the core: same leader, same term, on every replica.
    for name in REPLICAS:
        view = status(cluster.address(name))
        assert view is not None
        assert (view.leader_id, view.replicas[0].term) == (first, term)
    with webshard.Client(cluster.coordinators(), timeout=30) as client:
        deploy_until_acknowledged(client, "vit-tiny", uuid.uuid4().hex, 30)


def test_a_follower_with_a_torn_last_record_cuts_it_and_rejoins(cluster: LocalCluster) -> None:
    first = leader(cluster)
    assert first is not None
    victim = next(n for n in REPLICAS if n != first)
    cluster.popen(victim).send_signal(signal.SIGTERM)
    assert cluster.popen(victim).wait(timeout=30) == 0
    log_file = Path(cluster.data_dir) / victim / "raft" / "raft.log"
    whole = log_file.stat().st_size
    # Power lost half-way through appending a record: its header and part of its payload.
    with open(log_file, "ab") as log:
        log.write((64).to_bytes(4, "big") + b"\x12\x34\x56\x78" + b"partial payload")
    cluster.restart(victim)
    text = Path(cluster.data_dir, "logs", f"{victim}.log").read_text()
    assert "cutting off a torn last record" in text and str(log_file) in text
    assert f"offset {whole}" in text
    with webshard.Client(cluster.coordinators(), timeout=30) as client:
        placement = deploy_until_acknowledged(client, "clip-tiny", uuid.uuid4().hex, 60)

    def caught_up() -> bool:
        view = status(cluster.address(victim))
        held = {p.model: p.deploy_id for p in view.placements} if view else {}
        return held.get("clip-tiny") == placement.deploy_id

    wait_for(caught_up, 30, f"{victim} to rejoin and catch up")
