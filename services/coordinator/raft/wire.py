"""Conversion between the core's messages and RaftService's protobuf messages.

A request names its sender on the wire (candidate_id, leader_id); a reply does
not, since it comes back on the call the caller made. The core's replies also
carry fields the proto replies lack (pre_vote, seq, rejected_index, the
snapshot's index), all of which repeat the request. So a reply is always
converted together with the request it answers: ``*_from_proto(reply,
request=...)``.

InstallSnapshot is a client stream on the wire and one message in the core:
``snapshot_chunks`` cuts a snapshot into chunks and ``SnapshotAssembler``
puts them back together, checking offsets and headers.

Malformed input raises ``WireError`` (a ValueError), which a servicer answers
with INVALID_ARGUMENT: among it every term or index above ``MAX_TERM`` (2**63 - 1),
so that no message can push a replica's term to where term + 1 no longer
fits the wire's uint64. Given ``members`` (every configured replica id), a
request whose sender is not another member raises ``NotAMember``, which a
servicer answers with PERMISSION_DENIED, before anything reaches the core.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from webshard.coordinator.v1 import coordinator_pb2

from services.coordinator.raft.types import (
    MAX_INDEX,
    MAX_TERM,
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    InstallSnapshot,
    InstallSnapshotResponse,
    RequestVote,
    RequestVoteResponse,
    Role,
    Snapshot,
)

DEFAULT_CHUNK_BYTES = 1 << 20
"""Snapshot bytes per InstallSnapshot chunk: well under gRPC's 4 MiB default message limit."""

DEFAULT_MAX_SNAPSHOT_BYTES = 1 << 30
"""The largest snapshot an assembler accepts, so a broken sender cannot exhaust memory."""


class WireError(ValueError):
    """A protobuf message that cannot be a valid Raft message."""


class NotAMember(WireError):
    """A request whose sender is not one of the other configured replicas."""


def request_vote_to_proto(message: RequestVote) -> coordinator_pb2.RequestVoteRequest:
    """The proto form of a (pre-)vote request."""
    return coordinator_pb2.RequestVoteRequest(
        term=message.term,
        candidate_id=message.sender,
        last_log_index=message.last_log_index,
        last_log_term=message.last_log_term,
        pre_vote=message.pre_vote,
    )


def request_vote_from_proto(
    request: coordinator_pb2.RequestVoteRequest,
    *,
    recipient: str,
    ref: int = 0,
    members: Collection[str] | None = None,
) -> RequestVote:
    """A received vote request; ``ref`` lets the transport find the call its reply answers."""
    _require_sender(request.candidate_id, "candidate_id", recipient, members)
    _require_term(request.term, "term")
    _require_index(request.last_log_index, "last_log_index")
    _require_term(request.last_log_term, "last_log_term")
    return RequestVote(
        sender=request.candidate_id,
        recipient=recipient,
        term=request.term,
        last_log_index=request.last_log_index,
        last_log_term=request.last_log_term,
        pre_vote=request.pre_vote,
        ref=ref,
    )


def vote_response_to_proto(message: RequestVoteResponse) -> coordinator_pb2.RequestVoteResponse:
    """The proto form of a vote reply."""
    return coordinator_pb2.RequestVoteResponse(term=message.term, vote_granted=message.vote_granted)


def vote_response_from_proto(
    response: coordinator_pb2.RequestVoteResponse, *, request: RequestVote
) -> RequestVoteResponse:
    """The reply to ``request``, which this replica sent."""
    _require_term(response.term, "term")
    return RequestVoteResponse(
        sender=request.recipient,
        recipient=request.sender,
        term=response.term,
        vote_granted=response.vote_granted,
        pre_vote=request.pre_vote,
        ref=request.ref,
    )


def append_entries_to_proto(message: AppendEntries) -> coordinator_pb2.AppendEntriesRequest:
    """The proto form of an append (or heartbeat)."""
    return coordinator_pb2.AppendEntriesRequest(
        term=message.term,
        leader_id=message.sender,
        prev_log_index=message.prev_log_index,
        prev_log_term=message.prev_log_term,
        entries=[
            coordinator_pb2.LogEntry(term=e.term, index=e.index, command=e.command)
            for e in message.entries
        ],
        leader_commit=message.leader_commit,
    )


