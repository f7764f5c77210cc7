"""`make bench-stability`: elections of an idle coordinator group, quiet and saturated.

Three coordinator replicas run as real processes on loopback (no agents: the
group is idle, so every election it holds is spurious). In the saturated case
one CPU-bound busy loop per core runs beside them for the whole duration. The
bench polls ClusterStatus on every replica (its own role and term, and the
leader it knows) every `--poll-s`, and reads the replicas' JSON logs, where the
core logs each change of role with its cause.

Figures per case: `leader_changes` (distinct terms that had a leader, after
the first), `term_increase` (highest term seen, minus the term at the start),
`elections_started` (election timeouts logged: pre-votes started, which only
become a new term when a quorum grants them), `check_quorum_losses`,
`leaders_elected`, `stalls` (ticks that fired more than a tick late and were
not counted against the leader), `leaderless_s` (polls in which no replica
claimed leadership, times the poll interval), `unanswered_polls`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from webshard.coordinator.v1 import coordinator_pb2 as pb
from webshard.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

from tests.bench.common import REPO, write

REPLICAS = ("coordinator-0", "coordinator-1", "coordinator-2")
LEGACY_TIMERS = ["--raft-tick-ms", "15", "--election-ticks", "10", "--heartbeat-ticks", "2"]
CASES: dict[str, tuple[bool, list[str]]] = {
    # name: (saturate every core, extra coordinator arguments)
    "saturated": (True, []),
    "quiet": (False, []),
    "saturated-legacy-timers": (True, LEGACY_TIMERS),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Replica:
    name: str
    address: str
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None

    def status(self) -> pb.ClusterStatusResponse | None:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address)
        try:
            response: pb.ClusterStatusResponse = pb_grpc.CoordinatorServiceStub(
                self.channel
            ).ClusterStatus(pb.ClusterStatusRequest(), timeout=2)
        except grpc.RpcError:
            return None
        return response


@dataclass
class Observed:
    """What the polls saw."""

    polls: int = 0
    unanswered: int = 0
    leaderless: int = 0
    leader_terms: dict[int, set[str]] = field(default_factory=dict)
    terms: list[int] = field(default_factory=list)


def start_group(directory: Path, extra: list[str]) -> list[Replica]:
    replicas = [
        Replica(name, f"127.0.0.1:{free_port()}", directory / f"{name}.log") for name in REPLICAS
    ]
    for replica in replicas:
        peers = ",".join(f"{o.name}={o.address}" for o in replicas if o is not replica)
        host, port = replica.address.split(":")
        with open(replica.log, "wb") as out:
            replica.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.coordinator",
                    "--host",
                    host,
                    "--port",
                    port,
                    "--replica-id",
                    replica.name,
                    "--peers",
                    peers,
                    "--data-dir",
                    str(directory / replica.name),
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
    return replicas


def stop_group(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.channel is not None:
            replica.channel.close()
        if replica.popen is not None and replica.popen.poll() is None:
            replica.popen.send_signal(signal.SIGTERM)
    for replica in replicas:
        if replica.popen is None:
            continue
        try:
            replica.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            replica.popen.kill()
            replica.popen.wait()


def wait_for_leader(replicas: list[Replica], timeout: float) -> int:
    """The term of the first leader every replica agrees on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for replica in replicas:
            assert replica.popen is not None
            if replica.popen.poll() is not None:
                raise RuntimeError(f"{replica.name} exited:\n{replica.log.read_text()[-2000:]}")
        views = [r.status() for r in replicas]
        if all(v is not None for v in views):
            leaders = {v.leader_id for v in views if v is not None}
            if len(leaders) == 1 and "" not in leaders:
                return max(v.replicas[0].term for v in views if v is not None)
        time.sleep(0.1)
    raise RuntimeError(f"no leader within {timeout} s")


