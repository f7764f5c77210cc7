"""The loopback server one page talks to: its files, onnxruntime-web, shard bytes, its socket.

Everything the page needs comes from here (nothing from a CDN), over one port on
127.0.0.1: plain HTTP GETs for files and a WebSocket at ``/socket``. The
``websockets`` server answers both: ``process_request`` returns a response for a
file, or None to go on with the WebSocket handshake.

Every response carries ``Cross-Origin-Opener-Policy: same-origin`` and
``Cross-Origin-Embedder-Policy: require-corp``, which make the page
cross-origin isolated, so it gets SharedArrayBuffer and onnxruntime-web's
threaded wasm. Shards and the socket need the launch's token, so another local
process cannot read shard bytes or drive the page.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
SOCKET_PATH = "/socket"

_MIME_TYPES = MappingProxyType(
    {
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".mjs": "text/javascript; charset=utf-8",
        ".wasm": "application/wasm",
        ".map": "application/json",
        ".onnx": "application/octet-stream",
    }
)
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHARD_PATH = re.compile(r"^/shards/([0-9a-f]{64})\.onnx$")


class _QuietHttpLog(logging.LoggerAdapter[logging.Logger]):
    """websockets logs every connection and plain HTTP answer at INFO; DEBUG is enough here."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.INFO:
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


class PageServer:
    """Serves one page its files and shards and accepts its WebSocket."""

    def __init__(
        self,
        *,
        ort_dist: Path,
        token: str,
        on_socket: Callable[[ServerConnection], Awaitable[None]],
    ) -> None:
        self._ort_dist = ort_dist
        self._token = token
        self._on_socket = on_socket
        self._shards: MutableMapping[str, Path] = {}
        self._server: Server | None = None
        self.accept_sockets = True
        """False refuses new page sockets (503), for cutting the page off the agent."""

    @property
    def port(self) -> int:
        """The ephemeral port chosen at start."""
        if self._server is None:
            raise RuntimeError("page server is not started")
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def page_url(self) -> str:
        """The page's address, with the launch's token."""
        return f"{self.origin}/?token={self._token}"

    def shard_url(self, sha256: str) -> str:
        """Where the page fetches a registered shard (a path with the token)."""
        return f"/shards/{sha256}.onnx?token={self._token}"

    def add_shard(self, sha256: str, path: Path) -> None:
        """Serve the file at ``path`` as shard ``sha256``."""
        self._shards[sha256] = path

    async def start(self) -> None:
        """Listen on 127.0.0.1 on an ephemeral port."""
        self._server = await serve(
            self._on_socket,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            # Activations can be many MiB; the page is trusted and on loopback.
            max_size=None,
            # Tensors do not compress; deflate would only cost CPU on both ends.
            compression=None,
            logger=_QuietHttpLog(log, {}),
        )

    async def close(self) -> None:
        """Stop listening and close the page's socket."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _authorized(self, query: str) -> bool:
        tokens = parse_qs(query).get("token", [])
        return len(tokens) == 1 and hmac.compare_digest(tokens[0], self._token)

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        url = urlsplit(request.path)
        path = url.path
        if path == SOCKET_PATH:
            if not self._authorized(url.query):
                return self._plain(connection, http.HTTPStatus.FORBIDDEN, "bad token\n")
            if not self.accept_sockets:
                return self._plain(
                    connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "page is cut off\n"
                )
            return None
        file: Path | None = None
        if path in ("/", "/index.html"):
            file = STATIC_DIR / "index.html"
        elif path == "/page.js":
            file = STATIC_DIR / "page.js"
        elif path.startswith("/ort/") and _FILE_NAME.match(path[len("/ort/") :]):
            file = self._ort_dist / path[len("/ort/") :]
        elif match := _SHARD_PATH.match(path):
            if not self._authorized(url.query):
                return self._plain(connection, http.HTTPStatus.FORBIDDEN, "bad token\n")
            file = self._shards.get(match.group(1))
        if file is None or file.suffix not in _MIME_TYPES:
            return self._plain(connection, http.HTTPStatus.NOT_FOUND, f"{path} not found\n")
        try:
            body = await asyncio.to_thread(file.read_bytes)
        except OSError as exc:
            log.warning("page server cannot read %s: %s", file, exc)
            return self._plain(connection, http.HTTPStatus.NOT_FOUND, f"{path} not found\n")
        response = self._plain(connection, http.HTTPStatus.OK, "")
        response.body = body
        # Headers is a multi-map: assignment appends, so drop respond()'s values first.
        del response.headers["Content-Length"]
        del response.headers["Content-Type"]
        response.headers["Content-Length"] = str(len(body))
        response.headers["Content-Type"] = _MIME_TYPES[file.suffix]
        return response

    @staticmethod
    def _plain(connection: ServerConnection, status: http.HTTPStatus, text: str) -> Response:
        response = connection.respond(status, text)
        # respond() sets Content-Type and Content-Length; add the isolation headers.
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Embedder-Policy"] = "require-corp"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response
