"""Focused tests of the Raft core: each fault placed by hand, each outcome checked exactly."""

from __future__ import annotations

import random

import pytest

from services.coordinator.raft import (
    AppendEntries,
    AppendEntriesResponse,
    Config,
    Entry,
    HardState,
    InstallSnapshot,
    InstallSnapshotResponse,
    MemoryStorage,
    Message,
    Node,
    NotLeader,
    ReadState,
    RequestVote,
    RequestVoteResponse,
    Role,
    Snapshot,
    persist,
)
from tests.unit.sim.cluster import Cluster, encode_state

ELECTION = 10


def config(**overrides: object) -> Config:
    values: dict[str, object] = {"election_ticks": ELECTION, "heartbeat_ticks": 1}
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


def stable_cluster(size: int = 3, **overrides: object) -> tuple[Cluster, Node]:
    """A cluster whose r0 leads and whose every replica has applied the leader's no-op."""
    cluster = Cluster(size, config=config(**overrides))
    leader = cluster.elect("r0")
    cluster.tick(2)
    for rid in cluster.ids:
        assert cluster.node(rid).leader_id == "r0"
        assert cluster.node(rid).applied_index == leader.commit_index
    return cluster, leader


def lone_node(storage: MemoryStorage | None = None, **overrides: object) -> Node:
    """Replica r1 of a three-replica cluster, driven by hand."""
    return Node(
        "r1", ["r0", "r2"], storage or MemoryStorage(), config(**overrides), random.Random(1)
    )


def replies(node: Node, storage: MemoryStorage) -> tuple[Message, ...]:
    """Persist and take what the node has to say."""
    ready = node.ready()
    persist(storage, ready)
    node.advance(ready)
    return ready.messages


# ---------------------------------------------------------------------- elections


def test_a_leader_is_elected_and_commits_its_no_op_then_proposals() -> None:
    cluster, leader = stable_cluster()
    index = cluster.propose("r0", b"place shard 1")
    cluster.tick(2)
    for rid in cluster.ids:
        assert cluster.applied[rid][index] == b"place shard 1"
        # The no-op of the leader's term came first.
        assert cluster.applied[rid][index - 1] == b""
    assert leader.status().role is Role.LEADER


def test_followers_refuse_writes_and_reads_naming_the_leader() -> None:
    cluster, _ = stable_cluster()
    with pytest.raises(NotLeader) as raised:
        cluster.node("r1").propose(b"x")
    assert raised.value.leader_id == "r0"
    with pytest.raises(NotLeader):
        cluster.node("r2").read_index(b"read")
    fresh = lone_node()
    with pytest.raises(NotLeader) as raised:
        fresh.propose(b"x")
    assert raised.value.leader_id is None


def test_election_timeouts_are_randomized_within_one_to_two_election_ticks() -> None:
    for seed in range(30):
        node = Node("r1", ["r0", "r2"], MemoryStorage(), config(), random.Random(seed))
        ticks = 0
        while node.role is Role.FOLLOWER:
            node.tick()
            ticks += 1
        assert ELECTION <= ticks <= 2 * ELECTION - 1


@pytest.mark.parametrize("pre_vote", [True, False])
def test_pre_vote_stops_a_rejoining_partitioned_replica_from_disrupting_a_stable_leader(
    pre_vote: bool,
) -> None:
    cluster, leader = stable_cluster(pre_vote=pre_vote)
    term = leader.term
    cluster.isolate("r2")
    cluster.tick(10 * ELECTION)
    cut_off = cluster.node("r2")
    cluster.heal()
    cluster.tick(3 * ELECTION)
    if pre_vote:
        # Its pre-votes found no quorum, so it never raised its term, and the
        # leader never noticed it had been gone.
        assert cluster.leader() == "r0"
        assert leader.term == term
        assert cut_off.term == term
        assert cut_off.leader_id == "r0"
    else:
        # Without pre-vote, the same replica came back with a higher term and
        # forced the working leader out of office.
        assert leader.term > term


