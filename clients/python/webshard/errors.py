"""Typed errors raised by the webshard clients.

Every failed call raises an :class:`RPCError` subclass chosen by the gRPC
status code, never a raw ``grpc.RpcError``, so callers can write
``except NotFoundError`` instead of comparing codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCCancelledError",
    "RPCError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "from_rpc_error",
]

# The rich error model (google.rpc.Status) travels in this trailing metadata key.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

_WIRE_VARINT = 0
_WIRE_FIXED64 = 1
_WIRE_LEN = 2
_WIRE_FIXED32 = 5


class RPCError(Exception):
    """A call failed with a gRPC status.

    Attributes:
        code: the status code.
        message: the server's message, meant for a person.
        details: the rich error details (``google.rpc.Status.details``) the
            server attached, as ``Any`` messages; empty when it sent none.
        trailing_metadata: the call's trailing metadata as (key, value) pairs.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    """The status code; subclasses fix it."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: Iterable[any_pb2.Any] = (),
        trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> None:
        if code is not None:
            self.code = code
        self.message = message
        self.details: tuple[any_pb2.Any, ...] = tuple(details)
        self.trailing_metadata: tuple[tuple[str, str | bytes], ...] = tuple(trailing_metadata)
        super().__init__(f"{self.code.name}: {message}" if message else self.code.name)

    def metadata_value(self, key: str) -> str | None:
        """Returns the first trailing metadata value under ``key`` as text, if any."""
        for name, value in self.trailing_metadata:
            if name == key:
                return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return None


class InvalidArgumentError(RPCError):
    """The request was malformed: a field is missing, out of range or unknown."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RPCError):
    """The named model, agent, fault, recovery or breaker does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(RPCError):
    """The thing to be created exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(RPCError):
    """The system is not in a state that allows the call (for example, no leader)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(RPCError):
    """A limit was reached: memory budget, queue depth, message size or quota."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDeniedError(RPCError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(RPCError):
    """The call carried no valid credentials (for example, a missing fault token)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class UnavailableError(RPCError):
    """No replica could take the call, after retries and failover."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(RPCError):
    """The call's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnimplementedError(RPCError):
    """The server does not implement the method."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(RPCError):
    """The server broke an invariant of its own; worth a bug report."""

    code = grpc.StatusCode.INTERNAL


class RPCCancelledError(RPCError):
    """The call was cancelled, by the client or the server.

    Named so that it does not shadow ``asyncio.CancelledError``.
    """

    code = grpc.StatusCode.CANCELLED


class AbortedError(RPCError):
    """The call lost a concurrency race (for example, a placement changed under it)."""

    code = grpc.StatusCode.ABORTED


_ERROR_BY_CODE: dict[grpc.StatusCode, type[RPCError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        PermissionDeniedError,
        UnauthenticatedError,
        UnavailableError,
        DeadlineExceededError,
        UnimplementedError,
        InternalError,
        RPCCancelledError,
        AbortedError,
    )
}


def from_rpc_error(e: grpc.RpcError) -> RPCError:
    """Turns a raw ``grpc.RpcError`` (sync or aio) into the typed :class:`RPCError`."""
    code_of = getattr(e, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_of = getattr(e, "details", None)
    message = details_of() if callable(details_of) else str(e)
    metadata = trailing_metadata_pairs(e)
    cls = _ERROR_BY_CODE.get(code, RPCError)
    return cls(
        message or "",
        code=code,
        details=_status_details(metadata),
        trailing_metadata=metadata,
    )


def trailing_metadata_pairs(e: grpc.RpcError) -> list[tuple[str, str | bytes]]:
    """Returns a raw error's trailing metadata as (key, value) pairs.

    The sync API returns a tuple of metadata items, the aio API a
    ``grpc.aio.Metadata`` or None; both iterate as (key, value).
    """
    metadata_of = getattr(e, "trailing_metadata", None)
    metadata: Any = metadata_of() if callable(metadata_of) else None
    pairs: list[tuple[str, str | bytes]] = []
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(key, str) and isinstance(value, str | bytes):
            pairs.append((key, value))
    return pairs


def _status_details(metadata: Iterable[tuple[str, str | bytes]]) -> list[any_pb2.Any]:
    """Decodes the Any details of the google.rpc.Status in the trailing metadata.

    The SDK does not depend on googleapis-common-protos, so the three-field
    Status message (code=1, message=2, repeated Any details=3) is read from
    the wire format directly.
    """
    for key, value in metadata:
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            return [
                any_pb2.Any.FromString(payload)
                for number, payload in iter_wire_fields(value)
                if number == 3 and isinstance(payload, bytes)
            ]
        except ValueError:
            # A malformed details blob must not hide the status it came with.
            return []
    return []


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def iter_wire_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yields (field number, value) for each field of a serialized protobuf message.

    Varints come as ints, length-delimited fields as bytes; fixed-width fields
    are skipped. Raises ValueError on malformed input.
    """
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 0x7
        if wire_type == _WIRE_VARINT:
            value, pos = _read_varint(data, pos)
            yield number, value
        elif wire_type == _WIRE_LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated length-delimited field")
            yield number, data[pos : pos + length]
            pos += length
        elif wire_type == _WIRE_FIXED64:
            pos += 8
        elif wire_type == _WIRE_FIXED32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if pos != len(data):
        raise ValueError("truncated fixed-width field")


def encode_string_field(number: int, value: str) -> bytes:
    """Serializes one protobuf string field; an empty string is omitted, as proto3 does."""
    raw = value.encode("utf-8")
    if not raw:
        return b""
    return _varint((number << 3) | _WIRE_LEN) + _varint(len(raw)) + raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
