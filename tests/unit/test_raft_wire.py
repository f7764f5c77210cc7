"""The core's messages survive the trip through RaftService's protobufs."""

from __future__ import annotations

import itertools

import pytest
from webshard.coordinator.v1 import coordinator_pb2

from services.coordinator.raft import (
    AppendEntries,
    AppendEntriesResponse,
    Config,
    Entry,
    InstallSnapshot,
    InstallSnapshotResponse,
    Message,
    RequestVote,
    RequestVoteResponse,
    Role,
    Snapshot,
    wire,
)
from tests.unit.sim.cluster import Cluster, encode_state


def test_a_vote_request_and_its_reply_round_trip() -> None:
    request = RequestVote("r0", "r1", term=7, last_log_index=12, last_log_term=6, pre_vote=True)
    on_wire = wire.request_vote_to_proto(request)
    assert on_wire.candidate_id == "r0" and on_wire.pre_vote
    received = wire.request_vote_from_proto(
        coordinator_pb2.RequestVoteRequest.FromString(on_wire.SerializeToString()),
        recipient="r1",
        ref=5,
    )
    assert received == RequestVote("r0", "r1", 7, 12, 6, pre_vote=True, ref=5)
    reply = RequestVoteResponse("r1", "r0", term=7, vote_granted=True, pre_vote=True, ref=5)
    back = wire.vote_response_from_proto(wire.vote_response_to_proto(reply), request=request)
    # The proto reply has no pre_vote flag: it comes from the request.
    assert back == RequestVoteResponse("r1", "r0", 7, True, pre_vote=True)


def test_an_append_and_its_replies_round_trip() -> None:
    request = AppendEntries(
        "r0",
        "r2",
        term=3,
        prev_log_index=4,
        prev_log_term=2,
        entries=(Entry(5, 3, b""), Entry(6, 3, b"\x00\xffcmd")),
        leader_commit=4,
        seq=9,
    )
    received = wire.append_entries_from_proto(
        coordinator_pb2.AppendEntriesRequest.FromString(
            wire.append_entries_to_proto(request).SerializeToString()
        ),
        recipient="r2",
    )
    assert received == AppendEntries("r0", "r2", 3, 4, 2, request.entries, 4)
    accepted = AppendEntriesResponse("r2", "r0", 3, success=True, match_index=6)
    assert wire.append_response_from_proto(
        wire.append_response_to_proto(accepted), request=request
    ) == AppendEntriesResponse("r2", "r0", 3, True, match_index=6, seq=9)
    refused = AppendEntriesResponse("r2", "r0", 3, success=False, conflict_index=3)
    assert wire.append_response_from_proto(
        wire.append_response_to_proto(refused), request=request
    ) == AppendEntriesResponse("r2", "r0", 3, False, conflict_index=3, rejected_index=4, seq=9)


@pytest.mark.parametrize(
    "entries",
    [
        (Entry(6, 3, b"gap"),),
        (Entry(5, 3, b"a"), Entry(5, 3, b"again")),
        (Entry(5, 1, b"older than prev"),),
        (Entry(5, 4, b"newer than the leader"),),
    ],
)
def test_a_malformed_append_is_refused(entries: tuple[Entry, ...]) -> None:
    request = wire.append_entries_to_proto(
        AppendEntries(
            "r0", "r1", 3, prev_log_index=4, prev_log_term=2, entries=entries, leader_commit=0
        )
    )
    with pytest.raises(wire.WireError):
        wire.append_entries_from_proto(request, recipient="r1")


def test_requests_must_name_their_sender() -> None:
    with pytest.raises(wire.WireError):
        wire.request_vote_from_proto(coordinator_pb2.RequestVoteRequest(term=1), recipient="r1")
    with pytest.raises(wire.WireError):
        wire.append_entries_from_proto(coordinator_pb2.AppendEntriesRequest(term=1), recipient="r1")