@pytest.mark.parametrize("check_quorum", [True, False])
def test_a_replica_that_hears_from_its_leader_ignores_vote_requests(check_quorum: bool) -> None:
    cluster, _ = stable_cluster(check_quorum=check_quorum)
    follower = cluster.node("r1")
    term = follower.term
    # A candidate with a log as good as anyone's, from a higher term.
    cluster.crash("r2")
    follower.step(RequestVote("r2", "r1", term=term + 1, last_log_index=99, last_log_term=term))
    ready = follower.ready()
    follower.advance(ready)
    [reply] = ready.messages
    assert isinstance(reply, RequestVoteResponse)
    if check_quorum:
        assert not reply.vote_granted
        assert (follower.term, follower.leader_id) == (term, "r0")
    else:
        assert reply.vote_granted
        assert follower.term == term + 1


@pytest.mark.parametrize("check_quorum", [True, False])
def test_check_quorum_makes_an_isolated_leader_step_down(check_quorum: bool) -> None:
    cluster, leader = stable_cluster(check_quorum=check_quorum)
    cluster.isolate("r0")
    cluster.tick(2 * ELECTION)
    if check_quorum:
        assert leader.role is Role.FOLLOWER
        assert leader.leader_id is None
    else:
        assert leader.role is Role.LEADER  # a stale leader that does not know it
    # Either way the majority side moved on to a new leader.
    new = cluster.leader()
    assert new in ("r1", "r2")
    assert cluster.node(new).term > leader.term


def test_a_minority_partition_elects_nobody_and_commits_nothing() -> None:
    cluster, leader = stable_cluster(5)
    term = leader.term
    cluster.isolate("r0", "r1")
    lost = cluster.propose("r0", b"never committed")
    for _ in range(10 * ELECTION):
        cluster.tick()
        for rid in ("r0", "r1"):
            node = cluster.node(rid)
            assert node.commit_index < lost
            assert not (node.role is Role.LEADER and node.term != term)
    assert leader.role is not Role.LEADER  # check-quorum deposed it
    majority_leader = cluster.leader()
    assert majority_leader in ("r2", "r3", "r4")
    kept = cluster.propose(majority_leader, b"committed by the majority")
    cluster.tick(2)
    cluster.heal()
    cluster.tick(3 * ELECTION)
    for rid in cluster.ids:
        assert b"never committed" not in cluster.applied[rid].values()
        assert cluster.applied[rid][kept] == b"committed by the majority"
    assert {cluster.node(rid).term_at(lost) for rid in cluster.ids} == {
        cluster.node(majority_leader).term_at(lost)
    }


def test_a_restarted_replica_keeps_its_term_and_vote() -> None:
    storage = MemoryStorage()
    node = lone_node(storage)
    node.step(RequestVote("r0", "r1", term=5, last_log_index=0, last_log_term=0))
    [granted] = replies(node, storage)
    assert isinstance(granted, RequestVoteResponse) and granted.vote_granted

    restarted = lone_node(storage)
    assert (restarted.term, restarted.vote) == (5, "r0")
    restarted.step(RequestVote("r2", "r1", term=5, last_log_index=9, last_log_term=4))
    [refused] = replies(restarted, storage)
    assert isinstance(refused, RequestVoteResponse) and not refused.vote_granted


def test_a_vote_lost_before_it_was_persisted_was_never_promised() -> None:
    storage = MemoryStorage()
    node = lone_node(storage)
    node.step(RequestVote("r0", "r1", term=5, last_log_index=0, last_log_term=0))
    node.ready()  # crash: never persisted, never sent
    restarted = lone_node(storage)
    assert (restarted.term, restarted.vote) == (0, None)


