"""The values that go in and out of the consensus core: entries, messages, state, errors.

Every value here is an immutable dataclass with no behaviour beyond validation,
so a message can be handed to a simulated network, duplicated, delayed and
replayed without anyone changing it under the core's feet.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of the replicated log.

    An empty ``command`` is the no-op a new leader appends to commit the
    entries of earlier terms; a state machine skips it.
    """

    index: int
    term: int
    command: bytes


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state machine's state after applying every entry up to ``index``.

    ``term`` is the term of the entry at ``index``, which the log needs to keep
    checking the entries that follow it.
    """

    index: int
    term: int
    data: bytes


@dataclass(frozen=True, slots=True)
class HardState:
    """What a replica must have on disk before it sends anything: term, vote and commit index."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class PersistedState:
    """Everything a storage holds, as one replica reads it back when it starts."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()


@dataclass(frozen=True, slots=True)
class ReadState:
    """A confirmed linearizable read: answer it once the state machine has applied ``index``."""

    index: int
    context: bytes


MAX_TERM = 2**63 - 1
"""The highest term (and index) a replica accepts or reaches.

The wire carries uint64; stopping at 2**63 - 1 leaves every term + 1 a
replica computes representable, so one absurd message can neither overflow
the encoder nor wedge the cluster at the top of the range. At one election a
millisecond the range lasts 292 million years.
"""

MAX_INDEX = MAX_TERM
"""The highest log index a replica accepts, for the same reason."""


class Role(enum.Enum):
    """A replica's role in the election protocol."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


# The messages mirror RaftService in proto/webshard/coordinator/v1/coordinator.proto.
# `sender` and `recipient` are replica ids; on the wire the sender of a request is the
# proto's candidate_id/leader_id and the sender of a response is the replica that was
# called. `ref` is never read by the core: a reply copies its request's `ref` so that a
# transport serving unary RPCs can find the call a reply belongs to.


@dataclass(frozen=True, slots=True)
class RequestVote:
    """A request for a vote, or for a pre-vote (which changes nothing on the receiver).

    For a pre-vote, ``term`` is the term the sender would campaign in.
    """

    sender: str
    recipient: str
    term: int
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    ref: int = 0


@dataclass(frozen=True, slots=True)
class RequestVoteResponse:
    """The answer to a RequestVote.

    ``pre_vote`` repeats the request's flag: the proto reply lacks it, so a
    transport copies it from the request it sent.
    """

    sender: str
    recipient: str
    term: int
    vote_granted: bool
    pre_vote: bool = False
    ref: int = 0


@dataclass(frozen=True, slots=True)
class AppendEntries:
    """Entries to append after ``prev_log_index``; none makes it a heartbeat.

    ``seq`` numbers the leader's read-index rounds; a reply repeats it, which
    is how the leader knows the reply answers a message sent after a read
    arrived. It is not on the wire: the transport copies it from its request.
    """

    sender: str
    recipient: str
    term: int
    prev_log_index: int
    prev_log_term: int
    entries: tuple[Entry, ...]
    leader_commit: int
    seq: int = 0
    ref: int = 0


@dataclass(frozen=True, slots=True)
class AppendEntriesResponse:
    """The answer to an AppendEntries.

    On success ``match_index`` is the last index the receiver now shares with
    the leader. On failure ``conflict_index`` is where the leader should try
    next (the first index of the conflicting term, or just past the receiver's
    log), and ``rejected_index`` repeats the request's ``prev_log_index`` so the
    leader can tell a fresh refusal from a late one; like ``seq`` it is copied
    from the request by the transport, not carried on the wire.
    """

    sender: str
    recipient: str
    term: int
    success: bool
    match_index: int = 0
    conflict_index: int = 0
    rejected_index: int = 0
    seq: int = 0
    ref: int = 0


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """A whole snapshot for a replica whose next entry the leader has compacted away.

    The proto streams it in chunks; ``wire`` cuts and reassembles them, so the
    core only ever sees a complete snapshot.
    """

    sender: str
    recipient: str
    term: int
    snapshot: Snapshot
    seq: int = 0
    ref: int = 0


@dataclass(frozen=True, slots=True)
class InstallSnapshotResponse:
    """The answer to an InstallSnapshot.

    At the leader's term it means the receiver now holds everything up to
    ``match_index``, the snapshot's index (the proto reply carries only the
    term, so a transport fills this in from the request it sent).
    """

    sender: str
    recipient: str
    term: int
    match_index: int = 0
    seq: int = 0
    ref: int = 0


Request = RequestVote | AppendEntries | InstallSnapshot
Response = RequestVoteResponse | AppendEntriesResponse | InstallSnapshotResponse
Message = Request | Response


