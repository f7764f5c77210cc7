"""Durable storage for one replica's Raft state, and an in-memory twin for simulations.

``FileStorage`` keeps three files in its directory:

``raft.log``
    An append-only file: an 8-byte magic, then one record per entry. A record
    is ``u32 payload length | u32 CRC32 of the payload | payload`` and the
    payload is ``u64 index | u64 term | command`` (big-endian). Appends are
    written and fsynced before ``save`` returns. Replacing a conflicting suffix
    truncates the file at the first replaced record; compaction writes a new
    file beside it and renames it into place.
``hardstate``
    Term, vote and commit index, CRC-checked, replaced atomically (write a
    temporary file, fsync it, rename it over the old one, fsync the directory),
    so a crash leaves either the old or the new state, never a mixture.
``snapshot``
    The latest snapshot, CRC-checked, replaced atomically in the same way.

``save`` writes the snapshot first, then entries, then the hard state, so the
commit index on disk never points past the entries on disk.

Opening refuses damaged state with ``CorruptLog`` naming the file and byte
offset: a bad CRC, a gap or a step back in the indexes, a log that starts
after the snapshot ends, or a commit index past the last entry. Nothing
acknowledged is ever skipped to make the replica start, because a replica
that forgot entries it acknowledged can help elect a leader that lacks
committed entries; the operator moves the directory aside (or runs
``quarantine``, which keeps the term and vote) and the replica rejoins with
an empty log that the leader fills, by snapshot if it has compacted.

The one exception is a torn tail, the trace of a power loss in the middle of
an append: as etcd's WAL does, opening cuts it off with a WARNING naming the
file, the offset and the bytes cut. Every acknowledgement follows the fsync
that completes its records, so a record that never became whole was never
acknowledged, and forgetting it promises nothing. A tail is torn when it is
a partial record header, a record whose announced length runs past the end
of the file, zeros (an extent the filesystem allocated but the data never
reached), or a last record with a bad CRC one of whose 512-byte sectors is all
zeros (a sector write is atomic; a zero sector is one that was never
written). A bad CRC anywhere else, or in a last record with no zero sector,
is damage, and refused. The cut happens only once the rest of the state has
been validated: a hard state whose commit index needs the torn record is
refused with the file untouched.

One interrupted operation is completed rather than refused: a snapshot is
renamed into place before the log is rewritten, so a crash in between leaves
a log that still holds entries the snapshot covers. Those entries are
committed state the snapshot already holds; opening drops them (and any
entries after them when the log disagrees with the snapshot's last entry, as
Raft's snapshot installation does) and finishes the rewrite.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.coordinator.raft.types import (
    CorruptLog,
    Entry,
    HardState,
    PersistedState,
    Ready,
    Snapshot,
    StorageError,
)

log = logging.getLogger(__name__)

LOG_FILE = "raft.log"
HARD_STATE_FILE = "hardstate"
SNAPSHOT_FILE = "snapshot"
LOCK_FILE = "LOCK"

_LOG_MAGIC = b"WSRAFTL1"
_HARD_MAGIC = b"WSRAFTH1"
_SNAP_MAGIC = b"WSRAFTS1"
_RECORD = struct.Struct(">II")  # payload length, CRC32 of the payload
_ENTRY = struct.Struct(">QQ")  # index, term
_HARD = struct.Struct(">QQI")  # term, commit, vote length
_SNAP = struct.Struct(">QQQI")  # index, term, data length, CRC32 of the rest
# A record longer than this is garbage in a length field, not a real entry.
_MAX_RECORD = 64 << 20
# The smallest unit a disk writes atomically; a torn append leaves whole sectors unwritten.
_SECTOR = 512


class Storage(Protocol):
    """Durable (or, for simulations, remembered) Raft state of one replica."""

    def load(self) -> PersistedState:
        """Everything persisted: hard state, latest snapshot, the entries after it."""
        ...

    def save(
        self,
        *,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
    ) -> None:
        """Persist, in this order, a snapshot, entries and the hard state; durable on return.

        A snapshot drops the entries it covers; the entries after it are kept
        only when the log's entry at the snapshot's index has the snapshot's
        term. An entry replaces the stored entry at its index and all after it.
        """
        ...


def persist(storage: Storage, ready: Ready) -> None:
    """Persist what a Ready asks for, before its messages are sent."""
    storage.save(
        snapshot=ready.snapshot_to_persist, entries=ready.entries, hard_state=ready.hard_state
    )


class MemoryStorage:
    """Storage that keeps everything in memory: what survives a simulated crash."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []

    def load(self) -> PersistedState:
        """The remembered state."""
        return PersistedState(self.hard_state, self.snapshot, tuple(self.entries))

    def save(
        self,
        *,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
    ) -> None:
        """Remember a snapshot, entries and a hard state, with FileStorage's semantics."""
        if snapshot is not None:
            self._apply_snapshot(snapshot)
        if entries:
            self._append(entries)
        if hard_state is not None:
            self.hard_state = hard_state

    def _base(self) -> int:
        return self.snapshot.index if self.snapshot else 0

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        base = self._base()
        if snapshot.index <= base:
            return
        keep = snapshot.index - base
        matches = len(self.entries) >= keep and self.entries[keep - 1].term == snapshot.term
        self.entries = self.entries[keep:] if matches else []
        self.snapshot = snapshot

    def _append(self, entries: Sequence[Entry]) -> None:
        base = self._base()
        first = entries[0].index
        last = base + len(self.entries)
        if first <= base or first > last + 1:
            raise StorageError(f"entry {first} does not follow the log ({base + 1}..{last})")
        _require_contiguous(entries)
        del self.entries[first - base - 1 :]
        self.entries.extend(entries)


