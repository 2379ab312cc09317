"""``NativeSpeculative``: the C speculative step over a target context and its MTP
draft context (``csrc/speculative.cpp``)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .._ffi import ffi, lib
from ..errors import GrammarDeadEndError, LlamaError, NonFiniteLogitsError
from .context import NativeContext
from .handle import NativeHandle
from .interrupt import Stoppable
from .sampler import NativeSampler
from .status import check_status

PMTP_MAX_DRAFT_CAPACITY = int(lib.PMTP_MAX_DRAFT)
# A draft length that also skips the drafter's catch-up on the step's tokens.
PMTP_DRAFT_REST = int(lib.PMTP_DRAFT_REST)
# The statistics fields, as the shim's header declares them (the one list of them).
_STATS_FIELDS = tuple(name for name, _ in ffi.typeof("pmtp_spec_stats").fields)


class NativeSpeculative(NativeHandle):
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

    def _locked(self, computes: bool = True) -> Stoppable:
        """All three locks (in the one order: decoder, target, draft) and, for calls that
        compute, both contexts' abort states armed; ClosedError if any of the three was
        closed before its lock was held."""
        states = (self.target.abort_state, self.draft_context.abort_state) if computes else ()
        return Stoppable((self, self.target, self.draft_context), states)

    def prefill(self, seq: int, tokens: np.ndarray) -> None:
        with self._locked() as call:
            call.check(lib.pmtp_spec_prefill(self.ptr(), seq, ffi.cast("llama_token *", ffi.from_buffer(tokens)),
                                               len(tokens)), "prefill")

    def enqueue(self, seq: int, tokens: np.ndarray, ready: bool) -> None:
        with self._locked(computes=False) as call:
            call.check(lib.pmtp_spec_enqueue(self.ptr(), seq, ffi.cast("llama_token *", ffi.from_buffer(tokens)),
                                               len(tokens), int(ready)), "queue the prompt")

    def set_catch_up_from(self, seq: int, pos: int) -> None:
        with self.lock:
            check_status(lib.pmtp_spec_set_catch_up_from(self.ptr(), seq, pos), "set the catch-up window")

    def step_each(self, n_draft: Sequence[int],
                  p_min: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]:
        """One step with a draft length per sequence; returns views of (tokens, counts,
        drafted) and {seq: position} of sequences whose logits held NaN / Inf (they
        produced nothing; the others did): drafted[seq] is the verified draft length,
        -(length + 1) for lookup drafts. The last: {seq: (PMTP_ERR_NONFINITE or
        PMTP_ERR_GRAMMAR, position)} of the sequences that failed (they produced nothing)."""
        self._n_draft_each[:] = n_draft
        failures: dict[int, tuple[int, int]] = {}
        with self._locked() as call:
            status = lib.pmtp_spec_step_each(self.ptr(), self._n_draft_each_ptr, p_min, self._out_tokens_ptr,
                                             self._out_counts_ptr, self._out_drafted_ptr)
            if status == lib.PMTP_ERR_SEQUENCE:
                failures = self._failures()
            else:
                call.check(status, "speculative step")
        return self._out_tokens, self._out_counts, self._out_drafted, failures

    def set_sampler(self, seq: int, sampler: Optional[NativeSampler]) -> None:
        """The sampler of a sequence (None: greedy, unconstrained). The caller keeps it alive
        while it is set, and unsets it before freeing it."""
        with self.lock:
            check_status(lib.pmtp_spec_set_sampler(self.ptr(), seq, sampler.ptr() if sampler else ffi.NULL),
                         "set the sampler")

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

    def truncate(self, seq: int, n_keep: int) -> None:
        with self._locked() as call:
            call.check(lib.pmtp_spec_truncate(self.ptr(), seq, n_keep), "truncate the sequence")

    def _failures(self) -> dict[int, tuple[int, int]]:
        pos = ffi.new("llama_pos *")
        failures = {}
        for seq in range(self.n_seq):
            kind = lib.pmtp_spec_failure(self.ptr(), seq, pos)
            if kind < 0:
                failures[seq] = (int(kind), int(pos[0]))
        return failures

    def raise_failures(self, failures: dict[int, tuple[int, int]], produced: list[list[int]]) -> None:
        """The sequences of a step that could not go on: forgotten, and raised as one error
        whose ``failed`` holds each one's own. llama.cpp lets NaN in one sequence's memory
        reach others (see pmtp_spec_rebuild): after NaN the sources go and the rest is
        evaluated again (a sequence that was only reached produces nothing this step)."""
        if any(kind == lib.PMTP_ERR_NONFINITE for kind, _ in failures.values()):
            failures = self.rebuild()
        else:
            for seq in failures:
                self.reset_seq(seq)
        kinds = {lib.PMTP_ERR_NONFINITE: NonFiniteLogitsError, lib.PMTP_ERR_GRAMMAR: GrammarDeadEndError}
        failed: dict[int, LlamaError] = {seq: kinds[kind]({seq: pos}) for seq, (kind, pos) in failures.items()}
        if failed:
            first = type(failed[min(failed)])
            error = first({seq: pos for seq, (_, pos) in failures.items() if isinstance(failed[seq], first)},
                          produced)
            error.failed = failed
            raise error

    def rebuild(self) -> dict[int, tuple[int, int]]:
        """After a step with NaN / Inf (see pmtp_spec_rebuild): the failures that stand
        (the sources, and grammar dead ends), now forgotten; every other active sequence
        was evaluated again."""
        with self._locked() as call:
            call.check(lib.pmtp_spec_rebuild(self.ptr()), "rebuild the memory")
            return self._failures()

    def reset_seq(self, seq: int) -> None:
        with self._locked(computes=False) as call:
            call.check(lib.pmtp_spec_reset_seq(self.ptr(), seq), "reset sequence")

    def park(self, seq: int, parked: bool) -> None:
        with self.lock:
            check_status(lib.pmtp_spec_park(self.ptr(), seq, int(parked)), "park the sequence")

    def checkpoint(self, seq: int) -> "NativeCheckpoint":
        out = ffi.new("pmtp_spec_checkpoint **")
        with self._locked(computes=False) as call:
            call.check(lib.pmtp_spec_checkpoint_new(self.ptr(), seq, out), "save a checkpoint")
        return NativeCheckpoint(out[0])

    def restore(self, seq: int, checkpoint: "NativeCheckpoint") -> None:
        with self._locked(computes=False) as call:
            call.check(lib.pmtp_spec_checkpoint_restore(self.ptr(), seq, checkpoint.ptr), "restore a checkpoint")

    def stats(self) -> dict[str, Any]:
        """Every field of the C ``pmtp_spec_stats`` by its C name; per-position arrays cut
        to ``n_draft_max`` (the struct, declared once in the shim's header, is the list)."""
        raw = ffi.new("pmtp_spec_stats *")
        with self.lock:
            lib.pmtp_spec_get_stats(self.ptr(), raw)
        values: dict[str, Any] = {}
        for name in _STATS_FIELDS:
            value = getattr(raw, name)
            values[name] = [int(v) for v in value[0:self.n_draft_max]] if isinstance(value, ffi.CData) else int(value)
        return values

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


class NativeCheckpoint:
    """A sequence's saved recurrent and step state (see pmtp_spec_checkpoint_new); freed
    with :meth:`free` or when no longer referenced."""

    def __init__(self, ptr: Any) -> None:
        self.ptr = ffi.gc(ptr, lib.pmtp_spec_checkpoint_free)
        self.nbytes = int(lib.pmtp_spec_checkpoint_bytes(ptr))
        self.n_tokens = int(lib.pmtp_spec_checkpoint_n_tokens(ptr))

    def free(self) -> None:
        if self.ptr is not None:
            ffi.release(self.ptr)
            self.ptr = None