@dataclass(frozen=True, slots=True)
class Ready:
    """A batch of work the caller must do, in this order, then hand back to ``Node.advance``.

    1. Persist durably (fsync): ``snapshot`` or ``compaction`` first, then
       ``entries`` (an entry replaces any stored entry at its index and
       everything after it), then ``hard_state``.
    2. Send ``messages``. Only after step 1: a vote or an acknowledgement is a
       promise about what is on disk.
    3. If ``snapshot`` is set, restore the state machine from it; then apply
       ``committed_entries`` in order (skipping no-ops, whose command is empty).
    4. Answer the reads in ``read_states`` once the state machine has applied
       their index; fail the reads in ``dropped_reads`` (leadership was lost,
       the client should retry with the new leader).
    """

    messages: tuple[Message, ...] = ()
    entries: tuple[Entry, ...] = ()
    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    compaction: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    dropped_reads: tuple[bytes, ...] = ()

    @property
    def snapshot_to_persist(self) -> Snapshot | None:
        """The one snapshot storage must keep: one from the leader supersedes a local compaction."""
        return self.snapshot if self.snapshot is not None else self.compaction

    def is_empty(self) -> bool:
        """True when there is nothing to persist, send, apply or answer."""
        return not (
            self.messages
            or self.entries
            or self.hard_state is not None
            or self.snapshot is not None
            or self.compaction is not None
            or self.committed_entries
            or self.read_states
            or self.dropped_reads
        )


@dataclass(frozen=True, slots=True)
class Config:
    """Timing and flow-control knobs of one replica. Times are in ticks of the caller's clock."""

    election_ticks: int = 10
    """A follower that hears nothing from a leader for a random time in
    [election_ticks, 2 * election_ticks - 1] starts an election; a leader with
    check_quorum steps down after election_ticks without hearing from a quorum."""

    heartbeat_ticks: int = 1
    """A leader sends heartbeats every heartbeat_ticks; keep it well below election_ticks."""

    pre_vote: bool = True
    """Ask for pre-votes before bumping the term, so a replica that was cut off
    cannot force a working leader to step down when it comes back."""

    check_quorum: bool = True
    """A leader steps down when it has not heard from a quorum for election_ticks,
    and replicas that hear from a leader ignore vote requests for that long."""

    max_entries_per_message: int = 64
    """At most this many entries in one AppendEntries."""

    max_inflight_messages: int = 64
    """At most this many unacknowledged AppendEntries with entries to one follower."""

    tick_s: float = 0.0
    """The length of one tick in seconds, only to report durations in log lines (0: unknown)."""

    def __post_init__(self) -> None:
        if self.heartbeat_ticks < 1:
            raise ValueError("heartbeat_ticks must be at least 1")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("election_ticks must be greater than heartbeat_ticks")
        if self.max_entries_per_message < 1 or self.max_inflight_messages < 1:
            raise ValueError("max_entries_per_message and max_inflight_messages must be positive")


@dataclass(frozen=True, slots=True)
class Status:
    """A replica's view of itself, for status pages and the ClusterStatus RPC."""

    id: str
    role: Role
    term: int
    leader_id: str | None
    commit_index: int
    applied_index: int
    last_index: int
    snapshot_index: int


class RaftError(Exception):
    """Base of the consensus core's errors."""


class NotLeader(RaftError):
    """A write or a linearizable read reached a replica that is not the leader."""

    def __init__(self, leader_id: str | None) -> None:
        self.leader_id = leader_id
        hint = f"the leader is {leader_id!r}" if leader_id else "no leader is known yet"
        super().__init__(f"this replica is not the leader; {hint}")


class InvariantViolation(RaftError):
    """The protocol's safety was broken (two leaders in one term, a committed entry rewritten).

    Never caught inside the core: continuing could make replicas disagree.
    """


class StorageError(RaftError):
    """Durable storage could not be opened or written."""


class CorruptLog(StorageError):
    """Persisted Raft state is damaged, so the replica refuses to start.

    Nothing acknowledged is dropped or repaired automatically: a log that lost
    entries could make this replica vote for or acknowledge a history it never
    had. (A torn last record, never acknowledged, is cut off instead; see
    ``storage``.) An
    operator can move the data directory aside (better: run
    ``storage.quarantine``, which keeps the term and the vote so the replica
    cannot vote twice in one term) and restart the replica; it then rejoins
    with an empty log and the leader catches it up, by snapshot if needed.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"{path}: corrupt at byte offset {offset}: {reason}. Refusing to start; move the "
            "data directory aside (or quarantine its log) to rejoin from the leader."
        )
