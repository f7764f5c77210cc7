"""Domain errors that carry their gRPC status, and short, quoted error messages.

A servicer (or the domain code under it) raises a ``DomainError`` instead of
calling ``context.abort``; the server interceptor every service runs
(``services.common.interceptor``) ends the call with its code and message.
Messages are kept short on the way out: gRPC sends them as a trailer, and a
trailer over the peer's metadata limit (8 KiB by default) turns the whole
answer into RESOURCE_EXHAUSTED "Stream removed". ``quote`` is how a message
names what it rejects: a short prefix and the full length, never the value.
"""

from __future__ import annotations

import grpc

MAX_MESSAGE_CHARS = 300
"""Longest error message sent to a client; longer ones are cut and end with "…"."""


class DomainError(Exception):
    """A request the service cannot do, and the gRPC status that says why.

    Subclass it with the same ``(code, message)`` shape, or raise one of the
    fixed-code subclasses below (``NotFound("no model " + quote(name))``).
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers
        """Trailing metadata the call ends with (where to retry, say)."""


class _FixedCode(DomainError):
    """A DomainError whose code is fixed by its class."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(self.status, message, trailers)


class InvalidArgument(_FixedCode):
    """The request itself is wrong; sending it again will not help."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(_FixedCode):
    """What the request names does not exist."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(_FixedCode):
    """What the request would create exists already."""

    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(_FixedCode):
    """The system is not in a state where the request can be done (yet)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(_FixedCode):
    """Not now: retrying (perhaps elsewhere) may succeed."""

    status = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(_FixedCode):
    """A limit (memory, size, quota) would be exceeded."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(_FixedCode):
    """The work did not finish in the time it had."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(_FixedCode):
    """The caller may not do this."""

    status = grpc.StatusCode.PERMISSION_DENIED


class Aborted(_FixedCode):
    """A conflict with a concurrent change; retry from the start."""

    status = grpc.StatusCode.ABORTED


def quote(value: str | bytes, limit: int = 64) -> str:
    """``value`` as a message may show it: its repr, or that of its first ``limit``
    characters followed by "…" and the full length."""
    if len(value) <= limit:
        return repr(value)
    unit = "bytes" if isinstance(value, bytes) else "characters"
    return f"{value[:limit]!r}… ({len(value)} {unit})"


def shorten(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters, ending with "…" when cut."""
    if len(message) <= limit:
        return message
    return message[: limit - 1] + "…"
