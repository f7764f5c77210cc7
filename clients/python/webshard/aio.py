"""Async clients for the webshard services: the SDK's primary implementation.

:class:`Client` talks to the coordinator; :class:`FaultInjectorClient`,
:class:`RecoveryClient` and :class:`MetricsClient` to the other services. All
share one transport: a deadline on every call (a watch, which is meant to
stay open, has one only when given a timeout), retries of idempotent calls
through gRPC service config, failover across replicas, and leader-following
(a follower coordinator answers a write with FAILED_PRECONDITION and the
leader's address in the ``webshard-leader`` trailing metadata; the client
switches to that address, tries again and keeps using it).

The synchronous clients in :mod:`webshard.client` run these on a private
event loop, so every behaviour here holds for them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeAlias, TypeVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import (
    DeadlineExceededError,
    encode_string_field,
    from_rpc_error,
    iter_wire_fields,
    trailing_metadata_pairs,
)
from webshard.fault_injector.v1 import fault_injector_pb2
from webshard.metrics.v1 import metrics_pb2
from webshard.options import ChannelOptions, KeepaliveOptions, RetryPolicy, token_metadata
from webshard.recovery.v1 import recovery_pb2
from webshard.tensors import decode_tensor, encode_tensor

if TYPE_CHECKING:
    import numpy.typing as npt
    from google.protobuf.descriptor import ServiceDescriptor
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

__all__ = [
    "LEADER_METADATA_KEY",
    "Client",
    "FaultInjectorClient",
    "InferResult",
    "MetricsClient",
    "RecoveryClient",
    "ShardHop",
    "TimeRangeArg",
    "target_selector",
]

LEADER_METADATA_KEY = "webshard-leader"
"""Trailing metadata key in which a follower coordinator names the leader (host:port)."""

DEFAULT_COORDINATOR_TARGET = "127.0.0.1:50051"
DEFAULT_FAULT_INJECTOR_TARGET = "127.0.0.1:50053"
DEFAULT_RECOVERY_TARGET = "127.0.0.1:50054"
DEFAULT_METRICS_TARGET = "127.0.0.1:50055"

_T = TypeVar("_T")
_Resp = TypeVar("_Resp", bound=Message)
_V = TypeVar("_V", bound=int)

_HEALTH_SERVICE = "grpc.health.v1.Health"
_HEALTH_CHECK_PATH = f"/{_HEALTH_SERVICE}/Check"
# grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
_HEALTH_SERVING = 1

_INGEST_BATCH = 500


# --------------------------------------------------------------------------- enums


def _enum_value(wrapper: _EnumTypeWrapper[_V], prefix: str, value: str, what: str) -> _V:
    """Maps a short lowercase name ("attention_feedforward") to its enum value.

    The full constant name is accepted too. The zero (UNSPECIFIED) value is
    never a valid choice, so it is neither accepted nor listed.
    """
    name = value.strip().upper().replace("-", "_")
    if not name.startswith(prefix):
        name = prefix + name
    names = wrapper.keys()
    valid = [key for key in names if not key.endswith("_UNSPECIFIED")]
    if name not in valid:
        choices = ", ".join(key.removeprefix(prefix).lower() for key in valid)
        raise ValueError(f"unknown {what} {value!r}; valid values: {choices}")
    return wrapper.Value(name)


def _optional_enum(wrapper: _EnumTypeWrapper[_V], prefix: str, value: str | None, what: str) -> _V:
    """Like :func:`_enum_value`, with None meaning UNSPECIFIED (the server chooses)."""
    if value is None:
        return wrapper.Value(prefix + "UNSPECIFIED")
    return _enum_value(wrapper, prefix, value, what)


def _enum_name(wrapper: _EnumTypeWrapper[_V], prefix: str, number: _V) -> str:
    """Maps an enum value to its short lowercase name ("wasm"); unknown numbers as digits."""
    try:
        return wrapper.Name(number).removeprefix(prefix).lower()
    except ValueError:
        return str(int(number))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ShardHop:
    """One hop of an inference request through its shard chain."""

    shard_index: int
    """The shard's position in the chain, from 0."""
    agent_id: str
    """The agent that ran the shard."""
    browser_id: str
    """The browser (or native runtime) that ran the shard."""
    execution_provider: str
    """The provider that ran it, lowercase: "webgpu", "webnn", "wasm" or "cpu"."""
    compute_ms: float
    """Time the runtime spent in the shard, in milliseconds."""
    hop_ms: float
    """The whole hop as the coordinator saw it, transfer included, in milliseconds."""
    attempts: int
    """Tries the hop needed; more than 1 means a failure was recovered on this hop."""
    engine: str = ""
    """The engine that ran it: "chromium", "firefox" or "native"."""


@dataclass(frozen=True, slots=True)
class InferResult:
    """The answer to one inference request."""

    request_id: str
    """The request's id; sending the same id again returns the same answer."""
    outputs: dict[str, npt.NDArray[Any]]
    """The model's output tensors by name, decoded into numpy arrays."""
    trail: list[ShardHop]
    """Which agent, browser and provider ran each shard, in chain order."""
    total_ms: float
    """The request's time inside the coordinator, in milliseconds."""
    recovered: bool
    """True when a hop failed and was recovered during the request."""


def _ms(duration: duration_pb2.Duration) -> float:
    return duration.seconds * 1000.0 + duration.nanos / 1e6


def _infer_result(response: coordinator_pb2.InferResponse, request_id: str) -> InferResult:
    outputs = {tensor.name: decode_tensor(tensor) for tensor in response.outputs}
    trail = [
        ShardHop(
            shard_index=hop.shard_index,
            agent_id=hop.agent_id,
            browser_id=hop.browser_id,
            execution_provider=_enum_name(
                common_pb2.ExecutionProvider, "EXECUTION_PROVIDER_", hop.execution_provider
            ),
            compute_ms=_ms(hop.compute),
            hop_ms=_ms(hop.hop),
            attempts=hop.attempts,
            engine=hop.engine,
        )
        for hop in response.trail
    ]
    return InferResult(
        request_id=response.request_id or request_id,
        outputs=outputs,
        trail=trail,
        total_ms=_ms(response.total),
        recovered=response.recovered,
    )


