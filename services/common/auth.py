"""The bearer tokens that guard webshard's calls, checked the same way by every service.

Two tokens, both sent as ``authorization: Bearer <token>`` metadata:

- The cluster token (``WEBSHARD_CLUSTER_TOKEN``, every service) guards the calls
  that change state: each service names them in one frozenset next to its servicer,
  and ``TokenInterceptor`` refuses them without the token. Reads stay open. Every
  internal caller sends it.
- The fault token (``WEBSHARD_FAULT_TOKEN``) guards fault injection: the
  fault-injector requires it of its callers and sends it to the agents it asks to
  perform fault hooks; an agent configured with it requires it of those calls
  (``require_token``). A service whose fault token is empty uses its cluster token
  in its place (``fault_token``), so a cluster with only a cluster token set does
  not leave fault injection open.

A service with neither token configured checks nothing.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]  # subscriptable only in the stubs

log = logging.getLogger(__name__)

_BEARER = "bearer "


CLUSTER_TOKEN_ENV = "WEBSHARD_CLUSTER_TOKEN"
"""The environment variable (and, as --cluster-token, the flag) of the cluster token."""


def methods(service: str, *names: str) -> frozenset[str]:
    """Full method names ("/pkg.Service/Method") of ``names`` in ``service``."""
    return frozenset(f"/{service}/{name}" for name in names)


def fault_token(fault: str, cluster: str) -> str:
    """The token that guards fault injection: the fault token, else the cluster token."""
    return fault or cluster


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token``; none for an empty token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


async def require_token(
    context: grpc.aio.ServicerContext[object, object], token: str, *, method: str, service: str
) -> None:
    """Abort the call unless it carries ``authorization: Bearer <token>``.

    None is UNAUTHENTICATED, a wrong one PERMISSION_DENIED; an empty ``token``
    lets every call through. The comparison takes the same time however much of
    the token matches.
    """
    if not token:
        return
    given = _bearer(context.invocation_metadata())
    if not given:
        log.warning("call without a fault token refused", extra={"method": method})
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"this {service} requires 'authorization: Bearer <token>' metadata "
            "(the fault token: WEBSHARD_FAULT_TOKEN, or WEBSHARD_CLUSTER_TOKEN when that is "
            "empty)",
        )
    if not hmac.compare_digest(given.encode(), token.encode()):
        log.warning("call with a wrong fault token refused", extra={"method": method})
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the fault token is wrong")


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The token of the call's ``authorization: Bearer`` metadata; "" when there is none."""
    values = [value for key, value in (metadata or ()) if key.lower() == "authorization"]
    raw = values[0] if values else ""
    header = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return header[len(_BEARER) :].strip() if header.lower().startswith(_BEARER) else ""


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls of ``guarded`` methods (full names, "/pkg.Service/Method") that do not
    carry ``authorization: Bearer <token>``: UNAUTHENTICATED without one, PERMISSION_DENIED
    for a wrong one. Every other method, and every call when ``token`` is empty, goes
    through untouched.

    The check reads the metadata gRPC hands the interceptor, before the method's handler
    exists; a refused call runs none of the service's code (a request stream is not read).
    """

    def __init__(self, token: str, guarded: frozenset[str]) -> None:
        self._token = token.encode()
        self._guarded = guarded if token else frozenset()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """The method's own handler, or one that ends the call with the refusal."""
        method = handler_call_details.method
        if method not in self._guarded:
            return await continuation(handler_call_details)
        given = _bearer(handler_call_details.invocation_metadata)
        if given and hmac.compare_digest(given.encode(), self._token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if given:
            log.warning("call with a wrong cluster token refused", extra={"method": method})
            code = grpc.StatusCode.PERMISSION_DENIED
            message = f"the cluster token is wrong ({CLUSTER_TOKEN_ENV})"
        else:
            log.warning("call without a cluster token refused", extra={"method": method})
            code = grpc.StatusCode.UNAUTHENTICATED
            message = (
                f"{method} changes the cluster's state and requires "
                f"'authorization: Bearer <token>' metadata (the cluster token, {CLUSTER_TOKEN_ENV})"
            )
        return _refusal(handler, code, message)


def _refusal(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of ``handler``'s kind that ends every call with ``code`` and ``message``."""

    async def refuse(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    # Requests stay raw bytes: a refused call's request is never looked at, so one
    # that would not decode is refused for its missing token all the same.
    deserialize = serialize = None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, deserialize, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, deserialize, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserialize, serialize)
    return grpc.unary_unary_rpc_method_handler(refuse, deserialize, serialize)


class _Bearer:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnaryBearer(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """The call, with the token."""
        return await continuation(self._details(details), request)


class _UnaryStreamBearer(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """The call, with the token."""
        return await continuation(self._details(details), request)


class _StreamUnaryBearer(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        """The call, with the token."""
        return await continuation(self._details(details), requests)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``token`` on every unary, server-streaming and
    client-streaming call of a channel; none for an empty token.

    One per kind: a grpc.aio channel files each interceptor under the first kind it
    implements. Bidi streams pass the token per call (grpc.aio's stream-stream
    interceptors wrap ``write``, which the RunShard and session streams use).
    """
    if not token:
        return []
    return [_UnaryUnaryBearer(token), _UnaryStreamBearer(token), _StreamUnaryBearer(token)]
