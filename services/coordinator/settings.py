"""Coordinator settings."""

from __future__ import annotations

import dataclasses

from services.common.settings import ServerSettings, SettingsError, setting
from services.common.workloads import format_peers, statefulset_peers

DEFAULT_PORT = 50051


@dataclasses.dataclass
class CoordinatorSettings(ServerSettings):
    """Settings of one coordinator replica."""

    replica_id: str = setting("coordinator-0", "This replica's id, unique among the replicas.")
    peers: list[str] = setting(
        [],
        "The other replicas as id=host:port, comma-separated "
        "(for example coordinator-1=127.0.0.1:50061).",
    )
    pod_name: str = setting(
        "", "In Kubernetes: this pod's name; with peers empty, the peers derive from it."
    )
    pod_namespace: str = setting("", "In Kubernetes: this pod's namespace.")
    peer_service: str = setting(
        "coordinator-headless", "In Kubernetes: the headless Service in front of the replicas."
    )
    replicas: int = setting(3, "In Kubernetes: the StatefulSet's replica count.")
    cluster_domain: str = setting("cluster.local", "In Kubernetes: the cluster's DNS domain.")
    raft_tick_ms: int = setting(
        50, "The Raft clock's tick; election timeouts and heartbeats count in these ticks."
    )
    election_ticks: int = setting(
        20,
        "A follower that hears no leader for a random 1x-2x this many ticks starts an "
        "election (1.0-1.95 s by default: etcd's 1 s, since a Python replica on a busy "
        "machine can be descheduled for far longer than the Raft paper's 150 ms).",
    )
    heartbeat_ticks: int = setting(
        2, "A leader heartbeats every this many ticks (100 ms by default, a tenth of the timeout)."
    )
    propose_timeout_s: float = setting(
        5.0, "How long a write waits to be committed before it answers UNAVAILABLE."
    )
    snapshot_every: int = setting(
        1000, "Applied entries between snapshots (which let the log be compacted)."
    )
    heartbeat_interval_s: float = setting(1.0, "How often agents must send a heartbeat.")
    recovery: str = setting(
        "", "The recovery service's address; failures the coordinator detects go there."
    )
    cache_dir: str = setting(
        "", "Where cut shards are cached; empty uses $WEBSHARD_CACHE_DIR or ~/.cache/webshard."
    )
    default_deadline_s: float = setting(
        30.0, "Deadline of an inference request that arrives without one."
    )
    max_stream_in_flight: int = setting(
        256, "Requests of one InferStream in flight at once; reading pauses when full."
    )
    heartbeat_timeout_s: float = setting(
        3.0,
        "An agent silent for this long is marked unhealthy (three missed heartbeats by default).",
    )
    reattach_wait_s: float = setting(
        15.0,
        "A deploy that finds too few agents waits (within its deadline) for agents known to "
        "the cluster whose session ended or moved this long ago at most (a leader change).",
    )

    def peer_addresses(self) -> dict[str, str]:
        """The peers as a replica id -> address map; raises SettingsError on a malformed entry."""
        peers: dict[str, str] = {}
        for entry in self.peers:
            replica_id, sep, address = entry.partition("=")
            if not sep or not replica_id or ":" not in address:
                raise SettingsError(f"peer {entry!r} is not id=host:port")
            if replica_id == self.replica_id:
                raise SettingsError(f"peer {entry!r} has this replica's own id")
            peers[replica_id] = address
        return peers

    def validate(self) -> None:
        """Derive the peers in a StatefulSet, then check them and the heartbeat timing."""
        super().validate()
        if not self.peers and self.pod_name:
            self.replica_id, peers = statefulset_peers(
                self.pod_name,
                self.peer_service,
                self.pod_namespace,
                self.replicas,
                self.port or DEFAULT_PORT,
                cluster_domain=self.cluster_domain,
            )
            self.peers = format_peers(peers)
        self.peer_addresses()
        if self.raft_tick_ms < 1 or not 0 < self.heartbeat_ticks < self.election_ticks:
            raise SettingsError(
                "raft tick must be positive and heartbeat ticks fewer than election ticks"
            )
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise SettingsError(
                "heartbeat interval must be positive and shorter than the heartbeat timeout"
            )
