"""Tensors on the wire: numpy arrays <-> ``webshard.common.v1.Tensor``.

numpy is optional for the SDK as a whole; these functions import it on use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from webshard.common.v1 import common_pb2

if TYPE_CHECKING:
    import numpy.typing as npt


# Wire dtype ↔ numpy dtype. The wire is little-endian whatever the host is.
_NUMPY_DTYPE_BY_WIRE: dict[int, str] = {
    common_pb2.DATA_TYPE_FLOAT32: "<f4",
    common_pb2.DATA_TYPE_FLOAT16: "<f2",
    common_pb2.DATA_TYPE_INT64: "<i8",
    common_pb2.DATA_TYPE_INT32: "<i4",
    common_pb2.DATA_TYPE_BOOL: "|b1",
}
_WIRE_DTYPE_BY_NUMPY: dict[str, common_pb2.DataType.ValueType] = {
    "<f4": common_pb2.DATA_TYPE_FLOAT32,
    "<f2": common_pb2.DATA_TYPE_FLOAT16,
    "<i8": common_pb2.DATA_TYPE_INT64,
    "<i4": common_pb2.DATA_TYPE_INT32,
    "|b1": common_pb2.DATA_TYPE_BOOL,
}
_NUMPY_MISSING = (
    "webshard needs numpy to send or receive tensors: install it with `pip install numpy`"
)


def encode_tensor(name: str, value: npt.ArrayLike) -> common_pb2.Tensor:
    """Encodes an array as a ``common.v1.Tensor`` (row-major, little-endian).

    Only the wire's types are accepted (float32, float16, int64, int32, bool);
    anything else raises ValueError rather than being converted silently, since
    a float64 input cast down would change the numbers the model sees.
    """
    try:
        import numpy as np  # numpy is optional for the SDK: imported on use
    except ImportError as exc:
        raise ImportError(_NUMPY_MISSING) from exc
    array = np.asarray(value)
    little = array.dtype.newbyteorder("<")
    dtype = _WIRE_DTYPE_BY_NUMPY.get(little.str)
    if dtype is None:
        raise ValueError(
            f"input {name!r} has dtype {array.dtype}; tensors may be float32, float16, "
            f"int64, int32 or bool (convert with .astype(...))"
        )
    data = np.ascontiguousarray(array, dtype=little).tobytes()
    return common_pb2.Tensor(name=name, dtype=dtype, shape=list(array.shape), data=data)


def decode_tensor(tensor: common_pb2.Tensor) -> npt.NDArray[Any]:
    """Decodes a ``common.v1.Tensor`` into a writable numpy array in native byte order."""
    try:
        import numpy as np  # numpy is optional for the SDK: imported on use
    except ImportError as exc:
        raise ImportError(_NUMPY_MISSING) from exc
    spec = _NUMPY_DTYPE_BY_WIRE.get(tensor.dtype)
    if spec is None:
        raise ValueError(f"tensor {tensor.name!r} has unsupported dtype {tensor.dtype}")
    dtype = np.dtype(spec)
    shape = tuple(int(dim) for dim in tensor.shape)
    if math.prod(shape) * dtype.itemsize != len(tensor.data):
        raise ValueError(
            f"tensor {tensor.name!r}: shape {list(shape)} of {dtype} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, got {len(tensor.data)}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    # astype copies: the result owns writable memory in the host's byte order.
    return array.astype(dtype.newbyteorder("="))