def test_replies_with_terms_or_indexes_past_the_limit_are_refused() -> None:
    too_big = 2**63
    vote = RequestVote("r0", "r1", term=7, last_log_index=12, last_log_term=6)
    append = AppendEntries(
        "r0", "r1", 3, prev_log_index=4, prev_log_term=2, entries=(), leader_commit=0
    )
    snapshot = InstallSnapshot("r0", "r1", term=4, snapshot=Snapshot(10, 3, b""))
    with pytest.raises(wire.WireError, match="term"):
        wire.vote_response_from_proto(
            coordinator_pb2.RequestVoteResponse(term=too_big), request=vote
        )
    for field in ("term", "match_index", "conflict_index"):
        with pytest.raises(wire.WireError, match=field):
            wire.append_response_from_proto(
                coordinator_pb2.AppendEntriesResponse(**{field: too_big}),  # type: ignore[arg-type]
                request=append,
            )
    with pytest.raises(wire.WireError, match="term"):
        wire.snapshot_response_from_proto(
            coordinator_pb2.InstallSnapshotResponse(term=too_big), request=snapshot
        )
    reply = wire.vote_response_from_proto(
        coordinator_pb2.RequestVoteResponse(term=too_big - 1), request=vote
    )
    assert reply.term == too_big - 1