def test_a_replica_whose_hard_state_lags_its_log_takes_the_log_term_without_a_vote() -> None:
    # Entries are written before the hard state; a crash in between leaves this.
    storage = MemoryStorage()
    storage.save(entries=[Entry(1, 3, b"a")], hard_state=HardState(term=2, vote="r0", commit=0))
    node = lone_node(storage)
    assert (node.term, node.vote) == (3, None)


def test_a_candidate_with_a_stale_log_gets_no_vote() -> None:
    storage = MemoryStorage()
    storage.save(entries=[Entry(1, 1, b"a"), Entry(2, 2, b"b")], hard_state=HardState(2, None, 0))
    node = lone_node(storage)
    for last_index, last_term, granted in [(5, 1, False), (1, 2, False), (2, 2, True)]:
        node.step(
            RequestVote("r0", "r1", term=3, last_log_index=last_index, last_log_term=last_term)
        )
        [reply] = replies(node, storage)
        assert isinstance(reply, RequestVoteResponse)
        assert reply.vote_granted is granted


# ---------------------------------------------------------------------- replication


def test_a_leader_never_commits_an_earlier_terms_entry_by_counting_replicas() -> None:
    """Raft §5.4.2 (the paper's figure 8), played out on five replicas."""
    cluster, first = stable_cluster(5, max_entries_per_message=1)
    term_1 = first.term
    index = first.last_index + 1

    # (a) The term-1 leader gets X only to r1.
    cluster.isolate("r0", "r1")
    cluster.propose("r0", b"X")
    assert cluster.node("r1").term_at(index) == term_1

    # (b) r2..r4 elect a leader B whose own entry at that index never leaves it.
    cluster.drop = lambda m: (
        isinstance(m, AppendEntries) and any(e.term > term_1 for e in m.entries)
    )
    cluster.run_until(lambda: cluster.leader() in ("r2", "r3", "r4"), 10 * ELECTION, "election")
    b = cluster.node(cluster.leader() or "")
    term_2 = b.term
    assert b.term_at(index) == term_2
    rest = [rid for rid in ("r2", "r3", "r4") if rid != b.id]

    # (c) B is cut off; a replica holding X wins a later term and replicates X
    # (one entry per message) to the other two, but its own no-op goes nowhere.
    cluster.heal()
    cluster.isolate(b.id)
    cluster.drop = lambda m: (
        isinstance(m, AppendEntries)
        and any(e.term > term_2 for e in m.entries)
        and cluster.node(m.recipient).term_at(index) == term_1
    )
    cluster.run_until(lambda: cluster.leader() in ("r0", "r1"), 20 * ELECTION, "re-election")
    a = cluster.node(cluster.leader() or "")
    cluster.tick(3)
    for rid in rest:
        assert cluster.node(rid).term_at(index) == term_1
    # X now sits on four replicas of five, but it is from an earlier term.
    assert a.commit_index < index
    assert all(b"X" not in cluster.applied[rid].values() for rid in cluster.ids)

    # (d) The X holders are cut off; B returns, wins, and overwrites X. That
    # is legal only because X was never committed.
    cluster.heal()
    cluster.isolate("r0", "r1")
    cluster.run_until(lambda: cluster.leader() == b.id, 20 * ELECTION, "B's return")
    cluster.tick(3)
    cluster.heal()
    cluster.tick(3 * ELECTION)
    winner = cluster.node(cluster.leader() or "")
    assert winner.commit_index >= index
    for rid in cluster.ids:
        assert cluster.applied[rid][index] == b""  # B's no-op, the same everywhere
        assert cluster.node(rid).term_at(index) == term_2


