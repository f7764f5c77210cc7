"""The cluster as the coordinator knows it: agents, placements, and which replica leads.

Agents and placements are read through the SDK from the leader (linearizable
reads); replica roles come from ClusterStatus asked of every replica in turn,
because each one reports only its own role.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from webshard.aio import Client
from webshard.coordinator.v1 import coordinator_pb2
from webshard.errors import NotFoundError, RPCError
from webshard.options import RetryPolicy

from services.fault_injector.injector import ViewRequest
from services.fault_injector.spec import FaultError
from services.fault_injector.targets import ClusterView, Replica

# One quick retry: a fault is resolved against the cluster as it is now, and a
# coordinator that cannot answer within the timeout is reported, not waited for.
_RETRY = RetryPolicy(max_attempts=2)


class CoordinatorCluster:
    """A ClusterSource that asks the coordinator replicas."""

    def __init__(self, coordinators: Sequence[str], *, timeout_s: float = 5.0) -> None:
        self._coordinators = list(coordinators)
        self._timeout = timeout_s
        self._client: Client | None = None

    def _leader_client(self) -> Client:
        # Made on first use: grpc.aio channels belong to the running event loop.
        if self._client is None:
            self._client = Client(self._coordinators, timeout=self._timeout, retry=_RETRY)
        return self._client

    async def view(self, request: ViewRequest) -> ClusterView:
        """The agents, placements and replicas ``request`` asks for."""
        view = ClusterView()
        client = self._leader_client()
        try:
            if request.agents:
                # Unhealthy agents too: a selector may name one whose session is down.
                view.agents = await client.list_agents(include_unhealthy=True)
            models = request.models
            if models is None:
                status = await client.cluster_status()
                models = frozenset(p.model for p in status.placements)
            for model in sorted(models):
                with contextlib.suppress(NotFoundError):  # resolution names what is missing
                    view.placements[model] = await client.placement(model)
        except RPCError as exc:
            raise FaultError(
                "UNAVAILABLE", f"the coordinator could not describe the cluster: {exc}"
            ) from exc
        if request.replicas:
            view.replicas = await self._replicas()
        return view

    async def _replicas(self) -> list[Replica]:
        async def ask(address: str) -> Replica | None:
            try:
                async with Client(address, timeout=self._timeout, retry=_RETRY) as one:
                    status = await one.cluster_status()
            except RPCError:
                return None  # a stopped or unreachable replica leads nothing
            me = next(
                (r for r in status.replicas if r.replica_id == status.replica_id),
                coordinator_pb2.ReplicaInfo(replica_id=status.replica_id),
            )
            return Replica(
                replica_id=status.replica_id,
                address=address,
                role=me.role,
                term=me.term,
                leader_id=status.leader_id,
            )

        answers = await asyncio.gather(*(ask(a) for a in self._coordinators))
        replicas = [r for r in answers if r is not None]
        if not replicas:
            raise FaultError(
                "UNAVAILABLE",
                f"no coordinator replica answered ({', '.join(self._coordinators)})",
            )
        return replicas

    async def close(self) -> None:
        """Close the channels."""
        if self._client is not None:
            await self._client.close()
            self._client = None
