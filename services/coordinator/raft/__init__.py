"""Raft consensus for the coordinator replicas: a pure state machine plus its storage.

``Node`` is the protocol (no I/O, no clock); ``FileStorage`` makes its state
durable; ``wire`` converts its messages to and from RaftService's protobufs.
See ``Node`` for the loop that drives a replica.
"""

from services.coordinator.raft.core import Node, StorageReader
from services.coordinator.raft.storage import (
    FileStorage,
    MemoryStorage,
    Storage,
    persist,
    quarantine,
)
from services.coordinator.raft.types import (
    MAX_INDEX,
    MAX_TERM,
    AppendEntries,
    AppendEntriesResponse,
    Config,
    CorruptLog,
    Entry,
    HardState,
    InstallSnapshot,
    InstallSnapshotResponse,
    InvariantViolation,
    Message,
    NotLeader,
    PersistedState,
    RaftError,
    ReadState,
    Ready,
    Request,
    RequestVote,
    RequestVoteResponse,
    Response,
    Role,
    Snapshot,
    Status,
    StorageError,
)

__all__ = [
    "MAX_INDEX",
    "MAX_TERM",
    "AppendEntries",
    "AppendEntriesResponse",
    "Config",
    "CorruptLog",
    "Entry",
    "FileStorage",
    "HardState",
    "InstallSnapshot",
    "InstallSnapshotResponse",
    "InvariantViolation",
    "MemoryStorage",
    "Message",
    "Node",
    "NotLeader",
    "PersistedState",
    "RaftError",
    "ReadState",
    "Ready",
    "Request",
    "RequestVote",
    "RequestVoteResponse",
    "Response",
    "Role",
    "Snapshot",
    "Status",
    "Storage",
    "StorageError",
    "StorageReader",
    "persist",
    "quarantine",
]