def test_a_conflicting_uncommitted_suffix_is_replaced_and_the_hint_skips_its_term() -> None:
    storage = MemoryStorage()
    storage.save(
        entries=[Entry(1, 1, b"a"), Entry(2, 1, b"b"), Entry(3, 2, b"c"), Entry(4, 2, b"d")],
        hard_state=HardState(2, None, 1),
    )
    node = lone_node(storage)
    node.step(
        AppendEntries("r0", "r1", 3, prev_log_index=4, prev_log_term=3, entries=(), leader_commit=1)
    )
    [refusal] = replies(node, storage)
    assert isinstance(refusal, AppendEntriesResponse) and not refusal.success
    # Both entries of term 2 are skipped at once, not one per round trip.
    assert (refusal.conflict_index, refusal.rejected_index) == (3, 4)

    append = AppendEntries(
        "r0",
        "r1",
        3,
        prev_log_index=2,
        prev_log_term=1,
        entries=(Entry(3, 3, b"C"),),
        leader_commit=3,
    )
    node.step(append)
    [accepted] = replies(node, storage)
    assert isinstance(accepted, AppendEntriesResponse) and accepted.success
    assert accepted.match_index == 3
    assert node.last_index == 3 and node.commit_index == 3
    assert [e.command for e in storage.entries] == [b"a", b"b", b"C"]

    # A late duplicate of a shorter append must not cut off what came after it.
    node.step(
        AppendEntries(
            "r0",
            "r1",
            3,
            prev_log_index=3,
            prev_log_term=3,
            entries=(Entry(4, 3, b"D"),),
            leader_commit=3,
        )
    )
    replies(node, storage)
    node.step(append)
    [late] = replies(node, storage)
    assert isinstance(late, AppendEntriesResponse) and late.success
    assert node.last_index == 4
    assert [e.command for e in storage.entries] == [b"a", b"b", b"C", b"D"]


def test_the_commit_index_only_covers_what_the_append_proved() -> None:
    storage = MemoryStorage()
    storage.save(
        entries=[Entry(1, 1, b"a"), Entry(2, 1, b"stale")], hard_state=HardState(1, None, 0)
    )
    node = lone_node(storage)
    # The leader commits 5, but this append only proves the log up to 1 matches.
    node.step(
        AppendEntries("r0", "r1", 2, prev_log_index=1, prev_log_term=1, entries=(), leader_commit=5)
    )
    replies(node, storage)
    assert node.commit_index == 1


def test_a_follower_behind_a_compacted_log_catches_up_by_snapshot() -> None:
    cluster, leader = stable_cluster()
    cluster.isolate("r2")
    for number in range(20):
        cluster.propose("r0", f"command {number}".encode())
    cluster.tick(2)
    for rid in ("r0", "r1"):
        node = cluster.node(rid)
        node.compact(node.applied_index, encode_state(cluster.machines[rid]))
    cluster.flush()
    assert leader.first_index > cluster.node("r2").last_index + 1

    cluster.heal()
    cluster.run_until(
        lambda: cluster.node("r2").applied_index == leader.applied_index, 5 * ELECTION, "catch-up"
    )
    assert any(isinstance(m, InstallSnapshot) and m.recipient == "r2" for m in cluster.sent)
    assert cluster.machines["r2"] == cluster.machines["r0"]
    follower = cluster.node("r2")
    assert follower.snapshot is not None and leader.snapshot is not None
    assert follower.snapshot.index == leader.snapshot.index
    assert isinstance(cluster.storages["r2"], MemoryStorage)
    assert cluster.storages["r2"].snapshot == leader.snapshot

    # It keeps up by entries afterwards, and survives a restart from its snapshot.
    index = cluster.propose("r0", b"after the snapshot")
    cluster.tick(2)
    assert cluster.applied["r2"][index] == b"after the snapshot"
    cluster.crash("r2")
    cluster.start("r2")
    cluster.tick(2)
    assert cluster.machines["r2"] == cluster.machines["r0"]


