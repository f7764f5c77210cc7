"""The native runtime: shards in the agent process with Python onnxruntime on the CPU.

It runs the same shard files as the browsers, for machines without a browser and
as the reference a browser's output is checked against.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import psutil
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.common.v1 import common_pb2

from services.browser_agent.runtime import (
    BadInput,
    LoadResult,
    ProviderUnavailable,
    RunResult,
    ShardRejected,
    Tensors,
)

EP = common_pb2.ExecutionProvider
CPU_ONLY = "the native runtime runs shards on onnxruntime's CPU provider only"


@dataclass
class _Loaded:
    sha256: str
    session: ort.InferenceSession
    inputs: dict[str, ort.NodeArg]


class NativeRuntime:
    """Python onnxruntime, one session per loaded shard, runs in worker threads."""

    runtime_id = "native"
    engine = "native"

    def __init__(self, intra_op_threads: int = 1) -> None:
        self._threads = intra_op_threads
        self._loaded: dict[str, _Loaded] = {}
        self._started = Timestamp()
        self._started.GetCurrentTime()

    def info(self) -> common_pb2.BrowserInfo:
        """The native runtime as a BrowserInfo: always READY, CPU provider."""
        return common_pb2.BrowserInfo(
            browser_id=self.runtime_id,
            state=common_pb2.BROWSER_STATE_READY,
            runtime=common_pb2.RUNTIME_NATIVE,
            capabilities=common_pb2.Capabilities(execution_providers=[EP.EXECUTION_PROVIDER_CPU]),
            pid=psutil.Process().pid,
            memory_bytes=psutil.Process().memory_info().rss,
            started_at=self._started,
        )

    async def load(self, sha256: str, path: str, provider: int) -> LoadResult:
        """Create an onnxruntime session for the shard file."""
        if provider not in (EP.EXECUTION_PROVIDER_UNSPECIFIED, EP.EXECUTION_PROVIDER_CPU):
            raise ProviderUnavailable(f"{CPU_ONLY}, not {EP.Name(provider)}")  # type: ignore[arg-type]
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        started = time.perf_counter()
        try:
            session = await asyncio.to_thread(
                ort.InferenceSession, path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ShardRejected(f"onnxruntime could not load the shard: {exc}") from exc
        handle = f"native-{uuid.uuid4().hex[:12]}"
        self._loaded[handle] = _Loaded(
            sha256=sha256, session=session, inputs={i.name: i for i in session.get_inputs()}
        )
        reason = "cpu: requested" if provider == EP.EXECUTION_PROVIDER_CPU else f"cpu: {CPU_ONLY}"
        return LoadResult(
            handle=handle,
            execution_provider=EP.EXECUTION_PROVIDER_CPU,
            reason=reason,
            load_ms=(time.perf_counter() - started) * 1000,
        )

    async def run(self, handle: str, inputs: Tensors) -> RunResult:
        """Run one activation in a worker thread."""
        loaded = self._loaded[handle]
        missing = sorted(set(loaded.inputs) - set(inputs))
        if missing:
            raise BadInput(f"missing input tensor(s) {', '.join(missing)}")
        feeds = {name: inputs[name] for name in loaded.inputs}
        started = time.perf_counter()
        try:
            values = await asyncio.to_thread(loaded.session.run, None, feeds)
        except Exception as exc:  # shape and type errors come back as generic exceptions
            raise BadInput(f"onnxruntime rejected the inputs: {exc}") from exc
        compute_ms = (time.perf_counter() - started) * 1000
        names = [o.name for o in loaded.session.get_outputs()]
        return RunResult(
            outputs={n: np.asarray(v) for n, v in zip(names, values, strict=True)},
            compute_ms=compute_ms,
        )

    async def unload(self, handle: str) -> None:
        """Drop the session."""
        self._loaded.pop(handle, None)

    async def close(self) -> None:
        """Drop every session."""
        self._loaded.clear()

    def handles(self) -> list[str]:
        """Loaded shard handles."""
        return list(self._loaded)
