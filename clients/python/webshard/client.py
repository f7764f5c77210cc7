"""Synchronous clients for the webshard services.

Each wraps its async counterpart in :mod:`webshard.aio` and runs it on a
private event loop in a background thread, so deadlines, retries, failover and
leader-following are implemented once, in the async clients, and behave the
same here. A sync client may be shared between threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from webshard import aio
from webshard.common.v1 import common_pb2
from webshard.coordinator.v1 import coordinator_pb2
from webshard.fault_injector.v1 import fault_injector_pb2
from webshard.metrics.v1 import metrics_pb2
from webshard.options import KeepaliveOptions, RetryPolicy
from webshard.recovery.v1 import recovery_pb2

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["Client", "FaultInjectorClient", "MetricsClient", "RecoveryClient"]

_T = TypeVar("_T")


class _LoopThread:
    """An event loop running in a daemon thread, and a way to run coroutines on it.

    The thread is a daemon so a client never closed does not keep the
    interpreter alive at exit.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Runs ``coro`` on the loop and waits for its result in the calling thread."""
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # A KeyboardInterrupt in the caller must not leave the call running.
            future.cancel()
            raise

    def iterate(self, stream: AsyncIterator[_T]) -> Generator[_T, None, None]:
        """Turns an async iterator living on the loop into a blocking iterator."""

        async def next_item() -> _T:
            return await anext(stream)

        async def close_stream() -> None:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                try:
                    item = self.run(next_item())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._closed:
                self.run(close_stream())

    def close(self) -> None:
        """Stops the loop and joins its thread; later calls raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class _SyncClient:
    """Life cycle and health check shared by the sync clients."""

    _aio: aio.Client | aio.FaultInjectorClient | aio.RecoveryClient | aio.MetricsClient

    def __init__(self) -> None:
        self._runner = _LoopThread(f"webshard-{type(self).__name__}")

    @property
    def address(self) -> str:
        """The replica address calls go to now (the leader, once one is known)."""
        return self._aio.address

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every replica address known, leaders learned from redirects included."""
        return self._aio.addresses

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channels and stops the client's event loop thread."""
        try:
            self._runner.run(self._aio.close())
        except RuntimeError:
            return
        finally:
            self._runner.close()

    def check_health(self, *, service: str = "", timeout: float | None = None) -> bool:
        """Asks the standard gRPC health service whether ``service`` is serving.

        See :meth:`webshard.aio.Client.check_health`.
        """
        return self._runner.run(self._aio.check_health(service=service, timeout=timeout))


