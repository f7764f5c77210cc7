"""The browser runtime end to end: real headless browsers running shards with onnxruntime-web.

Every test runs on each engine: Chromium (under chromedriver) and Firefox (over
WebDriver BiDi); an engine whose browser is not installed is skipped, saying what
to install.

Every shard here is a small ONNX graph built with onnx.helper; every browser
output is checked against Python onnxruntime on the same bytes. One browser is
shared by the tests that leave it as they found it; the tests that crash, kill,
cut off or exhaust a browser get their own. Every fixture reaps what it started
and checks that no process of its launch is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import psutil
import pytest
import pytest_asyncio
from onnx import TensorProto, helper, numpy_helper
from webshard.common.v1 import common_pb2

from services.browser_agent.browser import (
    BrowserEvent,
    BrowserEventKind,
    BrowserOptions,
    BrowserPool,
    BrowserRuntime,
    LaunchFailed,
    ShardNotLoaded,
)
from services.browser_agent.browser.engines import missing_binaries
from services.browser_agent.browser.watchdog import LAUNCH_ENV
from services.browser_agent.runtime import (
    BadInput,
    ProviderUnavailable,
    RuntimeLost,
    ShardRejected,
    ShardRuntimeError,
)
from services.common.engines import ENGINES

REPO = Path(__file__).resolve().parents[2]
EP = common_pb2.ExecutionProvider
State = common_pb2.BrowserState

pytestmark = [
    pytest.mark.browser,
    pytest.mark.asyncio(loop_scope="module"),
]

# A failure must surface within this many seconds, not at a call's deadline.
PROMPT_S = 5.0


# --- shards -------------------------------------------------------------------


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
) -> bytes:
    graph = helper.make_graph(nodes, "shard", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mlp_model(seed: int = 0) -> bytes:
    """x[1,32,64] -> Gelu(x @ W + b), GELU written with Erf as BERT-style graphs do."""
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((64, 64)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["erf1"]),
        helper.make_node("Mul", ["h", "erf1"], ["gated"]),
        helper.make_node("Mul", ["gated", "half"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 64])],
        initializers,
    )


def embedding_model() -> bytes:
    """input_ids int64[1,32] -> Gather on a [100,16] table, as a token embedding does."""
    table = np.random.default_rng(7).standard_normal((100, 16)).astype(np.float32)
    return _model(
        [helper.make_node("Gather", ["table", "input_ids"], ["embeddings"], axis=0)],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 32])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [1, 32, 16])],
        [numpy_helper.from_array(table, "table")],
    )


def int32_model() -> bytes:
    """positions int32[1,32] -> the same int32 tensor and its int64 widening."""
    return _model(
        [
            helper.make_node("Identity", ["positions"], ["same"]),
            helper.make_node("Cast", ["positions"], ["wide"], to=TensorProto.INT64),
        ],
        [helper.make_tensor_value_info("positions", TensorProto.INT32, [1, 32])],
        [
            helper.make_tensor_value_info("same", TensorProto.INT32, [1, 32]),
            helper.make_tensor_value_info("wide", TensorProto.INT64, [1, 32]),
        ],
        [],
    )


ELEMENT_TYPES = {
    "half": (TensorProto.FLOAT16, np.float16),
    "double": (TensorProto.DOUBLE, np.float64),
    "flag": (TensorProto.BOOL, np.bool_),
    "byte": (TensorProto.UINT8, np.uint8),
    "signed_byte": (TensorProto.INT8, np.int8),
}


def identity_model() -> bytes:
    """One Identity per element type the wire carries besides float32, int64 and int32."""
    return _model(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name in ELEMENT_TYPES],
        [helper.make_tensor_value_info(n, t, [2, 3]) for n, (t, _) in ELEMENT_TYPES.items()],
        [
            helper.make_tensor_value_info(f"{n}_out", t, [2, 3])
            for n, (t, _) in ELEMENT_TYPES.items()
        ],
        [],
    )


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard bytes stored in the cache under their sha256."""

    sha256: str
    path: Path
    data: bytes

    def reference(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs of Python onnxruntime (CPU) on the same bytes."""
        session = onnxruntime.InferenceSession(self.data, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs), strict=True))


def store(shard_dir: Path, data: bytes) -> Shard:
    """Put shard bytes in the cache, named by their sha256."""
    sha256 = hashlib.sha256(data).hexdigest()
    path = shard_dir / f"{sha256}.onnx"
    path.write_bytes(data)
    return Shard(sha256, path, data)


def activation(seed: int) -> np.ndarray:
    """A float32 activation for the MLP shard."""
    return np.random.default_rng(seed).standard_normal((1, 32, 64)).astype(np.float32)


# --- processes and events -------------------------------------------------------


def launch_processes(marker: Path) -> list[psutil.Process]:
    """Live processes whose command line or environment names a launch's working folder."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        launched_in = None
        with contextlib.suppress(psutil.Error):
            launched_in = proc.environ().get(LAUNCH_ENV)
        if launched_in == str(marker) or any(
            str(marker) in part for part in proc.info["cmdline"] or []
        ):
            found.append(proc)
    return found


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def assert_reaped(marker: Path | None) -> None:
    """No process of the launch is left, and its folder is gone."""
    if marker is None:
        return
    leftovers = launch_processes(marker)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not leftovers, f"processes of {marker} outlived it: {[p.pid for p in leftovers]}"
    assert not marker.exists(), f"{marker} was not deleted"


class Events:
    """Collects a browser's events; tests wait for a kind with a deadline."""

    def __init__(self) -> None:
        self.seen: list[BrowserEvent] = []
        self._queue: asyncio.Queue[BrowserEvent] = asyncio.Queue()

    def __call__(self, event: BrowserEvent) -> None:
        self.seen.append(event)
        self._queue.put_nowait(event)

    async def wait_for(self, kind: BrowserEventKind, timeout: float = PROMPT_S) -> BrowserEvent:
        """The next event of ``kind``; fails the test after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self._queue.get()
                    if event.kind == kind:
                        return event
        except TimeoutError:
            pytest.fail(f"no {kind} event in {timeout} s; saw {self.seen}")


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the module's shard cache and browser working folders."""
    return tmp_path_factory.mktemp("browser-runtime")


@pytest.fixture(scope="module")
def shard_dir(workspace: Path) -> Path:
    """The shard cache every browser in this module serves from."""
    path = workspace / "shards"
    path.mkdir()
    return path


@pytest.fixture(scope="module", params=ENGINES)
def options(workspace: Path, request: pytest.FixtureRequest) -> BrowserOptions:
    """Browser options for each engine, with working folders under the test's own folder."""
    root = workspace / f"browsers-{request.param}"
    root.mkdir()
    options = BrowserOptions(engine=request.param, temp_root=str(root))
    missing = missing_binaries(options)
    if missing:
        pytest.skip(f"the {request.param} engine needs {', '.join(missing)} (make setup)")
    return options


@pytest.fixture(scope="module")
def mlp(shard_dir: Path) -> Shard:
    return store(shard_dir, mlp_model())


@pytest.fixture(scope="module")
def embedding(shard_dir: Path) -> Shard:
    return store(shard_dir, embedding_model())


@contextlib.asynccontextmanager
async def launched(
    name: str, shard_dir: Path, options: BrowserOptions
) -> AsyncIterator[tuple[BrowserRuntime, Events]]:
    """A launched browser, closed and checked for leftovers afterwards (also on failure)."""
    events = Events()
    runtime = BrowserRuntime(name, shard_dir, options=options, on_event=events)
    try:
        await runtime.launch()
        yield runtime, events
    finally:
        await runtime.close()
        assert_reaped(runtime.workdir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(shard_dir: Path, options: BrowserOptions) -> AsyncIterator[BrowserRuntime]:
    """One browser for the tests that leave it as they found it."""
    async with launched("browser-shared", shard_dir, options) as (runtime, _):
        yield runtime


@pytest_asyncio.fixture(loop_scope="module")
async def own(
    shard_dir: Path, options: BrowserOptions
) -> AsyncIterator[tuple[BrowserRuntime, Events]]:
    """A browser of the test's own, for faults that break it."""
    async with launched("browser-own", shard_dir, options) as launch:
        yield launch


def needs_webgpu(runtime: BrowserRuntime) -> None:
    if EP.EXECUTION_PROVIDER_WEBGPU not in runtime.capabilities.execution_providers:
        pytest.skip(f"no WebGPU adapter: {runtime.capabilities.webgpu.reason}")


# --- capabilities and providers -------------------------------------------------


async def test_capabilities_are_measured_in_the_page(
    shared: BrowserRuntime, options: BrowserOptions
) -> None:
    info = shared.info()
    caps = info.capabilities
    assert info.browser_id == "browser-shared"
    assert info.state == State.BROWSER_STATE_READY
    assert info.runtime == common_pb2.RUNTIME_BROWSER
    assert info.pid == shared.pid and psutil.pid_exists(info.pid)
    assert info.memory_bytes > 0
    assert info.started_at.seconds > 0
    assert caps.engine == options.engine
    assert {"chromium": "Chrome/", "firefox": "Firefox/"}[caps.engine] in caps.user_agent
    assert caps.engine_version and caps.engine_version.split(".")[0] in caps.user_agent
    # COOP/COEP from the agent's server make the page cross-origin isolated.
    assert caps.wasm.threads and caps.wasm.simd and caps.wasm.hardware_concurrency > 0
    assert EP.EXECUTION_PROVIDER_WASM in caps.execution_providers
    if caps.webgpu.available:
        if caps.engine == "chromium":  # Firefox keeps its adapter's name to itself
            assert caps.webgpu.vendor or caps.webgpu.description
        assert caps.webgpu.limits["maxBufferSize"] > 0
        assert EP.EXECUTION_PROVIDER_WEBGPU in caps.execution_providers
    else:
        assert caps.webgpu.reason
    assert (EP.EXECUTION_PROVIDER_WEBNN in caps.execution_providers) == caps.webnn.available
    if not caps.webnn.available:
        assert caps.webnn.reason


async def test_wasm_output_matches_python_onnxruntime(shared: BrowserRuntime, mlp: Shard) -> None:
    loaded = await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
    try:
        assert loaded.execution_provider == EP.EXECUTION_PROVIDER_WASM
        assert loaded.reason.startswith("wasm")
        x = activation(1)
        result = await shared.run(loaded.handle, {"x": x})
        expected = mlp.reference({"x": x})["y"]
        assert result.outputs["y"].dtype == np.float32
        assert result.outputs["y"].shape == expected.shape
        np.testing.assert_allclose(result.outputs["y"], expected, rtol=0, atol=1e-4)
        assert result.compute_ms > 0
        listed = {s.handle: s for s in shared.info().shards}
        assert listed[loaded.handle].spec.sha256 == mlp.sha256
        assert listed[loaded.handle].spec.size_bytes == len(mlp.data)
        assert list(listed[loaded.handle].spec.input_names) == ["x"]
        assert listed[loaded.handle].execution_provider == EP.EXECUTION_PROVIDER_WASM
    finally:
        await shared.unload(loaded.handle)


async def test_unpinned_provider_follows_the_capabilities(
    shared: BrowserRuntime, mlp: Shard
) -> None:
    caps = shared.capabilities
    loaded = await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_UNSPECIFIED)
    try:
        if caps.webgpu.available and not caps.webgpu.is_fallback_adapter:
            assert loaded.execution_provider == EP.EXECUTION_PROVIDER_WEBGPU
        else:
            assert loaded.execution_provider == EP.EXECUTION_PROVIDER_WASM
            if caps.webgpu.available:
                assert "software fallback" in loaded.reason
        if not caps.webnn.available:
            assert f"WebNN unavailable: {caps.webnn.reason}" in loaded.reason
        result = await shared.run(loaded.handle, {"x": activation(2)})
        np.testing.assert_allclose(
            result.outputs["y"], mlp.reference({"x": activation(2)})["y"], rtol=0, atol=1e-4
        )
    finally:
        await shared.unload(loaded.handle)


async def test_webgpu_output_matches_python_onnxruntime(shared: BrowserRuntime, mlp: Shard) -> None:
    needs_webgpu(shared)
    loaded = await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WEBGPU)
    try:
        assert loaded.execution_provider == EP.EXECUTION_PROVIDER_WEBGPU
        for seed in (3, 4):
            x = activation(seed)
            result = await shared.run(loaded.handle, {"x": x})
            np.testing.assert_allclose(
                result.outputs["y"], mlp.reference({"x": x})["y"], rtol=0, atol=1e-4
            )
    finally:
        await shared.unload(loaded.handle)