# --------------------------------------------------------------------------- transport


def parse_targets(target: str | Sequence[str]) -> list[str]:
    """Splits a target ("a:1,b:2" or a list of such strings) into distinct addresses."""
    parts = [target] if isinstance(target, str) else list(target)
    addresses: list[str] = []
    for part in parts:
        for piece in part.split(","):
            address = piece.strip()
            if address and address not in addresses:
                addresses.append(address)
    if not addresses:
        raise ValueError("target names no address; give host:port, or several separated by commas")
    return addresses


def _raw(data: bytes) -> bytes:
    return data


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _leader_named(err: grpc.RpcError) -> str | None:
    """The leader a replica's answer names in its trailing metadata: "" when it knows
    none, None when the answer names nothing."""
    return next(
        (
            (value.decode() if isinstance(value, bytes) else value).strip()
            for key, value in trailing_metadata_pairs(err)
            if key == LEADER_METADATA_KEY
        ),
        None,
    )


async def _connects(channel: grpc.aio.Channel, budget: float) -> bool:
    """Waits up to ``budget`` seconds for ``channel`` to connect.

    False when the address refuses or fails (TRANSIENT_FAILURE) or does not
    connect in time: the call can then go elsewhere without having been sent.
    """
    state = channel.get_state(try_to_connect=True)
    settled = (
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        grpc.ChannelConnectivity.SHUTDOWN,
    )
    try:
        async with asyncio.timeout(budget):
            while state not in settled:
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return state is grpc.ChannelConnectivity.READY