def test_a_lost_snapshot_is_sent_again() -> None:
    cluster, leader = stable_cluster()
    cluster.isolate("r2")
    for number in range(5):
        cluster.propose("r0", f"c{number}".encode())
    cluster.tick(2)
    leader.compact(leader.applied_index, encode_state(cluster.machines["r0"]))
    cluster.heal()
    cluster.drop = lambda m: isinstance(m, InstallSnapshot)
    cluster.tick(3)
    cluster.drop = None
    cluster.run_until(
        lambda: cluster.machines["r2"] == cluster.machines["r0"], 4 * ELECTION, "catch-up"
    )
    assert sum(isinstance(m, InstallSnapshot) for m in cluster.sent) >= 2


def test_a_replica_whose_log_was_moved_aside_rejoins_from_the_leader() -> None:
    cluster, leader = stable_cluster()
    for number in range(6):
        cluster.propose("r0", f"c{number}".encode())
    cluster.tick(2)
    leader.compact(3, encode_state(cluster.machines["r0"][:2]))  # state after entries 1..3
    cluster.crash("r2")
    old = cluster.storages["r2"]
    assert isinstance(old, MemoryStorage)
    # What storage.quarantine leaves: no log, no snapshot, the same term and vote.
    wiped = MemoryStorage()
    wiped.save(hard_state=HardState(old.hard_state.term, old.hard_state.vote, 0))
    cluster.storages["r2"] = wiped
    cluster.start("r2")
    cluster.run_until(
        lambda: cluster.node("r2").applied_index == leader.applied_index, 5 * ELECTION, "refill"
    )
    assert cluster.machines["r2"] == cluster.machines["r0"]


# ---------------------------------------------------------------------- reads


def test_read_index_answers_after_a_quorum_confirms_leadership() -> None:
    cluster, leader = stable_cluster()
    cluster.drop = lambda m: True
    leader.read_index(b"q1")
    cluster.flush()
    assert cluster.read_states["r0"] == []  # no heartbeat round answered yet
    cluster.drop = None
    cluster.tick()
    assert cluster.read_states["r0"] == [ReadState(leader.commit_index, b"q1")]
    # A heartbeat answered before the read arrived proves nothing about it.
    cluster.drop = lambda m: isinstance(m, AppendEntries)
    leader.read_index(b"q2")
    cluster.flush()
    assert len(cluster.read_states["r0"]) == 1


