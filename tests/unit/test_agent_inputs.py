"""An agent refuses activations no shard should be given, before any runtime sees them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from webshard.common.v1 import common_pb2

from services.browser_agent.agent import LoadedEntry, ShardHost
from services.browser_agent.runtime import BadInput, LoadResult, RunResult


class RecordingRuntime:
    """A runtime that answers every run and counts them."""

    runtime_id = "browser-0"

    def __init__(self) -> None:
        self.runs = 0

    def info(self) -> common_pb2.BrowserInfo:
        return common_pb2.BrowserInfo(browser_id=self.runtime_id)

    async def run(self, handle: str, inputs: Any) -> RunResult:
        self.runs += 1
        return RunResult(outputs=dict(inputs), compute_ms=0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
async def test_non_finite_activations_are_refused_before_the_runtime(bad: float) -> None:
    runtime = RecordingRuntime()
    host = ShardHost(runtime, lambda: [])  # type: ignore[arg-type]
    host._loaded["h"] = LoadedEntry(  # the host's own bookkeeping, as load() fills it
        spec=common_pb2.ShardSpec(),
        runtime=runtime,  # type: ignore[arg-type]
        result=LoadResult("h", 0, "", 0.0),  # type: ignore[arg-type]
    )
    hidden = np.ones((1, 4, 8), np.float32)
    _, result = await host.run("h", {"hidden": hidden, "mask": np.ones((1, 4), np.int64)})
    assert runtime.runs == 1 and "hidden" in result.outputs
    hidden[0, 2, 3] = bad
    with pytest.raises(BadInput, match="'hidden' holds NaN or infinite"):
        await host.run("h", {"hidden": hidden})
    assert runtime.runs == 1
