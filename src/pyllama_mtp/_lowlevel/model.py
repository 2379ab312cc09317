"""``NativeModel``: a loaded ``llama_model``, its vocabulary and metadata."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import numpy as np

from .._ffi import ffi, lib
from ..errors import InvalidArgumentError, LoadCancelledError, ModelLoadError
from .handle import NativeHandle, read_sized_string
from .system import device_handle

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


class NativeModel(NativeHandle):
    _kind = "model"

    def __init__(
        self,
        path: str,
        *,
        n_gpu_layers: int,
        load_mtp: bool,
        use_mmap: bool,
        repack: bool = True,
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
        params.use_extra_bufts = repack
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
            "description": read_sized_string(
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
            key = read_sized_string(lambda buf, size: lib.llama_model_meta_key_by_index(ptr, i, buf, size))
            value = read_sized_string(
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
