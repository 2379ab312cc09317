"""``Context`` (KV cache, recurrent state, outputs) and ``Batch`` (tokens to evaluate)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _lowlevel
from ._resource import Resource
from ._args import int_arg
from .errors import GrammarDeadEndError, InvalidArgumentError, NoMTPError, NonFiniteLogitsError, StateError
from .generation import Sampler, generate

if TYPE_CHECKING:  # annotations only: Model imports this module
    from .model import Model

IntArray = Union[Sequence[int], np.ndarray]


@contextlib.contextmanager
def time_limit(natives: Sequence[Any], seconds: Optional[float]) -> Iterator[None]:
    """Give every computation on these native contexts a deadline ``seconds`` from now.

    Nested limits keep the earlier deadline; the previous one is restored on exit.
    """
    if seconds is None:
        yield
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {seconds!r}")
    deadline = _lowlevel.monotonic_us() + int(seconds * 1e6)
    previous = [native.deadline_us for native in natives]
    for native, before in zip(natives, previous):
        native.deadline_us = deadline if before == 0 else min(before, deadline)
    try:
        yield
    finally:
        for native, before in zip(natives, previous):
            native.deadline_us = before


def _int_array(values: IntArray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise InvalidArgumentError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InvalidArgumentError(f"{name} must hold integers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int32)


class Batch:
    """Tokens to evaluate in one call: ids, positions, sequence ids and output flags.

    Args:
        tokens: token ids.
        positions: one position per token; ``None`` continues each sequence where the
            context's memory ends.
        seq_ids: one sequence id per token, or a single id for all.
        outputs: which tokens produce logits: ``None`` only the last, ``True`` all,
            or one flag per token.

    Everything is checked against the model and context before C sees it.
    """

    def __init__(self, tokens: IntArray, positions: Optional[IntArray] = None,
                 seq_ids: Union[int, IntArray] = 0,
                 outputs: Union[None, bool, Sequence[bool], np.ndarray] = None) -> None:
        self.tokens = _int_array(tokens, "tokens")
        n = len(self.tokens)
        if n == 0:
            raise InvalidArgumentError("a batch needs at least one token")
        self.positions = None if positions is None else _int_array(positions, "positions")
        if self.positions is not None and len(self.positions) != n:
            raise InvalidArgumentError(f"{len(self.positions)} positions for {n} tokens")
        if isinstance(seq_ids, (int, np.integer)):
            self.seq_ids = np.full(n, int(seq_ids), dtype=np.int32)
        else:
            self.seq_ids = _int_array(seq_ids, "seq_ids")
            if len(self.seq_ids) != n:
                raise InvalidArgumentError(f"{len(self.seq_ids)} sequence ids for {n} tokens")
        if outputs is None:
            self.outputs = np.zeros(n, dtype=np.int8)
            self.outputs[-1] = 1
        elif outputs is True or outputs is False:
            self.outputs = np.full(n, int(outputs), dtype=np.int8)
        else:
            flags = np.asarray(outputs)
            if flags.shape != (n,):
                raise InvalidArgumentError(f"outputs must have one flag per token ({n})")
            self.outputs = np.ascontiguousarray(flags != 0, dtype=np.int8)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"<Batch {len(self)} tokens, {int(self.outputs.sum())} outputs>"


class Context(Resource):
    """A llama.cpp context on a :class:`Model`: memory for ``n_seq_max`` sequences.

    ``n_rs_seq`` keeps that many recurrent-state snapshots per sequence so that a hybrid
    model (qwen35) can drop its last ``n_rs_seq`` positions (speculative rollback).

    Logits and hidden states are returned as **copies** (numpy float32 arrays): the
    context reuses its output buffers on the next decode, so a view would silently
    change under the caller.

    ``flash_attn``: True, False, or None to let llama.cpp choose per device. ``warmup``
    runs one throw-away decode at creation and empties the memory again, as llama.cpp's
    own tools do (it leaves no trace; see :meth:`_warm_up` for why it matters).

    All methods are thread-safe: calls on one context are serialised by its lock.
    Use one context per thread for parallel decoding.
    """

    def __init__(
        self,
        model: "Model",
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_ubatch: Optional[int] = None,
        n_seq_max: int = 1,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        n_rs_seq: int = 0,
        embeddings: bool = False,
        flash_attn: Optional[bool] = None,
        warmup: bool = True,
        _mtp_target: Optional["Context"] = None,
    ) -> None:
        n_ctx, n_batch, n_seq_max = (int_arg(name, value, 1) for name, value in
                                     (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_seq_max", n_seq_max)))
        n_ubatch = int_arg("n_ubatch", n_batch if n_ubatch is None else n_ubatch, 1, n_batch)
        n_rs_seq = int_arg("n_rs_seq", n_rs_seq, 0, 64)
        n_threads = int_arg("n_threads", n_threads, 1, none=True)
        n_threads_batch = int_arg("n_threads_batch", n_threads_batch, 1, none=True)
        config = _lowlevel.ContextConfig(
            n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max,
            n_rs_seq=n_rs_seq, n_threads=n_threads or 0, n_threads_batch=n_threads_batch or 0,
            embeddings=embeddings, flash_attn=flash_attn, mtp=_mtp_target is not None)
        if _mtp_target is not None and not model.mtp_loaded:
            # llama.cpp asserts (kills the process) building an MTP graph without the layers.
            raise NoMTPError("this model has no MTP layers loaded: load a model with MTP layers "
                             "and load_mtp=True to create a draft context")
        self._model = model  # strong: a context keeps its model alive
        # Strong too: llama.cpp keeps a pointer into the target (ctx_other) for drafters
        # that share its memory, so a draft context is closed with its target.
        self._target = _mtp_target
        self._config = config
        self._is_mtp = _mtp_target is not None
        self._embeddings = embeddings
        self._flash_attn = flash_attn
        self._last_outputs = np.zeros(0, dtype=np.int8)
        self._last_rows = (np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32))
        self._output_offset = 0
        native_model = model._adopt(self)  # ClosedError first, before any child process
        try:
            native_target = _mtp_target._adopt(self) if _mtp_target is not None else None
            model._preflight_context(config, _mtp_target._config if _mtp_target is not None else None)
            self._native = _lowlevel.NativeContext(native_model, config, native_target)
        except BaseException:
            self._abandon()
            raise
        self._mark_open_child()
        try:
            self._finish_init(warmup)
        except BaseException:
            self.close()  # the native context is ours alone yet: free it now
            raise

    def _finish_init(self, warmup: bool) -> None:
        model = self._model
        # Stop inside a graph only where that is known to be safe: all on the CPU backend
        # (only it polls the callback; on Vulkan a stop between splits left the device
        # queue broken and a later step crashed) and no recurrent memory (it cannot undo
        # a half-run ubatch: upstream restores a stale snapshot). Otherwise between calls.
        recurrent = not self._is_mtp and (model.is_recurrent or model.is_hybrid)
        offloaded = any(not entry["buffer_type"].upper().startswith("CPU") for entry in self.memory_breakdown())
        self._native.between_calls_only = recurrent or offloaded
        if warmup and not self._is_mtp:
            self._warm_up()

    def _warm_up(self) -> None:
        """One throw-away decode of [BOS, EOS], then empty memory: what llama.cpp's own
        tools do on every new context. Without it, the first single-token decode on
        Mesa's Vulkan device crashed the process for some graphs (glm4moe, 16-dim heads,
        flash attention; upstream's llama-completion --no-warmup crashes the same way)."""
        tokens = ([t for t in (self._model.bos, self._model.eos) if t >= 0] or [0])[:self.n_batch]
        self.decode(Batch(tokens, positions=range(len(tokens))))
        self.clear()
        self._last_outputs = np.zeros(0, dtype=np.int8)
        self._native.synchronize()

    # -- lifetime ---------------------------------------------------------------------
    def _release(self) -> None:
        # Draft contexts and decoders hold pointers into this context: they close too,
        # and their memory is freed before this context's.
        self._close_children()
        self._free_when_unused()

    @property
    def model(self) -> "Model":
        return self._model

    @property
    def lock(self):
        """The context's re-entrant lock: every method holds it; hold it yourself to make
        several calls (decode, then read logits) one atomic step across threads."""
        return self._native.lock

    # -- sizes ------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._native.n_ctx

    @property
    def n_batch(self) -> int:
        return self._native.n_batch

    @property
    def n_ubatch(self) -> int:
        return self._native.n_ubatch

    @property
    def n_seq_max(self) -> int:
        return self._native.n_seq_max

    @property
    def n_threads(self) -> int:
        return self._native.n_threads

    @property
    def n_rs_seq(self) -> int:
        """Recurrent-state snapshots per sequence (how far a hybrid model can roll back)."""
        return self._native.n_rs_seq

    @property
    def flash_attn(self) -> Optional[bool]:
        """Flash attention as requested: True, False or None (llama.cpp decides per device)."""
        return self._flash_attn

    @property
    def is_mtp(self) -> bool:
        """This is an MTP draft context (see :meth:`Model.mtp_context`)."""
        return self._is_mtp

    # -- decoding ---------------------------------------------------------------------
    def _check_seq(self, seq_id: int) -> int:
        if not isinstance(seq_id, (int, np.integer)) or not 0 <= seq_id < self.n_seq_max:
            raise InvalidArgumentError(f"sequence id {seq_id!r} is outside [0, n_seq_max={self.n_seq_max})")
        return int(seq_id)

    def decode(self, batch: Union[Batch, IntArray], *, seq_id: int = 0,
               timeout: Optional[float] = None) -> None:
        """Evaluate a batch (or a list of tokens continuing sequence ``seq_id``).

        Ctrl-C stops a long evaluation within one graph node (KeyboardInterrupt), as do
        :meth:`cancel` from another thread and ``timeout`` seconds.

        Raises:
            InvalidArgumentError: bad token id, sequence id, size or positions.
            ContextFullError: no KV slot is free; nothing of the batch was kept.
            AbortedError: :meth:`cancel` was called during the evaluation; ubatches that
                completed before it stay (``seq_pos_max`` says how far).
            DecodeTimeoutError: ``timeout`` (or an enclosing :meth:`time_limit`) passed.
        """
        if not isinstance(batch, Batch):
            batch = Batch(batch, seq_ids=self._check_seq(seq_id))
        if len(batch) > self.n_batch:
            raise InvalidArgumentError(f"batch of {len(batch)} tokens exceeds n_batch={self.n_batch}")
        self._model.check_tokens(batch.tokens)
        bad = np.flatnonzero((batch.seq_ids < 0) | (batch.seq_ids >= self.n_seq_max))
        if bad.size:
            raise InvalidArgumentError(
                f"sequence id {int(batch.seq_ids[bad[0]])} at index {int(bad[0])} is outside "
                f"[0, n_seq_max={self.n_seq_max})")
        positions = batch.positions if batch.positions is not None else self._next_positions(batch.seq_ids)
        if (positions < 0).any():
            raise InvalidArgumentError("positions must be non-negative")
        with self._native.lock, self.time_limit(timeout):
            self._last_outputs = np.zeros(0, dtype=np.int8)
            start = 0
            if self._native.between_calls_only:
                # Recurrent memory is stopped only between calls: evaluate a long batch in
                # ubatch-sized calls so cancel, timeouts and Ctrl-C act between them. Only
                # when no output is needed before the last call (each call replaces the
                # logits of the one before).
                last_chunk = (len(batch) - 1) // self.n_ubatch * self.n_ubatch
                if not batch.outputs[:last_chunk].any():
                    for start in range(0, last_chunk, self.n_ubatch):
                        end = start + self.n_ubatch
                        self._native.decode(batch.tokens[start:end], positions[start:end],
                                            batch.seq_ids[start:end], batch.outputs[start:end])
                    start = last_chunk
            self._native.decode(batch.tokens[start:], positions[start:], batch.seq_ids[start:],
                                batch.outputs[start:])
            self._last_outputs = batch.outputs.copy()
            self._last_rows = (batch.seq_ids, positions)  # who each output is, for errors
            self._output_offset = start  # batch index of the last call's first token

    def _next_positions(self, seq_ids: np.ndarray) -> np.ndarray:
        positions = np.empty(len(seq_ids), dtype=np.int32)
        for seq in np.unique(seq_ids):
            where = np.flatnonzero(seq_ids == seq)
            start = self._native.seq_pos_max(int(seq)) + 1
            positions[where] = np.arange(start, start + len(where), dtype=np.int32)
        return positions

    def _output_index(self, index: int) -> int:
        n = len(self._last_outputs)
        if not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise InvalidArgumentError(f"batch index {index!r} is outside the last batch ({n} tokens)")
        index = int(index) % n
        if not self._last_outputs[index]:
            raise InvalidArgumentError(f"token {index} of the last batch was not marked as an output")
        return index - self._output_offset

    def logits(self, index: int = -1) -> np.ndarray:
        """Logits (copy, float32, ``n_vocab``) of output token ``index`` of the last batch."""
        return self._native.logits(self._output_index(index), self._model.n_vocab)

    def embeddings(self, index: int = -1) -> np.ndarray:
        """Hidden state (copy, float32, ``n_embd``) of output token ``index``; needs ``embeddings=True``."""
        if not self._embeddings:
            raise InvalidArgumentError("create the context with embeddings=True to read hidden states")
        return self._native.embeddings(self._output_index(index), self._model.n_embd)

    def cancel(self) -> None:
        """Stop the running decode (or, if none runs, the next one) with AbortedError.

        Thread-safe. A context over recurrent memory (e.g. qwen35's linear-attention
        layers) stops at the next ubatch boundary: a half-computed ubatch could not be
        undone there."""
        self._native.request_abort()

    def time_limit(self, seconds: Optional[float]) -> "contextlib.AbstractContextManager[None]":
        """``with ctx.time_limit(2.0):`` every evaluation in the block raises
        :class:`DecodeTimeoutError` once 2 s have passed (``None``: no limit)."""
        return time_limit((self._native,), seconds)

    # -- memory -----------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every sequence."""
        self._native.memory_clear()

    def seq_rm(self, seq_id: int, p0: int = 0, p1: Optional[int] = None) -> None:
        """Remove positions [p0, p1) of a sequence (p1 None: to the end; seq_id -1: all sequences).

        Raises StateError when the memory cannot cut a sequence there (recurrent state
        keeps no history: only whole sequences, or the tail past a snapshot, can go).
        """
        if seq_id != -1:
            self._check_seq(seq_id)
        if p0 < 0 or (p1 is not None and p1 < p0):
            raise InvalidArgumentError(f"invalid range [{p0}, {p1})")
        if not self._native.seq_rm(int(seq_id), int(p0), -1 if p1 is None else int(p1)):
            raise StateError(f"cannot remove positions [{p0}, {p1}) of sequence {seq_id} from this memory")

    def seq_cp(self, src: int, dst: int, p0: int = 0, p1: Optional[int] = None) -> None:
        """Share positions [p0, p1) of sequence ``src`` with sequence ``dst``."""
        self._native.seq_cp(self._check_seq(src), self._check_seq(dst), int(p0), -1 if p1 is None else int(p1))

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but ``seq_id``."""
        self._native.seq_keep(self._check_seq(seq_id))

    def pos_max(self, seq_id: int = 0) -> int:
        """Last position held for the sequence, -1 when empty."""
        return self._native.seq_pos_max(self._check_seq(seq_id))

    def pos_min(self, seq_id: int = 0) -> int:
        return self._native.seq_pos_min(self._check_seq(seq_id))

    def save_state(self, seq_id: int = 0, *, partial: bool = False) -> bytes:
        """Serialise one sequence's memory (KV and recurrent state); ``partial``: only
        what cannot be cut back by position (a hybrid model's recurrent state), a
        checkpoint that :meth:`load_state` with ``partial=True`` and :meth:`seq_rm` of the
        positions after it resume from."""
        return self._native.state_seq_get(self._check_seq(seq_id), partial=bool(partial))

    def load_state(self, data: bytes, seq_id: int = 0, *, partial: bool = False) -> None:
        """Restore a sequence saved by :meth:`save_state` (replacing what it held; with
        ``partial``, only the recurrent part)."""
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise InvalidArgumentError("state data must be non-empty bytes")
        self._native.state_seq_set(bytes(data), self._check_seq(seq_id), partial=bool(partial))

    def memory_breakdown(self) -> list[dict[str, Any]]:
        """Bytes per buffer type: model weights, context (KV, recurrent state), compute."""
        return self._native.memory_breakdown()

    # -- generation -------------------------------------------------------------------
    def sample(self, sampler: Sampler, index: int = -1) -> int:
        """Choose a token with ``sampler`` from output ``index`` of the last batch."""
        native = sampler._native_sampler(self.model)
        row = self._output_index(index)
        try:
            return native.sample(self._native, row)
        except (NonFiniteLogitsError, GrammarDeadEndError) as error:
            seq_ids, positions = self._last_rows
            at = row + self._output_offset
            raise type(error)({int(seq_ids[at]): int(positions[at])}) from None

    def generate(self, prompt: Union[str, Iterable[int]], *, max_tokens: int = 128,
                 sampler: Optional[Sampler] = None, seq_id: int = 0, stop_at_eog: bool = True,
                 timeout: Optional[float] = None) -> Iterator[int]:
        """Stream generated token ids; see :func:`pyllama_mtp.generation.generate`."""
        return generate(self, prompt, max_tokens=max_tokens, sampler=sampler,
                        seq_id=seq_id, stop_at_eog=stop_at_eog, timeout=timeout)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.n_ctx}, n_seq_max={self.n_seq_max}"
        return f"<Context ({state})>"


def snapshot_bytes(model: "Model", n_seq_max: int, n_rs_seq: int) -> int:
    """Bytes that ``n_rs_seq`` recurrent-state snapshots take in a context. Measured, not
    modelled: two throwaway contexts, KV kept minimal, that differ only in that count."""
    if n_rs_seq <= 0:
        return 0
    sizes = []
    for count in (0, n_rs_seq):
        with Context(model, n_ctx=256, n_batch=32, n_seq_max=n_seq_max, n_rs_seq=count, n_threads=1) as probe:
            sizes.append(sum(entry["context"] for entry in probe.memory_breakdown()))
    return max(0, sizes[1] - sizes[0])
