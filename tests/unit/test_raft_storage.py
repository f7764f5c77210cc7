"""Durable Raft storage: round trips, refusal of damaged state, crash-safe replacement."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from services.coordinator.raft import (
    CorruptLog,
    Entry,
    FileStorage,
    HardState,
    MemoryStorage,
    PersistedState,
    Snapshot,
    StorageError,
    quarantine,
)
from services.coordinator.raft import storage as storage_module
from services.coordinator.raft.storage import HARD_STATE_FILE, LOG_FILE, SNAPSHOT_FILE
from tests.unit.sim.cluster import Cluster

MAGIC = 8  # bytes before the first record of the log
RECORD_HEADER = 8  # length and CRC before each payload
ENTRY_HEADER = 16  # index and term at the start of each payload


def entries(first: int, last: int, term: int = 1, tag: str = "c") -> list[Entry]:
    return [Entry(i, term, f"{tag}{i}".encode()) for i in range(first, last + 1)]


def record_offsets(commands: list[bytes]) -> list[int]:
    """Where each record starts in a freshly written log."""
    offsets, position = [], MAGIC
    for command in commands:
        offsets.append(position)
        position += RECORD_HEADER + ENTRY_HEADER + len(command)
    return offsets


def written(directory: Path, log: list[Entry], hard: HardState | None = None) -> None:
    with FileStorage(directory) as storage:
        storage.save(entries=log, hard_state=hard)


def test_round_trip_of_entries_hard_state_and_binary_commands(tmp_path: Path) -> None:
    log = [Entry(1, 1, b""), Entry(2, 1, bytes(range(256))), Entry(3, 2, b"\x00" * 1000)]
    with FileStorage(tmp_path) as storage:
        storage.save(entries=log, hard_state=HardState(term=2, vote="coordinator-1", commit=2))
        assert storage.load() == PersistedState(HardState(2, "coordinator-1", 2), None, tuple(log))
    with FileStorage(tmp_path) as reopened:
        assert reopened.load() == PersistedState(HardState(2, "coordinator-1", 2), None, tuple(log))
        reopened.save(hard_state=HardState(term=3, vote=None, commit=3))
    with FileStorage(tmp_path) as again:
        assert again.load().hard_state == HardState(3, None, 3)


def test_an_empty_directory_opens_as_an_empty_replica(tmp_path: Path) -> None:
    with FileStorage(tmp_path / "new") as storage:
        assert storage.load() == PersistedState()


def test_a_conflicting_suffix_is_replaced(tmp_path: Path) -> None:
    with FileStorage(tmp_path) as storage:
        storage.save(entries=entries(1, 5))
        storage.save(entries=entries(3, 4, term=2, tag="new"))
        expected = (*entries(1, 2), *entries(3, 4, term=2, tag="new"))
        assert storage.load().entries == expected
        storage.save(entries=entries(5, 6, term=2, tag="new"))
    with FileStorage(tmp_path) as reopened:
        assert [e.command for e in reopened.load().entries] == [
            b"c1",
            b"c2",
            b"new3",
            b"new4",
            b"new5",
            b"new6",
        ]


def test_entries_that_leave_a_gap_are_refused(tmp_path: Path) -> None:
    with FileStorage(tmp_path) as storage:
        storage.save(entries=entries(1, 2))
        with pytest.raises(StorageError):
            storage.save(entries=entries(4, 4))


@pytest.mark.parametrize("victim", [0, 2, 4])
@pytest.mark.parametrize("where", ["header", "payload"])
def test_a_flipped_byte_refuses_to_start_naming_the_file_and_offset(
    tmp_path: Path, victim: int, where: str
) -> None:
    log = entries(1, 5)
    written(tmp_path, log, HardState(1, None, 0))
    offset = record_offsets([e.command for e in log])[victim]
    flip = offset + (4 if where == "header" else RECORD_HEADER + ENTRY_HEADER + 1)
    path = tmp_path / LOG_FILE
    data = bytearray(path.read_bytes())
    data[flip] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert raised.value.path == str(path)
    assert raised.value.offset == offset
    assert f"offset {offset}" in str(raised.value)
    assert "CRC" in str(raised.value)


def tear(path: Path, whole: bytes, last: int, how: str) -> None:
    """Leave the log as a power loss in the middle of appending its last record could."""
    if how.startswith("cut-"):
        path.write_bytes(whole[: len(whole) - int(how.removeprefix("cut-"))])
    elif how == "zero-extent":  # the file grew but the data never reached it
        path.write_bytes(whole[:last] + bytes(len(whole) - last))
    elif how == "zero-sector":  # a long record whose second sector was never written
        sector = (last // 512 + 1) * 512
        path.write_bytes(whole[:sector] + bytes(512) + whole[sector + 512 :])
    else:
        raise AssertionError(how)


TEARS = [
    "cut-1",
    "cut-5",
    f"cut-{RECORD_HEADER + 3}",
    f"cut-{RECORD_HEADER + ENTRY_HEADER + 1}",
    "zero-extent",
    "zero-sector",
]


@pytest.mark.parametrize("how", TEARS)
def test_a_torn_tail_is_cut_off_with_a_warning_and_the_replica_opens(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = [*entries(1, 2), Entry(3, 1, b"x" * 2000)]  # the last one spans several sectors
    written(tmp_path, log, HardState(1, "r0", 2))
    path = tmp_path / LOG_FILE
    last = record_offsets([e.command for e in log])[-1]
    whole = path.read_bytes()
    tear(path, whole, last, how)
    size = path.stat().st_size
    with (
        caplog.at_level("WARNING", logger="services.coordinator.raft.storage"),
        FileStorage(tmp_path) as storage,
    ):
        assert storage.load() == PersistedState(HardState(1, "r0", 2), None, tuple(log[:2]))
        storage.save(entries=entries(3, 4, term=2))  # appends go on where the cut was
    assert path.stat().st_size > last
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    text = warning.getMessage()
    assert str(path) in text and f"offset {last}" in text and f"{size - last} bytes" in text
    caplog.clear()
    with caplog.at_level("WARNING"), FileStorage(tmp_path) as reopened:
        assert [e.index for e in reopened.load().entries] == [1, 2, 3, 4]
    assert not caplog.records


def test_a_torn_record_the_commit_index_needs_refuses_with_the_file_untouched(
    tmp_path: Path,
) -> None:
    log = entries(1, 3)
    written(tmp_path, log, HardState(1, None, 3))
    path = tmp_path / LOG_FILE
    path.write_bytes(path.read_bytes()[:-3])
    before = path.read_bytes()
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert raised.value.path == str(path)
    assert "committed entries are missing" in raised.value.reason
    assert path.read_bytes() == before


@pytest.mark.parametrize("victim", [0, 1])
def test_a_zeroed_sector_before_the_last_record_refuses_naming_the_file(
    tmp_path: Path, victim: int
) -> None:
    log = [Entry(1, 1, b"a" * 1500), Entry(2, 1, b"b" * 1500), Entry(3, 1, b"c")]
    written(tmp_path, log)
    path = tmp_path / LOG_FILE
    offset = record_offsets([e.command for e in log])[victim]
    sector = (offset // 512 + 1) * 512
    data = path.read_bytes()
    path.write_bytes(data[:sector] + bytes(512) + data[sector + 512 :])
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert raised.value.path == str(path)
    assert raised.value.offset == offset
    assert str(path) in str(raised.value) and "CRC" in str(raised.value)
    assert path.read_bytes()[sector : sector + 512] == bytes(512)  # nothing was cut


def test_an_index_gap_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILE
    records = [storage_module._encode_record(e) for e in (*entries(1, 2), *entries(4, 4))]
    path.write_bytes(b"WSRAFTL1" + b"".join(records))
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert raised.value.offset == MAGIC + len(records[0]) + len(records[1])
    assert "gap" in raised.value.reason


def test_a_term_going_backwards_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILE
    records = [storage_module._encode_record(e) for e in (Entry(1, 2, b"a"), Entry(2, 1, b"b"))]
    path.write_bytes(b"WSRAFTL1" + b"".join(records))
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert raised.value.offset == MAGIC + len(records[0])


def test_a_foreign_file_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / LOG_FILE).write_bytes(b"not a raft log at all")
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert raised.value.offset == 0


def test_a_commit_index_past_the_log_refuses_to_start(tmp_path: Path) -> None:
    written(tmp_path, entries(1, 3), HardState(1, None, 3))
    path = tmp_path / LOG_FILE
    # Cut exactly at a record boundary: every remaining record is whole, yet
    # committed entries are gone.
    path.write_bytes(path.read_bytes()[: record_offsets([b"c1", b"c2", b"c3"])[2]])
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert "committed" in raised.value.reason
    assert raised.value.offset == path.stat().st_size


def test_a_crash_while_writing_the_hard_state_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written(tmp_path, entries(1, 2), HardState(4, "r0", 2))
    # A crash after the temporary file was partly written, before the rename.
    (tmp_path / f"{HARD_STATE_FILE}.tmp").write_bytes(b"WSRAFTH1\x00\x00")
    with FileStorage(tmp_path) as storage:
        assert storage.load().hard_state == HardState(4, "r0", 2)
        assert not (tmp_path / f"{HARD_STATE_FILE}.tmp").exists()

        def crash(*args: object) -> None:
            raise OSError("power lost before the rename")

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(OSError):
            storage.save(hard_state=HardState(5, "r1", 2))
        monkeypatch.undo()
    with FileStorage(tmp_path) as reopened:
        assert reopened.load().hard_state == HardState(4, "r0", 2)


def test_a_damaged_hard_state_refuses_to_start(tmp_path: Path) -> None:
    written(tmp_path, entries(1, 2), HardState(4, "r0", 2))
    path = tmp_path / HARD_STATE_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert raised.value.path == str(path)


def test_snapshot_and_compaction_round_trip(tmp_path: Path) -> None:
    with FileStorage(tmp_path) as storage:
        storage.save(entries=entries(1, 10), hard_state=HardState(1, "r0", 8))
        size_before = (tmp_path / LOG_FILE).stat().st_size
        snapshot = Snapshot(index=6, term=1, data=b"state after 6")
        storage.save(snapshot=snapshot)
        assert storage.load() == PersistedState(
            HardState(1, "r0", 8), snapshot, tuple(entries(7, 10))
        )
        assert (tmp_path / LOG_FILE).stat().st_size < size_before
        storage.save(entries=entries(9, 11, term=2, tag="n"))  # after a compaction, still appends
    with FileStorage(tmp_path) as reopened:
        state = reopened.load()
        assert state.snapshot == snapshot
        assert [e.index for e in state.entries] == [7, 8, 9, 10, 11]
        assert state.entries[-1] == Entry(11, 2, b"n11")


def test_a_snapshot_that_disagrees_with_the_log_replaces_all_of_it(tmp_path: Path) -> None:
    with FileStorage(tmp_path) as storage:
        storage.save(entries=entries(1, 10))
        snapshot = Snapshot(index=8, term=3, data=b"from the leader")
        storage.save(snapshot=snapshot, entries=entries(9, 9, term=3, tag="l"))
        assert storage.load().entries == (Entry(9, 3, b"l9"),)
    with FileStorage(tmp_path) as reopened:
        assert reopened.load() == PersistedState(HardState(), snapshot, (Entry(9, 3, b"l9"),))


def test_a_crash_between_snapshot_and_log_rewrite_is_completed_on_open(tmp_path: Path) -> None:
    written(tmp_path, entries(1, 10), HardState(1, None, 10))
    # The snapshot was renamed into place; the log was not rewritten yet.
    snapshot = Snapshot(index=6, term=1, data=b"state")
    (tmp_path / SNAPSHOT_FILE).write_bytes(storage_module._encode_snapshot(snapshot))
    with FileStorage(tmp_path) as storage:
        state = storage.load()
        assert state.snapshot == snapshot
        assert [e.index for e in state.entries] == [7, 8, 9, 10]
    # The rewrite was finished: the file itself now starts after the snapshot.
    assert storage_module._read_log(tmp_path / LOG_FILE)[0][0].index == 7


def test_a_log_starting_after_the_snapshot_refuses_to_start(tmp_path: Path) -> None:
    with FileStorage(tmp_path) as storage:
        storage.save(entries=entries(1, 10))
        storage.save(snapshot=Snapshot(index=6, term=1, data=b"state"))
    (tmp_path / SNAPSHOT_FILE).unlink()  # entries 1..6 are nowhere now
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert "missing" in raised.value.reason
    assert raised.value.offset == MAGIC


def test_a_damaged_snapshot_refuses_to_start(tmp_path: Path) -> None:
    with FileStorage(tmp_path) as storage:
        storage.save(entries=entries(1, 4))
        storage.save(snapshot=Snapshot(index=3, term=1, data=b"state after 3"))
    path = tmp_path / SNAPSHOT_FILE
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as raised:
        FileStorage(tmp_path)
    assert raised.value.path == str(path)


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with FileStorage(tmp_path), pytest.raises(StorageError):
        FileStorage(tmp_path)
    FileStorage(tmp_path).close()  # released on close


def test_quarantine_keeps_term_and_vote_and_lets_the_replica_start_empty(tmp_path: Path) -> None:
    written(tmp_path, entries(1, 3), HardState(7, "r2", 3))
    path = tmp_path / LOG_FILE
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptLog):
        FileStorage(tmp_path)
    moved = quarantine(tmp_path)
    assert (moved / LOG_FILE).exists()
    with FileStorage(tmp_path) as storage:
        assert storage.load() == PersistedState(HardState(7, "r2", 0), None, ())


def test_file_storage_behaves_exactly_like_memory_storage(tmp_path: Path) -> None:
    """The simulation runs on MemoryStorage; the real replica on FileStorage. Same semantics."""
    rng = random.Random(7)
    memory = MemoryStorage()
    storage = FileStorage(tmp_path)
    term, commit = 1, 0
    try:
        for step in range(400):
            state = memory.load()
            base = state.snapshot.index if state.snapshot else 0
            last = base + len(state.entries)
            choice = rng.random()
            if choice < 0.5:
                # New entries, possibly replacing an uncommitted suffix.
                first = rng.randint(max(base, commit) + 1, last + 1)
                term += rng.random() < 0.2
                count = rng.randint(1, 4)
                batch = [
                    Entry(i, term, f"{step}:{i}".encode()) for i in range(first, first + count)
                ]
                memory.save(entries=batch)
                storage.save(entries=batch)
            elif choice < 0.6 and commit > base:
                # A local compaction: the snapshot agrees with the log.
                index = rng.randint(base + 1, commit)
                snapshot = Snapshot(index, state.entries[index - base - 1].term, b"local")
                memory.save(snapshot=snapshot)
                storage.save(snapshot=snapshot)
            elif choice < 0.7:
                # A snapshot from a leader, beyond our commit; its term may disagree.
                index = rng.randint(max(base, commit) + 1, last + 3)
                known = state.entries[index - base - 1].term if index <= last else term
                snapshot = Snapshot(index, known + (rng.random() < 0.5), b"leader")
                term = max(term, snapshot.term)
                commit = index
                memory.save(snapshot=snapshot)
                storage.save(snapshot=snapshot)
            elif choice < 0.9:
                commit = rng.randint(commit, last)
                hard = HardState(term, rng.choice([None, "r0", "r1"]), commit)
                memory.save(hard_state=hard)
                storage.save(hard_state=hard)
            else:
                storage.close()
                storage = FileStorage(tmp_path)
            assert storage.load() == memory.load(), step
    finally:
        storage.close()


def test_a_cluster_on_file_storage_survives_restarts(tmp_path: Path) -> None:
    directories = {f"r{i}": tmp_path / f"r{i}" for i in range(3)}
    storages = {rid: FileStorage(path) for rid, path in directories.items()}
    cluster = Cluster(3, storages=dict(storages))
    try:
        cluster.elect("r0")
        for number in range(5):
            cluster.propose("r0", f"c{number}".encode())
        cluster.tick(2)
        for rid in ("r0", "r2"):
            cluster.crash(rid)
            storages[rid].close()
            storages[rid] = FileStorage(directories[rid])
            cluster.storages[rid] = storages[rid]
            cluster.start(rid)
        cluster.run_until(lambda: cluster.leader() is not None, 10 * 10, "a new election")
        leader = cluster.leader()
        assert leader is not None
        cluster.propose(leader, b"after the restarts")
        cluster.tick(2)
        expected = [f"c{n}".encode() for n in range(5)] + [b"after the restarts"]
        for rid in cluster.ids:
            assert cluster.machines[rid] == expected
    finally:
        for storage in storages.values():
            storage.close()


def test_every_write_is_fsynced_before_save_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    with FileStorage(tmp_path) as storage:
        monkeypatch.setattr(os, "fsync", fsync)
        storage.save(entries=entries(1, 2))
        assert synced, "appending entries must fsync the log"
        synced.clear()
        storage.save(hard_state=HardState(1, "r0", 1))
        assert len(synced) >= 2, "the hard state file and its directory must both be fsynced"


def test_entries_out_of_order_are_refused_before_they_reach_the_disk(tmp_path: Path) -> None:
    for storage in (MemoryStorage(), FileStorage(tmp_path)):
        with pytest.raises(StorageError):
            storage.save(entries=[Entry(1, 1, b"a"), Entry(3, 1, b"c")])
        with pytest.raises(StorageError):
            storage.save(entries=[Entry(1, 2, b"a"), Entry(2, 1, b"b")])
        assert storage.load().entries == ()
        if isinstance(storage, FileStorage):
            storage.close()
