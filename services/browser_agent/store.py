"""The agent's shard store: shard bytes on disk, named by their SHA-256.

A shard is written to a temporary file while its chunks arrive, hashed on the
way, and renamed into place only when its size and hash match what the header
promised, so a crash or a bad upload never leaves a wrong file under a good name.
A reload after a browser crash, or a standby taking over, reads from here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(ValueError):
    """Shard bytes that cannot be accepted; the message says why."""


def check_sha256(sha256: str) -> None:
    """Raise StoreError unless ``sha256`` is 64 lowercase hex digits."""
    if not _SHA256.match(sha256):
        raise StoreError(f"shard hash {sha256!r} is not 64 lowercase hex digits (a SHA-256)")


class ShardStore:
    """Content-addressed shard files under ``<root>/shards``."""

    def __init__(self, root: Path, max_shard_bytes: int) -> None:
        self.root = root / "shards"
        self.root.mkdir(parents=True, exist_ok=True)
        self._max = max_shard_bytes

    def path(self, sha256: str) -> Path:
        """Where the shard with this hash lives (whether or not it is there)."""
        check_sha256(sha256)
        return self.root / f"{sha256}.onnx"

    def has(self, sha256: str) -> bool:
        """True when the shard's bytes are stored."""
        return self.path(sha256).is_file()

    def hashes(self) -> list[str]:
        """Every stored shard's hash."""
        return sorted(p.stem for p in self.root.glob("*.onnx"))

    async def put(self, sha256: str, size: int, chunks: AsyncIterator[bytes]) -> Path:
        """Store the bytes from ``chunks`` if they are ``size`` long and hash to ``sha256``."""
        target = self.path(sha256)
        if size <= 0:
            raise StoreError("shard size_bytes must be positive")
        if size > self._max:
            raise StoreError(
                f"shard of {size} bytes exceeds this agent's limit of {self._max} bytes"
            )
        digest = hashlib.sha256()
        received = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise StoreError(
                            f"received more than the {size} bytes the header announced"
                        )
                    digest.update(chunk)
                    out.write(chunk)
            if received != size:
                raise StoreError(f"received {received} bytes, the header announced {size}")
            actual = digest.hexdigest()
            if actual != sha256:
                raise StoreError(f"the bytes hash to {actual}, not to the announced {sha256}")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # gone already when the rename succeeded
        return target