async def test_pinned_webnn_without_webnn_says_why(shared: BrowserRuntime, mlp: Shard) -> None:
    webnn = shared.capabilities.webnn
    if webnn.available:
        pytest.skip("this browser has WebNN")
    with pytest.raises(ProviderUnavailable) as raised:
        await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WEBNN)
    assert webnn.reason in str(raised.value)
    assert raised.value.code == "FAILED_PRECONDITION"


async def test_cpu_provider_is_refused(shared: BrowserRuntime, mlp: Shard) -> None:
    with pytest.raises(ProviderUnavailable, match="native runtime"):
        await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_CPU)


# --- bad shards and bad inputs --------------------------------------------------


async def test_corrupt_bytes_are_rejected_with_ort_message(
    shared: BrowserRuntime, shard_dir: Path, embedding: Shard
) -> None:
    corrupt = store(shard_dir, mlp_model(seed=5)[:-40] + b"\xff" * 40)
    with pytest.raises(ShardRejected) as raised:
        await shared.load(corrupt.sha256, str(corrupt.path), EP.EXECUTION_PROVIDER_WASM)
    # onnxruntime-web's own words ("Can't create a session. ERROR_CODE: 7, ...").
    assert "create a session" in str(raised.value)
    assert raised.value.code == "INVALID_ARGUMENT"
    # The page is unharmed.
    loaded = await shared.load(embedding.sha256, str(embedding.path), EP.EXECUTION_PROVIDER_WASM)
    await shared.unload(loaded.handle)