class _Transport:
    """Channels to one service's replicas, and the call loop over them.

    One channel per address, made on first use (grpc.aio channels bind to the
    running event loop, so they cannot be made in a constructor that may run
    outside it). The current address is shared by all calls, so a leader
    found by one call is used by every later one.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float,
        options: ChannelOptions,
        idempotent_methods: Iterable[tuple[str, str]],
        metadata: Sequence[tuple[str, str]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self._addresses = parse_targets(target)
        self._current = self._addresses[0]
        self._timeout = timeout
        self._channel_args = options.channel_args(idempotent_methods)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closed = False
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata)
        self._interceptors = tuple(interceptors)

    @property
    def address(self) -> str:
        """The address calls go to now: the leader once one has been named."""
        return self._current

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every known address, leaders learned from redirects included."""
        return tuple(self._addresses)

    def channel(self, address: str) -> grpc.aio.Channel:
        """Returns the channel to ``address``, making it on first use."""
        if self._closed:
            raise RuntimeError("the client is closed")
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address, options=self._channel_args, interceptors=self._interceptors or None
            )
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        """Closes every channel; calls in flight are cancelled."""
        self._closed = True
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            await channel.close()

    def deadline(self, timeout: float | None) -> float:
        """Returns the event-loop time by which a call with ``timeout`` must end."""
        budget = self._timeout if timeout is None else timeout
        if budget <= 0:
            raise ValueError(f"timeout must be positive, not {budget}")
        return asyncio.get_running_loop().time() + budget

    @staticmethod
    def remaining(deadline: float) -> float:
        """Seconds left before ``deadline``; DeadlineExceededError when none are."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise DeadlineExceededError("the call's deadline passed before a replica answered")
        return left

    def _next_address(self, after: str, skipped: set[str]) -> str | None:
        """The first address after ``after`` (in ring order) that was not skipped."""
        count = len(self._addresses)
        start = self._addresses.index(after) if after in self._addresses else -1
        for step in range(1, count + 1):
            candidate = self._addresses[(start + step) % count]
            if candidate != after and candidate not in skipped:
                return candidate
        return None

    async def select(self, deadline: float, skipped: set[str]) -> str:
        """Returns the address to send to, skipping replicas that cannot be reached.

        Checking the connection first lets even a non-idempotent call move to
        another replica safely: nothing was sent to the one skipped. Each
        replica gets an equal share of the time left, so one that swallows
        packets cannot use up the whole deadline. With no replica left to try,
        the current one is used and its error is what the caller sees.
        """
        while True:
            address = self._current
            others = [a for a in self._addresses if a != address and a not in skipped]
            if not others:
                return address
            budget = self.remaining(deadline) / (len(others) + 1)
            if await _connects(self.channel(address), budget):
                return address
            skipped.add(address)
            self._current = self._next_address(address, skipped) or address

    def _follow(
        self, err: grpc.RpcError, address: str, *, idempotent: bool, skipped: set[str]
    ) -> str | None:
        """Returns where to try again after ``err`` from ``address``, or None to give up."""
        code = err.code()
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            leader = _leader_named(err)
            if not leader or leader == address:
                return None
            if leader not in self._addresses:
                self._addresses.append(leader)
            skipped.discard(leader)
            return leader
        if code is grpc.StatusCode.UNAVAILABLE and idempotent:
            # The channel has already retried this call; the replica is gone
            # for now. Only idempotent calls move on after being sent: a write
            # may have been applied before the replica failed.
            skipped.add(address)
            return self._next_address(address, skipped)
        return None

    async def call(
        self,
        invoke: Callable[[grpc.aio.Channel, float], Awaitable[_T]],
        *,
        timeout: float | None,
        idempotent: bool,
        replayable: bool = True,
    ) -> _T:
        """Runs ``invoke(channel, seconds_left)`` with failover and leader-following.

        ``timeout`` bounds the whole call, redirects included; each attempt
        sends what is left of it as its gRPC deadline. ``replayable`` is False
        for calls whose request cannot be sent twice (a consumed stream).
        """
        deadline = self.deadline(timeout)
        redirects_left = len(self._addresses) + 2
        skipped: set[str] = set()
        waits = 0
        while True:
            address = await self.select(deadline, skipped) if replayable else self._current
            channel = self.channel(address)
            try:
                return await invoke(channel, self.remaining(deadline))
            except grpc.RpcError as err:
                leader = _leader_named(err) if replayable else None
                electing = leader == "" and err.code() is grpc.StatusCode.UNAVAILABLE
                stale = err.code() is grpc.StatusCode.FAILED_PRECONDITION and leader in skipped
                if electing or stale:
                    # No leader yet, or one this call could not reach (the replica has not
                    # noticed its loss yet): an election is under way, and the replica
                    # did nothing. Wait (50 ms, doubling to 1 s) within the deadline, then
                    # try the named leader or the next replica; the last answer is the
                    # error when the deadline comes first.
                    waits += 1
                    pause = min(1.0, 0.05 * 2 ** (waits - 1))
                    if deadline - asyncio.get_running_loop().time() <= pause:
                        raise from_rpc_error(err) from err
                    await asyncio.sleep(pause)
                    if stale:
                        assert leader is not None
                        skipped.discard(leader)
                        self._current = leader
                    else:
                        self._current = self._next_address(address, skipped) or address
                    continue
                target = None
                if replayable and redirects_left > 0:
                    target = self._follow(err, address, idempotent=idempotent, skipped=skipped)
                if target is None:
                    raise from_rpc_error(err) from err
                self._current = target
                redirects_left -= 1

    async def stream(
        self,
        open_call: Callable[[grpc.aio.Channel, float | None], grpc.aio.UnaryStreamCall[Any, _T]],
        *,
        timeout: float | None,
    ) -> AsyncGenerator[_T, None]:
        """Yields a server stream's messages from a reachable replica.

        A watch is long-lived: with no ``timeout`` it has no deadline and runs
        until the caller stops iterating or the server ends it (keepalive pings
        notice a dead peer). With a ``timeout`` the watch lasts that long and
        then ends normally.
        """
        deadline = self.deadline(timeout)
        address = await self.select(deadline, set())
        call = open_call(
            self.channel(address), None if timeout is None else self.remaining(deadline)
        )
        try:
            async for message in call:
                yield message
        except grpc.RpcError as err:
            if timeout is not None and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            raise from_rpc_error(err) from err
        finally:
            # Stops the server stream when the caller leaves the loop early.
            call.cancel()


# --------------------------------------------------------------------------- clients


class _ServiceClient:
    """What every service client shares: transport, health check, life cycle."""

    _SERVICE: ClassVar[ServiceDescriptor]
    _IDEMPOTENT: ClassVar[frozenset[str]]

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float,
        retry: RetryPolicy | None,
        keepalive: KeepaliveOptions | None,
        max_message_bytes: int,
        token: str | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        options = ChannelOptions(
            retry=retry or RetryPolicy(),
            keepalive=keepalive or KeepaliveOptions(),
            max_message_bytes=max_message_bytes,
        )
        unknown = self._IDEMPOTENT - set(self._SERVICE.methods_by_name)
        if unknown:
            raise TypeError(f"{type(self).__name__} names unknown methods: {sorted(unknown)}")
        methods = [(self._SERVICE.full_name, name) for name in sorted(self._IDEMPOTENT)]
        methods.append((_HEALTH_SERVICE, "Check"))
        self._transport = _Transport(
            target,
            timeout=timeout,
            options=options,
            idempotent_methods=methods,
            metadata=token_metadata(token),
            interceptors=interceptors,
        )

    @property
    def address(self) -> str:
        """The replica address calls go to now (the leader, once one is known)."""
        return self._transport.address

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every replica address known, leaders learned from redirects included."""
        return self._transport.addresses

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the client's channels; the client cannot be used afterwards."""
        await self._transport.close()

    async def check_health(self, *, service: str = "", timeout: float | None = None) -> bool:
        """Asks the standard gRPC health service whether ``service`` is serving.

        ``service`` empty asks about the server as a whole. Returns True for
        SERVING and False for NOT_SERVING or an unknown status; a service the
        server does not know raises NotFoundError.
        """
        request = encode_string_field(1, service)

        async def invoke(channel: grpc.aio.Channel, seconds: float) -> bytes:
            check = channel.unary_unary(
                _HEALTH_CHECK_PATH, request_serializer=_raw, response_deserializer=_raw
            )
            return await check(request, timeout=seconds, metadata=self._transport.metadata)

        response = await self._transport.call(invoke, timeout=timeout, idempotent=True)
        try:
            status = next((value for number, value in iter_wire_fields(response) if number == 1), 0)
        except ValueError:
            return False
        return status == _HEALTH_SERVING

    def _path(self, method: str) -> str:
        return f"/{self._SERVICE.full_name}/{method}"

    async def _unary(
        self,
        method: str,
        request: Message,
        response_type: type[_Resp],
        *,
        timeout: float | None,
    ) -> _Resp:
        """Sends one unary call; retried and failed over only when ``method`` is idempotent."""
        path = self._path(method)

        async def invoke(channel: grpc.aio.Channel, seconds: float) -> _Resp:
            multicallable = channel.unary_unary(
                path,
                request_serializer=_serialize,
                response_deserializer=response_type.FromString,
            )
            return await multicallable(request, timeout=seconds, metadata=self._transport.metadata)

        return await self._transport.call(
            invoke, timeout=timeout, idempotent=method in self._IDEMPOTENT
        )

    def _server_stream(
        self,
        method: str,
        request: Message,
        response_type: type[_Resp],
        *,
        timeout: float | None,
    ) -> AsyncGenerator[_Resp, None]:
        path = self._path(method)

        def open_call(
            channel: grpc.aio.Channel, seconds: float | None
        ) -> grpc.aio.UnaryStreamCall[Any, _Resp]:
            multicallable = channel.unary_stream(
                path,
                request_serializer=_serialize,
                response_deserializer=response_type.FromString,
            )
            return multicallable(request, timeout=seconds, metadata=self._transport.metadata)

        return self._transport.stream(open_call, timeout=timeout)