def test_an_isolated_leader_never_answers_a_read_and_drops_it_when_it_steps_down() -> None:
    cluster, leader = stable_cluster()
    cluster.isolate("r0")
    leader.read_index(b"stale?")
    cluster.tick(ELECTION // 2)
    assert cluster.read_states["r0"] == []
    cluster.tick(2 * ELECTION)
    assert leader.role is Role.FOLLOWER
    assert cluster.dropped_reads["r0"] == [b"stale?"]


def test_a_read_waits_for_the_new_leaders_first_commit() -> None:
    cluster = Cluster(3, config=config())
    # Votes get through; appends do not, so r0 leads but cannot commit its no-op.
    cluster.drop = lambda m: isinstance(m, AppendEntries)
    leader = cluster.elect("r0")
    leader.read_index(b"q")
    cluster.tick(3)
    assert cluster.read_states["r0"] == []
    cluster.drop = None
    cluster.tick(3)
    [answer] = cluster.read_states["r0"]
    assert answer.context == b"q"
    assert answer.index >= leader.last_index  # covers the no-op of its term


# ---------------------------------------------------------------------- the transport contract


def test_every_request_gets_exactly_one_reply_with_its_ref() -> None:
    cluster, leader = stable_cluster()
    follower = cluster.node("r1")
    term = leader.term
    snapshot = Snapshot(index=1, term=term, data=b"")
    requests: list[Message] = [
        RequestVote(
            "r2", "r1", term=term + 1, last_log_index=99, last_log_term=99, ref=1
        ),  # in lease
        RequestVote("r2", "r1", term=term - 1, last_log_index=99, last_log_term=99, ref=2),  # stale
        RequestVote(
            "r2", "r1", term=term + 1, last_log_index=0, last_log_term=0, pre_vote=True, ref=3
        ),
        AppendEntries(
            "r0",
            "r1",
            term - 1,
            prev_log_index=0,
            prev_log_term=0,
            entries=(),
            leader_commit=0,
            ref=4,
        ),
        AppendEntries(
            "r0",
            "r1",
            term,
            prev_log_index=50,
            prev_log_term=term,
            entries=(),
            leader_commit=0,
            ref=5,
        ),
        AppendEntries(
            "r0", "r1", term, prev_log_index=0, prev_log_term=0, entries=(), leader_commit=0, ref=6
        ),
        InstallSnapshot("r0", "r1", term - 1, snapshot, ref=7),
        InstallSnapshot("r0", "r1", term, snapshot, ref=8),
    ]
    cluster.crash("r0")  # keep the leader out of the way
    for request in requests:
        follower.step(request)
        ready = follower.ready()
        follower.advance(ready)
        answers = [m for m in ready.messages if m.recipient == request.sender]
        assert len(answers) == 1, request
        assert answers[0].ref == request.ref
        expected = {
            RequestVote: RequestVoteResponse,
            AppendEntries: AppendEntriesResponse,
            InstallSnapshot: InstallSnapshotResponse,
        }[type(request)]
        assert isinstance(answers[0], expected)
    assert follower.term == term  # no request above could move it


def test_the_ready_contract_is_enforced() -> None:
    node = lone_node()
    node.step(RequestVote("r0", "r1", term=1, last_log_index=0, last_log_term=0))
    ready = node.ready()
    with pytest.raises(RuntimeError):
        node.ready()
    with pytest.raises(RuntimeError):
        node.advance(type(ready)())
    node.advance(ready)
    assert not node.has_ready()


def test_bad_configuration_and_membership_are_refused() -> None:
    with pytest.raises(ValueError):
        Config(election_ticks=2, heartbeat_ticks=2)
    with pytest.raises(ValueError):
        Node("r1", ["r1", "r2"], MemoryStorage(), config(), random.Random(0))
    with pytest.raises(ValueError):
        Node("r1", ["r2", "r2"], MemoryStorage(), config(), random.Random(0))
    node = lone_node()
    with pytest.raises(ValueError):
        node.step(RequestVote("r9", "r1", term=1, last_log_index=0, last_log_term=0))
    with pytest.raises(ValueError):
        node.step(RequestVote("r0", "r2", term=1, last_log_index=0, last_log_term=0))
    _, leader = stable_cluster()
    with pytest.raises(ValueError):
        leader.propose(b"")  # reserved for the no-op
    with pytest.raises(ValueError):
        leader.compact(leader.applied_index + 1, b"")


def test_a_term_past_the_limit_never_reaches_the_state_and_the_last_term_cannot_overflow() -> None:
    node = lone_node()
    with pytest.raises(ValueError, match="largest term"):
        node.step(
            AppendEntries(
                "r0", "r1", 2**63, prev_log_index=0, prev_log_term=0, entries=(), leader_commit=0
            )
        )
    assert node.term == 0
    storage = MemoryStorage()
    storage.hard_state = HardState(term=2**63 - 1)
    last = lone_node(storage)
    for _ in range(4 * ELECTION):
        last.tick()
    assert last.term == 2**63 - 1  # no campaign for a term the wire could not carry
    assert not any(isinstance(m, RequestVote) for m in replies(last, storage))


def test_a_single_replica_cluster_elects_itself_and_commits_alone() -> None:
    storage = MemoryStorage()
    node = Node("solo", [], storage, config(), random.Random(0))
    for _ in range(2 * ELECTION):
        node.tick()
    assert node.role is Role.LEADER
    index = node.propose(b"x")
    node.read_index(b"q")
    ready = node.ready()
    persist(storage, ready)
    node.advance(ready)
    assert [e.command for e in ready.committed_entries] == [b"", b"x"]
    assert ready.read_states == (ReadState(index, b"q"),)