@dataclass
class _Scan:
    """What opening a directory found, after validation."""

    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry]
    offsets: list[int]  # byte offset of each entry's record in the log file
    log_end: int
    stale_prefix: bool  # the log still holds entries the snapshot covers
    torn: _Torn | None  # a torn tail after log_end, to cut off


@dataclass(frozen=True)
class _Torn:
    """A torn last record: where it starts, how many bytes it spans, what it looks like."""

    offset: int
    length: int
    reason: str


class FileStorage:
    """Raft state in a directory, fsynced before anything is acknowledged.

    One process at a time: opening takes an exclusive lock on the directory.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Open (creating if needed) and validate; raises CorruptLog on damaged state."""
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self._dir)
        self._log_fd = -1
        try:
            for leftover in self._dir.glob("*.tmp"):
                leftover.unlink()  # a crash before a rename: the old file is still whole
            log_path = self._dir / LOG_FILE
            if not log_path.exists():
                _atomic_write(self._dir, LOG_FILE, _LOG_MAGIC)
            scan = _scan(self._dir)
            if scan.torn is not None:
                _cut_torn_tail(log_path, scan.torn)
            self._snapshot = scan.snapshot
            self._base = scan.snapshot.index if scan.snapshot else 0
            self._terms = [entry.term for entry in scan.entries]
            self._offsets = scan.offsets
            self._log_end = scan.log_end
            self._log_fd = os.open(log_path, os.O_RDWR)
            if scan.stale_prefix:
                self._rewrite_log(keep_from=0)
        except BaseException:
            self.close()
            raise

    @property
    def directory(self) -> Path:
        """The data directory."""
        return self._dir

    def load(self) -> PersistedState:
        """Read and validate everything on disk."""
        scan = _scan(self._dir)
        return PersistedState(scan.hard_state, scan.snapshot, tuple(scan.entries))

    def save(
        self,
        *,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
    ) -> None:
        """Persist a snapshot, entries, then the hard state; each is fsynced before the next."""
        if self._log_fd < 0:
            raise StorageError(f"{self._dir}: storage is closed")
        if snapshot is not None:
            self._save_snapshot(snapshot)
        if entries:
            self._append(entries)
        if hard_state is not None:
            _atomic_write(self._dir, HARD_STATE_FILE, _encode_hard_state(hard_state))

    def close(self) -> None:
        """Release the files and the directory lock."""
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    def __enter__(self) -> FileStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _last_index(self) -> int:
        return self._base + len(self._offsets)

    def _append(self, entries: Sequence[Entry]) -> None:
        first = entries[0].index
        last = self._last_index()
        if first <= self._base or first > last + 1:
            raise StorageError(f"entry {first} does not follow the log ({self._base + 1}..{last})")
        _require_contiguous(entries)
        if first <= last:
            # A leader replaced our uncommitted suffix. Cutting it off before the
            # new entries are durable is safe: we never acknowledged those to
            # this leader, and no earlier leader can have committed them.
            keep = first - self._base - 1
            self._log_end = self._offsets[keep]
            del self._offsets[keep:]
            del self._terms[keep:]
            os.ftruncate(self._log_fd, self._log_end)
        chunks = []
        position = self._log_end
        for entry in entries:
            record = _encode_record(entry)
            self._offsets.append(position)
            self._terms.append(entry.term)
            position += len(record)
            chunks.append(record)
        _write_all(self._log_fd, b"".join(chunks), self._log_end)
        self._log_end = position
        os.fsync(self._log_fd)

    def _save_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.index <= self._base:
            return
        _atomic_write(self._dir, SNAPSHOT_FILE, _encode_snapshot(snapshot))
        # The snapshot is durable: from here on, a crash before the rewrite below
        # completes is finished by the next open (see the module docstring).
        keep = snapshot.index - self._base
        matches = len(self._terms) >= keep and self._terms[keep - 1] == snapshot.term
        self._snapshot = snapshot
        self._base = snapshot.index
        self._rewrite_log(keep_from=keep if matches else len(self._offsets))

    def _rewrite_log(self, keep_from: int) -> None:
        """Replace the log file with one that holds only the records from ``keep_from`` on."""
        start = self._offsets[keep_from] if keep_from < len(self._offsets) else self._log_end
        tail = _read_range(self._log_fd, start, self._log_end - start)
        _atomic_write(self._dir, LOG_FILE, _LOG_MAGIC + tail)
        shift = start - len(_LOG_MAGIC)
        self._offsets = [offset - shift for offset in self._offsets[keep_from:]]
        self._terms = self._terms[keep_from:]
        self._log_end = len(_LOG_MAGIC) + len(tail)
        os.close(self._log_fd)
        self._log_fd = os.open(self._dir / LOG_FILE, os.O_RDWR)


