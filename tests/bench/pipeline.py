"""`make bench-pipeline`: latency and throughput of the sharded pipeline against the full graph.

For minilm-l6 on the native runtime with 1..6 layer shards over 3 agents, and on
headless Chromium's wasm provider with 3 shards, at 1, 8 and 50 concurrent
requests: p50/p95 latency and throughput through a local cluster of real
processes, beside the same sentence through the unsharded graph in this
process. Per-hop overhead is (latency - time inside the runtimes) / hops, p50
at concurrency 1: the price of gRPC, the coordinator and the agents per shard.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import webshard.aio
from webshard.cli.local import LocalCluster

from services.models import prepare_inputs, reference_session
from tests.bench.common import percentiles, write

SENTENCE = "A fleet of headless browsers runs one model, shard by shard."
CONCURRENCY = (1, 8, 50)


def in_process(requests: int) -> dict[str, float]:
    """The unsharded graph in this process, one request at a time."""
    session = reference_session("minilm-l6")
    feeds = prepare_inputs("minilm-l6", [SENTENCE])
    for _ in range(10):
        session.run(None, feeds)
    samples = []
    started = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        session.run(None, feeds)
        samples.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - started
    return {**percentiles(samples), "throughput_rps": round(requests / elapsed, 1)}


async def measure(client: webshard.aio.Client, concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` inferences, ``concurrency`` at a time."""
    samples: list[float] = []
    overheads: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            t0 = time.perf_counter()
            result = await client.infer("minilm-l6", texts=[SENTENCE])
            latency = (time.perf_counter() - t0) * 1000
            samples.append(latency)
            compute = sum(hop.compute_ms for hop in result.trail)
            overheads.append((latency - compute) / len(result.trail))

    for _ in range(min(10, requests)):  # warm the links and sessions
        await client.infer("minilm-l6", texts=[SENTENCE])
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        **percentiles(samples),
        "throughput_rps": round(requests / elapsed, 1),
        "per_hop_overhead_ms": percentiles(overheads)["p50_ms"],
    }


async def sweep(
    cluster: LocalCluster, runtime: str, ep: str, shard_counts: list[int], requests: int
) -> list[dict[str, Any]]:
    rows = []
    async with webshard.aio.Client(cluster.coordinators(), timeout=300) as client:
        for shards in shard_counts:
            await client.deploy(
                "minilm-l6",
                sharding="layer",
                shards=shards,
                runtime=runtime,
                ep=None if ep == "cpu" else ep,
            )
            for concurrency in CONCURRENCY:
                figures = await measure(client, concurrency, requests)
                rows.append(
                    {
                        "model": "minilm-l6",
                        "runtime": runtime,
                        "ep": ep,
                        "shards": shards,
                        "concurrency": concurrency,
                        "requests": requests,
                        **figures,
                    }
                )
                print(f"  {runtime}/{ep} shards={shards} c={concurrency}: {figures}", flush=True)
    return rows


def run_cluster(
    browsers: int, runtime: str, ep: str, shard_counts: list[int], requests: int
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(
            agents=3,
            data_dir=Path(tmp),
            auto_ports=True,
            extra_args={"browser_agent": ["--browsers", str(browsers)]},
        )
        cluster.start(timeout=180)
        try:
            return asyncio.run(sweep(cluster, runtime, ep, shard_counts, requests))
        finally:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per case [200]")
    parser.add_argument("--browser-requests", type=int, default=100, help="per browser case [100]")
    parser.add_argument("--skip-browser", action="store_true", help="native runtime only")
    args = parser.parse_args()

    baseline = in_process(args.requests)
    print(f"in-process full graph: {baseline}", flush=True)
    rows = run_cluster(0, "native", "cpu", [1, 2, 3, 4, 5, 6], args.requests)
    if not args.skip_browser:
        rows += run_cluster(1, "browser", "wasm", [3], args.browser_requests)
    for row in rows:
        row["in_process_p50_ms"] = baseline["p50_ms"]
        row["in_process_throughput_rps"] = baseline["throughput_rps"]
    write(
        "pipeline",
        rows,
        [
            "runtime",
            "ep",
            "shards",
            "concurrency",
            "p50_ms",
            "p95_ms",
            "throughput_rps",
            "in_process_p50_ms",
            "in_process_throughput_rps",
            "per_hop_overhead_ms",
        ],
    )


if __name__ == "__main__":
    main()