class Client(_SyncClient):
    """Client of the coordinator: deploy models, run inference, read the cluster.

    The blocking form of :class:`webshard.aio.Client`, with the same arguments
    and behaviour. Use it as ``with webshard.Client(...) as client:`` or call
    :meth:`close`.

    Args:
        target: coordinator replica addresses (a list, or one string separated by commas).
        token: the cluster token, sent on every call (see :class:`webshard.aio.Client`).
        timeout: default deadline of each call, in seconds.
        retry: retries of idempotent calls on UNAVAILABLE; default RetryPolicy().
        keepalive: keepalive pings; default KeepaliveOptions().
        max_message_bytes: largest message sent or received.
    """

    _aio: aio.Client

    def __init__(
        self,
        target: str | Sequence[str] = aio.DEFAULT_COORDINATOR_TARGET,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        keepalive: KeepaliveOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._aio = aio.Client(
            target,
            token=token,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
        )
        super().__init__()

    def cluster_status(
        self, *, timeout: float | None = None
    ) -> coordinator_pb2.ClusterStatusResponse:
        """Returns the replicas, the leader, the agents and the deployed models."""
        return self._runner.run(self._aio.cluster_status(timeout=timeout))

    def list_agents(
        self, *, include_unhealthy: bool = False, timeout: float | None = None
    ) -> list[common_pb2.AgentInfo]:
        """Returns the agent registry; ``include_unhealthy`` adds agents no longer heartbeating."""
        return self._runner.run(
            self._aio.list_agents(include_unhealthy=include_unhealthy, timeout=timeout)
        )

    def deploy(
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
        """Cuts ``model`` into shards and places them; see :meth:`webshard.aio.Client.deploy`."""
        return self._runner.run(
            self._aio.deploy(
                model,
                sharding=sharding,
                shards=shards,
                replicas=replicas,
                standby=standby,
                runtime=runtime,
                ep=ep,
                recovery_strategy=recovery_strategy,
                request_id=request_id,
                timeout=timeout,
                spares=spares,
                engines=engines,
            )
        )

    def placement(self, model: str, *, timeout: float | None = None) -> coordinator_pb2.Placement:
        """Returns where the deployed ``model``'s shards live."""
        return self._runner.run(self._aio.placement(model, timeout=timeout))

    def undeploy(self, model: str, *, timeout: float | None = None) -> int:
        """Removes ``model`` from every agent; returns the number of shard replicas unloaded."""
        return self._runner.run(self._aio.undeploy(model, timeout=timeout))

    def infer(
        self,
        model: str,
        *,
        texts: str | Sequence[str] | None = None,
        inputs: Mapping[str, npt.ArrayLike] | None = None,
        request_id: str | None = None,
        pins: Mapping[int, str] | None = None,
        timeout: float | None = None,
    ) -> aio.InferResult:
        """Runs one request through ``model``; see :meth:`webshard.aio.Client.infer`."""
        return self._runner.run(
            self._aio.infer(
                model,
                texts=texts,
                inputs=inputs,
                request_id=request_id,
                pins=pins,
                timeout=timeout,
            )
        )

    def replace_shard(
        self,
        model: str,
        shard_index: int,
        agent_id: str,
        browser_id: str = "",
        *,
        avoid: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> coordinator_pb2.ReplaceShardResponse:
        """Moves a shard's replica; see :meth:`webshard.aio.Client.replace_shard`."""
        return self._runner.run(
            self._aio.replace_shard(
                model, shard_index, agent_id, browser_id, avoid=avoid, timeout=timeout
            )
        )

    def verify_shard(
        self,
        model: str,
        shard_index: int,
        agent_id: str,
        browser_id: str = "",
        *,
        timeout: float | None = None,
    ) -> coordinator_pb2.VerifyShardResponse:
        """Checks one shard copy from a kept activation; see
        :meth:`webshard.aio.Client.verify_shard`."""
        return self._runner.run(
            self._aio.verify_shard(model, shard_index, agent_id, browser_id, timeout=timeout)
        )

    def restart_browser(
        self, agent_id: str, browser_id: str, *, timeout: float | None = None
    ) -> coordinator_pb2.RestartBrowserResponse:
        """Restarts a browser; see :meth:`webshard.aio.Client.restart_browser`."""
        return self._runner.run(self._aio.restart_browser(agent_id, browser_id, timeout=timeout))

    def pause_model(
        self, model: str, *, max_pause_s: float = 10.0, timeout: float | None = None
    ) -> str:
        """Holds new requests; see :meth:`webshard.aio.Client.pause_model`."""
        return self._runner.run(
            self._aio.pause_model(model, max_pause_s=max_pause_s, timeout=timeout)
        )

    def resume_model(
        self, model: str, barrier_id: str = "", *, timeout: float | None = None
    ) -> coordinator_pb2.ResumeModelResponse:
        """Lifts a barrier; see :meth:`webshard.aio.Client.resume_model`."""
        return self._runner.run(self._aio.resume_model(model, barrier_id, timeout=timeout))


class FaultInjectorClient(_SyncClient):
    """Client of the fault injector: the blocking form of :class:`aio.FaultInjectorClient`."""

    _aio: aio.FaultInjectorClient

    def __init__(
        self,
        target: str | Sequence[str] = aio.DEFAULT_FAULT_INJECTOR_TARGET,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        keepalive: KeepaliveOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._aio = aio.FaultInjectorClient(
            target,
            token=token,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
        )
        super().__init__()

    def inject(
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
        """Injects a fault; see :meth:`webshard.aio.FaultInjectorClient.inject`."""
        return self._runner.run(
            self._aio.inject(
                spec,
                kind=kind,
                intensity=intensity,
                target=target,
                duration_s=duration_s,
                dry_run=dry_run,
                force=force,
                labels=labels,
                timeout=timeout,
            )
        )

    def get_fault(self, fault_id: str, *, timeout: float | None = None) -> fault_injector_pb2.Fault:
        """Returns one fault."""
        return self._runner.run(self._aio.get_fault(fault_id, timeout=timeout))

    def list_faults(
        self, *, states: Iterable[str] = (), timeout: float | None = None
    ) -> list[fault_injector_pb2.Fault]:
        """Returns faults oldest first; ``states`` ("active", "refused", ...) filters."""
        return self._runner.run(self._aio.list_faults(states=states, timeout=timeout))

    def revert(self, fault_id: str, *, timeout: float | None = None) -> fault_injector_pb2.Fault:
        """Reverts one fault before its duration ends; returns it after the revert."""
        return self._runner.run(self._aio.revert(fault_id, timeout=timeout))

    def revert_all(self, *, timeout: float | None = None) -> int:
        """Reverts every active fault (the kill switch); returns how many were reverted."""
        return self._runner.run(self._aio.revert_all(timeout=timeout))

    def watch_faults(
        self, *, include_existing: bool = False, timeout: float | None = None
    ) -> Generator[fault_injector_pb2.Fault, None, None]:
        """Yields every change to every fault; see :meth:`aio.FaultInjectorClient.watch_faults`."""
        return self._runner.iterate(
            self._aio.watch_faults(include_existing=include_existing, timeout=timeout)
        )


class RecoveryClient(_SyncClient):
    """Client of the recovery service: the blocking form of :class:`aio.RecoveryClient`."""

    _aio: aio.RecoveryClient

    def __init__(
        self,
        target: str | Sequence[str] = aio.DEFAULT_RECOVERY_TARGET,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        keepalive: KeepaliveOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._aio = aio.RecoveryClient(
            target,
            token=token,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
        )
        super().__init__()

    def report_failure(
        self,
        report: recovery_pb2.FailureReport,
        *,
        strategy: str | None = None,
        timeout: float | None = None,
    ) -> recovery_pb2.ReportFailureResponse:
        """Hands a detected failure to recovery; see :meth:`aio.RecoveryClient.report_failure`."""
        return self._runner.run(
            self._aio.report_failure(report, strategy=strategy, timeout=timeout)
        )

    def get_recovery(
        self, recovery_id: str, *, timeout: float | None = None
    ) -> recovery_pb2.Recovery:
        """Returns one recovery, with its phases."""
        return self._runner.run(self._aio.get_recovery(recovery_id, timeout=timeout))

    def list_recoveries(
        self, *, limit: int = 0, timeout: float | None = None
    ) -> list[recovery_pb2.Recovery]:
        """Returns recent recoveries, newest first; ``limit`` 0 means the service's default."""
        return self._runner.run(self._aio.list_recoveries(limit=limit, timeout=timeout))

    def watch_recoveries(
        self, *, include_existing: bool = False, timeout: float | None = None
    ) -> Generator[recovery_pb2.Recovery, None, None]:
        """Yields every change to every recovery; ``timeout`` as for watch_faults."""
        return self._runner.iterate(
            self._aio.watch_recoveries(include_existing=include_existing, timeout=timeout)
        )

    def list_breakers(self, *, timeout: float | None = None) -> list[recovery_pb2.Breaker]:
        """Returns every circuit breaker."""
        return self._runner.run(self._aio.list_breakers(timeout=timeout))

    def get_breaker(
        self, target_id: str, *, scope: str | None = None, timeout: float | None = None
    ) -> recovery_pb2.Breaker:
        """Returns the breaker of an agent ("agent-1") or a browser ("agent-1/b0")."""
        return self._runner.run(self._aio.get_breaker(target_id, scope=scope, timeout=timeout))

    def reset_breaker(
        self, target_id: str, *, scope: str | None = None, timeout: float | None = None
    ) -> recovery_pb2.Breaker:
        """Closes a breaker by hand; returns it after the reset."""
        return self._runner.run(self._aio.reset_breaker(target_id, scope=scope, timeout=timeout))


class MetricsClient(_SyncClient):
    """Client of the metrics service: the blocking form of :class:`aio.MetricsClient`."""

    _aio: aio.MetricsClient

    def __init__(
        self,
        target: str | Sequence[str] = aio.DEFAULT_METRICS_TARGET,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        keepalive: KeepaliveOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._aio = aio.MetricsClient(
            target,
            token=token,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
        )
        super().__init__()

    def ingest(
        self,
        events: Iterable[metrics_pb2.Event],
        *,
        batch_size: int = 500,
        timeout: float | None = None,
    ) -> int:
        """Streams ``events`` in batches; returns how many were committed."""
        return self._runner.run(self._aio.ingest(events, batch_size=batch_size, timeout=timeout))

    def recovery_summary(
        self,
        *,
        group_by: Sequence[str] = (),
        run_id: str = "",
        time_range: aio.TimeRangeArg = None,
        timeout: float | None = None,
    ) -> list[metrics_pb2.RecoverySummaryRow]:
        """Returns recovery-time percentiles and success rates per group."""
        return self._runner.run(
            self._aio.recovery_summary(
                group_by=group_by, run_id=run_id, time_range=time_range, timeout=timeout
            )
        )

    def time_series(
        self,
        metric: str,
        *,
        time_range: aio.TimeRangeArg,
        bucket_s: float,
        timeout: float | None = None,
    ) -> list[metrics_pb2.TimeSeriesPoint]:
        """Returns ``metric`` in buckets of ``bucket_s`` seconds, oldest first."""
        return self._runner.run(
            self._aio.time_series(metric, time_range=time_range, bucket_s=bucket_s, timeout=timeout)
        )

    def report(
        self, *, format: str = "json", run_id: str = "", timeout: float | None = None
    ) -> bytes:
        """Renders a report: "json", "markdown", "html" or "junit"."""
        return self._runner.run(self._aio.report(format=format, run_id=run_id, timeout=timeout))
