"""Every unary RPC of every service, driven with malformed requests, answers with a
status that means something, in bounded time, and leaves every server SERVING.

Real service processes on loopback, wired as a small cluster: a coordinator, an
agent with the native runtime only (no Chromium), recovery, the fault-injector and
metrics. The methods come from the generated service descriptors, so a new RPC is
fuzzed without touching this file. Requests are generated with ``random`` from a
fixed seed (hypothesis is not a dependency): raw garbage bytes, messages with random
field values, undefined enum values, 100 KB strings, and negative or huge numbers.

A call fails the test when it ends with UNKNOWN or INTERNAL (a servicer raised
something nobody expected), RESOURCE_EXHAUSTED "Stream removed" (a message too long
to arrive), or no answer within ``DEADLINE_S``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from webshard.browser_agent.v1 import browser_agent_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.fault_injector.v1 import fault_injector_pb2
from webshard.metrics.v1 import metrics_pb2
from webshard.recovery.v1 import recovery_pb2

from tests.conftest import ServiceProcess, health_status

SEED = 20_261_204
DEADLINE_S = 5.0
RANDOM_MESSAGES = 12
"""Messages with random field values per method (besides the fixed cases)."""
LONG = 100_000
MAX_DEPTH = 3
MAX_UNDEFINED_ENUMS = 6
"""Requests per method with one enum value undefined (each a different one)."""

T = FieldDescriptor
INTS = {
    T.TYPE_INT32: (-(2**31), 2**31 - 1),
    T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    T.TYPE_INT64: (-(2**63), 2**63 - 1),
    T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1),
    T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1),
    T.TYPE_FIXED64: (0, 2**64 - 1),
}
FLOATS = (0.0, -1.0, 1e-9, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"))
STRINGS = ("", "x", "a/b:c", "ü💥\u0000\n", "x" * LONG, "-1", "../../etc/passwd")


@dataclass(frozen=True)
class Case:
    """One request: what kind of malformed it is, and its bytes."""

    kind: str
    raw: bytes


class Generator:
    """Malformed requests for a message type, from a seeded ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._enums_seen = 0
        self._undefined_at = -1

    def cases(self, message_type: type[Message]) -> Iterator[Case]:
        """Every kind of malformed request for ``message_type``."""
        rng = self.rng
        yield Case("garbage", b"\xff" * 8)
        for _ in range(2):
            yield Case("garbage", rng.randbytes(rng.randint(1, 48)))
        for _ in range(RANDOM_MESSAGES):
            yield Case("random", self.message(message_type, mode="random").SerializeToString())
        # One enum value at a time undefined (the first few), the others defined.
        for at in range(MAX_UNDEFINED_ENUMS):
            self._enums_seen, self._undefined_at = 0, at
            message = self.message(message_type, mode="enum")
            if self._enums_seen <= at:
                break
            yield Case("undefined enum", message.SerializeToString())
        yield Case("long strings", self.message(message_type, mode="long").SerializeToString())
        yield Case(
            "extreme numbers", self.message(message_type, mode="extreme").SerializeToString()
        )

    def message(self, message_type: type[Message], *, mode: str, depth: int = 0) -> Message:
        """A message of ``message_type`` with its fields filled as ``mode`` says (one
        member of each oneof; in ``random`` mode some fields are left unset)."""
        message = message_type()
        descriptor = message.DESCRIPTOR
        chosen = {oneof.name: self.rng.choice(oneof.fields) for oneof in descriptor.oneofs}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and chosen[oneof.name] is not field:
                continue
            if mode == "random" and self.rng.random() < 0.3:
                continue  # left unset
            self._fill(message, field, mode, depth)
        return message

    def _fill(self, message: Message, field: FieldDescriptor, mode: str, depth: int) -> None:
        entry = field.message_type
        if entry is not None:
            if depth >= MAX_DEPTH:
                return
            if entry.GetOptions().map_entry:
                target = getattr(message, field.name)
                key = self._value(entry.fields_by_name["key"], mode)
                value_field = entry.fields_by_name["value"]
                if value_field.message_type is not None:
                    target[key].CopyFrom(self._child(value_field, mode, depth))
                else:
                    target[key] = self._value(value_field, mode)
                return
            if field.is_repeated:
                for _ in range(self.rng.randint(1, 3)):
                    getattr(message, field.name).add().CopyFrom(self._child(field, mode, depth))
            else:
                getattr(message, field.name).CopyFrom(self._child(field, mode, depth))
            return
        if field.is_repeated:
            getattr(message, field.name).extend(
                self._value(field, mode) for _ in range(self.rng.randint(1, 3))
            )
        else:
            setattr(message, field.name, self._value(field, mode))

    def _child(self, field: FieldDescriptor, mode: str, depth: int) -> Message:
        return self.message(GetMessageClass(field.message_type), mode=mode, depth=depth + 1)

    def _value(self, field: FieldDescriptor, mode: str) -> Any:
        rng = self.rng
        kind = field.type
        if field.enum_type is not None:
            defined = [v.number for v in field.enum_type.values]
            self._enums_seen += 1
            if mode == "enum" and self._enums_seen == self._undefined_at + 1:
                return rng.choice([-1, max(defined) + 1, 999, 2**31 - 1])
            return rng.choice(defined)
        if kind in INTS:
            low, high = INTS[kind]
            if mode == "extreme":
                return rng.choice([low, high, -1 if low < 0 else high])
            return rng.choice([0, 1, low, high, rng.randint(low, high), -1 if low < 0 else 2])
        if kind in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
            if mode == "extreme":
                return rng.choice(FLOATS[3:])
            return rng.choice(FLOATS)
        if kind == T.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == T.TYPE_STRING:
            if mode == "long":
                return "s" * LONG
            return rng.choice([*STRINGS, "".join(rng.choices("abcxyz-_.0123456789", k=8))])
        if kind == T.TYPE_BYTES:
            if mode == "long":
                return b"\0" * LONG
            return rng.randbytes(rng.randint(0, 32))
        raise AssertionError(f"no generator for {field.full_name} (type {kind})")