def start_busy_loops(count: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def stop_busy_loops(loops: list[subprocess.Popen[bytes]]) -> None:
    for loop in loops:
        loop.kill()  # by PID: only the processes this bench started
    for loop in loops:
        loop.wait()


def observe(replicas: list[Replica], duration_s: float, poll_s: float) -> Observed:
    seen = Observed()
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        started = time.monotonic()
        claimed = False
        for replica in replicas:
            view = replica.status()
            seen.polls += 1
            if view is None:
                seen.unanswered += 1
                continue
            me = view.replicas[0]
            seen.terms.append(me.term)
            if view.leader_id:
                seen.leader_terms.setdefault(me.term, set()).add(view.leader_id)
            if me.role == pb.REPLICA_ROLE_LEADER:
                claimed = True
        if not claimed:
            seen.leaderless += 1
        time.sleep(max(0.0, poll_s - (time.monotonic() - started)))
    return seen


def log_events(replicas: list[Replica], offsets: dict[str, int]) -> dict[str, int]:
    """Counts of the causes the replicas logged after ``offsets`` (bytes into each log)."""
    counts = {"election_timeout": 0, "vote_won": 0, "check_quorum_lost": 0, "stalls": 0}
    for replica in replicas:
        with open(replica.log, "rb") as log:
            log.seek(offsets[replica.name])
            for line in log:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    cause = record.get("cause")
                    if cause in counts:
                        counts[cause] += 1
                    if "stalls" in record:
                        counts["stalls"] += int(record["stalls"])
    return counts


def run_case(name: str, duration_s: float, poll_s: float, busy_loops: int) -> dict[str, Any]:
    saturate, extra = CASES[name]
    loops_wanted = busy_loops if saturate else 0
    with tempfile.TemporaryDirectory(prefix="webshard-stability-") as tmp:
        replicas = start_group(Path(tmp), extra)
        loops: list[subprocess.Popen[bytes]] = []
        try:
            first_term = wait_for_leader(replicas, timeout=60)
            offsets = {r.name: r.log.stat().st_size for r in replicas}
            loops = start_busy_loops(loops_wanted)
            print(
                f"  {name}: leader at term {first_term}; {len(loops)} busy loops; "
                f"watching for {duration_s:.0f} s",
                flush=True,
            )
            seen = observe(replicas, duration_s, poll_s)
        finally:
            stop_busy_loops(loops)
            stop_group(replicas)
        events = log_events(replicas, offsets)
    leader_terms = sorted(seen.leader_terms)
    max_term = max(seen.terms, default=first_term)
    split = [t for t, leaders in seen.leader_terms.items() if len(leaders) > 1]
    if split:
        raise RuntimeError(f"two leaders reported in one term: {split}")
    timers = " ".join(extra) if extra else "defaults (tick 50 ms, election 20 ticks, heartbeat 2)"
    return {
        "case": name,
        "timers": timers,
        "duration_s": duration_s,
        "busy_loops": len(loops),
        "cores": os.cpu_count(),
        "leader_changes": len([t for t in leader_terms if t > first_term]),
        "term_increase": max_term - first_term,
        "max_term": max_term,
        "elections_started": events["election_timeout"],
        "leaders_elected": events["vote_won"],
        "check_quorum_losses": events["check_quorum_lost"],
        "stalls": events["stalls"],
        "leaderless_s": round(seen.leaderless * poll_s, 2),
        "polls": seen.polls,
        "unanswered_polls": seen.unanswered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0, help="watch time per case")
    parser.add_argument("--poll-s", type=float, default=0.2, help="ClusterStatus poll interval")
    parser.add_argument(
        "--busy-loops",
        type=int,
        default=os.cpu_count() or 1,
        help="busy loops in a saturated case (default: one per core)",
    )
    parser.add_argument(
        "--cases",
        default="saturated,quiet",
        help=f"comma-separated, from: {', '.join(CASES)}",
    )
    args = parser.parse_args()
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    rows = [run_case(n, args.duration_s, args.poll_s, args.busy_loops) for n in names]
    write(
        "stability",
        rows,
        [
            "case",
            "duration_s",
            "busy_loops",
            "leader_changes",
            "term_increase",
            "max_term",
            "elections_started",
            "leaders_elected",
            "check_quorum_losses",
            "stalls",
            "leaderless_s",
        ],
    )


if __name__ == "__main__":
    main()
