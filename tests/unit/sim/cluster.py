"""A small Raft cluster for focused tests: instant in-order delivery, faults placed by hand.

Unlike the seeded simulation, nothing here is random except each node's
election timeout (seeded per replica): a test decides who is cut off, which
messages are dropped and who crashes, then ticks the clock and looks.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Collection

from services.coordinator.raft import (
    Config,
    Entry,
    MemoryStorage,
    Message,
    Node,
    ReadState,
    Role,
    Storage,
    persist,
)


def encode_state(commands: list[bytes]) -> bytes:
    """The test state machine's snapshot: its commands, length-prefixed."""
    return b"".join(len(c).to_bytes(4, "big") + c for c in commands)


def decode_state(data: bytes) -> list[bytes]:
    """The inverse of ``encode_state``."""
    commands, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        commands.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return commands


class Cluster:
    """Replicas ``r0..r{size-1}`` driven through the Ready loop, with a message history."""

    def __init__(
        self,
        size: int = 3,
        *,
        config: Config | None = None,
        storages: dict[str, Storage] | None = None,
        seed: int = 0,
    ) -> None:
        self.ids = [f"r{i}" for i in range(size)]
        self.config = config or Config(election_ticks=10, heartbeat_ticks=1)
        self.seed = seed
        self.storages: dict[str, Storage] = storages or {rid: MemoryStorage() for rid in self.ids}
        self.nodes: dict[str, Node | None] = dict.fromkeys(self.ids)
        # Applied commands by index (no-ops included), per replica, rebuilt on restart.
        self.applied: dict[str, dict[int, bytes]] = {rid: {} for rid in self.ids}
        self.machines: dict[str, list[bytes]] = {rid: [] for rid in self.ids}
        self.read_states: dict[str, list[ReadState]] = {rid: [] for rid in self.ids}
        self.dropped_reads: dict[str, list[bytes]] = {rid: [] for rid in self.ids}
        self.sent: list[Message] = []
        self.queue: deque[Message] = deque()
        self.blocked: set[tuple[str, str]] = set()
        self.drop: Callable[[Message], bool] | None = None
        self._incarnations = dict.fromkeys(self.ids, 0)
        for rid in self.ids:
            self.start(rid)

    # ------------------------------------------------------------------ replicas

    def node(self, rid: str) -> Node:
        """The running node ``rid`` (it must be up)."""
        node = self.nodes[rid]
        assert node is not None, f"{rid} is down"
        return node

    def start(self, rid: str) -> Node:
        """Start (or restart) a replica from its storage."""
        self._incarnations[rid] += 1
        peers = [other for other in self.ids if other != rid]
        storage = self.storages[rid]
        rng = random.Random(f"{self.seed}/{rid}/{self._incarnations[rid]}")
        node = Node(rid, peers, storage, self.config, rng)
        self.nodes[rid] = node
        snapshot = storage.load().snapshot
        self.machines[rid] = decode_state(snapshot.data) if snapshot else []
        self.applied[rid] = {}
        return node

    def crash(self, rid: str) -> None:
        """Stop a replica; it keeps only what its storage holds."""
        self.nodes[rid] = None

    def up(self) -> list[str]:
        """Replicas that are running."""
        return [rid for rid in self.ids if self.nodes[rid] is not None]

    def leader(self) -> str | None:
        """The replica that leads in the highest term, if any."""
        best: Node | None = None
        for rid in self.up():
            node = self.node(rid)
            if node.role is Role.LEADER and (best is None or node.term > best.term):
                best = node
        return best.id if best else None

    # ------------------------------------------------------------------ faults

    def isolate(self, *rids: str) -> None:
        """Cut the given replicas off from the others (they still talk among themselves)."""
        for inside in rids:
            for outside in self.ids:
                if outside not in rids:
                    self.blocked.add((inside, outside))
                    self.blocked.add((outside, inside))

    def heal(self) -> None:
        """Remove every cut and drop filter."""
        self.blocked.clear()
        self.drop = None

    # ------------------------------------------------------------------ time

    def tick(self, ticks: int = 1, *, only: Collection[str] | None = None) -> None:
        """Advance the clock of every running replica (or only some), delivering as we go."""
        for _ in range(ticks):
            for rid in self.up():
                if only is None or rid in only:
                    self.node(rid).tick()
            self.flush()

    def run_until(self, condition: Callable[[], bool], max_ticks: int, what: str) -> int:
        """Tick until ``condition`` holds; fail after ``max_ticks``. Returns the ticks taken."""
        for taken in range(max_ticks + 1):
            if condition():
                return taken
            self.tick()
        raise AssertionError(f"{what} did not happen within {max_ticks} ticks")

    def elect(self, rid: str) -> Node:
        """Tick only ``rid`` until it wins an election (the others must be willing to vote)."""
        node = self.node(rid)
        for _ in range(4 * self.config.election_ticks):
            if node.role is Role.LEADER:
                return node
            self.tick(only=[rid])
        raise AssertionError(f"{rid} did not win an election")

    def propose(self, rid: str, command: bytes) -> int:
        """Propose on ``rid`` and deliver what follows."""
        index = self.node(rid).propose(command)
        self.flush()
        return index

    # ------------------------------------------------------------------ delivery

    def flush(self) -> None:
        """Handle every Ready and deliver every queued message until the cluster is quiet."""
        while True:
            busy = False
            for rid in self.up():
                node = self.node(rid)
                while node.has_ready():
                    self._handle_ready(rid, node)
                    busy = True
            if self.queue:
                message = self.queue.popleft()
                busy = True
                recipient = self.nodes[message.recipient]
                if (
                    recipient is not None
                    and (message.sender, message.recipient) not in self.blocked
                    and not (self.drop is not None and self.drop(message))
                ):
                    recipient.step(self.transmit(message))
            if not busy:
                return

    def transmit(self, message: Message) -> Message:
        """What the recipient gets for ``message``: the message itself, unless overridden."""
        return message

    def _handle_ready(self, rid: str, node: Node) -> None:
        ready = node.ready()
        persist(self.storages[rid], ready)
        self.sent.extend(ready.messages)
        self.queue.extend(ready.messages)
        if ready.snapshot is not None:
            self.machines[rid] = decode_state(ready.snapshot.data)
        for entry in ready.committed_entries:
            self._apply(rid, entry)
        self.read_states[rid].extend(ready.read_states)
        self.dropped_reads[rid].extend(ready.dropped_reads)
        node.advance(ready)

    def _apply(self, rid: str, entry: Entry) -> None:
        self.applied[rid][entry.index] = entry.command
        if entry.command:
            self.machines[rid].append(entry.command)
