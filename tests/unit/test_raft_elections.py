"""Elections are explained and rare: every change of role is logged with its cause, and a
replica's own stalls are not charged to its leader."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from services.coordinator.consensus import Replicator, StateMachine, TickClock
from services.coordinator.raft import AppendEntries, AppendEntriesResponse, Config, FileStorage
from tests.unit.sim.cluster import Cluster

ELECTION = 10
CORE = "services.coordinator.raft.core"


def messages(caplog: pytest.LogCaptureFixture, replica: str) -> list[tuple[str, str, str]]:
    """(level, cause, message) of the core's log lines about ``replica``."""
    return [
        (r.levelname, getattr(r, "cause", ""), r.getMessage())
        for r in caplog.records
        if r.name == CORE and getattr(r, "replica", None) == replica
    ]


def test_an_election_is_logged_from_timeout_to_leadership(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=CORE)
    cluster = Cluster(3, config=Config(election_ticks=ELECTION, heartbeat_ticks=1, tick_s=0.05))
    cluster.elect("r0")
    lines = messages(caplog, "r0")
    causes = [cause for _, cause, _ in lines]
    assert causes[:3] == ["election_timeout", "pre_vote_won", "vote_won"]
    level, _, timeout = lines[0]
    assert level == "INFO"
    # How long the leader was silent, in ticks and seconds, and the timeout it crossed.
    assert "no leader contact for" in timeout and " s)" in timeout and "timeout" in timeout
    assert "became leader of term 1" in lines[2][2]
    followers = messages(caplog, "r1")
    assert any(c == "leader_contact" and "following leader r0" in m for _, c, m in followers)


def test_a_lost_check_quorum_and_a_higher_term_are_logged_as_the_causes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster(3, config=Config(election_ticks=ELECTION, heartbeat_ticks=1))
    cluster.elect("r0")
    cluster.tick(2)
    caplog.set_level(logging.INFO, logger=CORE)
    caplog.clear()
    cluster.isolate("r0")
    cluster.tick(3 * ELECTION)
    [(level, _, text)] = [line for line in messages(caplog, "r0") if line[1] == "check_quorum_lost"]
    assert level == "WARNING"
    assert "check quorum lost" in text and "no follower" in text
    cluster.heal()
    cluster.run_until(lambda: cluster.node("r0").leader_id is not None, 10 * ELECTION, "rejoin")
    # The deposed leader learns the new term from the new leader, and says so.
    new = cluster.node("r0").leader_id
    assert new is not None
    assert any(
        cause in ("higher_term", "leader_contact") and new in text
        for _, cause, text in messages(caplog, "r0")
    )
    higher = [
        line for r in ("r1", "r2") for line in messages(caplog, r) if line[1] == "higher_term"
    ]
    assert higher and all("term" in text and "sent" in text for _, _, text in higher)


def test_a_leader_that_sees_a_higher_term_warns_naming_who_sent_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster(3, config=Config(election_ticks=ELECTION, heartbeat_ticks=1))
    leader = cluster.elect("r0")
    caplog.set_level(logging.INFO, logger=CORE)
    leader.step(AppendEntriesResponse("r2", "r0", term=leader.term + 5, success=False))
    [(level, cause, text)] = messages(caplog, "r0")
    assert (level, cause) == ("WARNING", "higher_term")
    assert "stepping down as leader" in text and "r2" in text and str(leader.term) in text


# ---------------------------------------------------------------------- the tick clock


def test_ticks_are_due_at_a_fixed_rate() -> None:
    clock = TickClock(0.05, now=0.0)
    assert clock.delay(0.0) == pytest.approx(0.05)
    assert clock.wake(0.06) == 1  # a little late: counted
    assert clock.delay(0.06) == pytest.approx(0.04)  # and the next sleep is shorter
    assert [clock.wake(t) for t in (0.10, 0.15, 0.20)] == [1, 1, 1]
    assert clock.stalls == 0


def test_a_stall_is_not_counted_and_the_schedule_restarts_after_it() -> None:
    clock = TickClock(0.05, now=0.0)
    assert clock.wake(0.05) == 1
    assert clock.wake(2.0) == 0  # due at 0.10, woke ~2 s late: our stall, not the leader's
    assert clock.stalls == 1 and clock.longest_stall_s == pytest.approx(1.9)
    assert clock.delay(2.0) == pytest.approx(0.05)  # a whole tick to read the backlog
    assert clock.wake(2.05) == 1


def test_a_process_that_is_always_stalled_still_ticks_every_other_wake() -> None:
    clock = TickClock(0.05, now=0.0)
    now, ticks = 0.0, []
    for _ in range(10):
        now += 0.5  # every sleep overshoots by ten ticks
        ticks.append(clock.wake(now))
    assert ticks == [0, 1] * 5  # slower, but a dead leader is still replaced


def test_a_heartbeat_that_queued_behind_a_tick_resets_the_timer_first(tmp_path: Path) -> None:
    """The loop steps messages before ticks: a heartbeat that arrived while the loop was
    busy counts before the tick that would otherwise have started an election."""

    async def scenario() -> None:
        replicator = Replicator(
            replica_id="r1",
            peers={"r0": "127.0.0.1:9", "r2": "127.0.0.1:9"},
            address="127.0.0.1:9",
            storage=FileStorage(tmp_path),
            state=StateMachine(apply=lambda _: None, snapshot=lambda: b"", restore=lambda _: None),
            config=Config(election_ticks=ELECTION, heartbeat_ticks=1),
            tick_s=3600.0,  # the ticker never fires: the test places every tick
        )
        node = replicator._node
        for _ in range(node._randomized_timeout - 1):
            node.tick()  # one tick short of an election
        replicator._events.put_nowait(("tick", None, None))
        heartbeat = AppendEntries(
            "r0", "r1", 1, prev_log_index=0, prev_log_term=0, entries=(), leader_commit=0, ref=1
        )
        reply = asyncio.ensure_future(replicator.deliver(heartbeat))
        await asyncio.sleep(0)  # the heartbeat is queued behind the tick
        await replicator.start()
        try:
            answer = await asyncio.wait_for(reply, 10)
        finally:
            await replicator.stop()
        assert isinstance(answer, AppendEntriesResponse) and answer.success
        assert node.leader_id == "r0" and node.term == 1

    with pytest.MonkeyPatch.context() as patch:
        started: list[str] = []
        patch.setattr(
            "services.coordinator.raft.core.Node._campaign", lambda self: started.append(self.id)
        )
        asyncio.run(scenario())
    assert started == []
