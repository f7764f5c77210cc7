"""The coordinator's replicated cluster state: what every replica applies from the Raft log.

Commands are small JSON documents (protobuf messages inside are base64): an
agent's registration or browser change, a model's placement, an undeploy.
Applying them is deterministic, so every replica that applied the same log
holds the same state. Liveness (heartbeats, open sessions) is not replicated:
it is a fact about the leader's connections, and agents reattach to a new
leader, which learns it again within a heartbeat.
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2 as pb

DEPLOY_IDS_KEPT = 10_000
"""Deploy request ids remembered for idempotent retries."""
ANSWERS_KEPT_S = 300.0
"""How long an Infer's answer is kept for a retry of its request id (by the leader's clock
when it was recorded, so every replica drops the same answers)."""
ANSWER_BYTES_KEPT = 32 * 1024 * 1024
"""The most answer bytes kept; the oldest go first."""


@dataclass
class AgentEntry:
    """An agent as the cluster knows it."""

    agent_id: str
    address: str
    memory_budget_bytes: int
    browsers: list[common_pb2.BrowserInfo]


def _b64(message: pb.Placement | common_pb2.BrowserInfo) -> str:
    return base64.b64encode(message.SerializeToString(deterministic=True)).decode()


def agent_command(entry: AgentEntry) -> bytes:
    """Register an agent or replace what is known of it."""
    return json.dumps(
        {
            "op": "agent",
            "agent_id": entry.agent_id,
            "address": entry.address,
            "memory_budget_bytes": entry.memory_budget_bytes,
            "browsers": [_b64(b) for b in entry.browsers],
        }
    ).encode()


def deploy_command(placement: pb.Placement) -> bytes:
    """Set a model's placement (its version is assigned when applied)."""
    return json.dumps({"op": "deploy", "placement": _b64(placement)}).encode()


def placement_command(placement: pb.Placement) -> bytes:
    """Replace a deployed model's placement (a replica moved by recovery)."""
    return json.dumps({"op": "placement", "placement": _b64(placement)}).encode()


@dataclass(frozen=True)
class Answer:
    """An Infer's answer kept for retries of its request id."""

    fingerprint: str
    """Hex digest of what the request asked (a reused id must ask the same)."""
    response: bytes
    """The serialized InferResponse."""
    at: float
    """The leader's wall clock when it was recorded."""


def answers_command(answers: dict[str, Answer]) -> bytes:
    """Record answers by request id, so a retry reaching another leader is answered once."""
    return json.dumps(
        {
            "op": "answers",
            "answers": [
                [rid, a.fingerprint, base64.b64encode(a.response).decode(), a.at]
                for rid, a in answers.items()
            ],
        }
    ).encode()


def undeploy_command(model: str) -> bytes:
    """Remove a model."""
    return json.dumps({"op": "undeploy", "model": model}).encode()


@dataclass
class ClusterState:
    """Agents and placements, changed only by applying commands."""

    agents: dict[str, AgentEntry] = field(default_factory=dict)
    placements: dict[str, pb.Placement] = field(default_factory=dict)
    deploy_ids: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """deploy request id -> model, oldest first."""
    answers: OrderedDict[str, Answer] = field(default_factory=OrderedDict)
    """Infer request id -> its answer, oldest first (bounded in age and bytes)."""
    answer_bytes: int = 0
    applied: int = 0
    on_agent: Callable[[AgentEntry], None] | None = None
    on_placement: Callable[[str, pb.Placement | None], None] | None = None

    def apply(self, command: bytes) -> None:
        """Apply one committed command."""
        doc = json.loads(command)
        op = doc["op"]
        if op == "agent":
            entry = AgentEntry(
                agent_id=doc["agent_id"],
                address=doc["address"],
                memory_budget_bytes=doc["memory_budget_bytes"],
                browsers=[
                    common_pb2.BrowserInfo.FromString(base64.b64decode(b)) for b in doc["browsers"]
                ],
            )
            self.agents[entry.agent_id] = entry
            if self.on_agent is not None:
                self.on_agent(entry)
        elif op == "deploy":
            placement = pb.Placement.FromString(base64.b64decode(doc["placement"]))
            if placement.deploy_id and placement.deploy_id in self.deploy_ids:
                return  # a retried deploy that already took effect
            previous = self.placements.get(placement.model)
            placement.version = (previous.version if previous else 0) + 1
            self.placements[placement.model] = placement
            if placement.deploy_id:
                self.deploy_ids[placement.deploy_id] = placement.model
                while len(self.deploy_ids) > DEPLOY_IDS_KEPT:
                    self.deploy_ids.popitem(last=False)
            if self.on_placement is not None:
                self.on_placement(placement.model, placement)
        elif op == "placement":
            placement = pb.Placement.FromString(base64.b64decode(doc["placement"]))
            previous = self.placements.get(placement.model)
            if previous is None:
                return  # undeployed meanwhile: nothing to move
            placement.version = previous.version + 1
            self.placements[placement.model] = placement
            if self.on_placement is not None:
                self.on_placement(placement.model, placement)
        elif op == "undeploy":
            if self.placements.pop(doc["model"], None) is not None and self.on_placement:
                self.on_placement(doc["model"], None)
        elif op == "answers":
            for rid, fingerprint, response, at in doc["answers"]:
                self._keep_answer(rid, Answer(fingerprint, base64.b64decode(response), at))
        else:
            raise ValueError(f"unknown cluster-state command {op!r}")
        self.applied += 1

    def _keep_answer(self, request_id: str, answer: Answer) -> None:
        if request_id in self.answers:
            return  # the first answer stands
        self.answers[request_id] = answer
        self.answer_bytes += len(answer.response)
        # Deterministic: by the recorded times and sizes only, never this replica's clock.
        while self.answers:
            oldest_id, oldest = next(iter(self.answers.items()))
            if answer.at - oldest.at <= ANSWERS_KEPT_S and self.answer_bytes <= ANSWER_BYTES_KEPT:
                break
            del self.answers[oldest_id]
            self.answer_bytes -= len(oldest.response)

    def placement_for_deploy(self, deploy_id: str) -> pb.Placement | None:
        """The current placement produced by deploy ``deploy_id``, if it took effect."""
        model = self.deploy_ids.get(deploy_id)
        placement = self.placements.get(model) if model else None
        return placement if placement is not None and placement.deploy_id == deploy_id else None

    def snapshot(self) -> bytes:
        """The whole state, for log compaction."""
        return json.dumps(
            {
                "agents": [json.loads(agent_command(a)) for a in self.agents.values()],
                "placements": [_b64(p) for p in self.placements.values()],
                "deploy_ids": list(self.deploy_ids.items()),
                "answers": json.loads(answers_command(dict(self.answers)))["answers"],
                "applied": self.applied,
            }
        ).encode()

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot's."""
        doc = json.loads(data)
        before = set(self.placements)
        self.agents.clear()
        self.placements.clear()
        self.deploy_ids = OrderedDict((k, v) for k, v in doc["deploy_ids"])
        self.answers.clear()
        self.answer_bytes = 0
        for rid, fingerprint, response, at in doc.get("answers", []):
            self._keep_answer(rid, Answer(fingerprint, base64.b64decode(response), at))
        for agent in doc["agents"]:
            self.apply(json.dumps(agent).encode())
        for raw in doc["placements"]:
            placement = pb.Placement.FromString(base64.b64decode(raw))
            self.placements[placement.model] = placement
            if self.on_placement is not None:
                self.on_placement(placement.model, placement)
        for model in before - set(self.placements):
            if self.on_placement is not None:
                self.on_placement(model, None)
        self.applied = doc["applied"]
