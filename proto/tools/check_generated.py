#!/usr/bin/env python3
"""Fails when the committed generated code differs from what `make proto` would write.

Usage: check_generated.py [--workspace DIR] [--generated DIR]

Regenerates the contracts of the buf workspace DIR (default: the repository) into
a temporary directory with the repository's buf.gen.yaml, then compares every
generated module (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``, ``*_pb2_grpc.pyi``)
with the committed ones under DIR/clients/python: changed, missing and stray
files are all reported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")


def generated_files(root: Path) -> dict[str, bytes]:
    """Generated modules under ``root``, by path relative to it."""
    files: dict[str, bytes] = {}
    for pattern in GENERATED:
        for path in root.rglob(pattern):
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


def stale(workspace: Path, committed: Path) -> list[str]:
    """Differences between fresh generation from ``workspace`` and ``committed``."""
    # buf and the plugins come from node_modules and this Python's environment,
    # whether or not they are on the caller's PATH.
    path = os.pathsep.join(
        [str(REPO / "node_modules" / ".bin"), str(Path(sys.executable).parent), os.environ["PATH"]]
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            ["buf", "generate", "--template", str(REPO / "buf.gen.yaml"), "-o", tmp],
            cwd=workspace,
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            return [f"buf generate failed: {result.stderr.strip()}"]
        fresh = generated_files(Path(tmp) / "clients" / "python")
    current = generated_files(committed)
    problems = [f"stale: {p}" for p in sorted(fresh) if p in current and fresh[p] != current[p]]
    problems += [f"missing: {p}" for p in sorted(set(fresh) - set(current))]
    problems += [f"stray: {p}" for p in sorted(set(current) - set(fresh))]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=REPO)
    parser.add_argument("--generated", type=Path, default=REPO / "clients" / "python")
    args = parser.parse_args()
    problems = stale(args.workspace.resolve(), args.generated.resolve())
    for line in problems:
        print(line)
    if problems:
        print("generated code is out of date with proto/: run `make proto` and commit the result")
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
