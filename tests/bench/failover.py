"""`make bench-failover`: SIGKILL the coordinator leader; time the new leader's first write.

Three coordinator replicas and one agent run as real processes on loopback.
Each trial deploys a model, SIGKILLs the leader, and from that instant retries
one write (undeploying the model) against the remaining replicas until one
acknowledges it; that interval is the failover time. The killed replica is
restarted before the next trial. Each row is one setting of the Raft timers:
the election timeout is drawn from [election_ticks, 2 * election_ticks - 1]
ticks. The Raft paper measured a median of 287 ms with 150-300 ms timeouts.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import webshard
from webshard.cli.local import LocalCluster
from webshard.errors import NotFoundError, RPCError

from tests.bench.common import percentiles, write
from tests.integration.test_coordinator_replicas import leader

SETTINGS = [(15, 10, 2), (10, 10, 2)]  # (tick ms, election ticks, heartbeat ticks)


def until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.005)


def trial(cluster: LocalCluster, client: webshard.Client) -> float:
    """One failover, in milliseconds."""
    until(lambda: leader(cluster) is not None, 30)
    until(lambda: len(client.list_agents()) == 1, 30)
    client.deploy("vit-tiny", sharding="layer", shards=1, runtime="native")
    victim = leader(cluster)
    assert victim is not None
    started = time.perf_counter()
    cluster.popen(victim).send_signal(signal.SIGKILL)
    while True:
        try:
            client.undeploy("vit-tiny", timeout=1.0)
            break
        except NotFoundError:
            break  # an earlier attempt committed; its answer was lost with the leader
        except RPCError:
            time.sleep(0.002)
    elapsed = (time.perf_counter() - started) * 1000
    cluster.popen(victim).wait(timeout=10)
    cluster.restart(victim)
    return elapsed


def run(tick_ms: int, election: int, heartbeat: int, trials: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(
            agents=1,
            data_dir=Path(tmp),
            auto_ports=True,
            extra_args={
                "browser_agent": ["--browsers", "0"],
                "coordinator": [
                    "--raft-tick-ms",
                    str(tick_ms),
                    "--election-ticks",
                    str(election),
                    "--heartbeat-ticks",
                    str(heartbeat),
                ],
            },
        )
        cluster.start(timeout=120)
        samples = []
        try:
            with webshard.Client(cluster.coordinators(), timeout=10) as client:
                for i in range(trials):
                    samples.append(trial(cluster, client))
                    print(f"  tick {tick_ms} ms, trial {i + 1}: {samples[-1]:.1f} ms", flush=True)
        finally:
            cluster.stop()
    return {
        "scenario": "sigkill_leader",
        "write": "UndeployModel",
        "replicas": 3,
        "tick_ms": tick_ms,
        "election_timeout_ms": f"{election * tick_ms}-{(2 * election - 1) * tick_ms}",
        "heartbeat_ms": heartbeat * tick_ms,
        "trials": trials,
        **percentiles(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    rows = [run(tick, election, heartbeat, args.trials) for tick, election, heartbeat in SETTINGS]
    write(
        "failover",
        rows,
        ["scenario", "election_timeout_ms", "heartbeat_ms", "trials", "p50_ms", "p95_ms", "max_ms"],
    )


if __name__ == "__main__":
    main()
