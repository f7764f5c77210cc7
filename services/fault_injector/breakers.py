"""Breaker states from the recovery service, for the injector to adapt to.

A breaker recovery has never heard of is closed. When recovery cannot be asked
(it is down, or this version does not serve breakers yet) every breaker is
treated as closed, and the fault's detail says so: injecting blind is the
injector's job, and refusing every fault would hide that recovery is missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from webshard.aio import RecoveryClient
from webshard.errors import (
    DeadlineExceededError,
    NotFoundError,
    RPCError,
    UnavailableError,
    UnimplementedError,
)
from webshard.options import RetryPolicy

from services.fault_injector.injector import BreakerStates

_RETRY = RetryPolicy(max_attempts=2)


class RecoveryBreakers:
    """A BreakerSource that asks the recovery service."""

    def __init__(self, address: str, *, timeout_s: float = 2.0) -> None:
        self._address = address
        self._timeout = timeout_s
        self._client: RecoveryClient | None = None

    async def states(self, keys: Sequence[tuple[str, str]]) -> BreakerStates:
        """Each breaker's state; all closed, with a note, when recovery cannot say."""
        if self._client is None:
            self._client = RecoveryClient(self._address, timeout=self._timeout, retry=_RETRY)
        client = self._client

        async def one(scope: str, target_id: str) -> tuple[tuple[str, str], int | None]:
            try:
                breaker = await client.get_breaker(target_id, scope=scope)
            except NotFoundError:
                return (scope, target_id), None
            return (scope, target_id), int(breaker.state)

        try:
            answers = await asyncio.gather(*(one(scope, tid) for scope, tid in keys))
        except (UnavailableError, UnimplementedError, DeadlineExceededError) as exc:
            return BreakerStates(
                {},
                note=(
                    f"breakers unknown (recovery at {self._address} answered "
                    f"{exc.code.name}); treated as CLOSED"
                ),
            )
        except RPCError as exc:
            return BreakerStates(
                {},
                note=f"breakers unknown (recovery at {self._address}: {exc}); treated as CLOSED",
            )
        return BreakerStates({key: state for key, state in answers if state is not None})

    async def close(self) -> None:
        """Close the channel."""
        if self._client is not None:
            await self._client.close()
            self._client = None
