"""A Raft replica as a pure state machine, shaped like etcd/raft.

Inputs are ticks of a logical clock, messages from peers, proposals and
read requests; outputs come back as a ``Ready`` batch (what to persist, what to
send, what to apply). The node never touches a disk, a socket or a clock, so
the same code runs under gRPC and inside a deterministic simulation.

The protocol is the Raft paper's, with the extensions of Ongaro's thesis that
a production deployment needs:

* Pre-vote (thesis §9.6): an election starts with a round of pre-votes that
  change no state. A replica that was cut off therefore cannot raise its term
  and force a working leader to step down when it returns.
* Check-quorum (thesis §6.2): a leader that has not heard from a quorum for
  an election timeout steps down, and a replica that heard from a leader
  within that time ignores vote requests (it knows the leader is alive).
* ReadIndex (thesis §6.4) for linearizable reads without a lease: the leader
  records its commit index, confirms it is still leader with a round of
  heartbeats acknowledged by a quorum, and only then hands the read back.
  No clock assumptions are needed, at the price of one round trip per batch
  of reads; a lease would save the round trip but trust bounded clock drift.
* Log replication with the conflict-index hint, commit counting only for
  entries of the current term (paper §5.4.2), and a no-op entry appended by a
  new leader so earlier entries commit without waiting for a client.
* Snapshots: the state machine hands in a snapshot with ``compact``; a
  follower that needs compacted entries receives the snapshot instead.

Membership is fixed by configuration.

Every change of role is logged with its cause (``services.coordinator.raft.core``):
an election timeout (with how long the leader has been silent), a higher term
seen (and from whom), a lost check-quorum, a won or lost vote. An election
nobody can explain from the logs is a bug.
"""

from __future__ import annotations

import enum
import logging
import random
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from services.coordinator.raft.log import RaftLog
from services.coordinator.raft.types import (
    MAX_TERM,
    AppendEntries,
    AppendEntriesResponse,
    Config,
    Entry,
    HardState,
    InstallSnapshot,
    InstallSnapshotResponse,
    InvariantViolation,
    Message,
    NotLeader,
    PersistedState,
    ReadState,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Role,
    Snapshot,
    Status,
)

log = logging.getLogger(__name__)


class StorageReader(Protocol):
    """What a node needs from storage: the state persisted so far, read once at start."""

    def load(self) -> PersistedState:
        """Everything persisted: hard state, latest snapshot, entries after it."""
        ...


class _Replication(enum.Enum):
    """How the leader is feeding one follower (etcd's progress states)."""

    PROBE = "probe"  # finding where the logs agree: one message at a time
    REPLICATE = "replicate"  # logs agree: stream entries optimistically
    SNAPSHOT = "snapshot"  # a snapshot is on its way; wait for it