async def test_bytes_that_do_not_match_their_hash_are_rejected(
    shared: BrowserRuntime, mlp: Shard
) -> None:
    with pytest.raises(ShardRejected, match="hashes to"):
        await shared.load("0" * 64, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)


async def test_shard_outside_the_cache_is_rejected(shared: BrowserRuntime, workspace: Path) -> None:
    outside = workspace / "outside.onnx"
    outside.write_bytes(mlp_model())
    sha256 = hashlib.sha256(outside.read_bytes()).hexdigest()
    with pytest.raises(ShardRejected, match="outside the shard cache"):
        await shared.load(sha256, str(outside), EP.EXECUTION_PROVIDER_WASM)


async def test_bad_inputs_fail_the_call_not_the_browser(
    shared: BrowserRuntime, mlp: Shard, embedding: Shard
) -> None:
    first = await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
    second = await shared.load(embedding.sha256, str(embedding.path), EP.EXECUTION_PROVIDER_WASM)
    try:
        with pytest.raises(BadInput, match="missing x"):
            await shared.run(first.handle, {"input": activation(1)})
        # A wrong shape passes the name check and is refused by onnxruntime-web itself.
        with pytest.raises(BadInput, match="dimensions"):
            await shared.run(first.handle, {"x": np.zeros((1, 32, 63), np.float32)})
        with pytest.raises(BadInput, match="Unexpected input data type"):
            await shared.run(first.handle, {"x": np.zeros((1, 32, 64), np.int32)})
        with pytest.raises(BadInput, match="not supported"):
            await shared.run(first.handle, {"x": np.zeros((1, 32, 64), np.complex64)})
        ids = np.arange(32, dtype=np.int64).reshape(1, 32)
        result = await shared.run(second.handle, {"input_ids": ids})
        np.testing.assert_array_equal(
            result.outputs["embeddings"], embedding.reference({"input_ids": ids})["embeddings"]
        )
        assert shared.state == State.BROWSER_STATE_READY
    finally:
        await shared.unload(first.handle)
        await shared.unload(second.handle)


