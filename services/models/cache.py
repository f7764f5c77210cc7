"""Where built models and their shards live on disk.

Layout under the cache directory:

- ``models/<name>-<version>.onnx``: full graphs, built on first use;
- ``shards/<sha256>.onnx``: shards, content-addressed;
- ``shards/index.json``: which shards a (model, strategy, count, version) cut produced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from services.models.catalogue import build_model, model_info

CACHE_ENV = "WEBSHARD_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$WEBSHARD_CACHE_DIR``, else ``~/.cache/webshard``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "webshard"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` or the default one."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The full ONNX file of catalogue model ``name``, building and caching it if missing."""
    info = model_info(name)
    path = resolve_cache_dir(cache_dir) / "models" / f"{name}-{info.version}.onnx"
    if not path.exists():
        write_atomically(path, build_model(name).SerializeToString())
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