class _Progress:
    """The leader's view of one follower."""

    __slots__ = (
        "inflight",
        "match",
        "next",
        "paused",
        "pending_snapshot",
        "recent_active",
        "snapshot_elapsed",
        "state",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = _Replication.PROBE
        self.paused = False
        self.pending_snapshot = 0
        self.snapshot_elapsed = 0
        # A new leader counts every follower as recently heard from, or
        # check-quorum would depose it before its first heartbeat round.
        self.recent_active = True
        self.inflight: deque[int] = deque()

    def become_probe(self) -> None:
        self.state = _Replication.PROBE
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = _Replication.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = _Replication.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_elapsed = 0
        self.inflight.clear()

    def update(self, match: int) -> bool:
        """Record an acknowledged match; False when it tells nothing new."""
        if match <= self.match:
            return False
        self.match = match
        self.next = max(self.next, match + 1)
        self.paused = False
        while self.inflight and self.inflight[0] <= match:
            self.inflight.popleft()
        return True

    def blocked(self, max_inflight: int) -> bool:
        if self.state is _Replication.PROBE:
            return self.paused
        if self.state is _Replication.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True


@dataclass(frozen=True, slots=True)
class _PendingRead:
    context: bytes
    index: int
    seq: int


class Node:
    """One Raft replica.

    Drive it from a single loop (see ``Ready``)::

        node.tick()                      # every tick of your clock
        node.step(message)               # every message from a peer
        index = node.propose(command)    # on the leader
        while node.has_ready():
            ready = node.ready()
            storage.save(...)            # fsync
            send(ready.messages)
            apply(ready.snapshot, ready.committed_entries); answer(ready.read_states)
            node.advance(ready)

    ``tick``, ``step``, ``propose``, ``read_index`` and ``compact`` may be called
    between ``ready`` and ``advance``; what they produce waits for the next
    Ready. Only one Ready is outstanding at a time, and Readys must be handled
    in the order they were returned.
    """

    def __init__(
        self,
        id: str,
        peers: Collection[str],
        storage: StorageReader,
        config: Config,
        rng: random.Random,
    ) -> None:
        """Start a replica from what ``storage`` holds.

        ``peers`` are the other voters (this replica's own id excluded, as in
        the coordinator's settings). ``rng`` drives the election timeouts; seed
        it per replica so no two draw the same sequence.

        The caller restores its state machine from ``storage``'s snapshot
        before the first Ready; committed entries after the snapshot come back
        in ``committed_entries`` to be applied again.
        """
        if not id:
            raise ValueError("a replica needs a non-empty id")
        others = list(peers)
        if id in others:
            raise ValueError(f"peers must not include this replica's own id {id!r}")
        if len(set(others)) != len(others) or any(not p for p in others):
            raise ValueError(f"peers must be distinct non-empty ids, got {others!r}")
        self._id = id
        self._peers = tuple(sorted(others))
        self._quorum = (len(self._peers) + 1) // 2 + 1
        self._config = config
        self._rng = rng

        state = storage.load()
        hard = state.hard_state
        self._log = RaftLog(state.snapshot, state.entries, hard.commit)
        self._snapshot: Snapshot | None = state.snapshot
        self._term = hard.term
        self._vote = hard.vote
        self._persisted_hard = hard
        if self._log.last_term > self._term:
            # Entries are written before the hard state, so a crash between the
            # two leaves entries of a term the hard state never reached. No vote
            # in that term was sent (it would be in the hard state), so taking
            # the term with no vote promises nothing new.
            self._term = self._log.last_term
            self._vote = None
        self._applied = self._log.snapshot_index

        self._role = Role.FOLLOWER
        self._leader: str | None = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._draw_timeout()
        # Ticks since a leader last reached us (or since start), for the logs.
        self._silent_ticks = 0
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, _Progress] = {}

        self._messages: list[Message] = []
        self._read_states: list[ReadState] = []
        self._dropped_reads: list[bytes] = []
        self._pending_snapshot: Snapshot | None = None
        self._pending_compaction: Snapshot | None = None
        self._outstanding: Ready | None = None

        # ReadIndex: reads waiting for the first commit of this leader's term,
        # reads waiting for a quorum to acknowledge a heartbeat round, the
        # current round number and the highest round each follower answered.
        self._reads_before_commit: list[bytes] = []
        self._pending_reads: deque[_PendingRead] = deque()
        self._read_seq = 0
        self._acked_seq: dict[str, int] = {}

    # ------------------------------------------------------------------ inspection

    @property
    def id(self) -> str:
        """This replica's id."""
        return self._id

    @property
    def peers(self) -> tuple[str, ...]:
        """The other voters."""
        return self._peers

    @property
    def role(self) -> Role:
        """Follower, pre-candidate, candidate or leader."""
        return self._role

    @property
    def term(self) -> int:
        """The current term."""
        return self._term

    @property
    def vote(self) -> str | None:
        """Who this replica voted for in the current term."""
        return self._vote

    @property
    def leader_id(self) -> str | None:
        """The leader of the current term as far as this replica knows."""
        return self._leader

    @property
    def commit_index(self) -> int:
        """The highest index known to be committed."""
        return self._log.committed

    @property
    def applied_index(self) -> int:
        """The highest index handed out for applying and acknowledged with ``advance``."""
        return self._applied

    @property
    def first_index(self) -> int:
        """The first index still held as an entry (not compacted into the snapshot)."""
        return self._log.first_index

    @property
    def last_index(self) -> int:
        """The index of the last entry."""
        return self._log.last_index

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot, made here or received from a leader."""
        return self._snapshot

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``; None when compacted away or past the end."""
        return self._log.term_at(index)

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``lo`` to ``hi - 1`` (``lo`` must be at least ``first_index``)."""
        return self._log.entries(lo, hi)

    def status(self) -> Status:
        """A snapshot of this replica's state for status reports."""
        return Status(
            id=self._id,
            role=self._role,
            term=self._term,
            leader_id=self._leader,
            commit_index=self._log.committed,
            applied_index=self._applied,
            last_index=self._log.last_index,
            snapshot_index=self._log.snapshot_index,
        )

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        """Advance the logical clock by one tick."""
        if self._role is Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            self._silent_ticks += 1
            if self._election_elapsed >= self._randomized_timeout:
                self._election_elapsed = 0
                self._log_event(
                    logging.INFO,
                    f"election timeout: no leader contact for {self._ticks(self._silent_ticks)} "
                    f"(timeout {self._ticks(self._randomized_timeout)}, last leader "
                    f"{self._leader or 'unknown'}); starting an election",
                    cause="election_timeout",
                    silent_ticks=self._silent_ticks,
                    timeout_ticks=self._randomized_timeout,
                    previous_leader=self._leader,
                )
                self._campaign()

    def propose(self, command: bytes) -> int:
        """Append a command to the log and return its index.

        The command is committed when it comes back in ``committed_entries`` at
        that index; if leadership changes first, a different entry may end up
        there, so callers recognise their command by its content (a request id).
        Raises NotLeader, naming the leader when one is known.
        """
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader)
        if not command:
            raise ValueError("an empty command is reserved for the leader's no-op entry")
        index = self._append_as_leader(command)
        self._broadcast_append()
        return index

    def read_index(self, context: bytes) -> None:
        """Start a linearizable read; it comes back as a ReadState carrying ``context``.

        The leader takes its commit index and confirms, with a heartbeat round a
        quorum answers, that no newer leader can have committed anything past
        it. Until this leader has committed an entry of its own term its commit
        index may lag what earlier leaders committed, so the read waits for
        that. The read fails (``dropped_reads``) if leadership is lost first.
        Followers raise NotLeader: the proto has no message to forward a read,
        so the client asks the leader.
        """
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader)
        if self._log.term_at(self._log.committed) != self._term:
            self._reads_before_commit.append(context)
            return
        self._start_read(context)

    def compact(self, index: int, data: bytes) -> None:
        """Take a snapshot of the state machine at ``index`` and drop the log up to it.

        ``data`` must be the state after applying exactly the entries up to
        ``index``, which must already be applied. The snapshot comes back in
        ``Ready.compaction`` for storage to keep.
        """
        if index > self._applied:
            raise ValueError(f"cannot compact at {index}: only {self._applied} is applied")
        if index <= self._log.snapshot_index:
            raise ValueError(f"already compacted up to {self._log.snapshot_index}")
        term = self._log.term_at(index)
        assert term is not None
        snapshot = Snapshot(index=index, term=term, data=data)
        self._log.compact(index)
        self._snapshot = snapshot
        self._pending_compaction = snapshot

    def report_unreachable(self, peer: str) -> None:
        """Tell the leader that sending to ``peer`` failed, so it re-probes instead of streaming."""
        progress = self._progress.get(peer) if self._role is Role.LEADER else None
        if progress is not None and progress.state is not _Replication.PROBE:
            progress.become_probe()

    def step(self, message: Message) -> None:
        """Handle one message from a peer.

        Every request gets exactly one reply (in a later Ready), even when the
        reply only says "no": a transport serving unary RPCs can wait for it.
        """
        if message.recipient != self._id:
            raise ValueError(f"message for {message.recipient!r} delivered to {self._id!r}")
        if message.sender not in self._peers:
            raise ValueError(f"message from {message.sender!r}, which is not a peer")
        if message.term > MAX_TERM:
            raise ValueError(f"term {message.term} is past the largest term {MAX_TERM}")

        if message.term > self._term:
            if isinstance(message, RequestVote) and self._in_lease():
                # Thesis §4.2.3: we heard from a live leader less than an
                # election timeout ago, so this candidate is the one cut off.
                # Neither adopting its term nor voting keeps the leader in place.
                self._reply_vote(message, granted=False)
                return
            if (isinstance(message, RequestVote) and message.pre_vote) or (
                isinstance(message, RequestVoteResponse)
                and message.pre_vote
                and message.vote_granted
            ):
                pass  # a pre-vote and a granted pre-vote carry a term nobody is in yet
            else:
                leader = (
                    message.sender
                    if isinstance(message, (AppendEntries, InstallSnapshot))
                    else None
                )
                self._log_event(
                    logging.WARNING if self._role is Role.LEADER else logging.INFO,
                    f"{'stepping down as leader' if self._role is Role.LEADER else 'new term'}"
                    f": {message.sender} sent {type(message).__name__} with term "
                    f"{message.term}, above our term {self._term}",
                    cause="higher_term",
                    from_replica=message.sender,
                    new_term=message.term,
                    previous_role=self._role.value,
                )
                self._become_follower(message.term, leader)
        elif message.term < self._term:
            # Answer stale requests with our term: a deposed leader or a lagging
            # candidate learns it is behind and steps down. Stale replies carry
            # nothing worth acting on.
            if isinstance(message, RequestVote):
                self._reply_vote(message, granted=False)
            elif isinstance(message, AppendEntries):
                self._reply_append(message, success=False)
            elif isinstance(message, InstallSnapshot):
                self._send(
                    InstallSnapshotResponse(
                        sender=self._id,
                        recipient=message.sender,
                        term=self._term,
                        seq=message.seq,
                        ref=message.ref,
                    )
                )
            return

        if isinstance(message, RequestVote):
            self._handle_request_vote(message)
        elif isinstance(message, RequestVoteResponse):
            self._handle_vote_response(message)
        elif isinstance(message, AppendEntries):
            self._handle_append(message)
        elif isinstance(message, AppendEntriesResponse):
            self._handle_append_response(message)
        elif isinstance(message, InstallSnapshot):
            self._handle_snapshot(message)
        else:
            self._handle_snapshot_response(message)

    # ------------------------------------------------------------------ output

    def has_ready(self) -> bool:
        """Whether ``ready`` would return any work."""
        if self._outstanding is not None:
            return False
        return bool(
            self._messages
            or self._read_states
            or self._dropped_reads
            or self._pending_snapshot is not None
            or self._pending_compaction is not None
            or self._log.stable < self._log.last_index
            or self._hard_state() != self._persisted_hard
            or self._log.committed > self._apply_from() - 1
        )

    def ready(self) -> Ready:
        """Take the accumulated work; hand it back to ``advance`` once done."""
        if self._outstanding is not None:
            raise RuntimeError("advance() the outstanding Ready before asking for another")
        hard = self._hard_state()
        start = self._apply_from()
        committed = (
            self._log.entries(start, self._log.committed + 1)
            if self._log.committed >= start
            else []
        )
        ready = Ready(
            messages=tuple(self._messages),
            entries=tuple(self._log.unstable()),
            hard_state=hard if hard != self._persisted_hard else None,
            snapshot=self._pending_snapshot,
            compaction=self._pending_compaction,
            committed_entries=tuple(committed),
            read_states=tuple(self._read_states),
            dropped_reads=tuple(self._dropped_reads),
        )
        self._messages = []
        self._read_states = []
        self._dropped_reads = []
        self._outstanding = ready
        return ready

    def advance(self, ready: Ready) -> None:
        """Acknowledge that ``ready`` was persisted, sent and applied."""
        if ready is not self._outstanding:
            raise RuntimeError("advance() takes the Ready most recently returned by ready()")
        self._outstanding = None
        if ready.entries:
            last = ready.entries[-1]
            self._log.stable_to(last.index, last.term)
        if ready.hard_state is not None:
            self._persisted_hard = ready.hard_state
        if ready.snapshot is not None:
            self._applied = max(self._applied, ready.snapshot.index)
            if self._pending_snapshot is ready.snapshot:
                self._pending_snapshot = None
        if ready.compaction is not None and self._pending_compaction is ready.compaction:
            self._pending_compaction = None
        if ready.committed_entries:
            self._applied = max(self._applied, ready.committed_entries[-1].index)

    # ------------------------------------------------------------------ internals: state

    def _hard_state(self) -> HardState:
        return HardState(term=self._term, vote=self._vote, commit=self._log.committed)

    def _apply_from(self) -> int:
        start = self._applied + 1
        if self._pending_snapshot is not None:
            # The state machine jumps to the snapshot before applying anything after it.
            start = max(start, self._pending_snapshot.index + 1)
        return start

    def _draw_timeout(self) -> int:
        ticks = self._config.election_ticks
        return ticks + self._rng.randrange(ticks)

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._vote = None
        self._leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._draw_timeout()
        self._votes = {}
        self._progress = {}
        self._acked_seq = {}
        self._dropped_reads.extend(self._reads_before_commit)
        self._dropped_reads.extend(read.context for read in self._pending_reads)
        self._reads_before_commit = []
        self._pending_reads.clear()

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self._role = Role.FOLLOWER
        self._leader = leader

    def _become_pre_candidate(self) -> None:
        # Unlike _reset, the term and vote stay: a pre-campaign promises nothing.
        self._reset(self._term)
        self._role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self._term + 1)
        self._vote = self._id
        self._role = Role.CANDIDATE

    def _become_leader(self, votes: list[str]) -> None:
        self._log_event(
            logging.INFO,
            f"became leader of term {self._term} with votes from {', '.join(votes)}",
            cause="vote_won",
            votes=votes,
        )
        self._reset(self._term)
        self._role = Role.LEADER
        self._leader = self._id
        next_index = self._log.last_index + 1
        self._progress = {peer: _Progress(next_index) for peer in self._peers}
        self._acked_seq = dict.fromkeys(self._peers, 0)
        # The no-op commits every earlier entry once it commits (§5.4.2 forbids
        # counting replicas for entries of earlier terms).
        self._append_as_leader(b"")
        self._broadcast_append()

    def _in_lease(self) -> bool:
        return (
            self._config.check_quorum
            and self._leader is not None
            and self._election_elapsed < self._config.election_ticks
        )

    def _send(self, message: Message) -> None:
        self._messages.append(message)

    def _ticks(self, ticks: int) -> str:
        """A number of ticks for a log line, in seconds too when the tick length is known."""
        tick_s = self._config.tick_s
        return f"{ticks} ticks ({ticks * tick_s:.2f} s)" if tick_s else f"{ticks} ticks"

    def _log_event(self, level: int, text: str, **fields: object) -> None:
        if log.isEnabledFor(level):
            log.log(
                level,
                f"raft {self._id}: {text}",
                extra={"replica": self._id, "term": self._term, "role": self._role.value, **fields},
            )

    # ------------------------------------------------------------------ internals: elections

    def _campaign(self) -> None:
        if self._term >= MAX_TERM:
            # Unreachable in practice (see MAX_TERM); refusing beats an overflow.
            self._log_event(
                logging.ERROR,
                f"cannot campaign: term {self._term} is the largest term",
                cause="term_exhausted",
            )
            return
        if self._config.pre_vote:
            self._become_pre_candidate()
            term = self._term + 1
        else:
            self._become_candidate()
            term = self._term
        self._poll(self._id, granted=True)
        if self._role not in (Role.PRE_CANDIDATE, Role.CANDIDATE):
            return  # a one-replica cluster won on its own vote
        pre_vote = self._role is Role.PRE_CANDIDATE
        for peer in self._peers:
            self._send(
                RequestVote(
                    sender=self._id,
                    recipient=peer,
                    term=term,
                    last_log_index=self._log.last_index,
                    last_log_term=self._log.last_term,
                    pre_vote=pre_vote,
                )
            )

    def _poll(self, voter: str, *, granted: bool) -> None:
        self._votes.setdefault(voter, granted)
        yes = sorted(v for v, vote in self._votes.items() if vote)
        no = sorted(v for v, vote in self._votes.items() if not vote)
        kind = "pre-vote" if self._role is Role.PRE_CANDIDATE else "vote"
        if len(yes) >= self._quorum:
            if self._role is Role.PRE_CANDIDATE:
                self._log_event(
                    logging.INFO,
                    f"pre-vote won ({', '.join(yes)}); campaigning in term {self._term + 1}",
                    cause="pre_vote_won",
                    votes=yes,
                )
                self._campaign_for_real()
            else:
                self._become_leader(yes)
        elif len(no) >= self._quorum:
            self._log_event(
                logging.INFO,
                f"{kind} lost: refused by {', '.join(no)}; staying a follower",
                cause=f"{kind.replace('-', '_')}_lost",
                refused_by=no,
            )
            self._become_follower(self._term, None)

    def _campaign_for_real(self) -> None:
        self._become_candidate()
        self._poll(self._id, granted=True)
        if self._role is Role.LEADER:
            return
        for peer in self._peers:
            self._send(
                RequestVote(
                    sender=self._id,
                    recipient=peer,
                    term=self._term,
                    last_log_index=self._log.last_index,
                    last_log_term=self._log.last_term,
                )
            )

    def _handle_request_vote(self, message: RequestVote) -> None:
        can_vote = (
            self._vote == message.sender
            or (self._vote is None and self._leader is None)
            or (message.pre_vote and message.term > self._term)
        )
        if can_vote and self._log.is_up_to_date(message.last_log_index, message.last_log_term):
            self._reply_vote(message, granted=True)
            if not message.pre_vote:
                self._vote = message.sender
                self._election_elapsed = 0
        else:
            self._reply_vote(message, granted=False)

    def _reply_vote(self, message: RequestVote, *, granted: bool) -> None:
        # A grant carries the requested term (for a pre-vote, one nobody is in
        # yet); a refusal carries ours, so a candidate that is behind catches up.
        self._send(
            RequestVoteResponse(
                sender=self._id,
                recipient=message.sender,
                term=message.term if granted else self._term,
                vote_granted=granted,
                pre_vote=message.pre_vote,
                ref=message.ref,
            )
        )

    def _handle_vote_response(self, message: RequestVoteResponse) -> None:
        wanted = Role.PRE_CANDIDATE if message.pre_vote else Role.CANDIDATE
        if self._role is wanted:
            self._poll(message.sender, granted=message.vote_granted)

    # ------------------------------------------------------------------ internals: followers

    def _accept_leader(self, message: AppendEntries | InstallSnapshot) -> None:
        if self._role is Role.LEADER:
            raise InvariantViolation(
                f"{self._id} leads term {self._term} but {message.sender} sent it "
                f"{type(message).__name__} for the same term"
            )
        if self._role is not Role.FOLLOWER or self._leader != message.sender:
            self._log_event(
                logging.INFO,
                f"following leader {message.sender} in term {self._term}"
                + (f" (was {self._role.value})" if self._role is not Role.FOLLOWER else ""),
                cause="leader_contact",
                leader=message.sender,
                previous_role=self._role.value,
            )
        if self._role is not Role.FOLLOWER:
            self._become_follower(self._term, message.sender)
        self._leader = message.sender
        self._election_elapsed = 0
        self._silent_ticks = 0

    def _handle_append(self, message: AppendEntries) -> None:
        self._accept_leader(message)
        if message.prev_log_index < self._log.committed:
            # Everything up to our commit index matches every leader's log; the
            # leader retries from there.
            self._reply_append(message, success=True, match=self._log.committed)
            return
        last_new = self._log.maybe_append(
            message.prev_log_index, message.prev_log_term, message.leader_commit, message.entries
        )
        if last_new is None:
            self._reply_append(
                message,
                success=False,
                conflict=self._log.conflict_hint(message.prev_log_index),
            )
        else:
            self._reply_append(message, success=True, match=last_new)

    def _reply_append(
        self, message: AppendEntries, *, success: bool, match: int = 0, conflict: int = 0
    ) -> None:
        self._send(
            AppendEntriesResponse(
                sender=self._id,
                recipient=message.sender,
                term=self._term,
                success=success,
                match_index=match,
                conflict_index=conflict,
                rejected_index=0 if success else message.prev_log_index,
                seq=message.seq,
                ref=message.ref,
            )
        )

    def _handle_snapshot(self, message: InstallSnapshot) -> None:
        self._accept_leader(message)
        snapshot = message.snapshot
        if snapshot.index <= self._log.committed:
            pass  # we hold at least as much already
        elif self._log.term_at(snapshot.index) == snapshot.term:
            # Our log already holds the snapshot's last entry, so (log matching)
            # everything before it too: keep the log, just learn the commit.
            self._log.commit_to(snapshot.index)
        else:
            self._log.restore(snapshot)
            self._snapshot = snapshot
            self._pending_snapshot = snapshot
            self._pending_compaction = None
        self._send(
            InstallSnapshotResponse(
                sender=self._id,
                recipient=message.sender,
                term=self._term,
                match_index=snapshot.index,
                seq=message.seq,
                ref=message.ref,
            )
        )

    # ------------------------------------------------------------------ internals: leaders

    def _append_as_leader(self, command: bytes) -> int:
        index = self._log.last_index + 1
        self._log.append([Entry(index=index, term=self._term, command=command)])
        self._maybe_commit()  # a one-replica cluster commits on its own
        return index

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._config.election_ticks:
            self._election_elapsed = 0
            if self._config.check_quorum:
                heard = sorted(p for p, pr in self._progress.items() if pr.recent_active)
                for progress in self._progress.values():
                    progress.recent_active = False
                if 1 + len(heard) < self._quorum:
                    self._log_event(
                        logging.WARNING,
                        f"stepping down as leader: check quorum lost, heard from "
                        f"{', '.join(heard) or 'no follower'} in the last "
                        f"{self._ticks(self._config.election_ticks)}, a quorum is "
                        f"{self._quorum} of {len(self._peers) + 1}",
                        cause="check_quorum_lost",
                        heard_from=heard,
                    )
                    self._become_follower(self._term, None)
                    return
        for progress in self._progress.values():
            if progress.state is _Replication.SNAPSHOT:
                progress.snapshot_elapsed += 1
                if progress.snapshot_elapsed >= self._config.election_ticks:
                    # Neither the snapshot nor its reply arrived: send it again.
                    progress.become_probe()
        if self._heartbeat_elapsed >= self._config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _broadcast_append(self) -> None:
        for peer in self._peers:
            self._send_append(peer, allow_empty=True)

    def _broadcast_heartbeat(self) -> None:
        for peer, progress in self._progress.items():
            if progress.state is _Replication.PROBE:
                # A heartbeat doubles as the retry of a probe that went unanswered.
                progress.paused = False
                self._send_append(peer, allow_empty=True)
            elif progress.state is _Replication.REPLICATE:
                # An empty append at next - 1: if entries in flight were lost the
                # follower refuses it, and the leader falls back to probing.
                self._send_empty_append(peer, progress.next - 1)
            else:
                self._send_empty_append(peer, progress.pending_snapshot)

    def _send_empty_append(self, peer: str, prev: int) -> None:
        prev_term = self._log.term_at(prev)
        if prev_term is None:
            progress = self._progress[peer]
            if progress.state is not _Replication.SNAPSHOT:
                self._send_snapshot(peer, progress)
            return
        self._send(
            AppendEntries(
                sender=self._id,
                recipient=peer,
                term=self._term,
                prev_log_index=prev,
                prev_log_term=prev_term,
                entries=(),
                leader_commit=self._log.committed,
                seq=self._read_seq,
            )
        )

    def _send_append(self, peer: str, *, allow_empty: bool) -> bool:
        """Send the follower what it lacks, if its progress allows; True if anything went."""
        progress = self._progress[peer]
        if progress.blocked(self._config.max_inflight_messages):
            return False
        prev = progress.next - 1
        prev_term = self._log.term_at(prev)
        if prev_term is None:
            self._send_snapshot(peer, progress)
            return True
        entries = self._log.entries(
            progress.next,
            min(self._log.last_index + 1, progress.next + self._config.max_entries_per_message),
        )
        if not entries and not allow_empty:
            return False
        self._send(
            AppendEntries(
                sender=self._id,
                recipient=peer,
                term=self._term,
                prev_log_index=prev,
                prev_log_term=prev_term,
                entries=tuple(entries),
                leader_commit=self._log.committed,
                seq=self._read_seq,
            )
        )
        if progress.state is _Replication.REPLICATE:
            if entries:
                progress.next = entries[-1].index + 1
                progress.inflight.append(entries[-1].index)
        else:
            progress.paused = True
        return True

    def _send_snapshot(self, peer: str, progress: _Progress) -> None:
        snapshot = self._snapshot
        if snapshot is None:
            raise InvariantViolation(
                f"entry {progress.next - 1} is compacted but no snapshot exists"
            )
        progress.become_snapshot(snapshot.index)
        self._send(
            InstallSnapshot(
                sender=self._id,
                recipient=peer,
                term=self._term,
                snapshot=snapshot,
                seq=self._read_seq,
            )
        )

    def _maybe_commit(self) -> bool:
        matches = sorted(
            [self._log.last_index, *(pr.match for pr in self._progress.values())], reverse=True
        )
        candidate = matches[self._quorum - 1]
        # Raft §5.4.2: replicas are counted only for entries of the current term;
        # earlier entries commit with them (log matching).
        if candidate <= self._log.committed or self._log.term_at(candidate) != self._term:
            return False
        self._log.commit_to(candidate)
        if self._reads_before_commit:
            waiting, self._reads_before_commit = self._reads_before_commit, []
            for context in waiting:
                self._start_read(context)
        return True

    def _acknowledged(self, peer: str, progress: _Progress, seq: int) -> None:
        progress.recent_active = True
        if seq > self._acked_seq.get(peer, 0):
            self._acked_seq[peer] = seq
            self._confirm_reads()

    def _handle_append_response(self, message: AppendEntriesResponse) -> None:
        progress = self._progress.get(message.sender)
        if self._role is not Role.LEADER or progress is None:
            return  # a reply to a leadership we no longer hold
        self._acknowledged(message.sender, progress, message.seq)
        if message.success:
            self._on_match(message.sender, progress, message.match_index)
            return
        if progress.state is _Replication.SNAPSHOT:
            return  # the snapshot decides where this follower resumes
        if progress.state is _Replication.REPLICATE:
            if message.rejected_index < progress.match:
                return  # refused something older than what it acknowledged since
            # A refusal at exactly the match is either late or a sign the
            # follower lost its log; a probe from there tells which.
            progress.become_probe()
            progress.next = max(
                progress.match + 1, min(message.conflict_index, message.rejected_index)
            )
        else:
            if message.rejected_index != progress.next - 1:
                return  # a late refusal of an earlier probe
            hint = max(1, min(message.conflict_index, message.rejected_index))
            if message.rejected_index <= progress.match:
                # It refused an entry it had acknowledged: its storage was wiped
                # (an operator moved a corrupt log aside). Forget the old match.
                progress.match = hint - 1
                progress.next = hint
            else:
                progress.next = max(progress.match + 1, hint)
            progress.paused = False
        self._send_append(message.sender, allow_empty=True)

    def _handle_snapshot_response(self, message: InstallSnapshotResponse) -> None:
        progress = self._progress.get(message.sender)
        if self._role is not Role.LEADER or progress is None:
            return
        self._acknowledged(message.sender, progress, message.seq)
        self._on_match(message.sender, progress, message.match_index)

    def _on_match(self, peer: str, progress: _Progress, match: int) -> None:
        if not progress.update(match):
            return
        if progress.state is _Replication.PROBE:
            progress.become_replicate()
        elif (
            progress.state is _Replication.SNAPSHOT and progress.match >= progress.pending_snapshot
        ):
            progress.become_probe()
        if self._maybe_commit():
            self._broadcast_append()
        else:
            while self._send_append(peer, allow_empty=False):
                pass

    # ------------------------------------------------------------------ internals: reads

    def _start_read(self, context: bytes) -> None:
        if self._quorum == 1:
            self._read_states.append(ReadState(index=self._log.committed, context=context))
            return
        self._read_seq += 1
        self._pending_reads.append(_PendingRead(context, self._log.committed, self._read_seq))
        self._broadcast_heartbeat()

    def _confirm_reads(self) -> None:
        while self._pending_reads:
            read = self._pending_reads[0]
            acks = 1 + sum(1 for seq in self._acked_seq.values() if seq >= read.seq)
            if acks < self._quorum:
                return
            self._pending_reads.popleft()
            self._read_states.append(ReadState(index=read.index, context=read.context))