async def test_int64_and_int32_tensors_round_trip(
    shared: BrowserRuntime, shard_dir: Path, embedding: Shard
) -> None:
    positions = store(shard_dir, int32_model())
    gather = await shared.load(embedding.sha256, str(embedding.path), EP.EXECUTION_PROVIDER_WASM)
    ints = await shared.load(positions.sha256, str(positions.path), EP.EXECUTION_PROVIDER_WASM)
    try:
        # Ids above 2**31 would not fit an int32; Gather only takes in-range ones, so the
        # int64 path is checked on values that exercise the high bytes below.
        ids = np.random.default_rng(0).integers(0, 100, (1, 32), dtype=np.int64)
        result = await shared.run(gather.handle, {"input_ids": ids})
        np.testing.assert_array_equal(
            result.outputs["embeddings"], embedding.reference({"input_ids": ids})["embeddings"]
        )
        values = np.array([[-(2**31), 2**31 - 1, -1, 0, *range(28)]], dtype=np.int32)
        result = await shared.run(ints.handle, {"positions": values})
        assert result.outputs["same"].dtype == np.int32
        assert result.outputs["wide"].dtype == np.int64
        np.testing.assert_array_equal(result.outputs["same"], values)
        np.testing.assert_array_equal(result.outputs["wide"], values.astype(np.int64))
    finally:
        await shared.unload(gather.handle)
        await shared.unload(ints.handle)


