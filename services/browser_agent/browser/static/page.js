// The page half of a webshard browser runtime.
//
// The agent serves this file, onnxruntime-web and shard bytes from its own
// loopback server and drives the page over one WebSocket: JSON text frames for
// control, binary frames for activations. A binary frame is
// [u32 LE header length][header JSON][padding to 8][tensor data, each block
// 8-aligned]; header.tensors lists {name, dtype, shape, offset, nbytes} with
// offsets from the start of the data section (see protocol.py).
//
// The page measures its capabilities once, connects, says hello, then loads
// shards into onnxruntime-web sessions and runs them on request. If its socket
// drops (the agent cut it, or the network went away) it reconnects and says
// hello again with the shards it still holds.

const TOKEN = new URLSearchParams(location.search).get("token") ?? "";
const ORT_MODULE = "/ort/ort.min.mjs";
const ORT_DIST = "/ort/";

const ARRAYS = {
  float32: Float32Array,
  float16: Uint16Array,
  float64: Float64Array,
  int64: BigInt64Array,
  int32: Int32Array,
  int8: Int8Array,
  uint8: Uint8Array,
  bool: Uint8Array,
};

// An ONNX model of one Identity node (float32 [1] -> [1], opset 13), made with
// onnx.helper. Creating a session from it at start compiles onnxruntime-web's
// wasm, so a standby page is ready before its first shard arrives.
const WARMUP_MODEL = new Uint8Array([
  8, 8, 18, 8, 119, 101, 98, 115, 104, 97, 114, 100, 58, 60, 10, 16, 10, 1, 120, 18, 1, 121, 34, 8,
  73, 100, 101, 110, 116, 105, 116, 121, 18, 6, 119, 97, 114, 109, 117, 112, 90, 15, 10, 1, 120,
  18, 10, 10, 8, 8, 1, 18, 4, 10, 2, 8, 1, 98, 15, 10, 1, 121, 18, 10, 10, 8, 8, 1, 18, 4, 10, 2,
  8, 1, 66, 4, 10, 0, 16, 13,
]);

// Memory held on purpose by allocate(); freed by releaseMemory().
const MEMORY_CHUNK = 16 * 1024 * 1024;
const PAGE_SIZE = 4096;

const state = {
  ort: null,
  ortError: "",
  capabilities: null,
  sessions: new Map(), // handle -> {session, provider, inputNames, outputNames, released}
  socket: null,
  reconnectDelay: 100,
  // onnxruntime-web does not take concurrent calls on one session well, and the
  // wasm backend is one instance per page: every ORT call waits for the last.
  work: Promise.resolve(),
  watchedDevice: null,
  // Set once the WebGPU device is lost: webgpu sessions cannot run any more, and a
  // run in flight may never settle (ORT's buffer mapping rejects out of its reach).
  deviceLost: null,
  deviceLostSignal: null,
  hoard: [],
  hoardBytes: 0,
};

class PageError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

function describe(err) {
  if (err instanceof Error || err instanceof DOMException) {
    return err.name && err.name !== "Error" ? `${err.name}: ${err.message}` : err.message;
  }
  return String(err);
}

function sendJson(message) {
  const socket = state.socket;
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify(message));
  }
}

function sendEvent(kind, message) {
  sendJson({ type: "event", kind, message });
}

function serialized(fn) {
  const result = state.work.then(() => fn());
  state.work = result.catch(() => {});
  return result;
}

// --- capabilities -----------------------------------------------------------

async function probeWebGpu() {
  if (!("gpu" in navigator)) {
    return { available: false, reason: "navigator.gpu is not defined: no WebGPU in this context" };
  }
  let adapter;
  try {
    adapter = await navigator.gpu.requestAdapter();
  } catch (err) {
    return { available: false, reason: `navigator.gpu.requestAdapter() failed: ${describe(err)}` };
  }
  if (!adapter) {
    return { available: false, reason: "navigator.gpu.requestAdapter() returned null" };
  }
  const info = adapter.info ?? {};
  const limits = {};
  // GPUSupportedLimits exposes its limits as enumerable prototype getters.
  for (const key in adapter.limits) {
    const value = adapter.limits[key];
    if (typeof value === "number") limits[key] = value;
  }
  return {
    available: true,
    vendor: info.vendor ?? "",
    architecture: info.architecture ?? "",
    device: info.device ?? "",
    description: info.description ?? "",
    isFallbackAdapter: Boolean(info.isFallbackAdapter ?? adapter.isFallbackAdapter),
    limits,
    reason: "",
  };
}

async function probeWebNn() {
  if (!navigator.ml) {
    return { available: false, reason: "navigator.ml is not defined: no WebNN in this browser" };
  }
  try {
    const context = await navigator.ml.createContext();
    context.destroy?.();
    return { available: true, reason: "" };
  } catch (err) {
    return { available: false, reason: describe(err) };
  }
}

