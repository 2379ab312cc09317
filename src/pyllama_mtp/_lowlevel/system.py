"""Build and system information, devices, RPC servers, thread count, quantization."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .._ffi import ffi, lib
from ..errors import InvalidArgumentError, LlamaError
from .handle import RPC_LOCK, c_string, share_one_lock_from_now_on
from .status import check_status

def shim_version() -> str:
    return c_string(lib.pmtp_version())


def llama_commit() -> str:
    return c_string(lib.pmtp_llama_commit())


def compiled_backends() -> list[str]:
    return [name for name in c_string(lib.pmtp_compiled_backends()).split(",") if name]


def cpu_features() -> str:
    return c_string(lib.llama_print_system_info())


def cpu_variant() -> str:
    return c_string(lib.pmtp_cpu_variant())


def backend_loading() -> str:
    return c_string(lib.pmtp_backend_loading())


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
            name=c_string(lib.ggml_backend_dev_name(dev)),
            description=c_string(lib.ggml_backend_dev_description(dev)),
            type=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
            memory_total=int(total[0]),
            memory_free=int(free[0]),
        ))
    return found


# ggml's RPC client shares one connection per server between all contexts and is not
# thread-safe (concurrent contexts aborted the process in our thread tests). Once an RPC
# server is in use, every native handle created from then on shares this one lock.


def add_rpc_server(endpoint: str) -> None:
    """Register a ggml RPC server as a device (it then appears in :func:`devices`)."""
    with RPC_LOCK:
        status = lib.pmtp_rpc_add_server(endpoint.encode())
        if status == lib.PMTP_ERR_ARGUMENT:
            raise InvalidArgumentError("this build has no RPC backend (build with GGML_RPC=ON)")
        check_status(status, f"connecting to the RPC server at {endpoint}")
        share_one_lock_from_now_on()


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


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
