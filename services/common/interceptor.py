"""The server interceptor every service runs: bad requests and errors get honest statuses.

- A request that cannot be decoded (not protobuf, bad UTF-8 in a string field)
  ends with INVALID_ARGUMENT "the request is not a valid <message>", not UNKNOWN
  with a DecodeError dump. gRPC decodes before the handler runs and turns a
  decoding exception into UNKNOWN, so the method's deserializer is wrapped: a
  failure becomes a ``_Refused`` value that the handler's wrapper (or, for a
  request stream, its iterator) turns into the status.
- A request with an enum field (at any depth, repeated or in a map) whose value
  its enum does not define ends with INVALID_ARGUMENT naming the field and the
  allowed names. proto3 enums are open, so such values decode fine and would
  otherwise reach the servicer as a bare int.
- A ``DomainError`` raised by a servicer ends the call with its code and message.
- Every message sent with an error is cut to ``MAX_MESSAGE_CHARS``: a long one
  (a 5 MB model name echoed back) would exceed the client's metadata limit and
  arrive as RESOURCE_EXHAUSTED "Stream removed" instead of the real status.
  Exceptions nobody expected still end with UNKNOWN (a servicer bug to fix),
  worded as gRPC words them but short.

``serve`` installs it after OpenTelemetry's interceptor, so it runs inside the
call's span and aborts through the span-recording context.

Cost on the hot paths (Infer, RunShard): the wrapped handlers are built once per
method; the enum check looks up a per-descriptor plan of the fields that can hold
an enum and returns at once for messages with none. Tensor payloads are bytes
fields and are never looked at.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.message import Message

from services.common.errors import DomainError, quote, shorten

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]  # subscriptable only in the stubs


@dataclass(frozen=True, slots=True)
class _Refused:
    """What the wrapped deserializer returns for a request the service must refuse."""

    message: str


# What a plan step looks at (see ``EnumCheck``).
_ENUM, _ENUMS, _ENUM_MAP, _MESSAGE, _MESSAGES, _MESSAGE_MAP = range(6)


@dataclass(frozen=True, slots=True)
class _Step:
    """One field of a message that holds an enum, or a message that can hold one."""

    name: str
    kind: int
    allowed: frozenset[int] = frozenset()
    enum: EnumDescriptor | None = None


class EnumCheck:
    """Finds enum values that their enum does not define, anywhere in a message.

    Per message type it keeps a plan: the fields that are enums, and the message
    fields whose type can (at some depth) hold one. A type with an empty plan is
    not walked at all.
    """

    def __init__(self) -> None:
        self._plans: dict[Descriptor, tuple[_Step, ...]] = {}

    def problem(self, message: Message) -> str | None:
        """Why ``message`` must be refused, or None when all its enum values are defined."""
        plan = self._plan(message.DESCRIPTOR)
        if not plan:
            return None
        return self._walk(message, plan, "")

    def _walk(self, message: Message, plan: tuple[_Step, ...], prefix: str) -> str | None:
        for step in plan:
            kind = step.kind
            if kind == _MESSAGE:
                if not message.HasField(step.name):
                    continue
                child: Message = getattr(message, step.name)
                problem = self._walk(child, self._plan(child.DESCRIPTOR), f"{prefix}{step.name}.")
                if problem is not None:
                    return problem
                continue
            value = getattr(message, step.name)
            if kind == _ENUM:
                if value not in step.allowed:
                    return _undefined(f"{prefix}{step.name}", value, step)
            elif kind == _ENUMS:
                for index, item in enumerate(value):
                    if item not in step.allowed:
                        return _undefined(f"{prefix}{step.name}[{index}]", item, step)
            elif kind == _ENUM_MAP:
                for key, item in value.items():
                    if item not in step.allowed:
                        return _undefined(f"{prefix}{step.name}[{_key(key)}]", item, step)
            else:
                items: Iterable[tuple[object, Message]] = (
                    enumerate(value)
                    if kind == _MESSAGES
                    else ((_key(k), v) for k, v in value.items())
                )
                for at, child in items:
                    problem = self._walk(
                        child, self._plan(child.DESCRIPTOR), f"{prefix}{step.name}[{at}]."
                    )
                    if problem is not None:
                        return problem
        return None

    # ``Any``: a message's DESCRIPTOR is typed as the union of upb's and the Python one.
    def _plan(self, descriptor: Any) -> tuple[_Step, ...]:
        plan = self._plans.get(descriptor)
        if plan is None:
            plan = self._plans[descriptor] = tuple(_steps(descriptor))
        return plan


def _steps(descriptor: Descriptor) -> list[_Step]:
    steps = []
    for field in descriptor.fields:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value = entry.fields_by_name["value"]
            if value.enum_type is not None:
                steps.append(_enum_step(field.name, _ENUM_MAP, value.enum_type))
            elif value.message_type is not None and _reaches_enum(value.message_type):
                steps.append(_Step(field.name, _MESSAGE_MAP))
        elif field.enum_type is not None:
            steps.append(
                _enum_step(field.name, _ENUMS if field.is_repeated else _ENUM, field.enum_type)
            )
        elif entry is not None and _reaches_enum(entry):
            steps.append(_Step(field.name, _MESSAGES if field.is_repeated else _MESSAGE))
    return steps


def _enum_step(name: str, kind: int, enum: EnumDescriptor) -> _Step:
    return _Step(name, kind, frozenset(enum.values_by_number), enum)


def _reaches_enum(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold an enum at any depth (recursive types too)."""
    seen = {descriptor}
    pending = [descriptor]
    while pending:
        for field in pending.pop().fields:
            if field.enum_type is not None:
                return True
            child: Descriptor | None = field.message_type
            if child is not None and child not in seen:
                seen.add(child)
                pending.append(child)
    return False


