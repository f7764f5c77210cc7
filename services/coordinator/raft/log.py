"""One replica's copy of the replicated log: a snapshot, then the entries after it.

The log lives in memory; storage holds the durable copy. ``stable`` marks how
far the durable copy is known to reach, so the node can hand the rest to the
caller to persist.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.coordinator.raft.types import Entry, InvariantViolation, Snapshot


class RaftLog:
    """Entries ``first_index..last_index`` after a snapshot, with commit and persistence marks."""

    __slots__ = ("_entries", "_snapshot_index", "_snapshot_term", "committed", "stable")

    def __init__(self, snapshot: Snapshot | None, entries: Sequence[Entry], committed: int) -> None:
        self._snapshot_index = snapshot.index if snapshot else 0
        self._snapshot_term = snapshot.term if snapshot else 0
        self._entries: list[Entry] = []
        expected = self._snapshot_index + 1
        for entry in entries:
            if entry.index <= self._snapshot_index:
                continue  # covered by the snapshot
            if entry.index != expected:
                raise ValueError(
                    f"log entries are not contiguous: {entry.index} after {expected - 1}"
                )
            self._entries.append(entry)
            expected += 1
        if committed > self.last_index:
            raise ValueError(f"commit index {committed} is past the last entry {self.last_index}")
        # A snapshot only ever holds committed state, so its index is committed.
        self.committed = max(committed, self._snapshot_index)
        self.stable = self.last_index

    @property
    def snapshot_index(self) -> int:
        """Index of the last entry the snapshot replaces (0 without a snapshot)."""
        return self._snapshot_index

    @property
    def snapshot_term(self) -> int:
        """Term of that entry."""
        return self._snapshot_term

    @property
    def first_index(self) -> int:
        """Index of the first entry held as an entry rather than in the snapshot."""
        return self._snapshot_index + 1

    @property
    def last_index(self) -> int:
        """Index of the last entry (the snapshot's index when no entry follows it)."""
        return self._snapshot_index + len(self._entries)

    @property
    def last_term(self) -> int:
        """Term of the last entry."""
        return self._entries[-1].term if self._entries else self._snapshot_term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``; None when compacted away or past the end."""
        if index == self._snapshot_index:
            return self._snapshot_term
        offset = index - self._snapshot_index - 1
        if offset < 0 or offset >= len(self._entries):
            return None
        return self._entries[offset].term

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``lo`` to ``hi - 1``; ``lo`` must not be compacted away."""
        if lo <= self._snapshot_index:
            raise ValueError(f"entry {lo} is compacted away (snapshot at {self._snapshot_index})")
        base = self._snapshot_index + 1
        return self._entries[lo - base : max(hi - base, lo - base)]

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Whether a log ending at (last_index, last_term) is at least as up to date as this one."""
        mine = self.last_term
        return last_term > mine or (last_term == mine and last_index >= self.last_index)

    def conflict_hint(self, prev_index: int) -> int:
        """Where a leader should retry after this log refused ``prev_index``.

        Past our end: just after our last entry. On a term mismatch: the first
        entry of our conflicting term, so the leader skips the whole term in one
        round trip instead of one entry per round trip; never below what is
        committed, which is known to match.
        """
        if prev_index > self.last_index:
            return self.last_index + 1
        term = self.term_at(prev_index)
        index = prev_index
        while index - 1 > self.committed and self.term_at(index - 1) == term:
            index -= 1
        return index

    def maybe_append(
        self, prev_index: int, prev_term: int, leader_commit: int, entries: Sequence[Entry]
    ) -> int | None:
        """Apply a leader's AppendEntries; return the last index now known to match, or None.

        Entries already present with the same term are kept: a late or
        duplicated message must never cut off entries a newer one appended.
        """
        if self.term_at(prev_index) != prev_term:
            return None
        last_new = prev_index + len(entries)
        for position, entry in enumerate(entries):
            existing = self.term_at(entry.index)
            if existing != entry.term:
                self.append(entries[position:])
                break
        # Only what this message proved matches may be committed: our log may
        # run on past last_new with entries from a deposed leader.
        self.commit_to(min(leader_commit, last_new))
        return last_new

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries, replacing any entry at their indexes and everything after."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise InvariantViolation(
                f"entry {first} would overwrite the committed log (commit index {self.committed})"
            )
        if first > self.last_index + 1:
            raise ValueError(f"entry {first} leaves a gap after {self.last_index}")
        del self._entries[first - self._snapshot_index - 1 :]
        self._entries.extend(entries)
        self.stable = min(self.stable, first - 1)

    def commit_to(self, index: int) -> None:
        """Raise the commit index; it never falls."""
        if index > self.committed:
            if index > self.last_index:
                raise InvariantViolation(f"commit {index} is past the last entry {self.last_index}")
            self.committed = index

    def unstable(self) -> list[Entry]:
        """Entries the caller has not persisted yet."""
        if self.stable >= self.last_index:
            return []
        return self.entries(max(self.stable, self._snapshot_index) + 1, self.last_index + 1)

    def stable_to(self, index: int, term: int) -> None:
        """Mark entries up to ``index`` as persisted, unless that entry was replaced meanwhile."""
        if self.term_at(index) == term and index > self.stable:
            self.stable = index

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log with a snapshot from the leader."""
        if snapshot.index <= self.committed:
            raise InvariantViolation(
                f"snapshot at {snapshot.index} would rewind the commit index {self.committed}"
            )
        self._snapshot_index = snapshot.index
        self._snapshot_term = snapshot.term
        self._entries.clear()
        self.committed = snapshot.index
        self.stable = snapshot.index

    def compact(self, index: int) -> None:
        """Drop the entries up to ``index``, which a snapshot now holds."""
        if index <= self._snapshot_index:
            return
        if index > self.committed:
            raise ValueError(f"cannot compact past the commit index {self.committed}")
        term = self.term_at(index)
        assert term is not None
        del self._entries[: index - self._snapshot_index]
        self._snapshot_index = index
        self._snapshot_term = term
        self.stable = max(self.stable, index)
