"""What every native handle shares: one owned pointer, one lock, freed exactly once;
and strings and JSON across the C boundary."""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Optional

from .._ffi import ffi, lib
from ..errors import ClosedError, InvalidArgumentError

# ggml's RPC client shares one connection per server between all contexts and is not
# thread-safe (concurrent contexts aborted the process in our thread tests). Once an RPC
# server is in use, every native handle created from then on shares this one lock.
RPC_LOCK = threading.RLock()
_rpc_in_use = False


def share_one_lock_from_now_on() -> None:
    """Every handle created from now on shares RPC_LOCK (an RPC server is in use)."""
    global _rpc_in_use
    _rpc_in_use = True


def c_string(ptr: Any) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def take_string(ptr: Any) -> str:
    """Read and free a string the shim allocated (pmtp_string_free)."""
    try:
        return c_string(ptr)
    finally:
        if ptr != ffi.NULL:
            lib.pmtp_string_free(ptr)


def to_json(value: Any, what: str) -> bytes:
    """JSON text for the shim; InvalidArgumentError for what JSON cannot hold."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(f"{what} must be JSON data: {error}") from None


def read_sized_string(reader: Callable[[Any, int], int], initial: int = 256) -> Optional[str]:
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


class NativeHandle:
    """Owns one native pointer: a lock around every use, freed exactly once."""

    _kind = "object"

    def __init__(self, ptr: Any) -> None:
        self._ptr = ptr
        self.lock = RPC_LOCK if _rpc_in_use else threading.RLock()

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