function probeWasm() {
  // The smallest module using a v128 instruction (as wasm-feature-detect checks SIMD).
  const simdModule = new Uint8Array([
    0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253,
    15, 253, 98, 11,
  ]);
  const available = typeof WebAssembly === "object";
  return {
    available,
    threads: Boolean(globalThis.crossOriginIsolated) && typeof SharedArrayBuffer === "function",
    simd: available && WebAssembly.validate(simdModule),
    hardwareConcurrency: navigator.hardwareConcurrency ?? 0,
    crossOriginIsolated: Boolean(globalThis.crossOriginIsolated),
  };
}

async function probe() {
  const [webgpu, webnn] = await Promise.all([probeWebGpu(), probeWebNn()]);
  return {
    webgpu,
    webnn,
    wasm: probeWasm(),
    userAgent: navigator.userAgent,
    ort: { version: state.ort?.env?.versions?.web ?? "", error: state.ortError },
  };
}

// --- shards -----------------------------------------------------------------

function watchDevice() {
  // The WebGPU device onnxruntime-web made for its webgpu execution provider.
  const device = state.ort.env.webgpu?.device;
  if (!device || state.watchedDevice === device) return;
  state.watchedDevice = device;
  state.deviceLostSignal = device.lost.then((info) => {
    const message = `WebGPU device lost (${info.reason}): ${info.message}`;
    state.deviceLost = message;
    sendEvent("device_lost", message);
    throw new PageError("internal", message);
  });
  // Nobody may await the signal; it must not count as an unhandled rejection.
  state.deviceLostSignal.catch(() => {});
}

function loadErrorKind(message) {
  // onnxruntime-web throws this when no listed execution provider could start.
  return /no available backend found/.test(message) ? "provider" : "rejected";
}

async function load({ handle, url, provider }) {
  if (!state.ort) throw new PageError("internal", `onnxruntime-web is not loaded: ${state.ortError}`);
  const response = await fetch(url);
  if (!response.ok) {
    throw new PageError("rejected", `fetching the shard failed: HTTP ${response.status}`);
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  let session;
  try {
    session = await state.ort.InferenceSession.create(bytes, { executionProviders: [provider] });
  } catch (err) {
    const message = describe(err);
    throw new PageError(loadErrorKind(message), message);
  }
  if (provider === "webgpu") watchDevice();
  state.sessions.set(handle, {
    session,
    provider,
    inputNames: [...session.inputNames],
    outputNames: [...session.outputNames],
    released: false,
  });
  return { inputNames: session.inputNames, outputNames: session.outputNames };
}

async function unload({ handle }) {
  const entry = state.sessions.get(handle);
  if (!entry) return {};
  state.sessions.delete(handle);
  if (!entry.released) await entry.session.release();
  return {};
}

async function failSession({ handle }) {
  const entry = state.sessions.get(handle);
  if (!entry) throw new PageError("not_found", `no shard is loaded as ${handle}`);
  // Release the real session under the handle: its next run fails (run refuses it).
  if (!entry.released) {
    entry.released = true;
    await entry.session.release();
  }
  return {};
}

async function loseDevice() {
  const device = state.ort?.env.webgpu?.device;
  if (!device) {
    throw new PageError("not_found", "no WebGPU device: no shard in this page runs on webgpu");
  }
  device.destroy();
  return {};
}

function allocate({ bytes }) {
  let allocated = 0;
  let error = "";
  while (allocated < bytes) {
    const size = Math.min(MEMORY_CHUNK, bytes - allocated);
    let chunk;
    try {
      chunk = new Uint8Array(size);
    } catch (err) {
      error = describe(err);
      break;
    }
    // Touch every page so the memory is really resident, not just reserved.
    for (let i = 0; i < size; i += PAGE_SIZE) chunk[i] = 1;
    state.hoard.push(chunk);
    allocated += size;
  }
  state.hoardBytes += allocated;
  return { allocated, total: state.hoardBytes, error };
}

function releaseMemory() {
  const released = state.hoardBytes;
  state.hoard = [];
  state.hoardBytes = 0;
  // Collect now (the browser runs with --expose-gc) so the memory leaves the
  // process at once, as it would from a real leak that was fixed.
  if (typeof globalThis.gc === "function") globalThis.gc();
  return { released };
}

function runErrorKind(message) {
  // ERROR_CODE 2 is ORT_INVALID_ARGUMENT: wrong shape, rank or element type of an input.
  if (/ERROR_CODE: 2,/.test(message) || /is missing in 'feeds'/.test(message)) return "bad_input";
  return "internal";
}

function decodeFrame(buffer) {
  const headerLength = new DataView(buffer).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, headerLength)));
  const base = Math.ceil((4 + headerLength) / 8) * 8;
  return { header, base };
}

function encodeFrame(header, tensors) {
  const entries = [];
  let offset = 0;
  for (const t of tensors) {
    entries.push({ name: t.name, dtype: t.dtype, shape: t.shape, offset, nbytes: t.bytes.byteLength });
    offset += Math.ceil(t.bytes.byteLength / 8) * 8;
  }
  const headerBytes = new TextEncoder().encode(JSON.stringify({ ...header, tensors: entries }));
  const base = Math.ceil((4 + headerBytes.byteLength) / 8) * 8;
  const frame = new ArrayBuffer(base + offset);
  new DataView(frame).setUint32(0, headerBytes.byteLength, true);
  new Uint8Array(frame, 4, headerBytes.byteLength).set(headerBytes);
  tensors.forEach((t, i) => new Uint8Array(frame, base + entries[i].offset).set(t.bytes));
  return frame;
}

