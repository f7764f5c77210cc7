"""What an agent's shard host remembers of the shards its browsers held."""

from __future__ import annotations

import time

from webshard.common.v1 import common_pb2

from services.browser_agent.agent import LoadedEntry, ShardHost
from services.browser_agent.runtime import LoadResult


class DeadRuntime:
    """A browser whose process has exited: unloads succeed, holding nothing."""

    runtime_id = "browser-1"

    async def unload(self, handle: str) -> None:
        return None


async def test_a_failure_names_the_shards_held_when_it_happened_even_if_unloaded_since() -> None:
    # A spare takes over in milliseconds and the coordinator unloads the lost replicas;
    # the agent's report of the crash, made after that, must still name them.
    runtime = DeadRuntime()
    host = ShardHost(None, lambda: [runtime])  # type: ignore[arg-type, list-item]
    for index in (0, 1):
        spec = common_pb2.ShardSpec(model="minilm-l6", index=index)
        host._loaded[f"h{index}"] = LoadedEntry(  # the host's own bookkeeping, as load() fills it
            spec=spec,
            runtime=runtime,  # type: ignore[arg-type]
            result=LoadResult(f"h{index}", 0, "", 0.0),  # type: ignore[arg-type]
        )
    failed_at = time.time()
    await host.unload("h0")
    assert [s.index for s in host.shards_on("browser-1")] == [1]
    assert sorted(s.index for s in host.shards_held("browser-1", failed_at)) == [0, 1]
    # Unloaded before the failure: not the failure's.
    assert [s.index for s in host.shards_held("browser-1", time.time() + 1)] == [1]
    assert host.shards_held("browser-0", failed_at) == []
