"""What every benchmark shares: machine facts, percentiles, the table and the JSON file.

A benchmark is `make bench-NAME`: it prints a table and writes
`bench-results/NAME.json` as {"benchmark", "machine", "rows"}; each row holds one
measured case, its parameters beside figures named with their unit.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results"


def machine() -> dict[str, Any]:
    """Facts about the machine the figures came from."""
    versions = {}
    for name, binary in (("chromium", "/usr/bin/chromium"), ("firefox", "/usr/bin/firefox-esr")):
        versions[name] = ""
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            versions[name] = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
    return {
        "hostname": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
        "gpu": "none (WebGPU runs on software adapters: Chromium's SwiftShader, Firefox's "
        "Mesa lavapipe)"
        if not Path("/dev/nvidia0").exists()
        else "nvidia",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50, p95 and max of a list of milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p95_ms": round(float(np.percentile(values, 95)), 3),
        "max_ms": round(float(values.max()), 3),
    }


def write(name: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Print the rows as a table and write bench-results/NAME.json."""
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_cell(row.get(c)).ljust(widths[c]) for c in columns))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows}, indent=2))
    print(f"\nwrote {path.relative_to(REPO)}")
    return path


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 0.01 else f"{value:.2f}"
    return "" if value is None else str(value)
