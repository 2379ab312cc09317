"""Thin wrappers over the C API: own native pointers, check return codes, convert types.

This is the only module besides ``_ffi`` that touches ``lib``. It knows nothing of
Python-level lifetimes (parents, children, ``with``): that is the public layer's job.
Each ``Native*`` class owns one pointer, frees it exactly once, and serialises every
call on it with its own lock, because llama.cpp objects are not thread-safe.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ._ffi import ffi, lib
from .errors import (
    AbortedError,
    ClosedError,
    ContextFullError,
    DecodeError,
    DecodeTimeoutError,
    InvalidArgumentError,
    LlamaError,
    LoadCancelledError,
    ModelLoadError,
    NoMTPError,
    StateError,
)

# ---------------------------------------------------------------------------
# The one place where C status codes become exceptions.
# ---------------------------------------------------------------------------

_STATUS_ERRORS: dict[int, type[LlamaError]] = {
    lib.PMTP_ERR_ARGUMENT: InvalidArgumentError,
    lib.PMTP_ERR_NO_KV_SLOT: ContextFullError,
    lib.PMTP_ERR_DECODE: DecodeError,
    lib.PMTP_ERR_ABORTED: AbortedError,
    lib.PMTP_ERR_NO_MTP: NoMTPError,
    lib.PMTP_ERR_ALLOC: DecodeError,
    lib.PMTP_ERR_INTERNAL: DecodeError,
    lib.PMTP_ERR_STATE: StateError,
}

_STATUS_TEXT: dict[int, str] = {
    lib.PMTP_ERR_ARGUMENT: "llama.cpp rejected the input",
    lib.PMTP_ERR_NO_KV_SLOT: "no free KV slot: the context is full",
    lib.PMTP_ERR_DECODE: "llama.cpp failed to evaluate the batch",
    lib.PMTP_ERR_ABORTED: "aborted",
    lib.PMTP_ERR_NO_MTP: "the model has no MTP layers loaded",
    lib.PMTP_ERR_ALLOC: "out of memory",
    lib.PMTP_ERR_INTERNAL: "llama.cpp raised an internal error",
    lib.PMTP_ERR_STATE: "the memory cannot be rolled back that far",
}


_ABORT_REASONS: dict[int, tuple[type[LlamaError], str]] = {
    lib.PMTP_ABORT_CANCEL: (AbortedError, "cancelled"),
    lib.PMTP_ABORT_TIMEOUT: (DecodeTimeoutError, "the time limit passed"),
}


def check_status(status: int, action: str, abort_reason: int = 0) -> int:
    """Return a non-negative status unchanged; raise the matching exception otherwise.

    ``abort_reason`` (a PMTP_ABORT_* value) says why an aborted call was stopped.
    """
    if status >= 0:
        return status
    if status == lib.PMTP_ERR_ABORTED and abort_reason in _ABORT_REASONS:
        error, text = _ABORT_REASONS[abort_reason]
        raise error(f"{action}: {text}")
    error = _STATUS_ERRORS.get(status, LlamaError)
    text = _STATUS_TEXT.get(status, f"unknown status {status}")
    raise error(f"{action}: {text}")


class _Stoppable:
    """Arms the abort states of contexts for one long C call, under their locks.

    On the main thread, while Python would turn Ctrl-C into KeyboardInterrupt, C watches
    SIGINT instead of Python during the call, so the call stops within one graph node
    instead of running to its end; the signal then becomes KeyboardInterrupt here.
    A context whose memory cannot undo a half-computed ubatch (``between_calls_only``) is
    never stopped inside a graph: its cancel flag and deadline are checked here, before
    the call, and Python's own Ctrl-C handling covers the time between calls.
    """

    __slots__ = ("_locks", "_states", "_watching", "_mark")

    def __init__(self, locks: tuple[Any, ...], states: tuple[Any, ...]) -> None:
        self._locks = locks
        self._states = states
        self._watching = False
        self._mark = 0

    def __enter__(self) -> "_Stoppable":
        for lock in self._locks:
            lock.acquire()
        try:
            for state in self._states:
                state.reason = lib.PMTP_ABORT_NONE
                if state.between_calls_only:
                    if state.cancel:
                        state.reason = lib.PMTP_ABORT_CANCEL
                    elif state.deadline_us and lib.pmtp_monotonic_us() >= state.deadline_us:
                        state.reason = lib.PMTP_ABORT_TIMEOUT
                    if state.reason:
                        self.check(lib.PMTP_ERR_ABORTED, "before the call")
        except BaseException:
            self._release()
            raise
        self._watching = (threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        self._mark = lib.pmtp_sigint_watch_begin() if self._watching else 0
        for state in self._states:
            state.watch_sigint = self._watching
            state.sigint_mark = self._mark
        return self

    def check(self, status: int, action: str) -> int:
        """check_status with the reason of an abort; a cancel that stopped a call is spent."""
        reason = 0
        if status == lib.PMTP_ERR_ABORTED:
            reason = next((int(state.reason) for state in self._states if state.reason), 0)
            if reason == lib.PMTP_ABORT_CANCEL:
                for state in self._states:
                    state.cancel = 0
            elif reason == lib.PMTP_ABORT_SIGINT:
                raise KeyboardInterrupt
        return check_status(status, action, reason)

    def _release(self) -> None:
        for lock in reversed(self._locks):
            lock.release()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        interrupted = False
        if self._watching:
            for state in self._states:
                state.watch_sigint = 0
            lib.pmtp_sigint_watch_end()
            interrupted = lib.pmtp_sigint_count() != self._mark
        self._release()
        # A Ctrl-C that came too late to stop the call is not lost.
        if interrupted and not isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt from exc


def _string(ptr: Any) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def _read_sized_string(reader: Callable[[Any, int], int], initial: int = 256) -> Optional[str]:
    """Call a llama.cpp "write into buf, return needed length" function until it fits."""
    size = initial
    while True:
        buf = ffi.new("char[]", size)
        needed = reader(buf, size)
        if needed < 0:
            return None
        if needed < size:
            return ffi.string(buf).decode("utf-8", "replace")
        size = needed + 1


# ---------------------------------------------------------------------------
# Build and system information
# ---------------------------------------------------------------------------


def shim_version() -> str:
    return _string(lib.pmtp_version())


def llama_commit() -> str:
    return _string(lib.pmtp_llama_commit())


def compiled_backends() -> list[str]:
    return [name for name in _string(lib.pmtp_compiled_backends()).split(",") if name]


def cpu_features() -> str:
    return _string(lib.llama_print_system_info())


@dataclass(frozen=True)
class DeviceInfo:
    """One device a compiled backend sees."""

    index: int
    name: str
    description: str
    type: str
    memory_total: int
    memory_free: int


_DEVICE_TYPES = {
    lib.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    lib.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    lib.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    lib.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}


def devices() -> list[DeviceInfo]:
    found = []
    free = ffi.new("size_t *")
    total = ffi.new("size_t *")
    for index in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(index)
        lib.ggml_backend_dev_memory(dev, free, total)
        found.append(DeviceInfo(
            index=index,
            name=_string(lib.ggml_backend_dev_name(dev)),
            description=_string(lib.ggml_backend_dev_description(dev)),
            type=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
            memory_total=int(total[0]),
            memory_free=int(free[0]),
        ))
    return found


# ggml's RPC client shares one connection per server between all contexts and is not
# thread-safe (concurrent contexts aborted the process in our thread tests). Once an RPC
# server is in use, every native handle created from then on shares this one lock.
_RPC_LOCK = threading.RLock()
_rpc_in_use = False


def add_rpc_server(endpoint: str) -> None:
    """Register a ggml RPC server as a device (it then appears in :func:`devices`)."""
    global _rpc_in_use
    with _RPC_LOCK:
        status = lib.pmtp_rpc_add_server(endpoint.encode())
        if status == lib.PMTP_ERR_ARGUMENT:
            raise InvalidArgumentError("this build has no RPC backend (build with GGML_RPC=ON)")
        check_status(status, f"connecting to the RPC server at {endpoint}")
        _rpc_in_use = True


def device_handle(name: str) -> Any:
    dev = lib.ggml_backend_dev_by_name(name.encode())
    if dev == ffi.NULL:
        known = ", ".join(d.name for d in devices())
        raise InvalidArgumentError(f"no device named {name!r} (this build sees: {known})")
    return dev


QUANT_TYPES = {
    "f32": lib.LLAMA_FTYPE_ALL_F32,
    "f16": lib.LLAMA_FTYPE_MOSTLY_F16,
    "bf16": lib.LLAMA_FTYPE_MOSTLY_BF16,
    "q4_0": lib.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q8_0": lib.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_k_s": lib.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "q4_k_m": lib.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": lib.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": lib.LLAMA_FTYPE_MOSTLY_Q6_K,
}


def quantize(source: str, destination: str, ftype: str, n_threads: int, pure: bool) -> None:
    """llama.cpp's own quantizer (llama_model_quantize): source GGUF -> destination GGUF."""
    params = lib.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = QUANT_TYPES[ftype]
    params.pure = pure
    params.allow_requantize = True
    params_ptr = ffi.new("llama_model_quantize_params *")
    params_ptr[0] = params
    status = lib.llama_model_quantize(os.fsencode(source), os.fsencode(destination), params_ptr)
    if status != 0:
        raise LlamaError(f"quantizing {source} to {ftype} failed (see the 'pyllama_mtp.llama_cpp' log)")


