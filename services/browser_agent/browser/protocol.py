"""The binary frames that carry tensors between the agent and its page.

A frame is ``[u32 little-endian header length][header JSON, UTF-8][padding][data]``.
The data section starts at the first multiple of 8 after the header, and each
tensor's bytes start at a multiple of 8 within it, so the page can view them as
typed arrays (``BigInt64Array`` needs 8-byte alignment) without copying. The
header lists each tensor as ``{name, dtype, shape, offset, nbytes}``, offsets
relative to the data section; every other header key is the message's own.
Control messages without tensors travel as JSON text frames.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from ..runtime import BadInput, Tensors

ALIGN = 8

# Wire names are onnxruntime-web's tensor type names; every dtype is little-endian.
WIRE_DTYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "float32": np.dtype("<f4"),
        "float16": np.dtype("<f2"),
        "float64": np.dtype("<f8"),
        "int64": np.dtype("<i8"),
        "int32": np.dtype("<i4"),
        "int8": np.dtype("i1"),
        "uint8": np.dtype("u1"),
        "bool": np.dtype("?"),
    }
)

_HEADER_LENGTH = struct.Struct("<I")


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def wire_dtype(array: np.ndarray) -> str:
    """The wire name of an array's element type; BadInput when the page cannot take it."""
    for name, dtype in WIRE_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    supported = ", ".join(WIRE_DTYPES)
    raise BadInput(f"tensor element type {array.dtype} is not supported; use one of {supported}")


def encode_frame(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> bytes:
    """One binary frame holding ``header`` and ``tensors`` (raw little-endian data)."""
    entries: list[dict[str, Any]] = []
    blocks: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        dtype = wire_dtype(array)
        data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[dtype]).tobytes()
        entries.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": [int(d) for d in array.shape],
                "offset": offset,
                "nbytes": len(data),
            }
        )
        padding = _aligned(len(data)) - len(data)
        blocks.append(data + b"\0" * padding)
        offset += len(data) + padding
    header_bytes = json.dumps({**header, "tensors": entries}, separators=(",", ":")).encode()
    prefix = _HEADER_LENGTH.pack(len(header_bytes)) + header_bytes
    prefix += b"\0" * (_aligned(len(prefix)) - len(prefix))
    return b"".join([prefix, *blocks])


def decode_frame(frame: bytes) -> tuple[dict[str, Any], Tensors]:
    """The header and tensors of a binary frame; the arrays own their memory."""
    if len(frame) < _HEADER_LENGTH.size:
        raise ValueError(f"frame of {len(frame)} bytes is too short for a header")
    (length,) = _HEADER_LENGTH.unpack_from(frame)
    end = _HEADER_LENGTH.size + length
    if end > len(frame):
        raise ValueError(f"frame header of {length} bytes overruns a {len(frame)}-byte frame")
    header: dict[str, Any] = json.loads(frame[_HEADER_LENGTH.size : end])
    base = _aligned(end)
    tensors: Tensors = {}
    for entry in header.pop("tensors", []):
        dtype = WIRE_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {entry['name']!r} has unknown dtype {entry['dtype']!r}")
        shape = tuple(int(d) for d in entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        start = base + int(entry["offset"])
        if count * dtype.itemsize != entry["nbytes"] or start + entry["nbytes"] > len(frame):
            raise ValueError(f"tensor {entry['name']!r} does not fit its shape {shape} or frame")
        array = np.frombuffer(frame, dtype=dtype, count=count, offset=start)
        tensors[entry["name"]] = array.reshape(shape).copy()
    return header, tensors