class Client(_ServiceClient):
    """Async client of the coordinator: deploy models, run inference, read the cluster.

    ``target`` is one coordinator address or several (a list, or one string
    separated by commas); the client finds the leader among them by itself.
    Use it as ``async with webshard.aio.Client(...) as client:`` or call
    :meth:`close`.

    Args:
        target: coordinator replica addresses, host:port.
        token: the cluster token, sent as "authorization: Bearer <token>" on every
            call; services started with WEBSHARD_CLUSTER_TOKEN require it of the
            calls that change state (deploy, undeploy, replace a shard, ...).
        timeout: default deadline of each call, in seconds.
        retry: retries of idempotent calls on UNAVAILABLE; default RetryPolicy().
        keepalive: keepalive pings; default KeepaliveOptions().
        max_message_bytes: largest message sent or received.
        interceptors: client interceptors for every channel the client makes
            (for example OpenTelemetry's, so calls carry the caller's trace
            context); the SDK itself depends on no tracing library.
    """

    _SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
    # Infer and DeployModel are idempotent because every request carries a request id.
    _IDEMPOTENT = frozenset(
        {
            "ClusterStatus",
            "ListAgents",
            "GetPlacement",
            "Infer",
            "DeployModel",
            # A replica already moved is answered with the current placement.
            "ReplaceShard",
            # Not VerifyShard: its UNAVAILABLE is a failed hop, the answer a recovery's
            # verify wants at once, not retried until the deadline.
            "ReconnectAgent",
            "PauseModel",
            "ResumeModel",
        }
    )

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_COORDINATOR_TARGET,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        keepalive: KeepaliveOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
            token=token,
            interceptors=interceptors,
        )

    async def cluster_status(
        self, *, timeout: float | None = None
    ) -> coordinator_pb2.ClusterStatusResponse:
        """Returns the replicas, the leader, the agents and the deployed models."""
        return await self._unary(
            "ClusterStatus",
            coordinator_pb2.ClusterStatusRequest(),
            coordinator_pb2.ClusterStatusResponse,
            timeout=timeout,
        )

    async def list_agents(
        self, *, include_unhealthy: bool = False, timeout: float | None = None
    ) -> list[common_pb2.AgentInfo]:
        """Returns the agent registry; ``include_unhealthy`` adds agents no longer heartbeating."""
        response = await self._unary(
            "ListAgents",
            coordinator_pb2.ListAgentsRequest(include_unhealthy=include_unhealthy),
            coordinator_pb2.ListAgentsResponse,
            timeout=timeout,
        )
        return list(response.agents)

    async def deploy(
        self,
        model: str,
        *,
        sharding: str = "layer",
        shards: int = 1,
        replicas: int = 1,
        standby: int = 0,
        runtime: str | None = None,
        ep: str | None = None,
        recovery_strategy: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        spares: int | None = None,
        engines: Sequence[str] = (),
    ) -> coordinator_pb2.Placement:
        """Cuts ``model`` into shards, places them on agents and returns the placement.

        Args:
            model: the model name, for example "minilm-l6".
            sharding: "layer", "attention_feedforward" or "component".
            shards: number of shards.
            replicas: copies of each shard, on different browsers and agents where possible.
            standby: warm standby browsers to keep for the model.
            runtime: "native" or "browser"; None lets the coordinator choose.
            ep: execution provider to pin ("webgpu", "webnn", "wasm", "cpu");
                None lets each agent choose from what its browser offers.
            recovery_strategy: "simple", "progressive", "coordinated" or
                "adaptive"; None uses the recovery service's default.
            request_id: makes the deploy idempotent, so a retry (after a leader
                change, say) never deploys twice; generated when None.
            timeout: deadline in seconds; the client's default when None.
            spares: hot spares per shard: loaded and warmed, taking no traffic, ready
                to take over from a failed replica without a load. None (or -1): the
                coordinator's default, one per shard where the fleet has room; 0: none.
                The coordinator checks the count (INVALID_ARGUMENT names the runtimes
                free for spares).
            engines: browser engines the model may run on ("chromium", "firefox");
                with more than one, each shard's copies and consecutive shards are
                spread over them. Empty: any.

        Raises:
            ValueError: an option names no known value, or a count is out of range.
        """
        if shards < 1 or replicas < 1 or standby < 0:
            raise ValueError("shards and replicas must be at least 1, standby at least 0")
        request = coordinator_pb2.DeployModelRequest(
            model=model,
            sharding=_enum_value(
                common_pb2.ShardingStrategy, "SHARDING_STRATEGY_", sharding, "sharding"
            ),
            shard_count=shards,
            replicas=replicas,
            standby_count=standby,
            runtime=_optional_enum(common_pb2.Runtime, "RUNTIME_", runtime, "runtime"),
            execution_provider=_optional_enum(
                common_pb2.ExecutionProvider, "EXECUTION_PROVIDER_", ep, "execution provider"
            ),
            recovery_strategy=_optional_enum(
                common_pb2.RecoveryStrategy,
                "RECOVERY_STRATEGY_",
                recovery_strategy,
                "recovery strategy",
            ),
            request_id=request_id or uuid.uuid4().hex,
            spares=spares,
            engines=list(engines),
        )
        response = await self._unary(
            "DeployModel", request, coordinator_pb2.DeployModelResponse, timeout=timeout
        )
        return response.placement

    async def placement(
        self, model: str, *, timeout: float | None = None
    ) -> coordinator_pb2.Placement:
        """Returns where the deployed ``model``'s shards live."""
        response = await self._unary(
            "GetPlacement",
            coordinator_pb2.GetPlacementRequest(model=model),
            coordinator_pb2.GetPlacementResponse,
            timeout=timeout,
        )
        return response.placement

    async def undeploy(self, model: str, *, timeout: float | None = None) -> int:
        """Removes ``model`` from every agent; returns the number of shard replicas unloaded."""
        response = await self._unary(
            "UndeployModel",
            coordinator_pb2.UndeployModelRequest(model=model),
            coordinator_pb2.UndeployModelResponse,
            timeout=timeout,
        )
        return response.unloaded_shards

    async def infer(
        self,
        model: str,
        *,
        texts: str | Sequence[str] | None = None,
        inputs: Mapping[str, npt.ArrayLike] | None = None,
        request_id: str | None = None,
        pins: Mapping[int, str] | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        """Runs one request through the deployed ``model``.

        Args:
            model: the deployed model's name.
            texts: raw text, one row of the batch per string; the coordinator
                tokenizes it.
            inputs: input tensors by graph name (numpy arrays or anything
                ``numpy.asarray`` takes); needs numpy.
            request_id: the request's id. A fresh one is made when None; pass
                the same id again to get the same answer without running twice.
            pins: shard index -> "agent-id/browser-id" (or "agent-id"): run that
                shard on that replica only, with no replay elsewhere (a probe).
            timeout: deadline in seconds; the client's default when None.

        Returns:
            The outputs as numpy arrays (numpy must be installed), the trail of
            shard hops, the coordinator's total time and whether a failure was
            recovered on the way.
        """
        if texts is None and not inputs:
            raise ValueError("infer needs texts or inputs")
        if isinstance(texts, str):
            texts = [texts]
        request_id = request_id or uuid.uuid4().hex
        request = coordinator_pb2.InferRequest(
            model=model,
            request_id=request_id,
            texts=list(texts or ()),
            inputs=[encode_tensor(name, value) for name, value in (inputs or {}).items()],
            pins=[
                coordinator_pb2.ReplicaPin(
                    shard_index=index,
                    agent_id=where.partition("/")[0],
                    browser_id=where.partition("/")[2],
                )
                for index, where in sorted((pins or {}).items())
            ],
        )
        response = await self._unary(
            "Infer", request, coordinator_pb2.InferResponse, timeout=timeout
        )
        return _infer_result(response, request_id)

    async def replace_shard(
        self,
        model: str,
        shard_index: int,
        agent_id: str,
        browser_id: str = "",
        *,
        avoid: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> coordinator_pb2.ReplaceShardResponse:
        """Moves the shard's replica on ``agent_id``/``browser_id`` (any browser of the
        agent when empty) to a hot spare, or a ready browser or warm standby elsewhere;
        never to a runtime in ``avoid`` ((agent, browser) pairs, browser "" for a
        whole agent)."""
        return await self._unary(
            "ReplaceShard",
            coordinator_pb2.ReplaceShardRequest(
                model=model,
                shard_index=shard_index,
                agent_id=agent_id,
                browser_id=browser_id,
                avoid=[coordinator_pb2.RuntimeRef(agent_id=a, browser_id=b) for a, b in avoid],
            ),
            coordinator_pb2.ReplaceShardResponse,
            timeout=timeout,
        )

    async def verify_shard(
        self,
        model: str,
        shard_index: int,
        agent_id: str,
        browser_id: str = "",
        *,
        timeout: float | None = None,
    ) -> coordinator_pb2.VerifyShardResponse:
        """Runs the shard once on its copy on ``agent_id``/``browser_id`` (whichever
        runtime of the agent holds one when empty) from the boundary activation the
        coordinator kept of its last run, and compares the outputs with the kept ones.

        A different answer comes back with ``passed`` false and the difference.
        Raises FailedPreconditionError when no activation of the shard is kept (run a
        whole inference instead), NotFoundError for an unknown model, shard or copy,
        UnavailableError when the hop failed.
        """
        return await self._unary(
            "VerifyShard",
            coordinator_pb2.VerifyShardRequest(
                model=model, shard_index=shard_index, agent_id=agent_id, browser_id=browser_id
            ),
            coordinator_pb2.VerifyShardResponse,
            timeout=timeout,
        )

    async def restart_browser(
        self, agent_id: str, browser_id: str, *, timeout: float | None = None
    ) -> coordinator_pb2.RestartBrowserResponse:
        """Replaces a browser with a fresh one on the same agent, its shards reloaded there."""
        return await self._unary(
            "RestartBrowser",
            coordinator_pb2.RestartBrowserRequest(agent_id=agent_id, browser_id=browser_id),
            coordinator_pb2.RestartBrowserResponse,
            timeout=timeout,
        )

    async def reconnect_agent(
        self,
        agent_id: str,
        browser_id: str = "",
        *,
        wait_s: float = 2.0,
        timeout: float | None = None,
    ) -> str:
        """Reopens the coordinator's stream to an agent and waits up to ``wait_s`` for
        ``browser_id``'s page to be connected; returns what was done."""
        response = await self._unary(
            "ReconnectAgent",
            coordinator_pb2.ReconnectAgentRequest(
                agent_id=agent_id, browser_id=browser_id, timeout=_duration(wait_s)
            ),
            coordinator_pb2.ReconnectAgentResponse,
            timeout=timeout,
        )
        return response.detail

    async def pause_model(
        self, model: str, *, max_pause_s: float = 10.0, timeout: float | None = None
    ) -> str:
        """Holds new requests for ``model`` (at most ``max_pause_s``); returns the barrier id."""
        response = await self._unary(
            "PauseModel",
            coordinator_pb2.PauseModelRequest(model=model, max_pause=_duration(max_pause_s)),
            coordinator_pb2.PauseModelResponse,
            timeout=timeout,
        )
        return response.barrier_id

    async def resume_model(
        self, model: str, barrier_id: str = "", *, timeout: float | None = None
    ) -> coordinator_pb2.ResumeModelResponse:
        """Lifts ``model``'s barrier; the held requests run."""
        return await self._unary(
            "ResumeModel",
            coordinator_pb2.ResumeModelRequest(model=model, barrier_id=barrier_id),
            coordinator_pb2.ResumeModelResponse,
            timeout=timeout,
        )


def target_selector(
    kind: str,
    *ids: str,
    model: str = "",
    mode: str | None = None,
    value: int = 0,
    peer_service: str = "",
) -> fault_injector_pb2.TargetSelector:
    """Builds a fault's target selector.

    Args:
        kind: "agent", "browser", "shard", "service" or "replica".
        ids: candidate ids ("model/shard-index" for shards); none means any.
        model: restricts shard candidates to one model.
        mode: "one", "all", "fixed" or "percent" (as Chaos Mesh counts). When
            None: "all" of the ids named, or "one" at random when none are.
        value: the count for "fixed", the percent for "percent".
        peer_service: the other end of the path, for latency and partition faults.
    """
    return fault_injector_pb2.TargetSelector(
        kind=_enum_value(fault_injector_pb2.TargetKind, "TARGET_KIND_", kind, "target kind"),
        ids=list(ids),
        model=model,
        mode=_enum_value(
            fault_injector_pb2.SelectorMode,
            "SELECTOR_MODE_",
            mode or ("all" if ids else "one"),
            "selector mode",
        ),
        value=value,
        peer_service=peer_service,
    )


def _selector(target: fault_injector_pb2.TargetSelector | str) -> fault_injector_pb2.TargetSelector:
    """Accepts a selector, or the short form "kind" or "kind:id,id"."""
    if isinstance(target, fault_injector_pb2.TargetSelector):
        return target
    kind, _, ids = target.partition(":")
    return target_selector(kind, *(i.strip() for i in ids.split(",") if i.strip()))


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


class FaultInjectorClient(_ServiceClient):
    """Async client of the fault injector: inject faults, watch them, revert them.

    Args:
        target: fault-injector address(es), host:port.
        token: sent as "authorization: Bearer <token>" on every call; the
            service requires it when it runs with WEBSHARD_FAULT_TOKEN (or, with
            none, WEBSHARD_CLUSTER_TOKEN).
        timeout, retry, keepalive, max_message_bytes, interceptors: as for :class:`Client`.
    """

    _SERVICE = fault_injector_pb2.DESCRIPTOR.services_by_name["FaultInjectorService"]
    # RevertAll is the kill switch: repeating it is harmless and it must get through.
    _IDEMPOTENT = frozenset({"GetFault", "ListFaults", "WatchFaults", "RevertAll"})

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_FAULT_INJECTOR_TARGET,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        keepalive: KeepaliveOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
            interceptors=interceptors,
            token=token,
        )

    async def inject(
        self,
        spec: fault_injector_pb2.FaultSpec | None = None,
        *,
        kind: str | None = None,
        intensity: str = "moderate",
        target: fault_injector_pb2.TargetSelector | str | None = None,
        duration_s: float | None = None,
        dry_run: bool = False,
        force: bool = False,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> fault_injector_pb2.Fault:
        """Injects a fault (or, with ``dry_run``, only resolves its targets) and returns it.

        Give either a full ``spec`` or the keyword form, for example
        ``inject(kind="browser_crash", intensity="severe", target="agent:agent-1",
        duration_s=30)``.

        Args:
            spec: the whole fault spec (needed for multiple_failures and cascade).
            kind: "connection_lost", "component_failure", "browser_crash",
                "memory_pressure", "latency", "partition", "leader_loss", ...
            intensity: "mild", "moderate" or "severe".
            target: a selector (see :func:`target_selector`) or its short form
                "kind" or "kind:id,id".
            duration_s: how long until it reverts by itself, at most the service's
                maximum; required (the service refuses a fault without one).
            dry_run: resolve the targets and check the guardrails without injecting.
            force: allow an unscoped selector (no ids, mode all).
            labels: free-form tags recorded with the fault.
            timeout: deadline in seconds; the client's default when None.
        """
        if spec is None:
            if kind is None:
                raise ValueError("inject needs a spec or kind=")
            spec = fault_injector_pb2.FaultSpec(
                kind=_enum_value(common_pb2.FaultKind, "FAULT_KIND_", kind, "fault kind"),
                intensity=_enum_value(common_pb2.Intensity, "INTENSITY_", intensity, "intensity"),
                dry_run=dry_run,
                labels=dict(labels or {}),
            )
            if target is not None:
                spec.target.CopyFrom(_selector(target))
            if duration_s is not None:
                spec.duration.CopyFrom(_duration(duration_s))
        elif kind is not None or target is not None or duration_s is not None or labels:
            raise ValueError("give either spec or kind=/target=/duration_s=/labels=, not both")
        elif dry_run and not spec.dry_run:
            dry = fault_injector_pb2.FaultSpec()
            dry.CopyFrom(spec)
            dry.dry_run = True
            spec = dry
        response = await self._unary(
            "InjectFault",
            fault_injector_pb2.InjectFaultRequest(spec=spec, force=force),
            fault_injector_pb2.InjectFaultResponse,
            timeout=timeout,
        )
        return response.fault

    async def get_fault(
        self, fault_id: str, *, timeout: float | None = None
    ) -> fault_injector_pb2.Fault:
        """Returns one fault."""
        response = await self._unary(
            "GetFault",
            fault_injector_pb2.GetFaultRequest(fault_id=fault_id),
            fault_injector_pb2.GetFaultResponse,
            timeout=timeout,
        )
        return response.fault

    async def list_faults(
        self, *, states: Iterable[str] = (), timeout: float | None = None
    ) -> list[fault_injector_pb2.Fault]:
        """Returns faults oldest first, refused ones included; ``states`` ("active", ...) filter."""
        request = fault_injector_pb2.ListFaultsRequest(
            states=[
                _enum_value(fault_injector_pb2.FaultState, "FAULT_STATE_", state, "fault state")
                for state in states
            ]
        )
        response = await self._unary(
            "ListFaults", request, fault_injector_pb2.ListFaultsResponse, timeout=timeout
        )
        return list(response.faults)

    async def revert(
        self, fault_id: str, *, timeout: float | None = None
    ) -> fault_injector_pb2.Fault:
        """Reverts one fault before its duration ends; returns it after the revert."""
        response = await self._unary(
            "RevertFault",
            fault_injector_pb2.RevertFaultRequest(fault_id=fault_id),
            fault_injector_pb2.RevertFaultResponse,
            timeout=timeout,
        )
        return response.fault

    async def revert_all(self, *, timeout: float | None = None) -> int:
        """Reverts every active fault (the kill switch); returns how many were reverted."""
        response = await self._unary(
            "RevertAll",
            fault_injector_pb2.RevertAllRequest(),
            fault_injector_pb2.RevertAllResponse,
            timeout=timeout,
        )
        return response.reverted

    async def watch_faults(
        self, *, include_existing: bool = False, timeout: float | None = None
    ) -> AsyncGenerator[fault_injector_pb2.Fault, None]:
        """Yields every change to every fault from now on.

        ``include_existing`` first yields the faults already known. With no
        ``timeout`` the watch runs until the caller stops iterating; with one,
        it ends normally after that many seconds.
        """
        stream = self._server_stream(
            "WatchFaults",
            fault_injector_pb2.WatchFaultsRequest(include_existing=include_existing),
            fault_injector_pb2.WatchFaultsResponse,
            timeout=timeout,
        )
        # aclosing: when the caller stops early, the server stream is cancelled
        # now rather than whenever the inner generator is collected.
        async with contextlib.aclosing(stream):
            async for change in stream:
                yield change.fault


def _breaker_scope(target_id: str, scope: str | None) -> recovery_pb2.BreakerScope.ValueType:
    """A browser breaker's id is "agent/browser", an agent's has no slash."""
    if scope is None:
        scope = "browser" if "/" in target_id else "agent"
    return _enum_value(recovery_pb2.BreakerScope, "BREAKER_SCOPE_", scope, "breaker scope")


class RecoveryClient(_ServiceClient):
    """Async client of the recovery service: failures, recoveries and circuit breakers.

    Args: as for :class:`Client`; ``target`` is the recovery service's address.
    """

    _SERVICE = recovery_pb2.DESCRIPTOR.services_by_name["RecoveryService"]
    # Closing a closed breaker changes nothing, so ResetBreaker may be repeated.
    _IDEMPOTENT = frozenset(
        {
            "GetRecovery",
            "ListRecoveries",
            "WatchRecoveries",
            "GetBreaker",
            "ListBreakers",
            "ResetBreaker",
        }
    )

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_RECOVERY_TARGET,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        keepalive: KeepaliveOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
            token=token,
            interceptors=interceptors,
        )

    async def report_failure(
        self,
        report: recovery_pb2.FailureReport,
        *,
        strategy: str | None = None,
        timeout: float | None = None,
    ) -> recovery_pb2.ReportFailureResponse:
        """Hands a detected failure to recovery; returns the recovery id and whether it joined one.

        ``strategy`` ("simple", "progressive", "coordinated", "adaptive")
        overrides the model's recovery strategy for this failure.
        """
        request = recovery_pb2.ReportFailureRequest(
            report=report,
            strategy=_optional_enum(
                common_pb2.RecoveryStrategy, "RECOVERY_STRATEGY_", strategy, "recovery strategy"
            ),
        )
        return await self._unary(
            "ReportFailure", request, recovery_pb2.ReportFailureResponse, timeout=timeout
        )

    async def get_recovery(
        self, recovery_id: str, *, timeout: float | None = None
    ) -> recovery_pb2.Recovery:
        """Returns one recovery, with its phases."""
        response = await self._unary(
            "GetRecovery",
            recovery_pb2.GetRecoveryRequest(recovery_id=recovery_id),
            recovery_pb2.GetRecoveryResponse,
            timeout=timeout,
        )
        return response.recovery

    async def list_recoveries(
        self, *, limit: int = 0, timeout: float | None = None
    ) -> list[recovery_pb2.Recovery]:
        """Returns recent recoveries, newest first; ``limit`` 0 means the service's default."""
        response = await self._unary(
            "ListRecoveries",
            recovery_pb2.ListRecoveriesRequest(limit=limit),
            recovery_pb2.ListRecoveriesResponse,
            timeout=timeout,
        )
        return list(response.recoveries)

    async def watch_recoveries(
        self, *, include_existing: bool = False, timeout: float | None = None
    ) -> AsyncGenerator[recovery_pb2.Recovery, None]:
        """Yields every change to every recovery from now on; ``timeout`` as for watch_faults."""
        stream = self._server_stream(
            "WatchRecoveries",
            recovery_pb2.WatchRecoveriesRequest(include_existing=include_existing),
            recovery_pb2.WatchRecoveriesResponse,
            timeout=timeout,
        )
        async with contextlib.aclosing(stream):
            async for change in stream:
                yield change.recovery

    async def list_breakers(self, *, timeout: float | None = None) -> list[recovery_pb2.Breaker]:
        """Returns every circuit breaker."""
        response = await self._unary(
            "ListBreakers",
            recovery_pb2.ListBreakersRequest(),
            recovery_pb2.ListBreakersResponse,
            timeout=timeout,
        )
        return list(response.breakers)

    async def get_breaker(
        self, target_id: str, *, scope: str | None = None, timeout: float | None = None
    ) -> recovery_pb2.Breaker:
        """Returns the breaker of an agent ("agent-1") or a browser ("agent-1/b0").

        ``scope`` ("agent" or "browser") is inferred from the id when None.
        """
        response = await self._unary(
            "GetBreaker",
            recovery_pb2.GetBreakerRequest(
                scope=_breaker_scope(target_id, scope), target_id=target_id
            ),
            recovery_pb2.GetBreakerResponse,
            timeout=timeout,
        )
        return response.breaker

    async def reset_breaker(
        self, target_id: str, *, scope: str | None = None, timeout: float | None = None
    ) -> recovery_pb2.Breaker:
        """Closes a breaker by hand; returns it after the reset. ``scope`` as for get_breaker."""
        response = await self._unary(
            "ResetBreaker",
            recovery_pb2.ResetBreakerRequest(
                scope=_breaker_scope(target_id, scope), target_id=target_id
            ),
            recovery_pb2.ResetBreakerResponse,
            timeout=timeout,
        )
        return response.breaker


TimeRangeArg: TypeAlias = common_pb2.TimeRange | tuple[datetime | None, datetime | None] | None
"""A time range: a TimeRange message, a (start, end) pair of aware datetimes, or None for all."""


def _time_range(value: TimeRangeArg) -> common_pb2.TimeRange | None:
    """Accepts a TimeRange or a (start, end) pair of aware datetimes, either end open."""
    if value is None or isinstance(value, common_pb2.TimeRange):
        return value
    start, end = value
    time_range = common_pb2.TimeRange()
    for point, field in ((start, time_range.start), (end, time_range.end)):
        if point is not None:
            if point.tzinfo is None:
                raise ValueError("time range ends must be timezone-aware datetimes")
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(point)
            field.CopyFrom(stamp)
    return time_range


async def _ingest_batches(
    events: Iterable[metrics_pb2.Event] | AsyncIterable[metrics_pb2.Event], batch_size: int
) -> AsyncIterator[metrics_pb2.IngestRequest]:
    batch: list[metrics_pb2.Event] = []
    if isinstance(events, AsyncIterable):
        async for event in events:
            batch.append(event)
            if len(batch) >= batch_size:
                yield metrics_pb2.IngestRequest(events=batch)
                batch = []
    else:
        for event in events:
            batch.append(event)
            if len(batch) >= batch_size:
                yield metrics_pb2.IngestRequest(events=batch)
                batch = []
    if batch:
        yield metrics_pb2.IngestRequest(events=batch)


_REPORT_FORMATS = {
    "json": metrics_pb2.REPORT_FORMAT_JSON,
    "markdown": metrics_pb2.REPORT_FORMAT_MARKDOWN,
    "md": metrics_pb2.REPORT_FORMAT_MARKDOWN,
    "html": metrics_pb2.REPORT_FORMAT_HTML,
    "junit": metrics_pb2.REPORT_FORMAT_JUNIT_XML,
    "junit_xml": metrics_pb2.REPORT_FORMAT_JUNIT_XML,
}


class MetricsClient(_ServiceClient):
    """Async client of the metrics service: ingest events, query them, render reports.

    Args: as for :class:`Client`; ``target`` is the metrics service's gRPC address.
    """

    _SERVICE = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"]
    _IDEMPOTENT = frozenset({"QueryRecoverySummary", "QueryTimeSeries", "GetReport"})

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_METRICS_TARGET,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        keepalive: KeepaliveOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
            token=token,
            interceptors=interceptors,
        )

    async def ingest(
        self,
        events: Iterable[metrics_pb2.Event] | AsyncIterable[metrics_pb2.Event],
        *,
        batch_size: int = _INGEST_BATCH,
        timeout: float | None = None,
    ) -> int:
        """Streams ``events`` in batches; returns how many were committed.

        The service answers only after committing every event it received, so
        a return means the events are stored. An ingest is never retried: the
        events are consumed as they are sent.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        path = self._path("Ingest")

        async def invoke(channel: grpc.aio.Channel, seconds: float) -> metrics_pb2.IngestResponse:
            multicallable = channel.stream_unary(
                path,
                request_serializer=_serialize,
                response_deserializer=metrics_pb2.IngestResponse.FromString,
            )
            return await multicallable(
                _ingest_batches(events, batch_size),
                timeout=seconds,
                metadata=self._transport.metadata,
            )

        response = await self._transport.call(
            invoke, timeout=timeout, idempotent=False, replayable=False
        )
        return response.committed

    async def recovery_summary(
        self,
        *,
        group_by: Sequence[str] = (),
        run_id: str = "",
        time_range: TimeRangeArg = None,
        timeout: float | None = None,
    ) -> list[metrics_pb2.RecoverySummaryRow]:
        """Returns recovery-time percentiles and success rates per group.

        Args:
            group_by: any of "scenario", "strategy", "model",
                "execution_provider", "run_id", "breakers_enabled".
            run_id: only this campaign run's recoveries.
            time_range: a TimeRange, or a (start, end) pair of aware datetimes
                (None for an open end).
            timeout: deadline in seconds; the client's default when None.
        """
        request = metrics_pb2.QueryRecoverySummaryRequest(
            group_by=list(group_by), run_id=run_id, time_range=_time_range(time_range)
        )
        response = await self._unary(
            "QueryRecoverySummary",
            request,
            metrics_pb2.QueryRecoverySummaryResponse,
            timeout=timeout,
        )
        return list(response.rows)

    async def time_series(
        self,
        metric: str,
        *,
        time_range: TimeRangeArg,
        bucket_s: float,
        timeout: float | None = None,
    ) -> list[metrics_pb2.TimeSeriesPoint]:
        """Returns ``metric`` in buckets of ``bucket_s`` seconds, oldest first.

        ``metric`` is one of "request_rate", "request_latency_p50_ms",
        "request_latency_p95_ms", "recoveries", "agent_memory_bytes".
        """
        if bucket_s <= 0:
            raise ValueError("bucket_s must be positive")
        request = metrics_pb2.QueryTimeSeriesRequest(
            metric=metric, time_range=_time_range(time_range), bucket=_duration(bucket_s)
        )
        response = await self._unary(
            "QueryTimeSeries", request, metrics_pb2.QueryTimeSeriesResponse, timeout=timeout
        )
        return list(response.points)

    async def report(
        self, *, format: str = "json", run_id: str = "", timeout: float | None = None
    ) -> bytes:
        """Renders a report over the stored events: "json", "markdown", "html" or "junit".

        ``run_id`` restricts it to one campaign run; empty covers everything stored.
        """
        wire_format = _REPORT_FORMATS.get(format.strip().lower())
        if wire_format is None:
            raise ValueError(
                f"unknown report format {format!r}; valid values: json, markdown, html, junit"
            )
        response = await self._unary(
            "GetReport",
            metrics_pb2.GetReportRequest(format=wire_format, run_id=run_id),
            metrics_pb2.GetReportResponse,
            timeout=timeout,
        )
        return response.content