# ---------------------------------------------------------------------------
# Native handles
# ---------------------------------------------------------------------------


class _NativeHandle:
    """Owns one native pointer: a lock around every use, freed exactly once."""

    _kind = "object"

    def __init__(self, ptr: Any) -> None:
        self._ptr = ptr
        self.lock = _RPC_LOCK if _rpc_in_use else threading.RLock()

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def ptr(self) -> Any:
        ptr = self._ptr
        if ptr is None:
            raise ClosedError(f"this {self._kind} is closed")
        return ptr

    def _free(self, ptr: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def free(self) -> None:
        with self.lock:
            ptr, self._ptr = self._ptr, None
            if ptr is not None:
                self._free(ptr)


class _ProgressRelay:
    """Carries a Python progress callable (and any exception it raised) through C."""

    def __init__(self, callback: Callable[[float], Optional[bool]]) -> None:
        self.callback = callback
        self.error: Optional[BaseException] = None
        self.cancelled = False


@ffi.def_extern()
def pmtp_py_progress(progress: float, user_data: Any) -> bool:
    relay: _ProgressRelay = ffi.from_handle(user_data)
    try:
        keep_going = relay.callback(float(progress))
    except BaseException as exc:  # noqa: BLE001 - re-raised after the C call returns
        relay.error = exc
        return False
    if keep_going is False:
        relay.cancelled = True
        return False
    return True


class NativeModel(_NativeHandle):
    _kind = "model"

    def __init__(
        self,
        path: str,
        *,
        n_gpu_layers: int,
        load_mtp: bool,
        use_mmap: bool,
        vocab_only: bool = False,
        progress: Optional[Callable[[float], Optional[bool]]] = None,
        devices: Optional[list[str]] = None,
        overrides: Optional[list[tuple[str, str]]] = None,
    ) -> None:
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        keep_alive = []  # C strings and arrays must outlive the load call
        if devices is not None:
            device_array = ffi.new("ggml_backend_dev_t[]", [device_handle(d) for d in devices] + [ffi.NULL])
            keep_alive.append(device_array)
            params.devices = device_array
        if overrides:
            # (tensor-name regex, device): put matching weights, and their compute, there.
            entries = ffi.new("struct llama_model_tensor_buft_override[]", len(overrides) + 1)
            for i, (pattern, device) in enumerate(overrides):
                c_pattern = ffi.new("char[]", pattern.encode())
                keep_alive.append(c_pattern)
                entries[i].pattern = c_pattern
                entries[i].buft = lib.ggml_backend_dev_buffer_type(device_handle(device))
            keep_alive.append(entries)
            params.tensor_buft_overrides = entries
        params.load_mtp = load_mtp
        params.vocab_only = vocab_only
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        relay = handle = None
        if progress is not None:
            relay = _ProgressRelay(progress)
            handle = ffi.new_handle(relay)
            params.progress_callback = lib.pmtp_py_progress
            params.progress_callback_user_data = handle
        ptr = lib.llama_model_load_from_file(os.fsencode(path), params)
        if relay is not None and relay.error is not None:
            if ptr != ffi.NULL:
                lib.llama_model_free(ptr)
            raise relay.error
        if ptr == ffi.NULL:
            if relay is not None and relay.cancelled:
                raise LoadCancelledError(f"loading {path} was cancelled by the progress callback")
            raise ModelLoadError(
                f"llama.cpp could not load {path} (corrupt, truncated or unsupported GGUF; "
                "enable logging for 'pyllama_mtp.llama_cpp' to see why)"
            )
        super().__init__(ptr)
        self.vocab = lib.llama_model_get_vocab(ptr)

    def _free(self, ptr: Any) -> None:
        lib.llama_model_free(ptr)

    # -- properties read once by the public layer ------------------------------------
    def hparams(self) -> dict[str, Any]:
        ptr = self.ptr()
        return {
            "n_vocab": lib.llama_vocab_n_tokens(self.vocab),
            "n_embd": lib.llama_model_n_embd(ptr),
            "n_layer": lib.llama_model_n_layer(ptr),
            "n_layer_nextn": lib.llama_model_n_layer_nextn(ptr),
            "n_head": lib.llama_model_n_head(ptr),
            "n_head_kv": lib.llama_model_n_head_kv(ptr),
            "n_ctx_train": lib.llama_model_n_ctx_train(ptr),
            "size": int(lib.llama_model_size(ptr)),
            "n_params": int(lib.llama_model_n_params(ptr)),
            "is_recurrent": bool(lib.llama_model_is_recurrent(ptr)),
            "is_hybrid": bool(lib.llama_model_is_hybrid(ptr)),
            "description": _read_sized_string(
                lambda buf, size: lib.llama_model_desc(ptr, buf, size)) or "",
            "bos": lib.llama_vocab_bos(self.vocab),
            "eos": lib.llama_vocab_eos(self.vocab),
            "eot": lib.llama_vocab_eot(self.vocab),
            "nl": lib.llama_vocab_nl(self.vocab),
            "add_bos": bool(lib.llama_vocab_get_add_bos(self.vocab)),
        }

    def metadata(self) -> dict[str, str]:
        ptr = self.ptr()
        result = {}
        for i in range(lib.llama_model_meta_count(ptr)):
            key = _read_sized_string(lambda buf, size: lib.llama_model_meta_key_by_index(ptr, i, buf, size))
            value = _read_sized_string(
                lambda buf, size: lib.llama_model_meta_val_str_by_index(ptr, i, buf, size))
            if key is not None:
                result[key] = value if value is not None else ""
        return result

    # -- vocabulary -------------------------------------------------------------------
    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> np.ndarray:
        self.ptr()
        capacity = len(text) + 8
        while True:
            out = np.empty(capacity, dtype=np.int32)
            n = lib.llama_tokenize(self.vocab, text, len(text),
                                   ffi.cast("llama_token *", ffi.from_buffer(out)), capacity,
                                   add_special, parse_special)
            if n == -(2**31):
                raise InvalidArgumentError("text is too long to tokenize")
            if n >= 0:
                return out[:n].copy()
            capacity = -n

    def token_to_piece(self, token: int, special: bool) -> bytes:
        self.ptr()
        size = 32
        while True:
            buf = ffi.new("char[]", size)
            n = lib.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
            if n >= 0:
                return ffi.buffer(buf, n)[:]
            size = -n

    def detokenize(self, tokens: np.ndarray, remove_special: bool, unparse_special: bool) -> bytes:
        self.ptr()
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        size = max(16, 4 * len(tokens))
        while True:
            buf = ffi.new("char[]", size)
            n = lib.llama_detokenize(self.vocab, ffi.cast("llama_token *", ffi.from_buffer(tokens)),
                                     len(tokens), buf, size, remove_special, unparse_special)
            if n >= 0:
                return ffi.buffer(buf, n)[:]
            size = -n

    def is_eog(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.vocab, token))


