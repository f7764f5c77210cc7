"""A page's measured capabilities, and the execution provider chosen from them."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from webshard.common.v1 import common_pb2

from ..runtime import ProviderUnavailable

EP = common_pb2.ExecutionProvider

# onnxruntime-web's names for the providers a browser can run.
ORT_NAMES: Mapping[int, str] = MappingProxyType(
    {
        EP.EXECUTION_PROVIDER_WEBGPU: "webgpu",
        EP.EXECUTION_PROVIDER_WEBNN: "webnn",
        EP.EXECUTION_PROVIDER_WASM: "wasm",
    }
)


def capabilities_from_page(report: Mapping[str, Any]) -> common_pb2.Capabilities:
    """The Capabilities message for what the page measured (see ``probe`` in page.js)."""
    webgpu = report.get("webgpu") or {}
    webnn = report.get("webnn") or {}
    wasm = report.get("wasm") or {}
    caps = common_pb2.Capabilities(
        webgpu=common_pb2.WebGpuAdapter(
            available=bool(webgpu.get("available")),
            vendor=str(webgpu.get("vendor", "")),
            architecture=str(webgpu.get("architecture", "")),
            device=str(webgpu.get("device", "")),
            description=str(webgpu.get("description", "")),
            is_fallback_adapter=bool(webgpu.get("isFallbackAdapter")),
            limits={str(k): int(v) for k, v in (webgpu.get("limits") or {}).items()},
            reason=str(webgpu.get("reason", "")),
        ),
        webnn=common_pb2.WebNnSupport(
            available=bool(webnn.get("available")), reason=str(webnn.get("reason", ""))
        ),
        wasm=common_pb2.WasmSupport(
            threads=bool(wasm.get("threads")),
            simd=bool(wasm.get("simd")),
            hardware_concurrency=int(wasm.get("hardwareConcurrency", 0)),
        ),
        user_agent=str(report.get("userAgent", "")),
    )
    # A provider is listed only when onnxruntime-web started and the browser has it.
    ort_ok = not (report.get("ort") or {}).get("error")
    if ort_ok and caps.webgpu.available:
        caps.execution_providers.append(EP.EXECUTION_PROVIDER_WEBGPU)
    if ort_ok and caps.webnn.available:
        caps.execution_providers.append(EP.EXECUTION_PROVIDER_WEBNN)
    if ort_ok and wasm.get("available"):
        caps.execution_providers.append(EP.EXECUTION_PROVIDER_WASM)
    return caps


def _adapter_words(adapter: common_pb2.WebGpuAdapter) -> str:
    words = " ".join(w for w in (adapter.vendor, adapter.architecture) if w)
    if adapter.description:
        words = f"{words} ({adapter.description})" if words else adapter.description
    return words or "unnamed adapter"


def _webnn_words(webnn: common_pb2.WebNnSupport) -> str:
    if webnn.available:
        return "WebNN available but chosen only when pinned"
    return f"WebNN unavailable: {webnn.reason}"


def choose_provider(
    caps: common_pb2.Capabilities, requested: int, browser_id: str
) -> tuple[common_pb2.ExecutionProvider.ValueType, str]:
    """The provider to run a shard with and why; ProviderUnavailable when a pin cannot hold.

    Unpinned, a browser runs a shard on WebGPU when it has a hardware adapter and
    on wasm otherwise: a software fallback adapter (SwiftShader) is far slower
    than wasm on the same CPU. WebNN is used only when pinned.
    """
    adapter = caps.webgpu
    usable = set(caps.execution_providers)
    if requested == EP.EXECUTION_PROVIDER_UNSPECIFIED:
        if EP.EXECUTION_PROVIDER_WEBGPU in usable and not adapter.is_fallback_adapter:
            return (
                EP.EXECUTION_PROVIDER_WEBGPU,
                f"webgpu: hardware adapter {_adapter_words(adapter)}",
            )
        if EP.EXECUTION_PROVIDER_WASM not in usable:
            raise ProviderUnavailable(f"{browser_id} has no usable execution provider")
        if adapter.available:
            why = f"WebGPU adapter is a software fallback: {_adapter_words(adapter)}"
        else:
            why = f"no WebGPU adapter: {adapter.reason}"
        return EP.EXECUTION_PROVIDER_WASM, f"wasm: {why}; {_webnn_words(caps.webnn)}"
    if requested == EP.EXECUTION_PROVIDER_WEBGPU:
        if EP.EXECUTION_PROVIDER_WEBGPU not in usable:
            raise ProviderUnavailable(
                f"webgpu is not available in {browser_id}: {adapter.reason or 'no adapter'}"
            )
        kind = "software fallback" if adapter.is_fallback_adapter else "hardware"
        reason = f"webgpu: pinned by the request; {kind} adapter {_adapter_words(adapter)}"
        return EP.EXECUTION_PROVIDER_WEBGPU, reason
    if requested == EP.EXECUTION_PROVIDER_WEBNN:
        if EP.EXECUTION_PROVIDER_WEBNN not in usable:
            raise ProviderUnavailable(
                f"webnn is not available in {browser_id}: {caps.webnn.reason or 'no context'}"
            )
        return EP.EXECUTION_PROVIDER_WEBNN, "webnn: pinned by the request"
    if requested == EP.EXECUTION_PROVIDER_WASM:
        if EP.EXECUTION_PROVIDER_WASM not in usable:
            raise ProviderUnavailable(f"wasm is not available in {browser_id}")
        return EP.EXECUTION_PROVIDER_WASM, "wasm: pinned by the request"
    name = EP.Name(EP.ValueType(requested)) if requested in EP.values() else str(requested)
    raise ProviderUnavailable(
        f"{name} cannot run in a browser; {browser_id} runs webgpu, webnn or wasm "
        "(EXECUTION_PROVIDER_CPU is the native runtime's)"
    )