async def test_other_element_types_round_trip(shared: BrowserRuntime, shard_dir: Path) -> None:
    shard = store(shard_dir, identity_model())
    loaded = await shared.load(shard.sha256, str(shard.path), EP.EXECUTION_PROVIDER_WASM)
    try:
        values = np.array([[0, 1, 2], [3, 4, 100]])
        inputs: dict[str, np.ndarray] = {
            name: values.astype(dtype) for name, (_, dtype) in ELEMENT_TYPES.items()
        }
        result = await shared.run(loaded.handle, inputs)
        for name, array in inputs.items():
            out = result.outputs[f"{name}_out"]
            assert out.dtype == array.dtype, name
            np.testing.assert_array_equal(out, array)
    finally:
        await shared.unload(loaded.handle)


async def test_concurrent_runs_get_their_own_answers(shared: BrowserRuntime, mlp: Shard) -> None:
    loaded = await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
    try:
        inputs = [activation(100 + i) for i in range(16)]
        results = await asyncio.gather(*(shared.run(loaded.handle, {"x": x}) for x in inputs))
        for x, result in zip(inputs, results, strict=True):
            np.testing.assert_allclose(
                result.outputs["y"], mlp.reference({"x": x})["y"], rtol=0, atol=1e-4
            )
    finally:
        await shared.unload(loaded.handle)


async def test_unloaded_shard_is_not_found(shared: BrowserRuntime, mlp: Shard) -> None:
    loaded = await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
    await shared.unload(loaded.handle)
    assert loaded.handle not in {s.handle for s in shared.info().shards}
    with pytest.raises(ShardNotLoaded):
        await shared.run(loaded.handle, {"x": activation(1)})


# --- faults that leave the browser up -------------------------------------------


async def test_failed_session_errors_alone(
    shared: BrowserRuntime, mlp: Shard, embedding: Shard
) -> None:
    broken = await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
    intact = await shared.load(embedding.sha256, str(embedding.path), EP.EXECUTION_PROVIDER_WASM)
    try:
        await shared.fail_session(broken.handle)
        with pytest.raises(ShardRuntimeError) as raised:
            await shared.run(broken.handle, {"x": activation(1)})
        assert not isinstance(raised.value, RuntimeLost | BadInput)
        ids = np.zeros((1, 32), np.int64)
        await shared.run(intact.handle, {"input_ids": ids})
    finally:
        await shared.unload(broken.handle)
        await shared.unload(intact.handle)