def append_entries_from_proto(
    request: coordinator_pb2.AppendEntriesRequest,
    *,
    recipient: str,
    ref: int = 0,
    members: Collection[str] | None = None,
) -> AppendEntries:
    """A received append, checked: its entries must follow prev_log_index one by one."""
    _require_sender(request.leader_id, "leader_id", recipient, members)
    _require_term(request.term, "term")
    _require_index(request.prev_log_index, "prev_log_index")
    _require_term(request.prev_log_term, "prev_log_term")
    _require_index(request.leader_commit, "leader_commit")
    if len(request.entries) > MAX_INDEX - request.prev_log_index:
        raise WireError(f"entries would run past the largest index {MAX_INDEX}")
    entries = tuple(Entry(index=e.index, term=e.term, command=e.command) for e in request.entries)
    previous_term = request.prev_log_term
    for position, entry in enumerate(entries):
        if entry.index != request.prev_log_index + 1 + position:
            raise WireError(
                f"entry {position} has index {entry.index}, expected "
                f"{request.prev_log_index + 1 + position}"
            )
        if not previous_term <= entry.term <= request.term:
            raise WireError(f"entry {entry.index} has term {entry.term} out of order")
        previous_term = entry.term
    return AppendEntries(
        sender=request.leader_id,
        recipient=recipient,
        term=request.term,
        prev_log_index=request.prev_log_index,
        prev_log_term=request.prev_log_term,
        entries=entries,
        leader_commit=request.leader_commit,
        ref=ref,
    )


def append_response_to_proto(
    message: AppendEntriesResponse,
) -> coordinator_pb2.AppendEntriesResponse:
    """The proto form of an append reply."""
    return coordinator_pb2.AppendEntriesResponse(
        term=message.term,
        success=message.success,
        match_index=message.match_index,
        conflict_index=message.conflict_index,
    )


def append_response_from_proto(
    response: coordinator_pb2.AppendEntriesResponse, *, request: AppendEntries
) -> AppendEntriesResponse:
    """The reply to ``request``; seq and rejected_index come from the request."""
    _require_term(response.term, "term")
    _require_index(response.match_index, "match_index")
    _require_index(response.conflict_index, "conflict_index")
    return AppendEntriesResponse(
        sender=request.recipient,
        recipient=request.sender,
        term=response.term,
        success=response.success,
        match_index=response.match_index,
        conflict_index=response.conflict_index,
        rejected_index=0 if response.success else request.prev_log_index,
        seq=request.seq,
        ref=request.ref,
    )