@dataclass
class ContextConfig:
    """What a context is created with; the public layer validates the numbers."""

    n_ctx: int = 0
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_rs_seq: int = 0
    n_threads: int = 0
    n_threads_batch: int = 0
    embeddings: bool = False
    mtp: bool = False
    flash_attn: Optional[bool] = None
    kv_unified: bool = True
    warmup: bool = True


class NativeContext(_NativeHandle):
    _kind = "context"

    def __init__(self, model: NativeModel, config: ContextConfig,
                 other: Optional["NativeContext"] = None) -> None:
        params = lib.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_ubatch
        params.n_seq_max = config.n_seq_max
        params.n_rs_seq = config.n_rs_seq
        threads = config.n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = config.n_threads_batch or threads
        params.embeddings = config.embeddings
        params.kv_unified = config.kv_unified
        params.no_perf = True
        if config.flash_attn is not None:
            params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn
                                      else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if config.mtp:
            params.ctx_type = lib.LLAMA_CONTEXT_TYPE_MTP
        if other is not None:
            # Upstream passes the target to every MTP drafter; llama.cpp keeps it only for
            # drafters that share the target's KV (gemma4 assistants).
            params.ctx_other = other.ptr()
        # Cancel flag, deadline and Ctrl-C watch, read by C on every graph node: no
        # Python, no GIL in that check.
        self.abort_state = ffi.new("pmtp_abort_state *")
        recurrent = not config.mtp and bool(
            lib.llama_model_is_recurrent(model.ptr()) or lib.llama_model_is_hybrid(model.ptr()))
        params.abort_callback = lib.pmtp_abort_check
        params.abort_callback_data = self.abort_state
        with model.lock:
            ptr = lib.llama_init_from_model(model.ptr(), params)
        if ptr == ffi.NULL:
            raise LlamaError("llama.cpp could not create the context (see the "
                             "'pyllama_mtp.llama_cpp' log for the reason)")
        super().__init__(ptr)
        self.memory = lib.llama_get_memory(ptr)
        self.n_ctx = int(lib.llama_n_ctx(ptr))
        self.n_batch = int(lib.llama_n_batch(ptr))
        self.n_ubatch = int(lib.llama_n_ubatch(ptr))
        self.n_seq_max = int(lib.llama_n_seq_max(ptr))
        self.n_rs_seq = int(lib.llama_n_rs_seq(ptr))
        self.n_threads = threads
        # Stop inside a graph only where that is known to be safe: all on the CPU backend
        # (only it polls the callback; on Vulkan a stop between splits left the device
        # queue broken and a later step crashed) and no recurrent memory (it cannot undo
        # a half-run ubatch: upstream restores a stale snapshot). Otherwise between calls.
        offloaded = any(not entry["buffer_type"].upper().startswith("CPU") for entry in self.memory_breakdown())
        self.abort_state.between_calls_only = recurrent or offloaded
        if config.warmup and not config.mtp:
            self._warm_up(model)

    def _warm_up(self, model: NativeModel) -> None:
        """One throw-away decode of [BOS, EOS], then empty memory: what llama.cpp's own
        tools do on every new context. Without it, the first single-token decode on
        Mesa's Vulkan device crashed the process for some graphs (glm4moe, 16-dim heads,
        flash attention; upstream's llama-completion --no-warmup crashes the same way)."""
        vocab = lib.llama_model_get_vocab(model.ptr())
        tokens = np.array([t for t in (lib.llama_vocab_bos(vocab), lib.llama_vocab_eos(vocab)) if t >= 0] or [0],
                          dtype=np.int32)
        n = len(tokens)
        outputs = np.zeros(n, dtype=np.int8)
        outputs[-1] = 1
        try:
            self.decode(tokens, np.arange(n, dtype=np.int32), np.zeros(n, dtype=np.int32), outputs)
            self.memory_clear()
            lib.llama_synchronize(self.ptr())
        except BaseException:
            self.free()
            raise

    def _free(self, ptr: Any) -> None:
        lib.llama_free(ptr)

    # -- cancellation -----------------------------------------------------------------
    def request_abort(self) -> None:
        """Safe from any thread, without the lock: C reads the flag while decoding. The
        flag stays set until it stops a computation (the running one or the next)."""
        self.abort_state.cancel = 1

    @property
    def between_calls_only(self) -> bool:
        """True when computations stop only between calls (see ``_Stoppable``)."""
        return bool(self.abort_state.between_calls_only)

    @property
    def deadline_us(self) -> int:
        """Monotonic deadline (see :func:`monotonic_us`) of every computation; 0 = none."""
        return int(self.abort_state.deadline_us)

    @deadline_us.setter
    def deadline_us(self, value: int) -> None:
        self.abort_state.deadline_us = value

    def stoppable(self) -> _Stoppable:
        """Lock this context and arm its abort state for one long call."""
        return _Stoppable((self.lock,), (self.abort_state,))

    # -- decoding ---------------------------------------------------------------------
    def decode(self, tokens: np.ndarray, pos: np.ndarray, seq_ids: np.ndarray,
               output: np.ndarray) -> None:
        """Arrays must be validated, contiguous int32/int32/int32/int8 of one length."""
        with self.stoppable() as call:
            status = lib.pmtp_decode_tokens(
                self.ptr(), len(tokens),
                ffi.cast("llama_token *", ffi.from_buffer(tokens)),
                ffi.cast("llama_pos *", ffi.from_buffer(pos)),
                ffi.cast("llama_seq_id *", ffi.from_buffer(seq_ids)),
                ffi.cast("int8_t *", ffi.from_buffer(output)))
            call.check(status, "decode")

    def logits(self, index: int, n_vocab: int) -> np.ndarray:
        with self.lock:
            row = lib.llama_get_logits_ith(self.ptr(), index)
            if row == ffi.NULL:
                raise InvalidArgumentError(f"no logits for batch index {index}")
            return np.frombuffer(ffi.buffer(row, 4 * n_vocab), dtype=np.float32).copy()

    def embeddings(self, index: int, n_embd: int) -> np.ndarray:
        with self.lock:
            row = lib.llama_get_embeddings_ith(self.ptr(), index)
            if row == ffi.NULL:
                raise InvalidArgumentError(f"no embeddings for batch index {index}")
            return np.frombuffer(ffi.buffer(row, 4 * n_embd), dtype=np.float32).copy()

    def set_nextn_output(self, enabled: bool, masked: bool = True) -> None:
        with self.lock:
            lib.pmtp_set_embeddings_nextn(self.ptr(), enabled, masked)

    def nextn_embeddings(self, index: int, n_embd: int) -> np.ndarray:
        with self.lock:
            row = lib.pmtp_get_embeddings_nextn_ith(self.ptr(), index)
            if row == ffi.NULL:
                raise InvalidArgumentError(f"no nextn hidden state for batch index {index}")
            return np.frombuffer(ffi.buffer(row, 4 * n_embd), dtype=np.float32).copy()

    def set_threads(self, n_threads: int, n_threads_batch: int) -> None:
        with self.lock:
            lib.llama_set_n_threads(self.ptr(), n_threads, n_threads_batch)

    # -- memory -----------------------------------------------------------------------
    def memory_clear(self) -> None:
        with self.lock:
            self.ptr()
            lib.llama_memory_clear(self.memory, True)

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        with self.lock:
            self.ptr()
            return bool(lib.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        with self.lock:
            self.ptr()
            lib.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        with self.lock:
            self.ptr()
            lib.llama_memory_seq_keep(self.memory, seq_id)

    def seq_pos_min(self, seq_id: int) -> int:
        with self.lock:
            self.ptr()
            return int(lib.llama_memory_seq_pos_min(self.memory, seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        with self.lock:
            self.ptr()
            return int(lib.llama_memory_seq_pos_max(self.memory, seq_id))

    def state_seq_get(self, seq_id: int) -> bytes:
        with self.lock:
            ptr = self.ptr()
            size = lib.llama_state_seq_get_size(ptr, seq_id)
            buf = ffi.new("uint8_t[]", max(size, 1))
            written = lib.llama_state_seq_get_data(ptr, buf, size, seq_id)
            if written == 0 and size != 0:
                raise StateError(f"could not save the state of sequence {seq_id}")
            return ffi.buffer(buf, written)[:]

    def state_seq_set(self, data: bytes, seq_id: int) -> None:
        with self.lock:
            ptr = self.ptr()
            read = lib.llama_state_seq_set_data(ptr, ffi.from_buffer(data), len(data), seq_id)
            if read == 0:
                raise StateError(f"could not restore the state of sequence {seq_id} "
                                 "(data from another model or context shape?)")

    def memory_breakdown(self) -> list[dict[str, Any]]:
        with self.lock:
            ptr = self.ptr()
            capacity = 8
            while True:
                entries = ffi.new("pmtp_memory_entry[]", capacity)
                n = check_status(lib.pmtp_memory_breakdown(ptr, entries, capacity), "memory breakdown")
                if n <= capacity:
                    break
                capacity = n
            return [{
                "buffer_type": ffi.string(entries[i].buffer_type).decode(),
                "model": int(entries[i].model),
                "context": int(entries[i].context),
                "compute": int(entries[i].compute),
            } for i in range(n)]


class NativeSampler(_NativeHandle):
    """A llama.cpp sampler chain: greedy, or temperature / top-k / top-p / min-p / seeded dist."""

    _kind = "sampler"

    def __init__(self, *, temperature: float, top_k: int, top_p: float, min_p: float,
                 seed: int) -> None:
        chain_params = lib.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = lib.llama_sampler_chain_init(chain_params)
        if temperature <= 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(top_p, 1))
            if min_p > 0.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(min_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        super().__init__(chain)

    def _free(self, ptr: Any) -> None:
        lib.llama_sampler_free(ptr)

    def sample(self, context: NativeContext, index: int) -> int:
        # llama_sampler_sample also accepts the token into the chain's state.
        with self.lock, context.lock:
            return int(lib.llama_sampler_sample(self.ptr(), context.ptr(), index))

    def reset(self) -> None:
        with self.lock:
            lib.llama_sampler_reset(self.ptr())


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)



class NativeSpeculative(_NativeHandle):
    """The C speculative driver over a target context and its MTP draft context."""

    _kind = "speculative decoder"

    def __init__(self, target: NativeContext, draft: NativeContext, n_seq: int, n_draft_max: int) -> None:
        status = ffi.new("int32_t *")
        with target.lock, draft.lock:
            ptr = lib.pmtp_spec_new(target.ptr(), draft.ptr(), n_seq, n_draft_max, status)
        check_status(status[0], "creating the speculative decoder")
        super().__init__(ptr)
        self.target = target
        self.draft_context = draft
        lib.pmtp_spec_set_draft_abort_state(ptr, draft.abort_state)
        self._stats_buffer = ffi.new("pmtp_spec_stats *")
        self.n_seq = n_seq
        self.n_draft_max = int(lib.pmtp_spec_n_draft_max(ptr))
        self._out_tokens = np.zeros((n_seq, self.n_draft_max + 1), dtype=np.int32)
        self._out_counts = np.zeros(n_seq, dtype=np.int32)
        self._limits = np.zeros(n_seq, dtype=np.int32)
        self._n_draft_each = np.zeros(n_seq, dtype=np.int32)
        self._out_drafted = np.zeros(n_seq, dtype=np.int32)
        self._n_draft_each_ptr = ffi.cast("int32_t *", ffi.from_buffer(self._n_draft_each))
        self._out_drafted_ptr = ffi.cast("int32_t *", ffi.from_buffer(self._out_drafted))
        self._out_tokens_ptr = ffi.cast("llama_token *", ffi.from_buffer(self._out_tokens))
        self._out_counts_ptr = ffi.cast("int32_t *", ffi.from_buffer(self._out_counts))
        self._limits_ptr = ffi.cast("int32_t *", ffi.from_buffer(self._limits))

    def _free(self, ptr: Any) -> None:
        lib.pmtp_spec_free(ptr)

    def _locked(self, computes: bool = True) -> _Stoppable:
        """All three locks (in a fixed order: no deadlock) and, for calls that compute,
        both contexts' abort states armed; first checks that neither context was closed."""
        self.target.ptr(), self.draft_context.ptr()  # raise ClosedError first
        states = (self.target.abort_state, self.draft_context.abort_state) if computes else ()
        return _Stoppable((self.lock, self.target.lock, self.draft_context.lock), states)

    def prefill(self, seq: int, tokens: np.ndarray) -> None:
        with self._locked() as call:
            call.check(lib.pmtp_spec_prefill(self.ptr(), seq, ffi.cast("llama_token *", ffi.from_buffer(tokens)),
                                               len(tokens)), "prefill")

    def step_each(self, n_draft: Sequence[int], p_min: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step with a draft length per sequence; returns views of (tokens, counts,
        drafted): drafted[seq] is the verified draft length, -(length + 1) for lookup drafts."""
        self._n_draft_each[:] = n_draft
        with self._locked() as call:
            call.check(lib.pmtp_spec_step_each(self.ptr(), self._n_draft_each_ptr, p_min, self._out_tokens_ptr,
                                                 self._out_counts_ptr, self._out_drafted_ptr), "speculative step")
        return self._out_tokens, self._out_counts, self._out_drafted

    def set_sampling(self, temperature: float, top_k: int, top_p: float, min_p: float, seed: int,
                     exact_match: bool) -> None:
        params = ffi.new("pmtp_sampling_params *")
        params.temperature = temperature
        params.top_k = top_k
        params.top_p = top_p
        params.min_p = min_p
        params.seed = seed & 0xFFFFFFFF
        params.exact_match = exact_match
        with self.lock:
            check_status(lib.pmtp_spec_set_sampling(self.ptr(), params), "set sampling")

    def set_lookup(self, ngram: int, min_tokens: int, max_tokens: int) -> None:
        params = ffi.new("pmtp_lookup_params *")
        params.ngram = ngram
        params.min_tokens = min_tokens
        params.max_tokens = max_tokens
        with self.lock:
            check_status(lib.pmtp_spec_set_lookup(self.ptr(), params), "set lookup")

    def draft(self, limits: np.ndarray, p_min: float) -> None:
        self._limits[:] = limits
        with self._locked() as call:
            call.check(lib.pmtp_spec_draft(self.ptr(), self._limits_ptr, p_min), "draft")

    def get_draft(self, seq: int) -> tuple[list[int], list[float]]:
        tokens = ffi.new("llama_token[]", PMTP_MAX_DRAFT_CAPACITY)
        probs = ffi.new("float[]", PMTP_MAX_DRAFT_CAPACITY)
        with self.lock:
            n = check_status(lib.pmtp_spec_get_draft(self.ptr(), seq, tokens, probs, PMTP_MAX_DRAFT_CAPACITY),
                             "get draft")
        return [int(tokens[i]) for i in range(n)], [float(probs[i]) for i in range(n)]

    def set_draft(self, seq: int, tokens: np.ndarray) -> None:
        with self.lock:
            check_status(lib.pmtp_spec_set_draft(self.ptr(), seq, ffi.cast("llama_token *", ffi.from_buffer(tokens)),
                                                 len(tokens)), "set draft")

    def verify(self) -> None:
        with self._locked() as call:
            call.check(lib.pmtp_spec_verify(self.ptr()), "verify")

    def target_choices(self, seq: int) -> list[int]:
        out = ffi.new("llama_token[]", PMTP_MAX_DRAFT_CAPACITY + 1)
        with self.lock:
            n = check_status(lib.pmtp_spec_target_choices(self.ptr(), seq, out, PMTP_MAX_DRAFT_CAPACITY + 1),
                             "target choices")
        return [int(out[i]) for i in range(n)]

    def verify_row(self, seq: int, row: int) -> int:
        with self.lock:
            return check_status(lib.pmtp_spec_verify_row(self.ptr(), seq, row), "verify row")

    def accept(self, seq: int, n_accepted: int, next_token: int) -> None:
        with self._locked(computes=False) as call:
            call.check(lib.pmtp_spec_accept(self.ptr(), seq, n_accepted, next_token), "accept")

    def seq_state(self, seq: int) -> tuple[bool, int, int]:
        id_last = ffi.new("llama_token *")
        n_past = ffi.new("llama_pos *")
        with self.lock:
            active = check_status(lib.pmtp_spec_seq_state(self.ptr(), seq, id_last, n_past), "sequence state")
        return bool(active), int(id_last[0]), int(n_past[0])

    def reset_seq(self, seq: int) -> None:
        with self._locked(computes=False) as call:
            call.check(lib.pmtp_spec_reset_seq(self.ptr(), seq), "reset sequence")

    def stats(self) -> dict[str, Any]:
        raw = ffi.new("pmtp_spec_stats *")
        with self.lock:
            lib.pmtp_spec_get_stats(self.ptr(), raw)
        n = self.n_draft_max
        return {
            "n_draft_max": int(raw.n_draft_max),
            "n_steps": int(raw.n_steps),
            "n_drafted": int(raw.n_drafted),
            "n_accepted": int(raw.n_accepted),
            "n_generated": int(raw.n_generated),
            "drafted_at": [int(raw.drafted_at[i]) for i in range(n)],
            "accepted_at": [int(raw.accepted_at[i]) for i in range(n)],
            "t_target_us": int(raw.t_target_us),
            "t_draft_us": int(raw.t_draft_us),
            "n_lookup_steps": int(raw.n_lookup_steps),
            "n_lookup_drafted": int(raw.n_lookup_drafted),
            "n_lookup_accepted": int(raw.n_lookup_accepted),
        }

    def timings_us(self) -> tuple[int, int]:
        """(target µs, draft µs) so far: the cheap subset of stats() that the adaptive
        policy reads around every step."""
        raw = self._stats_buffer
        with self.lock:
            lib.pmtp_spec_get_stats(self.ptr(), raw)
        return int(raw.t_target_us), int(raw.t_draft_us)

    def reset_stats(self) -> None:
        with self.lock:
            lib.pmtp_spec_reset_stats(self.ptr())


PMTP_MAX_DRAFT_CAPACITY = int(lib.PMTP_MAX_DRAFT)


def monotonic_us() -> int:
    """The clock of ``NativeContext.deadline_us`` (microseconds, monotonic)."""
    return int(lib.pmtp_monotonic_us())
