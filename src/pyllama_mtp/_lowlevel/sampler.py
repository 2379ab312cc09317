"""``NativeSampler``: the shim's one sampler (llama.cpp's common_sampler, our chain,
an optional grammar), for plain and speculative decoding alike."""

from __future__ import annotations

from typing import Any, Optional

from .._ffi import ffi, lib
from .context import NativeContext
from .handle import NativeHandle, take_string, to_json
from .model import NativeModel
from .status import check_status


def grammar_trial(model: NativeModel, gbnf: str, n_steps: int, *, from_start: bool, seed: int = 0) -> None:
    """Walk ``gbnf`` over the model's vocabulary for up to ``n_steps`` tokens (see
    pmtp_grammar_trial); InvalidArgumentError if llama.cpp refuses or fails in it, or
    (``from_start``) if no token can begin it."""
    error = ffi.new("char **")
    with model.lock:
        status = lib.pmtp_grammar_trial(model.ptr(), gbnf.encode("utf-8"), n_steps,
                                        seed & 0xFFFFFFFF, int(from_start), error)
    check_status(status, "try the grammar", message=take_string(error[0]))


class NativeSampler(NativeHandle):
    """top-k, top-p, min-p, temperature, then a draw seeded by ``seed`` (greedy at
    temperature <= 0), after the grammar of ``constraint`` (see pmtp_sampler_new)."""

    _kind = "sampler"

    def __init__(self, model: NativeModel, *, temperature: float, top_k: int, top_p: float,
                 min_p: float, seed: int, exact_match: bool = False,
                 constraint: Optional[dict[str, Any]] = None) -> None:
        params = ffi.new("pmtp_sampling_params *")
        params.temperature = temperature
        params.top_k = top_k
        params.top_p = top_p
        params.min_p = min_p
        params.seed = seed & 0xFFFFFFFF
        params.exact_match = exact_match
        payload = to_json(constraint, "the grammar constraint") if constraint else ffi.NULL
        out = ffi.new("pmtp_sampler **")
        error = ffi.new("char **")
        with model.lock:
            status = lib.pmtp_sampler_new(model.ptr(), params, payload, out, error)
        check_status(status, "make the sampler", message=take_string(error[0]))
        super().__init__(out[0])

    def _free(self, ptr: Any) -> None:
        lib.pmtp_sampler_free(ptr)

    def sample(self, context: NativeContext, index: int) -> int:
        token = ffi.new("llama_token *")
        with context.lock, self.lock:  # the one order: contexts before samplers
            check_status(lib.pmtp_sampler_sample(self.ptr(), context.ptr(), index, token), "sample")
        return int(token[0])

    def reset(self) -> None:
        with self.lock:
            lib.pmtp_sampler_reset(self.ptr())