async def test_failed_session_never_answers_for_a_later_one(
    shared: BrowserRuntime, mlp: Shard, shard_dir: Path
) -> None:
    """onnxruntime-web reuses a released session's id for the next session created, so a
    run under the failed handle must be refused, never routed to the newcomer."""
    other = store(shard_dir, mlp_model(seed=1))  # the same inputs and outputs, other weights
    broken = await shared.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
    await shared.fail_session(broken.handle)
    later = await shared.load(other.sha256, str(other.path), EP.EXECUTION_PROVIDER_WASM)
    try:
        x = activation(3)
        with pytest.raises(ShardRuntimeError, match="failed"):
            await shared.run(broken.handle, {"x": x})
        result = await shared.run(later.handle, {"x": x})
        np.testing.assert_allclose(
            result.outputs["y"], other.reference({"x": x})["y"], rtol=0, atol=1e-4
        )
    finally:
        await shared.unload(broken.handle)
        await shared.unload(later.handle)


async def test_allocated_memory_is_resident(shared: BrowserRuntime) -> None:
    before = shared.info().memory_bytes
    size = 256 << 20
    try:
        held = await shared.allocate_memory(size)
        assert held >= size
        # Touched pages are resident. The renderer may reuse memory it already held, so
        # the tree need not grow by all of it, but by a good part.
        assert shared.info().memory_bytes - before > size // 2
    finally:
        await shared.release_memory()


async def test_cut_connection_fails_calls_and_comes_back(
    own: tuple[BrowserRuntime, Events], mlp: Shard
) -> None:
    runtime, events = own
    loaded = await runtime.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
    await runtime.set_offline(True)
    await events.wait_for(BrowserEventKind.PAGE_DISCONNECTED)
    assert runtime.state == State.BROWSER_STATE_FAILED
    async with asyncio.timeout(PROMPT_S):
        with pytest.raises(RuntimeLost):
            await runtime.run(loaded.handle, {"x": activation(1)})
    await runtime.set_offline(False)
    await events.wait_for(BrowserEventKind.PAGE_RECONNECTED, timeout=10)
    assert runtime.state == State.BROWSER_STATE_READY
    # The page kept its session through the cut.
    result = await runtime.run(loaded.handle, {"x": activation(1)})
    np.testing.assert_allclose(
        result.outputs["y"], mlp.reference({"x": activation(1)})["y"], rtol=0, atol=1e-4
    )


async def test_lost_device_is_reported_and_fails_gpu_runs(
    own: tuple[BrowserRuntime, Events], mlp: Shard, embedding: Shard
) -> None:
    runtime, events = own
    needs_webgpu(runtime)
    gpu = await runtime.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WEBGPU)
    cpu = await runtime.load(embedding.sha256, str(embedding.path), EP.EXECUTION_PROVIDER_WASM)
    await runtime.run(gpu.handle, {"x": activation(1)})
    await runtime.lose_device()
    event = await events.wait_for(BrowserEventKind.DEVICE_LOST)
    assert "destroyed" in event.message
    async with asyncio.timeout(PROMPT_S):
        with pytest.raises(ShardRuntimeError, match="device lost"):
            await runtime.run(gpu.handle, {"x": activation(1)})
    await runtime.run(cpu.handle, {"input_ids": np.zeros((1, 32), np.int64)})


# --- faults that take the browser down ------------------------------------------


async def test_crashed_page_fails_the_next_call_promptly(
    own: tuple[BrowserRuntime, Events], mlp: Shard
) -> None:
    runtime, events = own
    loaded = await runtime.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
    await runtime.crash_page()
    async with asyncio.timeout(PROMPT_S):
        with pytest.raises(RuntimeLost):
            await runtime.run(loaded.handle, {"x": activation(1)})
    await events.wait_for(BrowserEventKind.PAGE_CRASHED, timeout=15)
    assert runtime.state == State.BROWSER_STATE_FAILED
    assert runtime.info().shards == []
    with pytest.raises(RuntimeLost):
        await runtime.run(loaded.handle, {"x": activation(1)})