def quarantine(directory: str | os.PathLike[str]) -> Path:
    """Move a replica's log and snapshot aside so it can rejoin with an empty log.

    The operator's answer to CorruptLog. The term and vote stay (only the
    commit index is reset), so the replica cannot vote a second time in a term
    it already voted in; the leader then refills its log. Returns the folder
    the files were moved to. Raises CorruptLog when the hard state itself is
    damaged: then move the whole directory aside, and bring the replica back
    only after the cluster has elected a leader without it.
    """
    root = Path(directory)
    lock_fd = _lock(root)
    try:
        hard = _read_hard_state(root / HARD_STATE_FILE)
        number = 0
        while (root / f"quarantine-{number}").exists():
            number += 1
        target = root / f"quarantine-{number}"
        target.mkdir()
        for name in (LOG_FILE, SNAPSHOT_FILE):
            if (root / name).exists():
                os.rename(root / name, target / name)
        _fsync_dir(target)
        _atomic_write(root, HARD_STATE_FILE, _encode_hard_state(HardState(hard.term, hard.vote, 0)))
        return target
    finally:
        os.close(lock_fd)


def _require_contiguous(entries: Sequence[Entry]) -> None:
    # What is written here is refused on the next open if it has a gap, so
    # refuse it now, while the caller can still see why.
    for before, after in itertools.pairwise(entries):
        if after.index != before.index + 1 or after.term < before.term:
            raise StorageError(f"entry {after.index} (term {after.term}) cannot follow {before}")


# ---------------------------------------------------------------------- encoding


