"""`make bench-shards`: one shard's latency and throughput per model, runtime, provider and size.

Each model runs as a single shard (its whole graph, cut once) in the native
runtime (Python onnxruntime, CPU) and in one headless browser of each engine
(Chromium, Firefox) with onnxruntime-web's wasm and webgpu providers (webgpu
where the browser has an adapter). Text models are measured at sequence lengths
8, 32 and 128; the vision and audio models at their one input size. Every row
carries the largest absolute difference from the native output. On a machine
without a GPU, Chromium's WebGPU adapter is SwiftShader and Firefox's is Mesa's
lavapipe (with mesa-vulkan-drivers), both software fallbacks; the rows say so in
`adapter`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
from webshard.common.v1 import common_pb2

from services.browser_agent.browser.engines import missing_binaries
from services.browser_agent.browser.options import BrowserOptions
from services.browser_agent.browser.runtime import BrowserRuntime
from services.browser_agent.native import NativeRuntime
from services.browser_agent.runtime import ShardRuntime
from services.models import cut_model, default_cache_dir, example_inputs
from tests.bench.common import percentiles, write

EP = common_pb2.ExecutionProvider
TEXT_MODELS = ("minilm-l6", "bert-base", "decoder-tiny")
OTHER_MODELS = ("vit-tiny", "whisper-tiny-enc", "clip-tiny")
SEQ_LENS = (8, 32, 128)
# Cases a software WebGPU adapter (SwiftShader) cannot finish in a browser call's 60 s.
TOO_SLOW = {("bert-base", 128)}


async def timed(
    runtime: ShardRuntime, handle: str, feeds: dict[str, Any], runs: int
) -> tuple[list[float], dict[str, Any], float]:
    """Latencies of ``runs`` calls (after two warm-ups), the last outputs, and throughput."""
    for _ in range(2):
        result = await runtime.run(handle, feeds)
    samples = []
    started = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        result = await runtime.run(handle, feeds)
        samples.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - started
    return samples, result.outputs, runs / elapsed


async def launch(engine: str, cache: Path) -> tuple[BrowserRuntime, str]:
    """A browser of ``engine`` and its WebGPU adapter's name (software fallbacks said so)."""
    browser = BrowserRuntime(
        f"bench-{engine}", cache / "shards", options=BrowserOptions(engine=engine)
    )
    await browser.launch()
    adapter = browser.capabilities.webgpu
    # Firefox keeps its adapter's vendor and description to itself.
    name = adapter.description or adapter.vendor or ("unnamed" if adapter.available else "none")
    return browser, name + (" (software fallback)" if adapter.is_fallback_adapter else "")


async def bench(
    models: list[str], runs: dict[str, int], cache: Path, engines: list[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    native = NativeRuntime(intra_op_threads=1)
    browsers: dict[str, tuple[BrowserRuntime, str]] = {}
    try:
        for engine in engines:
            browsers[engine] = await launch(engine, cache)
        for model in models:
            [shard] = cut_model(model, "layer", 1, cache)
            sizes = SEQ_LENS if model in TEXT_MODELS else (None,)
            # (engine, ep) -> runtime, handle, adapter; native first: the reference.
            cpu = await native.load(shard.sha256, str(shard.path), EP.EXECUTION_PROVIDER_CPU)
            handles: dict[tuple[str, str], tuple[ShardRuntime, str, str]] = {
                ("native", "cpu"): (native, cpu.handle, "")
            }
            for engine, (browser, adapter_name) in browsers.items():
                for ep, provider in (
                    ("wasm", EP.EXECUTION_PROVIDER_WASM),
                    ("webgpu", EP.EXECUTION_PROVIDER_WEBGPU),
                ):
                    if provider not in browser.capabilities.execution_providers:
                        continue  # no WebGPU adapter in this browser
                    loaded = await browser.load(shard.sha256, str(shard.path), provider)
                    adapter = adapter_name if ep == "webgpu" else ""
                    handles[(engine, ep)] = (browser, loaded.handle, adapter)
            for seq in sizes:
                feeds = example_inputs(model, batch=1, seq_len=seq or 32, seed=1)
                reference: dict[str, Any] = {}
                for (engine, ep), (runtime, handle, adapter_name) in handles.items():
                    case = {
                        "model": model,
                        "engine": engine,
                        "runtime": "native" if ep == "cpu" else "browser",
                        "ep": ep,
                        "seq_len": seq if seq is not None else "",
                        "adapter": adapter_name,
                    }
                    if "software" in adapter_name and (model, seq) in TOO_SLOW:
                        rows.append(
                            {**case, "skipped": "one run takes over a minute on a software adapter"}
                        )
                        continue
                    n = runs[ep]
                    samples, outputs, throughput = await timed(runtime, handle, feeds, n)
                    if ep == "cpu":
                        reference = outputs
                    err = max(
                        float(
                            np.max(
                                np.abs(
                                    np.asarray(outputs[k], np.float64)
                                    - np.asarray(reference[k], np.float64)
                                )
                            )
                        )
                        for k in reference
                    )
                    rows.append(
                        {
                            **case,
                            "runs": n,
                            **percentiles(samples),
                            "throughput_rps": round(throughput, 2),
                            "max_abs_err": err,
                            "shard_mb": round(shard.size_bytes / 1e6, 1),
                        }
                    )
                    print(
                        f"  {model} {engine} {ep} seq={seq}: p50 {rows[-1]['p50_ms']} ms, "
                        f"err {err:.2e}",
                        flush=True,
                    )
            for runtime, handle, _ in handles.values():
                await runtime.unload(handle)
    finally:
        for browser, _ in browsers.values():
            await browser.close()
        await native.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TEXT_MODELS + OTHER_MODELS))
    parser.add_argument("--runs", type=int, default=30, help="timed runs per native/wasm case")
    parser.add_argument("--webgpu-runs", type=int, default=3, help="timed runs per webgpu case")
    parser.add_argument(
        "--engines", default="chromium,firefox", help="browser engines [chromium,firefox]"
    )
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    for engine in engines:
        missing = missing_binaries(BrowserOptions(engine=engine))
        if missing:
            parser.error(f"the {engine} engine needs {', '.join(missing)} (make setup)")
    # Shards are cut into the usual cache; the browser serves them from there.
    rows = asyncio.run(
        bench(
            args.models.split(","),
            {"cpu": args.runs, "wasm": args.runs, "webgpu": args.webgpu_runs},
            default_cache_dir(),
            engines,
        )
    )
    columns = ["model", "engine", "ep", "seq_len", "runs", "p50_ms", "p95_ms"]
    columns += ["throughput_rps", "max_abs_err", "adapter", "skipped"]
    write("shards", rows, columns)


if __name__ == "__main__":
    main()
