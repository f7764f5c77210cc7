"""RaftService refuses, at the wire, what no member of the cluster could have sent.

One AppendEntries with term 2**64 - 1 once left a whole cluster leaderless:
the follower took the term, its replies deposed the leader, and every replica
then failed to encode term + 1 forever. Terms and indexes past ``MAX_TERM``
and senders that are not other configured members are refused before the
message reaches the core.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from webshard.coordinator.v1 import coordinator_pb2 as pb

from services.common.errors import DomainError
from services.coordinator.consensus import Replicator
from services.coordinator.raft import (
    AppendEntriesResponse,
    InstallSnapshotResponse,
    Message,
    RequestVoteResponse,
)
from services.coordinator.servicer import RaftServicer

MAX_TERM = 2**63 - 1  # the largest term and index: term + 1 always fits the wire's uint64
MEMBERS = frozenset({"coordinator-0", "coordinator-1", "coordinator-2"})
TOO_BIG = [MAX_TERM + 1, 2**64 - 1]


class FakeContext:
    """The servicer ends a call by raising a DomainError (the server's interceptor
    turns it into the status); it never calls the context."""


class FakeReplicator:
    """Stands in for the Raft loop: records what reached it and answers every request."""

    replica_id = "coordinator-0"
    members = MEMBERS

    def __init__(self) -> None:
        self.delivered: list[Message] = []
        self._ref = 0

    def new_ref(self) -> int:
        self._ref += 1
        return self._ref

    async def deliver(self, message: Message) -> Message:
        self.delivered.append(message)
        fields: dict[str, Any] = {
            "sender": message.recipient,
            "recipient": message.sender,
            "term": message.term,
            "ref": message.ref,
        }
        name = type(message).__name__
        if name == "RequestVote":
            return RequestVoteResponse(**fields, vote_granted=False)
        if name == "AppendEntries":
            return AppendEntriesResponse(**fields, success=True)
        return InstallSnapshotResponse(**fields)


def call(servicer: RaftServicer, method: str, request: Any) -> Any:
    context = cast(Any, FakeContext())
    if method == "InstallSnapshot":

        async def stream() -> AsyncIterator[pb.InstallSnapshotRequest]:
            yield request

        return asyncio.run(servicer.InstallSnapshot(stream(), context))
    return asyncio.run(getattr(servicer, method)(request, context))


def servicer() -> tuple[RaftServicer, FakeReplicator]:
    fake = FakeReplicator()
    return RaftServicer(cast(Replicator, fake)), fake


def test_the_message_that_wedged_a_cluster_is_refused_before_the_core() -> None:
    raft, fake = servicer()
    request = pb.AppendEntriesRequest(term=2**64 - 1, leader_id="coordinator-1")
    with pytest.raises(DomainError) as refused:
        call(raft, "AppendEntries", request)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "term 18446744073709551615" in refused.value.message
    assert str(MAX_TERM) in refused.value.message
    assert fake.delivered == []


def requests(value: int) -> list[tuple[str, str, Any]]:
    """Every number a request carries, set to ``value`` one at a time."""
    vote: dict[str, Any] = {
        "term": 5,
        "candidate_id": "coordinator-1",
        "last_log_index": 3,
        "last_log_term": 2,
    }
    append: dict[str, Any] = {
        "term": 5,
        "leader_id": "coordinator-1",
        "prev_log_index": 3,
        "prev_log_term": 2,
        "leader_commit": 3,
    }
    chunk: dict[str, Any] = {
        "term": 5,
        "leader_id": "coordinator-1",
        "last_included_index": 3,
        "last_included_term": 2,
        "done": True,
    }
    cases: list[tuple[str, str, Any]] = []
    for field in ("term", "last_log_index", "last_log_term"):
        cases.append(("RequestVote", field, pb.RequestVoteRequest(**{**vote, field: value})))
    for field in ("term", "prev_log_index", "prev_log_term", "leader_commit"):
        cases.append(("AppendEntries", field, pb.AppendEntriesRequest(**{**append, field: value})))
    for field in ("term", "last_included_index", "last_included_term"):
        request = pb.InstallSnapshotRequest(**{**chunk, field: value})
        cases.append(("InstallSnapshot", field, request))
    return cases


@pytest.mark.parametrize("value", TOO_BIG)
@pytest.mark.parametrize("case", range(len(requests(0))))
def test_every_term_and_index_past_the_limit_is_refused(value: int, case: int) -> None:
    method, field, request = requests(value)[case]
    raft, fake = servicer()
    with pytest.raises(DomainError) as refused:
        call(raft, method, request)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.value.message
    assert fake.delivered == []


@pytest.mark.parametrize("case", range(len(requests(0))))
def test_the_largest_term_and_index_still_pass(case: int) -> None:
    method, field, request = requests(MAX_TERM)[case]
    if field == "last_included_term":
        request.term = MAX_TERM  # a snapshot's term may not pass its leader's
    raft, fake = servicer()
    call(raft, method, request)
    assert len(fake.delivered) == 1


@pytest.mark.parametrize("sender", ["coordinator-9", "coordinator-0", "x" * 500])
@pytest.mark.parametrize("method", ["RequestVote", "AppendEntries", "InstallSnapshot"])
def test_a_sender_that_is_not_another_member_is_refused(sender: str, method: str) -> None:
    request: Any
    if method == "RequestVote":
        request = pb.RequestVoteRequest(term=5, candidate_id=sender)
    elif method == "AppendEntries":
        request = pb.AppendEntriesRequest(term=5, leader_id=sender)
    else:
        request = pb.InstallSnapshotRequest(
            term=5, leader_id=sender, last_included_index=3, last_included_term=2, done=True
        )
    raft, fake = servicer()
    with pytest.raises(DomainError) as refused:
        call(raft, method, request)
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
    details = refused.value.message
    assert "coordinator-0, coordinator-1, coordinator-2" in details  # the member set, named
    assert len(details) < 200  # a long id is quoted by a short prefix only
    assert fake.delivered == []