def test_entries_may_not_run_past_the_largest_index() -> None:
    request = coordinator_pb2.AppendEntriesRequest(
        term=3,
        leader_id="r0",
        prev_log_index=2**63 - 1,
        prev_log_term=3,
        entries=[coordinator_pb2.LogEntry(term=3, index=2**63, command=b"x")],
    )
    with pytest.raises(wire.WireError, match="largest index"):
        wire.append_entries_from_proto(request, recipient="r1")


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 2500])
def test_a_snapshot_is_chunked_and_reassembled(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    message = InstallSnapshot("r0", "r1", term=4, snapshot=Snapshot(10, 3, data), seq=2)
    chunks = list(wire.snapshot_chunks(message, chunk_bytes=1000))
    assert len(chunks) == max(1, -(-size // 1000))
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(len(c.data) <= 1000 for c in chunks)
    assembler = wire.SnapshotAssembler(recipient="r1", ref=8)
    results = [
        assembler.add(coordinator_pb2.InstallSnapshotRequest.FromString(c.SerializeToString()))
        for c in chunks
    ]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == InstallSnapshot("r0", "r1", 4, Snapshot(10, 3, data), ref=8)
    reply = wire.snapshot_response_from_proto(
        wire.snapshot_response_to_proto(InstallSnapshotResponse("r1", "r0", 4, match_index=10)),
        request=message,
    )
    assert reply == InstallSnapshotResponse("r1", "r0", 4, match_index=10, seq=2)


def test_a_broken_snapshot_stream_is_refused() -> None:
    message = InstallSnapshot("r0", "r1", term=4, snapshot=Snapshot(10, 3, b"x" * 30))
    chunks = list(wire.snapshot_chunks(message, chunk_bytes=10))

    skipped = wire.SnapshotAssembler(recipient="r1")
    skipped.add(chunks[0])
    with pytest.raises(wire.WireError):
        skipped.add(chunks[2])

    mixed = wire.SnapshotAssembler(recipient="r1")
    mixed.add(chunks[0])
    other = coordinator_pb2.InstallSnapshotRequest()
    other.CopyFrom(chunks[1])
    other.last_included_index = 11
    with pytest.raises(wire.WireError):
        mixed.add(other)

    finished = wire.SnapshotAssembler(recipient="r1")
    for chunk in chunks:
        finished.add(chunk)
    with pytest.raises(wire.WireError):
        finished.add(chunks[-1])

    small = wire.SnapshotAssembler(recipient="r1", max_bytes=15)
    small.add(chunks[0])
    with pytest.raises(wire.WireError):
        small.add(chunks[1])


def test_roles_map_onto_the_proto_enum() -> None:
    assert {wire.role_to_proto(role) for role in Role} == {
        coordinator_pb2.REPLICA_ROLE_FOLLOWER,
        coordinator_pb2.REPLICA_ROLE_PRE_CANDIDATE,
        coordinator_pb2.REPLICA_ROLE_CANDIDATE,
        coordinator_pb2.REPLICA_ROLE_LEADER,
    }


class WireCluster(Cluster):
    """A cluster whose every message crosses the wire as serialized protobufs.

    It pairs replies with requests the way a unary-RPC transport must: each
    delivered request gets a ref, and the reply carrying that ref is converted
    with the request the caller sent.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._refs = itertools.count(1)
        self._calls: dict[int, Message] = {}
        self.crossed = 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def transmit(self, message: Message) -> Message:
        self.crossed += 1
        if isinstance(message, RequestVote):
            ref = next(self._refs)
            self._calls[ref] = message
            data = wire.request_vote_to_proto(message).SerializeToString()
            return wire.request_vote_from_proto(
                coordinator_pb2.RequestVoteRequest.FromString(data),
                recipient=message.recipient,
                ref=ref,
            )
        if isinstance(message, AppendEntries):
            ref = next(self._refs)
            self._calls[ref] = message
            data = wire.append_entries_to_proto(message).SerializeToString()
            return wire.append_entries_from_proto(
                coordinator_pb2.AppendEntriesRequest.FromString(data),
                recipient=message.recipient,
                ref=ref,
            )
        if isinstance(message, InstallSnapshot):
            ref = next(self._refs)
            self._calls[ref] = message
            assembler = wire.SnapshotAssembler(recipient=message.recipient, ref=ref)
            whole = None
            for chunk in wire.snapshot_chunks(message, chunk_bytes=7):
                whole = assembler.add(
                    coordinator_pb2.InstallSnapshotRequest.FromString(chunk.SerializeToString())
                )
            assert whole is not None
            return whole
        request = self._calls.pop(message.ref)
        if isinstance(message, RequestVoteResponse):
            assert isinstance(request, RequestVote)
            data = wire.vote_response_to_proto(message).SerializeToString()
            return wire.vote_response_from_proto(
                coordinator_pb2.RequestVoteResponse.FromString(data), request=request
            )
        if isinstance(message, AppendEntriesResponse):
            assert isinstance(request, AppendEntries)
            data = wire.append_response_to_proto(message).SerializeToString()
            return wire.append_response_from_proto(
                coordinator_pb2.AppendEntriesResponse.FromString(data), request=request
            )
        assert isinstance(request, InstallSnapshot)
        data = wire.snapshot_response_to_proto(message).SerializeToString()
        return wire.snapshot_response_from_proto(
            coordinator_pb2.InstallSnapshotResponse.FromString(data), request=request
        )


def test_a_cluster_talking_only_through_protobufs_elects_replicates_snapshots_and_reads() -> None:
    cluster = WireCluster(
        3, config=Config(election_ticks=10, heartbeat_ticks=1, max_entries_per_message=4)
    )
    leader = cluster.elect("r0")
    cluster.isolate("r2")
    for number in range(12):
        cluster.propose("r0", f"c{number}".encode())
    cluster.tick(2)
    leader.compact(leader.applied_index, encode_state(cluster.machines["r0"]))
    cluster.heal()
    cluster.run_until(
        lambda: cluster.machines["r2"] == cluster.machines["r0"], 50, "catch-up by snapshot"
    )
    leader.read_index(b"q")
    cluster.tick()
    assert [rs.context for rs in cluster.read_states["r0"]] == [b"q"]
    # Failover across the wire too.
    cluster.isolate("r0")
    cluster.run_until(lambda: cluster.leader() in ("r1", "r2"), 100, "failover")
    new = cluster.leader()
    assert new is not None
    cluster.propose(new, b"after failover")
    cluster.heal()
    cluster.tick(30)
    for rid in cluster.ids:
        assert cluster.machines[rid] == cluster.machines[new]
        assert cluster.machines[rid][-1] == b"after failover"
    assert cluster.crossed > 100
    assert any(isinstance(m, InstallSnapshot) for m in cluster.sent)