async def test_killed_browser_fails_calls_in_flight_and_is_reaped(
    own: tuple[BrowserRuntime, Events], mlp: Shard
) -> None:
    runtime, events = own
    # The first run of a WebGPU session compiles its shaders: long enough to kill it mid-call.
    provider = (
        EP.EXECUTION_PROVIDER_WEBGPU
        if EP.EXECUTION_PROVIDER_WEBGPU in runtime.capabilities.execution_providers
        else EP.EXECUTION_PROVIDER_WASM
    )
    loaded = await runtime.load(mlp.sha256, str(mlp.path), provider)
    pid = runtime.pid
    assert pid is not None
    in_flight = asyncio.create_task(runtime.run(loaded.handle, {"x": activation(1)}))
    await asyncio.sleep(0)  # let the run reach the socket
    await runtime.kill()
    async with asyncio.timeout(PROMPT_S):
        with pytest.raises(RuntimeLost):
            await in_flight
        with pytest.raises(RuntimeLost):
            await runtime.run(loaded.handle, {"x": activation(1)})
    await events.wait_for(BrowserEventKind.PROCESS_EXITED)
    assert runtime.state == State.BROWSER_STATE_FAILED
    assert runtime.info().memory_bytes == 0
    assert runtime.workdir is not None
    workdir = runtime.workdir
    # The exit is told at once; the reap of what the launch left follows it.
    await asyncio.to_thread(
        wait_until,
        lambda: not [p for p in launch_processes(workdir) if "chromedriver" not in p.name()],
        PROMPT_S,
        "the killed browser's processes reaped",
    )


async def test_close_during_launch_reaps_the_launch(
    shard_dir: Path, options: BrowserOptions
) -> None:
    runtime = BrowserRuntime("browser-interrupted", shard_dir, options=options)
    launch = asyncio.create_task(runtime.launch())
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: runtime.workdir is not None and bool(launch_processes(runtime.workdir)),
            30,
            "the launch to start processes",
        )
        await runtime.close()
        async with asyncio.timeout(PROMPT_S * 2):
            with pytest.raises(LaunchFailed):
                await launch
    finally:
        launch.cancel()
        await asyncio.gather(launch, return_exceptions=True)
        await runtime.close()
    assert runtime.state == State.BROWSER_STATE_STOPPED
    await asyncio.to_thread(
        wait_until,
        lambda: runtime.workdir is not None and not launch_processes(runtime.workdir),
        PROMPT_S,
        "the interrupted launch's processes to die",
    )
    assert_reaped(runtime.workdir)


# --- no orphans -------------------------------------------------------------------

_AGENT = """
import asyncio, sys
from services.browser_agent.browser import BrowserOptions, BrowserRuntime

async def main() -> None:
    options = BrowserOptions(engine=sys.argv[3], temp_root=sys.argv[2])
    runtime = BrowserRuntime("browser-orphan", sys.argv[1], options=options)
    await runtime.launch()
    print(runtime.workdir, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def agent_process(
    tmp_path: Path, shard_dir: Path, options: BrowserOptions
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A separate Python process that launched a browser and waits; its browser root."""
    root = tmp_path / "browsers"
    root.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _AGENT, str(shard_dir), str(root), options.engine],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, root
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for leftover in launch_processes(root):
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        shutil.rmtree(root, ignore_errors=True)


async def test_sigkilled_agent_leaves_no_browser_behind(
    agent_process: tuple[subprocess.Popen[str], Path], options: BrowserOptions
) -> None:
    proc, root = agent_process
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=60)
    workdir = Path(line.strip())
    assert workdir.parent == root, f"agent did not launch: {line!r}"
    names = {p.name() for p in launch_processes(workdir)}
    if options.engine == "chromium":
        assert "chromedriver" in names
        assert any("chrom" in n and n != "chromedriver" for n in names)
    else:  # the browser and its content processes (named for their roles)
        assert "firefox-esr" in names and len(launch_processes(workdir)) > 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    await asyncio.to_thread(
        wait_until, lambda: not launch_processes(workdir), 10, "the launch's processes to die"
    )
    await asyncio.to_thread(wait_until, lambda: not workdir.exists(), 10, "its folder to go")


# --- the pool ---------------------------------------------------------------------


