"""``NativeSampler``: a llama.cpp sampler chain."""

from __future__ import annotations

from typing import Any

from .._ffi import lib
from .context import NativeContext
from .handle import NativeHandle

class NativeSampler(NativeHandle):
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
