"""The bearer token that guards fault injection, checked the same way by every service.

The fault-injector requires it of its callers and sends it to the agents it asks to
perform fault hooks; an agent configured with it requires it of those calls. A
service without a token configured checks nothing.
"""

from __future__ import annotations

import hmac
import logging

import grpc

log = logging.getLogger(__name__)

_BEARER = "bearer "


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
    values = [
        value
        for key, value in (context.invocation_metadata() or ())
        if key.lower() == "authorization"
    ]
    raw = values[0] if values else ""
    header = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    given = header[len(_BEARER) :].strip() if header.lower().startswith(_BEARER) else ""
    if not given:
        log.warning("call without a fault token refused", extra={"method": method})
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"this {service} requires 'authorization: Bearer <token>' metadata "
            "(the fault token, WEBSHARD_FAULT_TOKEN)",
        )
    if not hmac.compare_digest(given.encode(), token.encode()):
        log.warning("call with a wrong fault token refused", extra={"method": method})
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the fault token is wrong")