def unary_methods(service: ServiceDescriptor) -> list[MethodDescriptor]:
    """The service's methods with a single request and a single response."""
    return [m for m in service.methods if not m.client_streaming and not m.server_streaming]


def fuzz(address: str, service: ServiceDescriptor, rng: random.Random) -> list[str]:
    """Drive every unary method of ``service`` at ``address``; return what went wrong."""
    generator = Generator(rng)
    problems = []
    with grpc.insecure_channel(address) as channel:
        for method in unary_methods(service):
            call = channel.unary_unary(f"/{service.full_name}/{method.name}")
            for case in generator.cases(GetMessageClass(method.input_type)):
                started = time.monotonic()
                try:
                    call(case.raw, timeout=DEADLINE_S)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                took = time.monotonic() - started
                late = code == grpc.StatusCode.DEADLINE_EXCEEDED and took >= DEADLINE_S
                removed = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Stream removed" in details
                # What the server's interceptor refuses before any servicer sees it.
                refused = case.kind == "undefined enum" or case.raw == b"\xff" * 8
                if refused and code != grpc.StatusCode.INVALID_ARGUMENT:
                    problems.append(f"{method.name} [{case.kind}]: {code.name} {details[:200]!r}")
                elif code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) or removed or late:
                    what = (
                        f"no answer within {DEADLINE_S} s" if late else f"{code.name} {details!r}"
                    )
                    problems.append(f"{method.name} [{case.kind}]: {what[:200]}")
    return problems


@pytest.fixture
def cluster(start_service: Callable[..., ServiceProcess]) -> dict[str, ServiceProcess]:
    """The five services, wired to each other, all SERVING."""
    coordinator = start_service("coordinator", "--heartbeat-timeout-s", "30", wait=False)
    recovery = start_service(
        "recovery", "--coordinators", coordinator.address, "--action-timeout-s", "1", wait=False
    )
    agent = start_service(
        "browser_agent",
        *("--agent-id", "fuzz-agent", "--browsers", "0", "--native", "true"),
        *("--coordinators", coordinator.address, "--recovery", recovery.address),
        wait=False,
    )
    injector = start_service(
        "fault_injector",
        *("--coordinators", coordinator.address, "--recovery", recovery.address),
        *("--max-duration-s", "2", "--memory-pressure-cap-mb", "1", "--agent-timeout-s", "2"),
        wait=False,
    )
    metrics = start_service(
        "metrics",
        "--http-port",
        "0",
        *("--coordinators", coordinator.address, "--recovery", recovery.address),
        *("--fault-injector", injector.address),
        wait=False,
    )
    services = {
        "coordinator": coordinator,
        "browser_agent": agent,
        "recovery": recovery,
        "fault_injector": injector,
        "metrics": metrics,
    }
    for proc in services.values():
        proc.wait_serving(timeout=60)
    return services


# Which process serves each API; the coordinator's Raft API is fuzzed last (a forged
# AppendEntries may make it follow a leader that does not exist).
APIS = [
    ("metrics", metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"]),
    ("recovery", recovery_pb2.DESCRIPTOR.services_by_name["RecoveryService"]),
    ("fault_injector", fault_injector_pb2.DESCRIPTOR.services_by_name["FaultInjectorService"]),
    ("browser_agent", browser_agent_pb2.DESCRIPTOR.services_by_name["BrowserAgentService"]),
    ("coordinator", coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]),
    ("coordinator", coordinator_pb2.DESCRIPTOR.services_by_name["RaftService"]),
]


def test_every_unary_rpc_answers_malformed_requests_with_a_meaningful_status(
    cluster: dict[str, ServiceProcess],
) -> None:
    # Every service of every generated module is covered.
    generated = {
        service.full_name
        for module in (
            coordinator_pb2,
            browser_agent_pb2,
            fault_injector_pb2,
            recovery_pb2,
            metrics_pb2,
        )
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert generated == {service.full_name for _, service in APIS}

    rng = random.Random(SEED)
    problems = []
    for name, service in APIS:
        found = fuzz(cluster[name].address, service, rng)
        problems.extend(f"{service.name}/{problem}" for problem in found)

    unhealthy = {
        name: status
        for name, proc in cluster.items()
        if (status := health_status(proc.address, timeout=DEADLINE_S)) != "SERVING"
    }
    assert not unhealthy, f"not SERVING after the fuzzing: {unhealthy}"
    assert not problems, f"{len(problems)} calls failed:\n" + "\n".join(problems)