def _key(key: object) -> str:
    return quote(key, 32) if isinstance(key, str) else repr(key)


def _undefined(path: str, value: int, step: _Step) -> str:
    assert step.enum is not None
    names = [v.name for v in step.enum.values]
    # FAULT_KIND_{UNSPECIFIED, CONNECTION_LOST, ...}: every name fits in a short message.
    first, last = min(names), max(names)  # their common prefix is everyone's
    same = next(
        (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first)
    )
    prefix = first[:same].rpartition("_")[0]
    if prefix and len(names) > 1:
        listed = f"{prefix}_{{{', '.join(n.removeprefix(prefix + '_') for n in names)}}}"
    else:
        listed = ", ".join(names)
    return f"{path} is {value}, which {step.enum.name} does not define; use one of {listed}"


class _ShortMessages:
    """A servicer context whose error messages are cut to a length gRPC can carry."""

    __slots__ = ("_context", "aborted", "code_set")

    def __init__(self, context: Any) -> None:
        self._context = context
        self.aborted = False
        self.code_set = grpc.StatusCode.OK

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Any = (),
    ) -> NoReturn:
        """End the call with ``code`` and ``details``, cut short."""
        self.aborted = True
        await self._context.abort(code, shorten(details), trailing_metadata)
        raise AssertionError("abort returned")  # pragma: no cover

    def set_code(self, code: grpc.StatusCode) -> None:
        """Set the code the call ends with (also when the handler then raises)."""
        self.code_set = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        """Set the message the call ends with, cut short."""
        self._context.set_details(shorten(details))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Refuses undecodable requests and undefined enum values with INVALID_ARGUMENT,
    ends calls that raise a ``DomainError`` with its status, and keeps messages short."""

    def __init__(self) -> None:
        self._enums = EnumCheck()
        # method -> (the handler it had, its wrapped handler); handlers are built once.
        self._handlers: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """The method's handler, wrapped."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._handlers.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._handlers[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler, method: str) -> Handler:
        deserializer = self._deserializer(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            assert handler.stream_stream is not None
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, method, request_streaming=True),
                deserializer,
                serializer,
            )
        if handler.request_streaming:
            assert handler.stream_unary is not None
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, request_streaming=True),
                deserializer,
                serializer,
            )
        if handler.response_streaming:
            assert handler.unary_stream is not None
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method, request_streaming=False),
                deserializer,
                serializer,
            )
        assert handler.unary_unary is not None
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, method, request_streaming=False),
            deserializer,
            serializer,
        )

    def _deserializer(self, deserialize: Any) -> Any:
        """``deserialize`` returning ``_Refused`` instead of raising, and for undefined enums."""
        message_type = getattr(deserialize, "__self__", None)
        descriptor = getattr(message_type, "DESCRIPTOR", None)
        if not isinstance(descriptor, Descriptor):
            return deserialize  # not a generated message's FromString: left as it is
        undecodable = _Refused(f"the request is not a valid {descriptor.full_name}")
        problem = self._enums.problem

        def checked(raw: bytes) -> object:
            try:
                request = deserialize(raw)
            except Exception:
                return undecodable
            refusal = problem(request)
            return request if refusal is None else _Refused(refusal)

        return checked

    def _unary(self, behavior: Any, method: str, *, request_streaming: bool) -> Any:
        async def unary(request: Any, context: Any) -> Any:
            short = _ShortMessages(context)
            if request_streaming:
                request = _checked(request, short)
            elif type(request) is _Refused:
                await short.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            try:
                response = behavior(request, short)
                # A servicer's method that is not async (the generated base class's
                # UNIMPLEMENTED stubs) answers, or raises, at once.
                return await response if inspect.isawaitable(response) else response
            except Exception as exc:
                await _end(exc, context, short, method)

        return unary

    def _streaming(self, behavior: Any, method: str, *, request_streaming: bool) -> Any:
        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            short = _ShortMessages(context)
            if request_streaming:
                request = _checked(request, short)
            elif type(request) is _Refused:
                await short.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            responses = None
            try:
                responses = behavior(request, short)
                if inspect.isawaitable(responses):  # a handler that writes with context.write
                    await responses
                    return
                async for response in responses:
                    yield response
            except Exception as exc:
                await _end(exc, context, short, method)
            finally:
                close = getattr(responses, "aclose", None)
                if close is not None:
                    await close()

        return streaming


async def _checked(requests: AsyncIterator[Any], context: _ShortMessages) -> AsyncIterator[Any]:
    """A request stream that ends the call with INVALID_ARGUMENT at the first refused message."""
    async for request in requests:
        if type(request) is _Refused:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


async def _end(exc: Exception, context: Any, short: _ShortMessages, method: str) -> NoReturn:
    """End a call whose handler raised ``exc`` with the status it calls for."""
    if short.aborted or isinstance(exc, grpc.aio.AbortError):
        raise exc  # the status is already sent
    if isinstance(exc, DomainError):
        if exc.trailers:
            context.set_trailing_metadata(exc.trailers)
        await context.abort(exc.code, shorten(exc.message))
    log.error(
        "unexpected error in a handler",
        exc_info=exc,
        extra={"method": method, "error": shorten(f"{type(exc).__name__}: {exc}")},
    )
    # As gRPC ends it (with the code the handler set, if any), but short enough to arrive.
    code = grpc.StatusCode.UNKNOWN if short.code_set == grpc.StatusCode.OK else short.code_set
    await context.abort(code, shorten(f"Unexpected {type(exc)}: {exc}"))
    raise AssertionError("abort returned")  # pragma: no cover
