"""One headless browser with one page that runs shards with onnxruntime-web.

The browser's engine (``engines.py``: Chromium under Selenium, Firefox over
WebDriver BiDi) drives its life cycle and its fault hooks; tensors and shard
commands travel over the page's WebSocket to this process's loopback server (see
``server.py`` and ``protocol.py``), the same page and code for every engine.
The engine's blocking calls run in worker threads so the event loop keeps serving.

Failure is noticed three ways, whichever comes first: the page's socket closes
(a crashed renderer, a killed browser, a cut connection), the browser's main
process exits (polled), or a call passes its deadline. Calls in flight then
fail with ``RuntimeLost`` at once; none waits for a page that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from webshard.common.v1 import common_pb2
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from services.common.pulse import Pulse

from ..runtime import (
    BadInput,
    LoadResult,
    ProviderUnavailable,
    RunResult,
    RuntimeLost,
    ShardRejected,
    ShardRuntimeError,
    Tensors,
)
from .capabilities import ORT_NAMES, capabilities_from_page, choose_provider
from .engines import PageGone, make_engine
from .errors import CallTimedOut, LaunchFailed, ShardNotLoaded
from .events import BrowserEvent, BrowserEventKind, EventCallback
from .options import BrowserOptions, find_ort_dist
from .processes import Watchdog, is_alive, kill_tree, reap, tree_rss
from .protocol import decode_frame, encode_frame
from .server import PageServer

log = logging.getLogger(__name__)

State = common_pb2.BrowserState

_HELLO_TIMEOUT_S = 10.0
_CDP_TIMEOUT_S = 10.0

# The page's error kinds (page.js) and the errors they become.
_PAGE_ERRORS: dict[str, type[ShardRuntimeError]] = {
    "rejected": ShardRejected,
    "provider": ProviderUnavailable,
    "bad_input": BadInput,
    "not_found": ShardNotLoaded,
    "internal": ShardRuntimeError,
}


@dataclasses.dataclass(frozen=True)
class _Reply:
    payload: dict[str, Any]
    tensors: Tensors | None


@dataclasses.dataclass(frozen=True)
class _Shard:
    result: LoadResult
    info: common_pb2.LoadedShard
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def _digest(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


class BrowserRuntime:
    """A ShardRuntime backed by one headless browser page running onnxruntime-web.

    ``shard_dir`` is the agent's shard cache: the page fetches shard bytes from
    this runtime's loopback server, which serves only files inside it. Events the
    browser reports on its own (a lost WebGPU device, a dropped socket, an exited
    process) go to ``on_event``.
    """

    def __init__(
        self,
        browser_id: str,
        shard_dir: Path | str,
        *,
        options: BrowserOptions | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self._id = browser_id
        self._shard_dir = Path(shard_dir).resolve()
        self._options = options or BrowserOptions()
        self._on_event = on_event
        self._state: common_pb2.BrowserState.ValueType = State.BROWSER_STATE_STARTING
        self._standby = False
        self._launched = False
        self._closing = False
        self._lost: str | None = None
        self._token = secrets.token_urlsafe(24)
        self._workdir: Path | None = None
        self._server: PageServer | None = None
        self._watchdog: Watchdog | None = None
        self._engine = make_engine(self._options)
        self._socket: ServerConnection | None = None
        self.changed = Pulse()
        """Fires when the page's socket opens or closes and when the state changes."""
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._capabilities = common_pb2.Capabilities()
        self._pending: dict[int, asyncio.Future[_Reply]] = {}
        self._ids = itertools.count(1)
        self._handles = itertools.count(1)
        self._shards: dict[str, _Shard] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at = Timestamp()
        self._offline = False

    # --- identity and state -------------------------------------------------

    @property
    def runtime_id(self) -> str:
        """The browser id, unique within the agent (``browser-0``)."""
        return self._id

    @property
    def state(self) -> common_pb2.BrowserState.ValueType:
        """The life-cycle state, a common_pb2.BrowserState value."""
        return self._state

    @property
    def standby(self) -> bool:
        """True while the browser is held as a standby (launched as one, not yet promoted)."""
        return self._standby

    @property
    def capabilities(self) -> common_pb2.Capabilities:
        """What the page measured at launch."""
        return self._capabilities

    @property
    def pid(self) -> int | None:
        """The browser's main process id once launched."""
        return self._engine.browser_pid

    @property
    def engine(self) -> str:
        """The browser engine: ``chromium`` or ``firefox``."""
        return self._engine.name

    @property
    def workdir(self) -> Path | None:
        """The launch's working folder (profile, driver log); every process of the launch
        names it on its command line."""
        return self._workdir

    @property
    def connected(self) -> bool:
        """True while the page's socket is open."""
        return self._socket is not None

    @property
    def lost_reason(self) -> str | None:
        """Why the browser is gone for good (process exited, page crashed), if it is."""
        return self._lost

    def promote(self) -> None:
        """Turn a standby into a browser that hosts shards (STANDBY → READY)."""
        self._standby = False
        if self._state == State.BROWSER_STATE_STANDBY:
            self._set_state(State.BROWSER_STATE_READY)

    def info(self) -> common_pb2.BrowserInfo:
        """State, capabilities, pid, process-tree memory and loaded shards."""
        pid = self._engine.browser_pid or 0
        gone = self._lost is not None or self._state == State.BROWSER_STATE_STOPPED
        memory = tree_rss(pid) if pid and not gone else 0
        return common_pb2.BrowserInfo(
            browser_id=self._id,
            state=self._state,
            capabilities=self._capabilities,
            pid=pid,
            memory_bytes=memory,
            shards=[shard.info for shard in self._shards.values()],
            started_at=self._started_at,
            runtime=common_pb2.RUNTIME_BROWSER,
        )

    # --- life cycle ---------------------------------------------------------

    async def launch(self, *, standby: bool = False) -> None:
        """Start the browser and its page; return once the page has reported its capabilities.

        ``standby`` leaves the browser in STANDBY (runtime loaded, no shard assigned)
        instead of READY. On any failure everything started is reaped and
        LaunchFailed is raised.
        """
        if self._launched:
            raise RuntimeError(f"{self._id} was already launched")
        self._launched = True
        self._standby = standby
        self._started_at.GetCurrentTime()
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        try:
            ort_dist = find_ort_dist(self._options.ort_dist)
            self._workdir = Path(
                tempfile.mkdtemp(
                    prefix=f"webshard-{self._id}-", dir=self._options.temp_root or None
                )
            )
            # The watchdog first: from here on, whatever the launch starts dies with us.
            self._watchdog = Watchdog(self._workdir)
            await self._watchdog.start()
            self._server = PageServer(
                ort_dist=ort_dist, token=self._token, on_socket=self._serve_socket
            )
            await self._server.start()
            await asyncio.to_thread(self._engine.start, self._workdir)
            if self._closing:
                raise LaunchFailed(f"{self._id} was closed during its launch")
            # On the loop thread: the watchdog's pipe is an asyncio transport. Until these
            # lines arrive, the watchdog finds the launch by the marker on command lines.
            group, pid = self._engine.group, self._engine.browser_pid
            if group is not None:
                self._watchdog.watch_group(group)
                self._watchdog.watch_pid(group)
            if pid is not None:
                self._watchdog.watch_pid(pid)
            self._spawn(self._watch_process())
            page_url = self._server.page_url()
            async with asyncio.timeout(self._options.launch_timeout_s):
                await asyncio.to_thread(self._engine.open, page_url)
                hello = await self._hello
            ort_error = (hello.get("capabilities", {}).get("ort") or {}).get("error")
            if ort_error:
                raise LaunchFailed(
                    f"{self._id}: the page could not start onnxruntime-web: {ort_error}"
                )
        except BaseException as exc:
            tail = self._engine.log_tail()
            detail = f"; {tail}" if tail else ""
            if self._hello.done() and not self._hello.cancelled():
                self._hello.exception()  # retrieved: the launch's own error is the one raised
            interrupted = self._closing
            if interrupted:
                # close() ran while the launch was in flight: reap what the launch started
                # after it (the browser would also have re-created its profile folder).
                await asyncio.to_thread(self._reap)
                if self._workdir is not None:
                    await asyncio.to_thread(shutil.rmtree, self._workdir, True)
            else:
                await self.close()
            if isinstance(exc, ShardRuntimeError) or not isinstance(exc, Exception):
                raise
            if interrupted:
                raise LaunchFailed(f"{self._id} was closed during its launch") from exc
            # Engines fail in many types (WebDriverException, urllib3 and websockets
            # errors, OSError); to the agent they all mean the browser did not start.
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
            raise LaunchFailed(f"{self._id}: launch {what}{detail}") from exc
        self._set_state(State.BROWSER_STATE_STANDBY if standby else State.BROWSER_STATE_READY)
        log.info(
            "browser launched",
            extra={
                "browser_id": self._id,
                "pid": self._engine.browser_pid,
                "engine": self._engine.name,
                "version": self._engine.version,
                "launch_ms": round((time.perf_counter() - started) * 1000, 1),
                "execution_providers": [
                    common_pb2.ExecutionProvider.Name(p)
                    for p in self._capabilities.execution_providers
                ],
            },
        )

    async def close(self) -> None:
        """Quit the browser, SIGKILL whatever of the launch is left, delete its folder."""
        if self._closing:
            return
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(LaunchFailed(f"{self._id} was closed during its launch"))
        self._fail_pending(RuntimeLost(f"{self._id} was closed"))
        pid = self._engine.browser_pid
        if pid and is_alive(pid):
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(self._engine.quit), timeout=self._options.quit_timeout_s
                )
            except Exception as exc:  # every engine's own errors: the reap follows anyway
                log.info("quit failed; killing the browser", extra={"error": str(exc)})
        await asyncio.to_thread(self._reap)
        if self._watchdog is not None:
            self._watchdog.forget()
            await self._watchdog.stop()
        if self._server is not None:
            await self._server.close()
        if self._workdir is not None:
            await asyncio.to_thread(shutil.rmtree, self._workdir, True)
        self._shards.clear()
        self._socket = None
        self._set_state(State.BROWSER_STATE_STOPPED)

    def _reap(self) -> None:
        if self._workdir is None:
            return
        group = self._engine.group
        pids = {p for p in (group, self._engine.browser_pid) if p}
        killed = reap(str(self._workdir), {group} if group else set(), pids)
        self._engine.collect()
        if killed:
            log.info("reaped browser processes", extra={"browser_id": self._id, "killed": killed})

    # --- supervision --------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_state(self, state: common_pb2.BrowserState.ValueType) -> None:
        if state != self._state:
            log.debug(
                "browser state",
                extra={"browser_id": self._id, "state": State.Name(state)},
            )
            self._state = state
            self.changed.fire()

    def _emit(self, kind: BrowserEventKind, message: str) -> None:
        log.info(
            "browser event", extra={"browser_id": self._id, "kind": str(kind), "detail": message}
        )
        if self._on_event is not None:
            try:
                self._on_event(BrowserEvent(self._id, kind, message))
            except Exception:
                log.exception("browser event callback failed")

    def _fail_pending(self, error: ShardRuntimeError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _mark_lost(self, reason: str) -> None:
        self._lost = reason
        self._shards.clear()
        if self._hello is not None and not self._hello.done():
            # Died during launch: the launch fails now instead of at its deadline.
            self._hello.set_exception(RuntimeLost(f"{self._id}: {reason}"))
        if not self._closing:
            self._set_state(State.BROWSER_STATE_FAILED)
        self._fail_pending(RuntimeLost(f"{self._id}: {reason}"))

    async def _watch_process(self) -> None:
        pid = self._engine.browser_pid
        if pid is None:
            return
        # Polled: the browser may be a driver's child, not ours, so there is no wait() to block
        # in, and a pidfd would tie this to Linux >= 5.3 for little gain at 4 polls a second.
        while True:
            if not is_alive(pid):
                break
            await asyncio.sleep(self._options.process_poll_s)
        if self._closing:
            return
        reason = f"browser process {pid} exited"
        self._mark_lost(reason)
        # Told before the reap: the reap takes a while, and a close in the meantime (the
        # browser's last shard moved away) cancels this task.
        self._emit(BrowserEventKind.PROCESS_EXITED, reason)
        await asyncio.to_thread(self._reap)

    async def _check_page(self) -> None:
        """After the socket dropped: a crashed renderer is gone for good, a cut one is not."""
        if self._lost is not None or self._closing:
            return
        pid = self._engine.browser_pid
        if pid is None or not is_alive(pid):
            return  # the whole browser went; the process watch reports that
        try:
            message = await asyncio.wait_for(
                asyncio.to_thread(self._engine.crash_message), timeout=_CDP_TIMEOUT_S
            )
        except PageGone:
            return  # closing, or the whole browser going: reported elsewhere
        except TimeoutError:
            log.info("page check timed out", extra={"browser_id": self._id})
            return
        if message is not None and self._lost is None and not self._closing:
            self._mark_lost(f"page crashed: {message}")
            self._emit(BrowserEventKind.PAGE_CRASHED, message)

    # --- the page's socket --------------------------------------------------

    async def _serve_socket(self, conn: ServerConnection) -> None:
        try:
            async with asyncio.timeout(_HELLO_TIMEOUT_S):
                first = await conn.recv()
            hello = json.loads(first)
        except (TimeoutError, ConnectionClosed, ValueError) as exc:
            log.warning(
                "page socket sent no hello", extra={"browser_id": self._id, "error": str(exc)}
            )
            return
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            log.warning(
                "page socket's first message is not a hello", extra={"browser_id": self._id}
            )
            return
        if self._closing or self._lost is not None:
            return
        previous, self._socket = self._socket, conn
        self.changed.fire()
        if previous is not None:
            await previous.close()
        self._on_hello(hello)
        try:
            async for message in conn:
                self._dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            if self._socket is conn:
                self._socket = None
                self._on_socket_closed(conn)
                self.changed.fire()

    def _on_hello(self, hello: dict[str, Any]) -> None:
        assert self._hello is not None
        if not self._hello.done():
            self._capabilities = capabilities_from_page(hello.get("capabilities") or {})
            self._capabilities.engine = self._engine.name
            self._capabilities.engine_version = self._engine.version
            self._hello.set_result(hello)
            return
        held = set(hello.get("handles") or [])
        for handle in [h for h in self._shards if h not in held]:
            del self._shards[handle]
        if self._state == State.BROWSER_STATE_FAILED:
            self._set_state(
                State.BROWSER_STATE_STANDBY if self._standby else State.BROWSER_STATE_READY
            )
        self._emit(
            BrowserEventKind.PAGE_RECONNECTED, f"page reconnected holding {len(held)} shard(s)"
        )

    def _on_socket_closed(self, conn: ServerConnection) -> None:
        code = conn.close_code
        reason = f"page socket closed (code {code})" if code else "page socket closed"
        self._fail_pending(RuntimeLost(f"{self._id}: {reason}"))
        if self._closing or self._lost is not None or not (self._hello and self._hello.done()):
            return
        self._set_state(State.BROWSER_STATE_FAILED)
        self._emit(BrowserEventKind.PAGE_DISCONNECTED, reason)
        if not self._offline:
            self._spawn(self._check_page())

    def _dispatch(self, message: str | bytes) -> None:
        tensors: Tensors | None = None
        try:
            if isinstance(message, str):
                payload = json.loads(message)
                if "type" in payload:
                    self._on_page_message(payload)
                    return
            else:
                payload, tensors = decode_frame(message)
        except ValueError as exc:
            log.warning(
                "undecodable page message", extra={"browser_id": self._id, "error": str(exc)}
            )
            return
        future = self._pending.get(payload.get("id", -1))
        if future is not None and not future.done():
            future.set_result(_Reply(payload, tensors))

    def _on_page_message(self, message: dict[str, Any]) -> None:
        if message.get("type") != "event":
            return
        try:
            kind = BrowserEventKind(str(message.get("kind")))
        except ValueError:
            log.warning("unknown page event", extra={"browser_id": self._id, "event": message})
            return
        self._emit(kind, str(message.get("message", "")))

    def _connection(self) -> ServerConnection:
        if self._lost is not None:
            raise RuntimeLost(f"{self._id}: {self._lost}")
        if self._closing:
            raise RuntimeLost(f"{self._id} was closed")
        if self._socket is None:
            raise RuntimeLost(f"{self._id}: the page is not connected")
        return self._socket

    async def _request(self, encode: Callable[[int], str | bytes], what: str) -> _Reply:
        conn = self._connection()
        request_id = next(self._ids)
        future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await conn.send(encode(request_id))
            async with asyncio.timeout(self._options.call_timeout_s):
                reply = await future
        except ConnectionClosed as exc:
            raise RuntimeLost(f"{self._id}: the page socket closed during {what}") from exc
        except TimeoutError as exc:
            raise CallTimedOut(
                f"{self._id}: {what} got no answer in {self._options.call_timeout_s} s"
            ) from exc
        finally:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by a lost socket while the send was failing: seen
        if not reply.payload.get("ok"):
            error = reply.payload.get("error") or {}
            kind = _PAGE_ERRORS.get(str(error.get("kind")), ShardRuntimeError)
            raise kind(f"{self._id}: {what} failed in the page: {error.get('message', '')}")
        return reply

    async def _control(self, op: str, what: str, **fields: Any) -> dict[str, Any]:
        reply = await self._request(
            lambda request_id: json.dumps({"id": request_id, "op": op, **fields}), what
        )
        return reply.payload

    # --- shards -------------------------------------------------------------

    async def load(self, sha256: str, path: str, provider: int) -> LoadResult:
        """Load the shard stored at ``path`` (inside the shard cache, hashing to ``sha256``).

        ``provider`` is a common_pb2.ExecutionProvider value; UNSPECIFIED chooses from
        the page's capabilities (see ``choose_provider``) and says why.
        """
        self._connection()
        sha256 = sha256.lower()
        provider, reason = choose_provider(self._capabilities, provider, self._id)
        file = await asyncio.to_thread(Path(path).resolve)
        if not file.is_relative_to(self._shard_dir):
            raise ShardRejected(f"shard file {file} is outside the shard cache {self._shard_dir}")
        try:
            size, digest = await asyncio.to_thread(_digest, file)
        except OSError as exc:
            raise ShardRejected(f"cannot read shard file {file}: {exc}") from exc
        if digest != sha256:
            raise ShardRejected(f"shard file {file} hashes to {digest}, not {sha256}")
        assert self._server is not None
        self._server.add_shard(sha256, file)
        handle = f"{self._id}/{sha256[:12]}/{next(self._handles)}"
        started = time.perf_counter()
        answer = await self._control(
            "load",
            f"load of shard {sha256[:12]}",
            handle=handle,
            url=self._server.shard_url(sha256),
            provider=ORT_NAMES[provider],
        )
        load_ms = (time.perf_counter() - started) * 1000
        inputs = tuple(str(n) for n in answer.get("inputNames", []))
        outputs = tuple(str(n) for n in answer.get("outputNames", []))
        result = LoadResult(
            handle=handle, execution_provider=provider, reason=reason, load_ms=load_ms
        )
        self._shards[handle] = _Shard(
            result=result,
            info=common_pb2.LoadedShard(
                handle=handle,
                spec=common_pb2.ShardSpec(
                    sha256=sha256, size_bytes=size, input_names=inputs, output_names=outputs
                ),
                execution_provider=provider,
                execution_provider_reason=reason,
                engine=self._engine.name,
            ),
            input_names=inputs,
            output_names=outputs,
        )
        log.info(
            "shard loaded",
            extra={
                "browser_id": self._id,
                "handle": handle,
                "execution_provider": common_pb2.ExecutionProvider.Name(provider),
                "load_ms": round(load_ms, 1),
            },
        )
        return result

    def _shard(self, handle: str) -> _Shard:
        shard = self._shards.get(handle)
        if shard is None:
            self._connection()  # a lost browser says so rather than "not loaded"
            raise ShardNotLoaded(f"{self._id} has no shard loaded as {handle}")
        return shard

    async def run(self, handle: str, inputs: Tensors) -> RunResult:
        """Run one activation through a loaded shard; the page times ``session.run``."""
        shard = self._shard(handle)
        missing = [name for name in shard.input_names if name not in inputs]
        unknown = [name for name in inputs if name not in shard.input_names]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown {', '.join(unknown)}")
            raise BadInput(
                f"inputs do not match shard {handle}: {'; '.join(parts)} "
                f"(it takes {', '.join(shard.input_names)})"
            )
        arrays = {name: np.asarray(inputs[name]) for name in shard.input_names}
        reply = await self._request(
            lambda request_id: encode_frame(
                {"id": request_id, "op": "run", "handle": handle}, arrays
            ),
            f"run of {handle}",
        )
        if reply.tensors is None:
            raise ShardRuntimeError(
                f"{self._id}: the page answered run of {handle} without tensors"
            )
        return RunResult(outputs=reply.tensors, compute_ms=float(reply.payload["compute_ms"]))

    async def unload(self, handle: str) -> None:
        """Release a loaded shard; an unknown handle is already released."""
        if self._shards.pop(handle, None) is None:
            return
        with contextlib.suppress(RuntimeLost):
            await self._control("unload", f"unload of {handle}", handle=handle)

    # --- fault hooks --------------------------------------------------------

    async def crash_page(self) -> None:
        """Crash the page's renderer (Chromium: CDP ``Page.crash``; Firefox: the page's
        content process is killed); its shards are lost."""
        self._connection()
        try:
            await asyncio.wait_for(
                asyncio.to_thread(self._engine.crash_page), timeout=_CDP_TIMEOUT_S
            )
        except (PageGone, TimeoutError) as exc:
            # The command's own target dies under it, so an error here is the expected answer.
            log.debug("the page crash answered with an error", extra={"error": str(exc)})

    async def kill(self) -> None:
        """SIGKILL the browser's whole process tree, as an out-of-memory killer would."""
        pid = self._engine.browser_pid
        if pid is None:
            raise RuntimeLost(f"{self._id} was never launched")
        await asyncio.to_thread(kill_tree, pid)

    async def set_offline(self, offline: bool) -> None:
        """Cut the page off the agent (or reconnect it) as a network loss would.

        The engine's own emulation (Chromium: CDP ``Network.emulateNetworkConditions``;
        Firefox: BiDi ``emulation.setNetworkConditions``) is applied for real, but a
        browser does not close a WebSocket that is already open when it goes offline
        (it only fails new connections), so the cut is completed from the
        agent's side: the server closes the page's socket and refuses new ones until
        ``set_offline(False)``. The page keeps its shards and reconnects by itself
        once allowed (event ``page_reconnected``).
        """
        assert self._server is not None
        self._offline = offline

        async def emulate() -> None:
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(self._engine.emulate_offline, offline),
                    timeout=_CDP_TIMEOUT_S,
                )
            except PageGone as exc:
                raise RuntimeLost(f"{self._id}: {exc}") from exc

        if offline:
            # The cut first: it takes effect at once, and activations in flight fail
            # now rather than wait on a page that chromedriver may keep busy for seconds.
            self._server.accept_sockets = False
            if self._socket is not None:
                await self._socket.close(code=1001, reason="connection cut by fault injection")
            try:
                await emulate()
            except RuntimeLost as exc:
                if not self._closing:
                    raise
                # Cut off, the page lost its shards to recovery and the agent closed the
                # empty browser before the emulation ran: the cut took effect all the same.
                log.info("browser closed while going offline", extra={"error": str(exc)})
        else:
            try:
                await emulate()
            finally:
                self._server.accept_sockets = True

    async def allocate_memory(self, size_bytes: int) -> int:
        """Allocate and touch ``size_bytes`` in the page, kept until ``release_memory``.

        Returns the page's total held allocation; allocation stops early (and the
        total says so) when the page cannot get more.
        """
        answer = await self._control(
            "allocate", f"allocation of {size_bytes} bytes", bytes=int(size_bytes)
        )
        if answer.get("error"):
            log.info("page allocation stopped early", extra={"error": answer["error"]})
        return int(answer.get("total", 0))

    async def release_memory(self) -> int:
        """Drop the page's held allocation (the garbage collector frees it); returns its size."""
        answer = await self._control("release_memory", "memory release")
        return int(answer.get("released", 0))

    async def fail_session(self, handle: str) -> None:
        """Release the shard's onnxruntime-web session under it: its next run fails in ORT."""
        self._shard(handle)
        await self._control("fail_session", f"failing {handle}", handle=handle)

    async def lose_device(self) -> None:
        """Destroy onnxruntime-web's WebGPU device; the page reports ``device_lost``."""
        await self._control("lose_device", "device loss")
