"""A deterministic simulation of a Raft cluster: virtual clock, hostile network, crashes.

Everything random comes from one ``random.Random(seed)``, so a seed replays
exactly. The network drops, delays, duplicates, reorders and partitions
messages; replicas crash at any point of handling a Ready (before persisting,
half-way through persisting, after persisting but before sending, after
sending) and restart from what their storage kept. Clients propose commands
and ask for linearizable reads throughout.

The checker watches the whole history:

* election safety: at most one leader per term;
* log matching: an (index, term) pair always names the same command and the
  same predecessor term, in every log that ever persisted it;
* leader completeness: a leader's log, when it takes office, holds every
  entry committed in an earlier term;
* state-machine safety: every replica applies the same command at an index,
  checked through a hash chain over everything applied so far (so snapshots
  are checked too), and no command is applied at two indexes;
* linearizable reads: a read's index covers everything committed before the
  read was asked for;
* liveness: once the network heals and every replica is up, a leader is
  elected and a fresh proposal is applied everywhere within a bound.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from services.coordinator.raft import (
    Config,
    MemoryStorage,
    Message,
    Node,
    NotLeader,
    Ready,
    Role,
    Snapshot,
)


class Violation(AssertionError):
    """A safety or liveness property failed."""


@dataclass(frozen=True)
class Scenario:
    """The knobs of one simulated run, all drawn from its seed."""

    voters: int
    raft: Config
    chaos_ticks: int
    drop: float
    duplicate: float
    max_delay: int
    crash_per_tick: float
    crash_per_ready: float
    restart_per_tick: float
    partition_per_tick: float
    heal_per_tick: float
    propose_per_tick: float
    read_per_tick: float
    compact_after: int
    interleave: float
    liveness_bound: int

    @staticmethod
    def from_seed(seed: int) -> Scenario:
        """Draw a scenario; the simulation's own stream starts after these draws."""
        rng = random.Random(f"scenario/{seed}")
        election = rng.randint(5, 12)
        heartbeat = rng.randint(1, max(1, election // 3))
        raft = Config(
            election_ticks=election,
            heartbeat_ticks=heartbeat,
            pre_vote=rng.random() < 0.85,
            check_quorum=rng.random() < 0.85,
            max_entries_per_message=rng.choice([1, 3, 64]),
            max_inflight_messages=rng.choice([1, 4, 64]),
        )
        return Scenario(
            voters=rng.choice([3, 3, 5]),
            raft=raft,
            chaos_ticks=rng.randint(120, 220),
            drop=rng.choice([0.0, 0.02, 0.1, 0.25]),
            duplicate=rng.choice([0.0, 0.03, 0.1]),
            max_delay=rng.choice([1, 2, 4, election]),
            crash_per_tick=rng.choice([0.0, 0.01, 0.03]),
            crash_per_ready=rng.choice([0.0, 0.003, 0.02]),
            restart_per_tick=rng.choice([0.03, 0.1]),
            partition_per_tick=rng.choice([0.0, 0.01, 0.03]),
            heal_per_tick=rng.choice([0.02, 0.06]),
            propose_per_tick=rng.choice([0.1, 0.3, 0.6]),
            read_per_tick=rng.choice([0.0, 0.1, 0.4]),
            compact_after=rng.choice([4, 16, 10_000]),
            interleave=rng.choice([0.0, 0.0, 0.2]),
            # Generous against the worst case: split votes, a pre-vote round
            # and a lease to wait out, each an election timeout or two.
            liveness_bound=60 * election,
        )


@dataclass
class _StateMachine:
    """A replica's applied state: how far it got and a hash chain over what it applied."""

    index: int = 0
    digest: bytes = b""

    def encode(self) -> bytes:
        return self.index.to_bytes(8, "big") + self.digest

    @staticmethod
    def decode(data: bytes) -> _StateMachine:
        return _StateMachine(int.from_bytes(data[:8], "big"), data[8:])


@dataclass
class _Replica:
    id: str
    storage: MemoryStorage = field(default_factory=MemoryStorage)
    node: Node | None = None
    machine: _StateMachine = field(default_factory=_StateMachine)
    incarnation: int = 0


@dataclass(order=True)
class _InFlight:
    due: int
    order: float
    message: Message = field(compare=False)
    taken: bool = field(default=False, compare=False)


class Simulation:
    """One seeded run of a cluster."""

    def __init__(self, seed: int, *, trace: bool = False) -> None:
        self.seed = seed
        self.scenario = Scenario.from_seed(seed)
        self.rng = random.Random(seed)
        self.now = 0
        self.ids = [f"r{i}" for i in range(self.scenario.voters)]
        self.replicas = {rid: _Replica(rid) for rid in self.ids}
        self.in_flight: list[_InFlight] = []
        self.group = dict.fromkeys(self.ids, 0)  # partition: replicas talk within a group
        self.drop = self.scenario.drop
        self.duplicate = self.scenario.duplicate
        self.max_delay = self.scenario.max_delay
        self.chaos = True
        self.trace: list[str] | None = [] if trace else None
        # History for the checks.
        self.leaders: dict[int, str] = {}
        self.leader_logs: dict[int, tuple[int, int, list[int]]] = {}
        self.entry_commands: dict[tuple[int, int], bytes] = {}
        self.entry_predecessors: dict[tuple[int, int], int] = {}
        self.chain: dict[int, bytes] = {0: b""}
        self.applied_at: dict[bytes, int] = {}
        self.committed: dict[int, tuple[int, int]] = {}  # index -> (entry term, commit term)
        self.max_commit = 0
        self.reads: dict[bytes, int] = {}
        self.proposals = 0
        self.live_after = -1
        self.stats: Counter[str] = Counter()  # what the run exercised
        for rid in self.ids:
            self._start(self.replicas[rid])

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """Chaos, then heal and demand progress, then the end-of-run checks."""
        try:
            for _ in range(self.scenario.chaos_ticks):
                self._chaos_events()
                self._step_clock()
            self._heal()
            self._await_liveness()
            self._final_checks()
        except Violation as failure:
            raise Violation(self._describe(str(failure))) from None
        except Exception as error:
            # The core's own InvariantViolation, or a crash: report it with the seed.
            raise Violation(self._describe(f"{type(error).__name__}: {error}")) from error

    def _describe(self, failure: str) -> str:
        lines = [
            f"seed {self.seed} at tick {self.now}: {failure}",
            f"scenario: {self.scenario}",
            f"replay: WEBSHARD_RAFT_SEED={self.seed} pytest tests/unit/test_raft_sim.py -k replay",
        ]
        if self.trace is not None:
            lines.append("last events:")
            lines.extend(self.trace[-300:])
        return "\n".join(lines)

    def _log(self, text: str) -> None:
        if self.trace is not None:
            self.trace.append(f"[{self.now}] {text}")

    def _step_clock(self) -> None:
        self.now += 1
        for rid in self.ids:
            replica = self.replicas[rid]
            if replica.node is not None:
                replica.node.tick()
                self._observe(replica)
        for message in self._due():
            self._deliver(message)
        for rid in self.ids:
            self._drain(self.replicas[rid])

    def _up(self) -> list[_Replica]:
        return [self.replicas[rid] for rid in self.ids if self.replicas[rid].node is not None]

    def _leader(self) -> _Replica | None:
        """The up replica that believes it leads in the highest term."""
        best: _Replica | None = None
        for replica in self._up():
            node = replica.node
            assert node is not None
            if node.role is Role.LEADER and (
                best is None or best.node is None or node.term > best.node.term
            ):
                best = replica
        return best

    # ------------------------------------------------------------------ faults and clients

    def _chaos_events(self) -> None:
        s = self.scenario
        rng = self.rng
        if rng.random() < s.crash_per_tick:
            up = self._up()
            leaders = [r for r in up if r.node is not None and r.node.role is Role.LEADER]
            if up:
                # Leaders crash more often than their share: losing one with
                # entries on a minority is where Raft's subtle cases live.
                victim = rng.choice(leaders if leaders and rng.random() < 0.5 else up)
                self._crash(victim, "crash between ticks")
        for rid in self.ids:
            replica = self.replicas[rid]
            if replica.node is None and rng.random() < s.restart_per_tick:
                self._start(replica)
        if rng.random() < s.partition_per_tick:
            self._partition()
        if rng.random() < s.heal_per_tick:
            self.group = dict.fromkeys(self.ids, 0)
            self._log("partition healed")
        if rng.random() < s.propose_per_tick:
            self._propose()
        if rng.random() < s.read_per_tick:
            self._read()
        if rng.random() < 0.1:
            up = self._up()
            if up:
                self._compact(rng.choice(up))

    def _partition(self) -> None:
        rng = self.rng
        kind = rng.random()
        if kind < 0.4:
            leader = self._leader()
            isolated = [leader.id if leader else rng.choice(self.ids)]
        elif kind < 0.7:
            isolated = [rng.choice(self.ids)]
        else:
            isolated = rng.sample(self.ids, rng.randint(1, len(self.ids) - 1))
        self.group = {rid: (1 if rid in isolated else 0) for rid in self.ids}
        self._log(f"partition {sorted(isolated)} from the rest")
        self.stats["partitions"] += 1

    def _propose(self) -> None:
        up = self._up()
        if not up:
            return
        leaders = [r for r in up if r.node is not None and r.node.role is Role.LEADER]
        replica = self.rng.choice(leaders if leaders and self.rng.random() < 0.8 else up)
        assert replica.node is not None
        self.proposals += 1
        command = f"{self.seed}:{self.proposals}".encode()
        try:
            index = replica.node.propose(command)
        except NotLeader:
            return
        self._log(f"{replica.id} proposed {command!r} at {index}")
        self._drain(replica)

    def _read(self) -> None:
        # Any replica that believes it leads, a deposed one cut off by a
        # partition included: that is the one that must not answer stale.
        leaders = [r for r in self._up() if r.node is not None and r.node.role is Role.LEADER]
        if not leaders:
            return
        leader = self.rng.choice(leaders)
        assert leader.node is not None
        context = f"read:{self.now}:{self.rng.random()}".encode()
        leader.node.read_index(context)
        # Everything committed anywhere by now must be visible to this read.
        self.reads[context] = self.max_commit
        self._drain(leader)

    def _compact(self, replica: _Replica) -> None:
        node = replica.node
        assert node is not None
        applied = replica.machine.index
        snapshot_index = node.snapshot.index if node.snapshot else 0
        if applied - snapshot_index >= self.scenario.compact_after and applied == (
            node.applied_index
        ):
            node.compact(applied, replica.machine.encode())
            self._log(f"{replica.id} compacted up to {applied}")
            self.stats["compactions"] += 1
            self._drain(replica)

    def _crash(self, replica: _Replica, why: str) -> None:
        self._log(f"{replica.id} crashed ({why})")
        self.stats[f"crashes {why}"] += 1
        replica.node = None
        replica.machine = _StateMachine()

    def _start(self, replica: _Replica) -> None:
        replica.incarnation += 1
        peers = [rid for rid in self.ids if rid != replica.id]
        rng = random.Random(f"{self.seed}/{replica.id}/{replica.incarnation}")
        replica.node = Node(replica.id, peers, replica.storage, self.scenario.raft, rng)
        snapshot = replica.storage.snapshot
        replica.machine = (
            _StateMachine.decode(snapshot.data) if snapshot is not None else _StateMachine()
        )
        self._check_machine(replica, "restarted from its snapshot")
        self._log(f"{replica.id} started (incarnation {replica.incarnation})")

    # ------------------------------------------------------------------ network

    def _send(self, message: Message) -> None:
        if self.chaos and self.rng.random() < self.drop:
            return
        copies = 2 if self.chaos and self.rng.random() < self.duplicate else 1
        self.stats["messages"] += 1
        for _ in range(copies):
            delay = self.rng.randint(1, self.max_delay)
            heapq.heappush(self.in_flight, _InFlight(self.now + delay, self.rng.random(), message))

    def _due(self) -> Iterator[Message]:
        while self.in_flight and self.in_flight[0].due <= self.now:
            item = heapq.heappop(self.in_flight)
            if not item.taken:
                yield item.message

    def _deliver(self, message: Message) -> None:
        replica = self.replicas[message.recipient]
        if replica.node is None or self.group[message.sender] != self.group[message.recipient]:
            return
        replica.node.step(message)
        self._observe(replica)

    # ------------------------------------------------------------------ the Ready loop

    def _drain(self, replica: _Replica) -> None:
        while replica.node is not None and replica.node.has_ready():
            self._handle_ready(replica, replica.node.ready())

    def _handle_ready(self, replica: _Replica, ready: Ready) -> None:
        node = replica.node
        assert node is not None
        crash_at = None
        if self.chaos and self.rng.random() < self.scenario.crash_per_ready:
            crash_at = self.rng.choice(
                ["before persist", "mid persist", "before send", "after send"]
            )
        if crash_at == "before persist":
            self._crash(replica, "before persisting its Ready")
            return
        self._check_persisted_entries(node, ready)
        storage = replica.storage
        storage.save(snapshot=ready.snapshot_to_persist, entries=ready.entries)
        if crash_at == "mid persist":
            # FileStorage writes snapshot, entries, then hard state, each durable
            # on its own: a crash can land between entries and hard state.
            self._crash(replica, "between persisting entries and hard state")
            return
        if ready.hard_state is not None:
            storage.save(hard_state=ready.hard_state)
        if self.chaos and self.rng.random() < self.scenario.interleave:
            self._interleave(replica)
        if crash_at == "before send":
            self._crash(replica, "after persisting, before sending")
            return
        for message in ready.messages:
            self._send(message)
        if crash_at == "after send":
            self._crash(replica, "after sending, before applying")
            return
        self._apply(replica, ready)
        node.advance(ready)

    def _interleave(self, replica: _Replica) -> None:
        """Give the node new input while its Ready is outstanding, as an async driver would."""
        node = replica.node
        assert node is not None
        choice = self.rng.random()
        if choice < 0.3:
            node.tick()
        elif choice < 0.5:
            if node.role is Role.LEADER:
                self.proposals += 1
                node.propose(f"{self.seed}:{self.proposals}".encode())
        else:
            # The next message on its way to this replica arrives early.
            for item in self.in_flight:
                if item.message.recipient == replica.id and not item.taken:
                    item.taken = True
                    if self.group[item.message.sender] == self.group[replica.id]:
                        node.step(item.message)
                    break
        self._observe(replica)

    def _apply(self, replica: _Replica, ready: Ready) -> None:
        if ready.snapshot is not None:
            replica.machine = _StateMachine.decode(ready.snapshot.data)
            self._check_snapshot(replica, ready.snapshot)
            self.stats["snapshots installed"] += 1
        for entry in ready.committed_entries:
            machine = replica.machine
            if entry.index != machine.index + 1:
                raise Violation(
                    f"{replica.id} applied entry {entry.index} after {machine.index}: not in order"
                )
            machine.index = entry.index
            machine.digest = hashlib.blake2b(
                machine.digest + entry.command, digest_size=16
            ).digest()
            self._check_machine(replica, f"applied {entry.command!r}")
            if entry.command:
                first = self.applied_at.setdefault(entry.command, entry.index)
                if first != entry.index:
                    raise Violation(
                        f"command {entry.command!r} applied at {entry.index} and at {first}"
                    )
            if entry.index not in self.committed:
                raise Violation(
                    f"{replica.id} applied {entry.index} before any leader committed it"
                )
        for read in ready.read_states:
            needed = self.reads.pop(read.context, None)
            if needed is None:
                raise Violation(
                    f"{replica.id} answered an unknown or repeated read {read.context!r}"
                )
            if read.index < needed:
                raise Violation(
                    f"{replica.id} answered a read at {read.index} but {needed} was committed "
                    "before the read was asked: a stale read"
                )
            self.stats["reads answered"] += 1
        for context in ready.dropped_reads:
            self.reads.pop(context, None)
            self.stats["reads dropped"] += 1

    # ------------------------------------------------------------------ checks

    def _observe(self, replica: _Replica) -> None:
        """Checks after any input to a replica: election safety, commits."""
        node = replica.node
        if node is None:
            return
        if node.role is Role.LEADER:
            holder = self.leaders.setdefault(node.term, replica.id)
            if holder != replica.id:
                raise Violation(f"two leaders in term {node.term}: {holder} and {replica.id}")
            if node.term not in self.leader_logs:
                first = node.first_index
                terms = [entry.term for entry in node.entries(first, node.last_index + 1)]
                self.leader_logs[node.term] = (node.first_index - 1, first, terms)
                self._log(f"{replica.id} leads term {node.term}")
                self.stats["leaders elected"] += 1
            if node.commit_index > self.max_commit:
                for index in range(self.max_commit + 1, node.commit_index + 1):
                    term = node.term_at(index)
                    assert term is not None
                    self.committed[index] = (term, node.term)
                self.max_commit = node.commit_index

    def _check_persisted_entries(self, node: Node, ready: Ready) -> None:
        if not ready.entries:
            return
        first = ready.entries[0]
        previous_term = node.term_at(first.index - 1)
        if ready.snapshot is not None and ready.snapshot.index == first.index - 1:
            previous_term = ready.snapshot.term
        for entry in ready.entries:
            key = (entry.index, entry.term)
            command = self.entry_commands.setdefault(key, entry.command)
            if command != entry.command:
                raise Violation(f"two different commands at index {entry.index} term {entry.term}")
            if previous_term is not None:
                known = self.entry_predecessors.setdefault(key, previous_term)
                if known != previous_term:
                    raise Violation(
                        f"log matching: entry {key} follows term {previous_term} in one log "
                        f"and term {known} in another"
                    )
            previous_term = entry.term

    def _check_machine(self, replica: _Replica, what: str) -> None:
        machine = replica.machine
        known = self.chain.setdefault(machine.index, machine.digest)
        if known != machine.digest:
            raise Violation(
                f"{replica.id} {what}: its state at index {machine.index} differs from "
                "another replica's"
            )

    def _check_snapshot(self, replica: _Replica, snapshot: Snapshot) -> None:
        if snapshot.index != replica.machine.index:
            raise Violation(f"snapshot at {snapshot.index} holds state of {replica.machine.index}")
        self._check_machine(replica, f"installed a snapshot at {snapshot.index}")

    def _final_checks(self) -> None:
        # Leader completeness over the whole history.
        for term, (snapshot_index, first, terms) in self.leader_logs.items():
            for index, (entry_term, commit_term) in self.committed.items():
                if commit_term >= term or index <= snapshot_index:
                    continue  # covered by the snapshot, whose state the hash chain checks
                position = index - first
                if position >= len(terms) or terms[position] != entry_term:
                    raise Violation(
                        f"leader completeness: the leader of term {term} lacked entry {index} "
                        f"(term {entry_term}) committed in term {commit_term}"
                    )
        # Log matching between the final logs.
        logs = []
        for replica in self._up():
            node = replica.node
            assert node is not None
            logs.append({e.index: e for e in node.entries(node.first_index, node.last_index + 1)})
        for i, mine in enumerate(logs):
            for theirs in logs[i + 1 :]:
                shared = [
                    idx for idx in mine if idx in theirs and mine[idx].term == theirs[idx].term
                ]
                if not shared:
                    continue
                top = max(shared)
                for idx in range(top, 0, -1):
                    if idx not in mine or idx not in theirs:
                        break
                    if mine[idx] != theirs[idx]:
                        raise Violation(f"log matching: logs agree at {top} but differ at {idx}")

    # ------------------------------------------------------------------ liveness

    def _heal(self) -> None:
        self.chaos = False
        self.group = dict.fromkeys(self.ids, 0)
        self.max_delay = 1
        for rid in self.ids:
            if self.replicas[rid].node is None:
                self._start(self.replicas[rid])
        self._log("healed: every replica up, network reliable")

    def _await_liveness(self) -> None:
        """After healing, a leader everyone follows must commit a fresh command everywhere."""
        start = self.now
        deadline = self.now + self.scenario.liveness_bound
        command = b""
        proposed_in: tuple[str, int] | None = None
        while self.now < deadline:
            self._step_clock()
            leader = self._leader()
            if leader is None or leader.node is None:
                continue
            up = self._up()
            if proposed_in != (leader.id, leader.node.term) and all(
                r.node is not None and r.node.leader_id == leader.id for r in up
            ):
                # A proposal made under an earlier leader may have been lost with
                # its leadership; propose afresh to each new one.
                self.proposals += 1
                command = f"{self.seed}:live:{self.proposals}".encode()
                leader.node.propose(command)
                proposed_in = (leader.id, leader.node.term)
                self._drain(leader)
            index = self.applied_at.get(command) if command else None
            if index is not None and all(r.machine.index >= index for r in up):
                self.live_after = self.now - start
                self._log(f"live after {self.live_after} ticks")
                return
        raise Violation(
            f"no progress within {self.scenario.liveness_bound} ticks after healing: "
            + ", ".join(f"{r.id}={r.node.role.value}@{r.node.term}" for r in self._up() if r.node)
        )