async function run(header, buffer, base) {
  const entry = state.sessions.get(header.handle);
  if (!entry) throw new PageError("not_found", `no shard is loaded as ${header.handle}`);
  // onnxruntime-web gives a released session's id to the next session it creates: run
  // it and the newcomer's graph answers under this handle's output names.
  if (entry.released) {
    throw new PageError("internal", `the session of ${header.handle} failed; load the shard again`);
  }
  const feeds = {};
  for (const t of header.tensors) {
    const TypedArray = ARRAYS[t.dtype];
    if (!TypedArray) {
      throw new PageError("bad_input", `input ${t.name} has unsupported type ${t.dtype}`);
    }
    const data = new TypedArray(buffer, base + t.offset, t.nbytes / TypedArray.BYTES_PER_ELEMENT);
    feeds[t.name] = new state.ort.Tensor(t.dtype, data, t.shape);
  }
  const missing = entry.inputNames.filter((name) => !(name in feeds));
  if (missing.length) {
    throw new PageError(
      "bad_input",
      `missing input ${missing.join(", ")}; the shard takes ${entry.inputNames.join(", ")}`,
    );
  }
  const onGpu = entry.provider === "webgpu";
  if (onGpu && state.deviceLost) throw new PageError("internal", state.deviceLost);
  const start = performance.now();
  let results;
  try {
    const running = entry.session.run(feeds);
    results = await (onGpu && state.deviceLostSignal
      ? Promise.race([running, state.deviceLostSignal])
      : running);
  } catch (err) {
    const message = describe(err);
    throw new PageError(runErrorKind(message), message);
  }
  const computeMs = performance.now() - start;
  const outputs = entry.outputNames.map((name) => {
    const tensor = results[name];
    const data = tensor.data;
    const out = {
      name,
      dtype: tensor.type,
      shape: [...tensor.dims],
      bytes: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    };
    return out;
  });
  const frame = encodeFrame({ id: header.id, ok: true, compute_ms: computeMs }, outputs);
  for (const name of entry.outputNames) results[name].dispose?.();
  return frame;
}

// --- socket -----------------------------------------------------------------

const CONTROL = {
  load: (msg) => serialized(() => load(msg)),
  unload: (msg) => serialized(() => unload(msg)),
  fail_session: (msg) => serialized(() => failSession(msg)),
  lose_device: () => loseDevice(),
  allocate: (msg) => allocate(msg),
  release_memory: () => releaseMemory(),
  ping: () => ({}),
};

async function answer(socket, id, work) {
  let reply;
  try {
    const result = await work();
    if (result instanceof ArrayBuffer) {
      if (socket.readyState === WebSocket.OPEN) socket.send(result);
      return;
    }
    reply = { id, ok: true, ...result };
  } catch (err) {
    reply = { id, ok: false, error: { kind: err.kind ?? "internal", message: describe(err) } };
  }
  if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(reply));
}

function onMessage(socket, event) {
  if (typeof event.data === "string") {
    const msg = JSON.parse(event.data);
    const op = CONTROL[msg.op];
    answer(socket, msg.id, async () => {
      if (!op) throw new PageError("internal", `unknown operation ${msg.op}`);
      return op(msg);
    });
    return;
  }
  const { header, base } = decodeFrame(event.data);
  answer(socket, header.id, () => serialized(() => run(header, event.data, base)));
}

function connect() {
  const socket = new WebSocket(`ws://${location.host}/socket?token=${encodeURIComponent(TOKEN)}`);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    state.socket = socket;
    state.reconnectDelay = 100;
    sendJson({
      type: "hello",
      capabilities: state.capabilities,
      handles: [...state.sessions.keys()],
    });
  };
  socket.onmessage = (event) => onMessage(socket, event);
  socket.onclose = () => {
    if (state.socket === socket) state.socket = null;
    setTimeout(connect, state.reconnectDelay);
    state.reconnectDelay = Math.min(state.reconnectDelay * 2, 2000);
  };
}

window.addEventListener("error", (event) => sendEvent("page_error", describe(event.error ?? event.message)));
window.addEventListener("unhandledrejection", (event) => sendEvent("page_error", describe(event.reason)));

async function main() {
  try {
    state.ort = await import(ORT_MODULE);
    state.ort.env.wasm.wasmPaths = ORT_DIST;
  } catch (err) {
    state.ortError = `importing ${ORT_MODULE} failed: ${describe(err)}`;
  }
  if (state.ort) {
    try {
      const warmup = await state.ort.InferenceSession.create(WARMUP_MODEL, {
        executionProviders: ["wasm"],
      });
      await warmup.release();
    } catch (err) {
      state.ortError = `onnxruntime-web's wasm backend did not start: ${describe(err)}`;
    }
  }
  state.capabilities = await probe();
  connect();
}

main();