def _encode_record(entry: Entry) -> bytes:
    payload = _ENTRY.pack(entry.index, entry.term) + entry.command
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def _encode_hard_state(hard: HardState) -> bytes:
    vote = (hard.vote or "").encode()
    payload = _HARD.pack(hard.term, hard.commit, len(vote)) + vote
    return _HARD_MAGIC + _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def _encode_snapshot(snapshot: Snapshot) -> bytes:
    fields = struct.pack(">QQQ", snapshot.index, snapshot.term, len(snapshot.data))
    crc = zlib.crc32(snapshot.data, zlib.crc32(fields))
    return _SNAP_MAGIC + fields + struct.pack(">I", crc) + snapshot.data


# ---------------------------------------------------------------------- reading


def _scan(directory: Path) -> _Scan:
    hard = _read_hard_state(directory / HARD_STATE_FILE)
    snapshot = _read_snapshot(directory / SNAPSHOT_FILE)
    log_path = directory / LOG_FILE
    entries, offsets, log_end, torn = _read_log(log_path)
    base = snapshot.index if snapshot else 0
    base_term = snapshot.term if snapshot else 0
    stale_prefix = False
    if entries:
        first = entries[0].index
        if first > base + 1:
            raise CorruptLog(
                str(log_path),
                offsets[0],
                f"the log starts at index {first} but the snapshot ends at {base}: "
                f"entries {base + 1}..{first - 1} are missing",
            )
        if first <= base:
            stale_prefix = True
            at_base = base - first
            matches = at_base < len(entries) and entries[at_base].term == base_term
            keep = at_base + 1 if matches else len(entries)
            entries, offsets = entries[keep:], offsets[keep:]
        if entries and entries[0].term < base_term:
            raise CorruptLog(
                str(log_path),
                offsets[0],
                f"entry {entries[0].index} has term {entries[0].term}, "
                f"older than the snapshot's term {base_term}",
            )
    last = entries[-1].index if entries else base
    if hard.commit > last:
        raise CorruptLog(
            str(log_path),
            log_end,
            f"the hard state says index {hard.commit} is committed but the log ends at "
            f"{last}: committed entries are missing",
        )
    return _Scan(hard, snapshot, entries, offsets, log_end, stale_prefix, torn)


def _read_log(path: Path) -> tuple[list[Entry], list[int], int, _Torn | None]:
    data = path.read_bytes()
    if data[: len(_LOG_MAGIC)] != _LOG_MAGIC:
        raise CorruptLog(str(path), 0, "not a webshard Raft log (bad magic)")
    entries: list[Entry] = []
    offsets: list[int] = []
    offset = len(_LOG_MAGIC)
    while offset < len(data):
        torn = _torn_tail(data, offset)
        if torn is not None:
            return entries, offsets, offset, torn
        length, crc = _RECORD.unpack_from(data, offset)
        if length < _ENTRY.size or length > _MAX_RECORD:
            raise CorruptLog(str(path), offset, f"impossible record length {length}")
        body = offset + _RECORD.size
        payload = data[body : body + length]
        if zlib.crc32(payload) != crc:
            raise CorruptLog(str(path), offset, "CRC mismatch")
        index, term = _ENTRY.unpack_from(payload)
        if entries:
            previous = entries[-1]
            if index != previous.index + 1:
                raise CorruptLog(
                    str(path), offset, f"index gap: entry {index} follows {previous.index}"
                )
            if term < previous.term:
                raise CorruptLog(
                    str(path), offset, f"entry {index} has term {term} < {previous.term} before it"
                )
        elif index == 0:
            raise CorruptLog(str(path), offset, "entry index 0 (indexes start at 1)")
        entries.append(Entry(index=index, term=term, command=payload[_ENTRY.size :]))
        offsets.append(offset)
        offset = body + length
    return entries, offsets, offset, None


