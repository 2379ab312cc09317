"""``NativeContext``: a ``llama_context`` (KV cache, recurrent state, outputs)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .._ffi import ffi, lib
from ..errors import InvalidArgumentError, LlamaError, StateError
from .handle import NativeHandle
from .interrupt import Stoppable
from .model import NativeModel
from .status import check_status
from .system import default_threads

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


class NativeContext(NativeHandle):
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
        # Cancel flag, deadline and Ctrl-C watch, read by C on every graph node: no
        # Python, no GIL in that check.
        self.abort_state = ffi.new("pmtp_abort_state *")
        params.abort_callback = lib.pmtp_abort_check
        params.abort_callback_data = self.abort_state
        # The target's lock, then the model's (the one order): neither can be freed here.
        with other.lock if other is not None else contextlib.nullcontext(), model.lock:
            if other is not None:
                # Upstream passes the target to every MTP drafter; llama.cpp keeps it only
                # for drafters that share the target's KV (gemma4 assistants).
                params.ctx_other = other.ptr()
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

    def _free(self, ptr: Any) -> None:
        lib.llama_free(ptr)

    # -- cancellation -----------------------------------------------------------------
    def request_abort(self) -> None:
        """Safe from any thread, without the lock: C reads the flag while decoding. The
        flag stays set until it stops a computation (the running one or the next)."""
        self.abort_state.cancel = 1

    @property
    def between_calls_only(self) -> bool:
        """True when computations stop only between calls (see ``Stoppable``); the
        public layer decides it from the model and where the context computes."""
        return bool(self.abort_state.between_calls_only)

    @between_calls_only.setter
    def between_calls_only(self, value: bool) -> None:
        self.abort_state.between_calls_only = bool(value)

    @property
    def deadline_us(self) -> int:
        """Monotonic deadline (see :func:`monotonic_us`) of every computation; 0 = none."""
        return int(self.abort_state.deadline_us)

    @deadline_us.setter
    def deadline_us(self, value: int) -> None:
        self.abort_state.deadline_us = value

    def stoppable(self) -> Stoppable:
        """Lock this context and arm its abort state for one long call."""
        return Stoppable((self,), (self.abort_state,))

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

    def _output_row(self, getter: Any, what: str, index: int, width: int) -> np.ndarray:
        """A copy of one output row (the context reuses its buffers on the next decode)."""
        with self.lock:
            row = getter(self.ptr(), index)
            if row == ffi.NULL:
                raise InvalidArgumentError(f"no {what} for batch index {index}")
            return np.frombuffer(ffi.buffer(row, 4 * width), dtype=np.float32).copy()

    def logits(self, index: int, n_vocab: int) -> np.ndarray:
        return self._output_row(lib.llama_get_logits_ith, "logits", index, n_vocab)

    def embeddings(self, index: int, n_embd: int) -> np.ndarray:
        return self._output_row(lib.llama_get_embeddings_ith, "embeddings", index, n_embd)

    def synchronize(self) -> None:
        """Wait until every computation queued on the backend has finished."""
        with self.lock:
            lib.llama_synchronize(self.ptr())

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

    def state_seq_get(self, seq_id: int, partial: bool = False) -> bytes:
        """A sequence's memory; ``partial``: only what cannot be cut back by position
        (recurrent state; llama.cpp's LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)."""
        flags = lib.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else 0
        with self.lock:
            ptr = self.ptr()
            size = lib.llama_state_seq_get_size_ext(ptr, seq_id, flags)
            buf = ffi.new("uint8_t[]", max(size, 1))
            written = lib.llama_state_seq_get_data_ext(ptr, buf, size, seq_id, flags)
            if written == 0 and size != 0:
                raise StateError(f"could not save the state of sequence {seq_id}")
            return ffi.buffer(buf, written)[:]

    def state_seq_set(self, data: bytes, seq_id: int, partial: bool = False) -> None:
        flags = lib.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else 0
        with self.lock:
            ptr = self.ptr()
            read = lib.llama_state_seq_set_data_ext(ptr, ffi.from_buffer(data), len(data), seq_id, flags)
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