async def test_pool_promotes_a_standby_and_replaces_it(
    shard_dir: Path, options: BrowserOptions, mlp: Shard
) -> None:
    pool = BrowserPool(shard_dir, active=1, standby=1, options=options)
    workdirs: list[Path] = []
    try:
        await pool.start()
        workdirs += [b.workdir for b in pool.browsers() if b.workdir]
        assert [b.state for b in pool.active()] == [State.BROWSER_STATE_READY]
        [standby] = pool.standbys()
        assert standby.info().state == State.BROWSER_STATE_STANDBY
        assert standby.capabilities.execution_providers

        promoted = await pool.promote_standby()
        assert promoted is standby
        assert promoted.state == State.BROWSER_STATE_READY
        loaded = await promoted.load(mlp.sha256, str(mlp.path), EP.EXECUTION_PROVIDER_WASM)
        result = await promoted.run(loaded.handle, {"x": activation(9)})
        np.testing.assert_allclose(
            result.outputs["y"], mlp.reference({"x": activation(9)})["y"], rtol=0, atol=1e-4
        )
        await pool.settle()
        [replacement] = pool.standbys()
        assert replacement is not standby
        assert len(pool.active()) == 2

        # Grown by the promotion, the pool gives back an active browser left idle; at
        # its configured size it keeps the last one.
        first = next(b for b in pool.active() if b is not promoted)
        assert await pool.shrink(first.runtime_id)
        assert pool.active() == [promoted]
        assert not await pool.shrink(promoted.runtime_id)
        assert not await pool.shrink(replacement.runtime_id)  # standbys are not shrunk

        # A standby that dies is reaped and replaced; it held nothing to recover.
        if replacement.workdir:
            workdirs.append(replacement.workdir)
        await replacement.kill()
        async with asyncio.timeout(PROMPT_S):
            while (event := await pool.events.get()).kind != BrowserEventKind.PROCESS_EXITED:
                pass
        assert event.browser_id == replacement.runtime_id
        await pool.settle()
        [third] = pool.standbys()
        assert third is not replacement
        workdirs += [b.workdir for b in pool.browsers() if b.workdir]
    finally:
        await pool.close()
        for workdir in workdirs:
            assert_reaped(workdir)


async def test_pool_keeps_its_standby_count_when_a_crash_and_a_promotion_meet(
    shard_dir: Path, options: BrowserOptions
) -> None:
    """A browser crash retires the browser (a standby launches in its place) and a
    promotion takes a standby: one launch replaces both, whichever comes first (a spare
    loaded onto the standby may promote it before the agent retires the dead browser)."""
    pool = BrowserPool(shard_dir, active=1, standby=1, options=options)
    workdirs: list[Path] = []
    try:
        await pool.start()
        workdirs += [b.workdir for b in pool.browsers() if b.workdir]
        [active] = pool.active()
        await pool.retire(active.runtime_id)  # a standby launches in its place
        await pool.promote_standby()  # its replacement is that standby: nothing added
        await pool.settle()
        assert len(pool.standbys()) == 1 and len(pool.browsers()) == 2
        workdirs += [b.workdir for b in pool.browsers() if b.workdir]

        [active] = pool.active()
        await pool.promote_standby()  # a standby launches in its place
        await pool.retire(active.runtime_id)  # that one replaces the retired one too
        await pool.settle()
        assert len(pool.standbys()) == 1 and len(pool.browsers()) == 2
        workdirs += [b.workdir for b in pool.browsers() if b.workdir]
    finally:
        await pool.close()
        for workdir in workdirs:
            assert_reaped(workdir)


async def test_a_pool_without_standbys_launches_one_for_a_retired_browser(
    shard_dir: Path, options: BrowserOptions
) -> None:
    """With no standby configured, a crashed browser still gets a successor to load into."""
    pool = BrowserPool(shard_dir, active=1, standby=0, options=options)
    workdirs: list[Path] = []
    try:
        await pool.start()
        [active] = pool.active()
        workdirs += [b.workdir for b in pool.browsers() if b.workdir]
        await pool.retire(active.runtime_id)
        await pool.settle()
        assert len(pool.standbys()) == 1 and len(pool.browsers()) == 1
        workdirs += [b.workdir for b in pool.browsers() if b.workdir]
    finally:
        await pool.close()
        for workdir in workdirs:
            assert_reaped(workdir)