def _torn_tail(data: bytes, offset: int) -> _Torn | None:
    """The torn tail starting at ``offset``, or None when a whole record (or damage) is there."""
    rest = len(data) - offset
    if rest < _RECORD.size:
        return _Torn(offset, rest, "a partial record header")
    if not any(data[offset:]):
        return _Torn(offset, rest, "zeros where a record should start")
    length, crc = _RECORD.unpack_from(data, offset)
    if length < _ENTRY.size or length > _MAX_RECORD:
        return None  # garbage in a length field is damage, not a torn append
    end = offset + _RECORD.size + length
    if end > len(data):
        return _Torn(offset, rest, f"a record of {length} bytes with {rest - _RECORD.size} present")
    if any(data[end:]) or zlib.crc32(data[offset + _RECORD.size : end]) == crc:
        return None  # not the last record, or a whole one
    sector = offset
    while sector < end:
        stop = min(end, (sector // _SECTOR + 1) * _SECTOR)
        if not any(data[sector:stop]):
            return _Torn(
                offset, rest, f"a last record with a bad CRC and a zero sector at {sector}"
            )
        sector = stop
    return None


def _cut_torn_tail(path: Path, torn: _Torn) -> None:
    """Cut the torn tail off the log file (durably), saying what went."""
    log.warning(
        f"{path}: cutting off a torn last record at byte offset {torn.offset} "
        f"({torn.length} bytes: {torn.reason}); it was never acknowledged, as every "
        "acknowledgement follows the fsync that completes its record",
        extra={"file": str(path), "offset": torn.offset, "bytes_cut": torn.length},
    )
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, torn.offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_hard_state(path: Path) -> HardState:
    if not path.exists():
        return HardState()
    data = path.read_bytes()
    payload = _checked_payload(path, data, _HARD_MAGIC)
    if len(payload) < _HARD.size:
        raise CorruptLog(str(path), len(_HARD_MAGIC) + _RECORD.size, "hard state too short")
    term, commit, vote_length = _HARD.unpack_from(payload)
    if _HARD.size + vote_length != len(payload):
        raise CorruptLog(str(path), len(_HARD_MAGIC) + _RECORD.size, "bad vote length")
    try:
        vote = payload[_HARD.size :].decode()
    except UnicodeDecodeError:
        raise CorruptLog(str(path), len(_HARD_MAGIC) + _RECORD.size, "vote is not UTF-8") from None
    return HardState(term=term, vote=vote or None, commit=commit)


def _checked_payload(path: Path, data: bytes, magic: bytes) -> bytes:
    if data[: len(magic)] != magic:
        raise CorruptLog(str(path), 0, "bad magic")
    offset = len(magic)
    if len(data) < offset + _RECORD.size:
        raise CorruptLog(str(path), offset, "truncated header")
    length, crc = _RECORD.unpack_from(data, offset)
    payload = data[offset + _RECORD.size :]
    if len(payload) != length:
        raise CorruptLog(str(path), offset, f"{length} bytes announced, {len(payload)} present")
    if zlib.crc32(payload) != crc:
        raise CorruptLog(str(path), offset, "CRC mismatch")
    return payload


def _read_snapshot(path: Path) -> Snapshot | None:
    if not path.exists():
        return None
    data = path.read_bytes()
    if data[: len(_SNAP_MAGIC)] != _SNAP_MAGIC:
        raise CorruptLog(str(path), 0, "bad magic")
    header = len(_SNAP_MAGIC)
    if len(data) < header + _SNAP.size:
        raise CorruptLog(str(path), header, "truncated header")
    index, term, length, crc = _SNAP.unpack_from(data, header)
    body = data[header + _SNAP.size :]
    if len(body) != length:
        raise CorruptLog(str(path), header, f"{length} bytes announced, {len(body)} present")
    fields = data[header : header + 24]
    if zlib.crc32(body, zlib.crc32(fields)) != crc:
        raise CorruptLog(str(path), header, "CRC mismatch")
    return Snapshot(index=index, term=term, data=body)


# ---------------------------------------------------------------------- files


def _lock(directory: Path) -> int:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageError(f"{directory} is in use by another replica process") from None
    return fd


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _read_range(fd: int, offset: int, length: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise StorageError(f"log file ended early while reading at offset {offset}")
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(directory: Path, name: str, data: bytes) -> None:
    """Replace ``name`` so that a crash leaves the old or the new content, whole."""
    temporary = directory / f"{name}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(temporary, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_dir(directory)