def snapshot_chunks(
    message: InstallSnapshot, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[coordinator_pb2.InstallSnapshotRequest]:
    """The InstallSnapshot stream for one snapshot: every chunk repeats the header."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    data = message.snapshot.data
    offset = 0
    while True:
        chunk = data[offset : offset + chunk_bytes]
        done = offset + len(chunk) >= len(data)
        yield coordinator_pb2.InstallSnapshotRequest(
            term=message.term,
            leader_id=message.sender,
            last_included_index=message.snapshot.index,
            last_included_term=message.snapshot.term,
            offset=offset,
            data=chunk,
            done=done,
        )
        if done:
            return
        offset += len(chunk)


class SnapshotAssembler:
    """Collects one InstallSnapshot stream into the core's single message."""

    def __init__(
        self,
        *,
        recipient: str,
        ref: int = 0,
        max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
        members: Collection[str] | None = None,
    ) -> None:
        """Start an empty snapshot for ``recipient`` (this replica), sent by one of ``members``."""
        self._recipient = recipient
        self._members = members
        self._ref = ref
        self._max_bytes = max_bytes
        self._first: coordinator_pb2.InstallSnapshotRequest | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._done = False

    def add(self, chunk: coordinator_pb2.InstallSnapshotRequest) -> InstallSnapshot | None:
        """Take the next chunk; return the whole message after the chunk marked done."""
        if self._done:
            raise WireError("chunk after the last one")
        if self._first is None:
            _require_sender(chunk.leader_id, "leader_id", self._recipient, self._members)
            _require_term(chunk.term, "term")
            _require_index(chunk.last_included_index, "last_included_index")
            _require_term(chunk.last_included_term, "last_included_term")
            if chunk.last_included_index == 0:
                raise WireError("a snapshot must include at least one entry")
            if chunk.last_included_term > chunk.term:
                raise WireError("a snapshot cannot hold entries from a term after the leader's")
            self._first = chunk
        elif (chunk.term, chunk.leader_id, chunk.last_included_index, chunk.last_included_term) != (
            self._first.term,
            self._first.leader_id,
            self._first.last_included_index,
            self._first.last_included_term,
        ):
            raise WireError("chunks of one stream describe different snapshots")
        if chunk.offset != self._size:
            raise WireError(f"chunk at offset {chunk.offset}, expected {self._size}")
        self._size += len(chunk.data)
        if self._size > self._max_bytes:
            raise WireError(f"snapshot larger than {self._max_bytes} bytes")
        self._parts.append(chunk.data)
        if not chunk.done:
            return None
        self._done = True
        first = self._first
        return InstallSnapshot(
            sender=first.leader_id,
            recipient=self._recipient,
            term=first.term,
            snapshot=Snapshot(
                index=first.last_included_index,
                term=first.last_included_term,
                data=b"".join(self._parts),
            ),
            ref=self._ref,
        )


def snapshot_response_to_proto(
    message: InstallSnapshotResponse,
) -> coordinator_pb2.InstallSnapshotResponse:
    """The proto form of a snapshot reply."""
    return coordinator_pb2.InstallSnapshotResponse(term=message.term)


def snapshot_response_from_proto(
    response: coordinator_pb2.InstallSnapshotResponse, *, request: InstallSnapshot
) -> InstallSnapshotResponse:
    """The reply to ``request``: at the leader's term it acknowledges the snapshot's index."""
    _require_term(response.term, "term")
    return InstallSnapshotResponse(
        sender=request.recipient,
        recipient=request.sender,
        term=response.term,
        match_index=request.snapshot.index,
        seq=request.seq,
        ref=request.ref,
    )


def role_to_proto(role: Role) -> coordinator_pb2.ReplicaRole.ValueType:
    """The ReplicaRole reported in ClusterStatus."""
    match role:
        case Role.FOLLOWER:
            return coordinator_pb2.REPLICA_ROLE_FOLLOWER
        case Role.PRE_CANDIDATE:
            return coordinator_pb2.REPLICA_ROLE_PRE_CANDIDATE
        case Role.CANDIDATE:
            return coordinator_pb2.REPLICA_ROLE_CANDIDATE
        case Role.LEADER:
            return coordinator_pb2.REPLICA_ROLE_LEADER


def _require_id(value: str, field: str) -> None:
    if not value:
        raise WireError(f"{field} must name a replica")


def _require_sender(
    value: str, field: str, recipient: str, members: Collection[str] | None
) -> None:
    _require_id(value, field)
    if members is None:
        return
    named = repr(value[:40] + ("..." if len(value) > 40 else ""))
    listed = ", ".join(sorted(members))
    if value == recipient:
        raise NotAMember(
            f"{field} {named} is this replica itself; messages come from the other members "
            f"({listed})"
        )
    if value not in members:
        raise NotAMember(f"{field} {named} is not a member of this cluster ({listed})")


def _require_term(value: int, field: str) -> None:
    if value > MAX_TERM:
        raise WireError(f"{field} {value} is past the largest term this cluster uses ({MAX_TERM})")


def _require_index(value: int, field: str) -> None:
    if value > MAX_INDEX:
        raise WireError(f"{field} {value} is past the largest log index ({MAX_INDEX})")
