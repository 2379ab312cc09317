"""MTP speculative decoding: draft with the model's MTP head, verify with the trunk.

The whole step runs in the C shim (``csrc/speculative.cpp``): one call from Python per
step, whatever the draft length. The low-level methods (:meth:`SpeculativeDecoder.draft`,
:meth:`~SpeculativeDecoder.verify`, :meth:`~SpeculativeDecoder.accept`,
:meth:`~SpeculativeDecoder.rollback`) expose the same machinery for custom policies.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _lowlevel
from ._resource import Resource, native_handle
from ._args import int_arg, number_arg
from .adaptive import AdaptiveDraft, StepCost, plan_drafts
from .context import Context, snapshot_bytes, time_limit
from .errors import ContextFullError, InvalidArgumentError
from .generation import Sampler
from .grammar import GrammarLike
from .speculative_steps import StepByStep
from .stats import MemoryReport, SpeculativeStats

__all__ = ["SpeculativeDecoder", "SpeculativeStats", "MemoryReport"]


class SpeculativeDecoder(StepByStep, Resource):
    """Greedy MTP speculative decoding over a target context and its MTP draft context.

    Output is token-for-token what plain greedy decoding of the target would produce:
    drafts only decide how many tokens one target batch confirms.

    Args:
        target: the model's ordinary context. For hybrid / recurrent models (qwen35) it
            must keep ``n_rs_seq >= n_draft + 1`` recurrent snapshots so rejected drafts
            can be rolled back; :meth:`create` sets this up.
        draft: ``model.mtp_context(target)``.
        n_draft: tokens drafted per step (1..16); with ``adaptive`` the most it drafts.
        p_min: stop drafting when the MTP head's top probability falls under this.
        adaptive: choose the draft length each step from the recent acceptance per
            position and the measured cost of verify batches and drafts
            (:mod:`pyllama_mtp.adaptive`).
        max_draft: the longest draft the decoder holds (default ``n_draft``); n-gram
            lookup drafts (:meth:`set_lookup`) and :meth:`set_draft` may use up to it.
        catch_up: the drafter's catch-up over a prompt (one MTP-layer row per token)
            covers its last ``catch_up`` tokens only (None: all of them). Bounds what a
            long prompt costs beyond the target's prefill; drafts then attend to those
            tokens only (benchmarks/ttft_bench.py measures both sides).
    """

    def __init__(self, target: Context, draft: Context, *, n_draft: int = 3, p_min: float = 0.0,
                 adaptive: bool = False, max_draft: Optional[int] = None,
                 catch_up: Optional[int] = None) -> None:
        if not draft.is_mtp:
            raise InvalidArgumentError("draft must be an MTP context: use model.mtp_context(target)")
        if draft.model is not target.model:
            raise InvalidArgumentError("target and draft contexts must come from the same model")
        if draft.n_seq_max < target.n_seq_max:
            raise InvalidArgumentError("the draft context must hold as many sequences as the target")
        capacity = _lowlevel.PMTP_MAX_DRAFT_CAPACITY
        n_draft = int_arg("n_draft", n_draft, 1, capacity)
        max_draft = int_arg("max_draft", n_draft if max_draft is None else max_draft, n_draft, capacity)
        p_min = number_arg("p_min", p_min, 0.0, 1.0, high_open=True)
        catch_up = int_arg("catch_up", catch_up, 1, none=True)
        self.catch_up = catch_up
        model = target.model
        if (model.is_hybrid or model.is_recurrent) and target.n_rs_seq < max_draft + 1:
            raise InvalidArgumentError(
                f"{model.architecture} keeps recurrent state: create the target context with "
                f"n_rs_seq >= max_draft + 1 ({max_draft + 1}) so rejected drafts can be rolled back "
                "(SpeculativeDecoder.create does this)")
        self._target = target
        self._draft_ctx = draft
        # Registered with both contexts: closing either closes this decoder, freed first.
        try:
            self._native = _lowlevel.NativeSpeculative(target._adopt(self), draft._adopt(self),
                                                       target.n_seq_max, max_draft)
        except BaseException:
            self._abandon()
            raise
        self.n_draft = min(n_draft, self._native.n_draft_max)
        self.p_min = float(p_min)
        # One adaptive policy per sequence: each learns its own sequence's acceptance.
        self._policies = [AdaptiveDraft(self.n_draft, self.n_draft) for _ in range(target.n_seq_max)] \
            if adaptive else []
        self._cost = StepCost()  # shared: the verify batch is
        self._last_drafted = [0] * target.n_seq_max
        self._prefilled = [False] * target.n_seq_max  # see step()
        self._queued: set[int] = set()
        self._wall_s = 0.0
        self._owned: list[Context] = []
        # Each sequence's native sampler (None: greedy, unconstrained), owned here.
        self._samplers: list[Optional[_lowlevel.NativeSampler]] = [None] * target.n_seq_max
        self._mark_open_child()

    @classmethod
    def create(cls, model, *, n_ctx: int = 2048, n_draft: int = 3, p_min: float = 0.0,
               n_seq_max: int = 1, n_batch: int = 512, n_threads: Optional[int] = None,
               flash_attn: Optional[bool] = None, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
               exact_match: bool = False, adaptive: bool = False, lookup_ngram: int = 0,
               lookup_min: int = 2, lookup_max: int = 8, grammar: GrammarLike = None,
               catch_up: Optional[int] = None) -> "SpeculativeDecoder":
        """Make both contexts with the right settings and a decoder that owns them.

        Sampling arguments: see :meth:`set_sampling` (default: greedy). ``lookup_ngram``
        > 0 turns on n-gram lookup drafts of ``lookup_min`` to ``lookup_max`` tokens (see
        :meth:`set_lookup`).
        """
        # The caller's arguments, before anything is derived from them (n_rs_seq, max_draft).
        capacity = _lowlevel.PMTP_MAX_DRAFT_CAPACITY
        n_draft = int_arg("n_draft", n_draft, 1, capacity)
        lookup_ngram = int_arg("lookup_ngram", lookup_ngram, 0, 64)
        lookup_max = int_arg("lookup_max", lookup_max, 1, capacity)
        max_draft = max(n_draft, lookup_max) if lookup_ngram else n_draft
        target = Context(model, n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max, n_threads=n_threads,
                         n_rs_seq=max_draft + 1 if (model.is_hybrid or model.is_recurrent) else 0,
                         flash_attn=flash_attn)
        try:
            draft = model.mtp_context(target)
        except BaseException:
            target.close()
            raise
        try:
            decoder = cls(target, draft, n_draft=n_draft, p_min=p_min, adaptive=adaptive, max_draft=max_draft,
                          catch_up=catch_up)
        except BaseException:
            draft.close()
            target.close()
            raise
        decoder._owned = [draft, target]
        try:
            if temperature > 0 or grammar is not None:
                decoder.set_sampling(temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                                     exact_match=exact_match, grammar=grammar)
            if lookup_ngram:
                decoder.set_lookup(lookup_ngram, min_tokens=lookup_min, max_tokens=lookup_max)
        except BaseException:
            decoder.close()
            raise
        return decoder

    def set_lookup(self, ngram: int, *, min_tokens: int = 2, max_tokens: Optional[int] = None) -> None:
        """Draft from the sequence's own history where it repeats (n-gram lookup).

        Before each :meth:`step`, a sequence whose last ``ngram`` tokens occurred earlier
        in it takes the tokens that followed their most recent occurrence as its draft,
        if there are at least ``min_tokens`` of them (at most ``max_tokens``, default
        and limit: ``max_draft``); the MTP head drafts for the others. The target
        verifies either kind the same way, so greedy output stays plain greedy decoding
        and sampled output keeps its distribution. ``ngram=0`` turns lookup off.
        Statistics count lookup steps apart (``stats.lookup_*``).
        """
        capacity = self._native.n_draft_max
        max_tokens = capacity if max_tokens is None else max_tokens
        ngram = int_arg("ngram", ngram, 0, 64)
        max_tokens = int_arg("max_tokens", max_tokens, 1, capacity)  # capacity: max_draft
        min_tokens = int_arg("min_tokens", min_tokens, 1, max_tokens)
        self._native.set_lookup(ngram, min_tokens, max_tokens)

    def set_sampling(self, temperature: float = 0.0, *, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0, seed: int = 0, exact_match: bool = False,
                     grammar: GrammarLike = None, seq_id: Optional[int] = None) -> None:
        """How :meth:`step` picks tokens; ``temperature=0`` is greedy (the default).

        At ``temperature > 0`` the MTP head samples each draft token from its own
        distribution q (same filters), and the target accepts it with probability
        min(1, p/q), drawing from the residual max(0, p - q) on a rejection (speculative
        sampling): the tokens have exactly the distribution of plain sampling with
        ``Sampler(temperature, top_k=, top_p=, min_p=, grammar=)``, and more drafts
        survive than with ``exact_match=True``, which keeps a draft token only when the
        target's own sample equals it.

        ``grammar`` (GBNF text or a :class:`Grammar`) constrains the target's choice at
        verification; drafts stay unconstrained and survive only where the constrained
        target agrees (greedy) or by the rule above against the constrained p. The
        grammar advances over accepted tokens only. Greedy constrained output equals
        plain constrained output token for token.

        ``seq_id=None`` sets every sequence (sequence i seeded with ``seed + i``); one
        sequence's settings are its own (a server's requests differ). Each call starts
        a fresh grammar and random stream.
        """
        # Sampler checks the settings; the decoder owns one native sampler per sequence.
        settings = Sampler(temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, grammar=grammar)
        seqs = range(self.n_seq) if seq_id is None else [self._check_seq(seq_id)]
        try:
            for seq in seqs:
                native = None
                if not settings.is_greedy or settings.grammar is not None:
                    native = settings.native_for(self._target.model, exact_match=bool(exact_match),
                                                 seed=seed + seq if seq_id is None else seed)
                self._native.set_sampler(seq, native)
                # Unset first, then freed: the C step never sees a freed sampler.
                old, self._samplers[seq] = self._samplers[seq], native
                if old is not None:
                    old.free()
        finally:
            settings.close()

    # -- lifetime ---------------------------------------------------------------------
    def _release(self) -> None:
        self._free_when_unused()  # the C driver, before the contexts it points into
        for sampler in self._samplers:
            if sampler is not None:
                sampler.free()
        for ctx in self._owned:
            ctx.close()

    @property
    def target(self) -> Context:
        return self._target

    @property
    def draft_context(self) -> Context:
        return self._draft_ctx

    @property
    def n_seq(self) -> int:
        return self._native.n_seq

    # -- high level -------------------------------------------------------------------
    def prefill(self, prompt: Union[str, Iterable[int]], seq_id: int = 0) -> None:
        """Evaluate a prompt on a sequence (continuing it if already started)."""
        model = self._target.model
        tokens = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise InvalidArgumentError("the prompt is empty")
        array = model.check_tokens(tokens)
        seq_id = self._check_seq(seq_id)
        _, _, n_past = self._native.seq_state(seq_id)
        if n_past + len(array) > self._target.n_ctx:
            raise ContextFullError(f"the prompt ({len(array)} tokens) does not fit the context "
                                   f"({n_past} of {self._target.n_ctx} positions used)")
        # A recurrent target stops only between calls: feed a long prompt in ubatch-sized
        # calls so cancel, timeouts and Ctrl-C act between them.
        chunk = self._target.n_ubatch if native_handle(self._target).between_calls_only else len(array)
        if self.catch_up is not None:
            # The last token stays pending (the next step evaluates it): the drafter sees
            # the catch_up positions before it.
            active, _, n_past = self._native.seq_state(seq_id)
            end = n_past + len(array) if active else self._target.pos_max(seq_id) + len(array)
            self._native.set_catch_up_from(seq_id, end - self.catch_up)
        start = time.perf_counter()
        try:
            for begin in range(0, len(array), chunk):
                self._native.prefill(seq_id, np.ascontiguousarray(array[begin:begin + chunk], dtype=np.int32))
        finally:
            self._wall_s += time.perf_counter() - start
            if self.catch_up is not None:
                self._native.set_catch_up_from(seq_id, -1)
        self._prefilled[seq_id] = True

    def step(self, n_draft: Union[None, int, Sequence[Optional[int]]] = None) -> list[list[int]]:
        """One speculative step on every active sequence: the tokens each one produced.

        Each list holds the accepted draft tokens and the target's next token (at least
        one token per active sequence). ``n_draft``: None drafts the decoder's length (or
        the adaptive plan); an int, that length for every sequence; a list, each
        sequence's length, None entries planned (a server's per-request setting).
        A sequence's first step after a prefill drafts nothing unless given a length: its
        first token then comes as fast as plain decoding's (time to first token).
        :attr:`last_drafted` says what each sequence drafted.
        """
        n_max = self._native.n_draft_max
        fixed = [n_draft] * self.n_seq if n_draft is None or isinstance(n_draft, int) else list(n_draft)
        if len(fixed) != self.n_seq or not all(
                n is None or (isinstance(n, (int, np.integer)) and 0 <= n <= n_max) for n in fixed):
            raise InvalidArgumentError(f"n_draft must be None, an int in [0, {n_max}] or one of those "
                                       f"for each of the {self.n_seq} sequences")
        # Planning, the C step and the bookkeeping are one step under the decoder's lock
        # (the first in the one lock order): threads sharing a decoder take whole steps.
        with self._native.lock:
            # A close() asked for while this call waited for the lock wins: it raises
            # ClosedError here rather than waiting behind a thread that steps on.
            self._live_native()
            if any(self._prefilled):
                fixed = [0 if n is None and first else n for n, first in zip(fixed, self._prefilled)]
                self._prefilled = [False] * self.n_seq
            policies = self._policies if any(n is None for n in fixed) else []
            if policies:
                active = [self._native.seq_state(seq)[0] for seq in range(self.n_seq)]
                lengths = plan_drafts(policies, active, self._cost, fixed)
                # A planned sequence that drafts nothing also spares its drafter the catch-up.
                run_lengths = [_lowlevel.PMTP_DRAFT_REST if n == 0 and fixed[seq] is None else n
                               for seq, n in enumerate(lengths)]
            else:
                lengths = run_lengths = [self.n_draft if n is None else int(n) for n in fixed]
            start = time.perf_counter()
            try:
                tokens, counts, drafted, failures = self._native.step_each(run_lengths, self.p_min)
                produced = [tokens[seq, :counts[seq]].tolist() for seq in range(self.n_seq)]
                # Lookup drafts come back as -(length + 1).
                self._last_drafted = [d if d >= 0 else -d - 1 for d in drafted.tolist()]
            finally:
                self._wall_s += time.perf_counter() - start
            carried_prompts = bool(self._queued)
            if carried_prompts:  # queued prompts (enqueue()) that ended this step
                self._queued = {seq for seq in self._queued if not self._native.seq_state(seq)[0]}
            if policies and not carried_prompts:  # a prompt chunk's time is no verify cost
                self._cost.observe(sum(map(bool, produced)), max(lengths), time.perf_counter() - start)
                for policy, tokens_out, n_drafted in zip(policies, produced, drafted.tolist()):
                    # Inactive sequences produced nothing; lookup drafts (negative) say nothing
                    # about the MTP head.
                    if tokens_out and n_drafted >= 0:
                        policy.observe(n_drafted, len(tokens_out) - 1)
            if failures:
                self._native.raise_failures(failures, produced)
            return produced

    @property
    def last_drafted(self) -> list[int]:
        """Each sequence's verified draft length (MTP or lookup) in the last :meth:`step`;
        the step's tokens for that sequence hold the accepted part plus one."""
        return list(self._last_drafted)

    @property
    def adaptive(self) -> Optional[AdaptiveDraft]:
        """Sequence 0's adaptive policy (None without ``adaptive=True``); see :attr:`policies`."""
        return self._policies[0] if self._policies else None

    @property
    def policies(self) -> list[AdaptiveDraft]:
        """Each sequence's adaptive policy (empty without ``adaptive=True``)."""
        return list(self._policies)

    def generate(self, prompt: Union[str, Iterable[int]], *, max_tokens: int = 128, seq_id: int = 0,
                 stop_at_eog: bool = True, timeout: Optional[float] = None) -> Iterator[int]:
        """Prefill ``prompt`` and stream up to ``max_tokens`` generated tokens (one sequence).

        ``timeout`` (seconds) bounds the whole generation (:class:`DecodeTimeoutError`);
        Ctrl-C stops it within one graph node. Either way the tokens yielded so far are
        kept and :meth:`step` continues the sequence.
        """
        max_tokens = int_arg("max_tokens", max_tokens, 0)
        if self.n_seq != 1:
            raise InvalidArgumentError("generate() drives one sequence; use generate_many() "
                                       "for a decoder with several")
        with self.time_limit(timeout):
            self.prefill(prompt, seq_id)
            model = self._target.model
            produced = 0
            while produced < max_tokens:
                for token in self.step()[seq_id]:
                    if stop_at_eog and model.is_eog(token):
                        return
                    yield token
                    produced += 1
                    if produced >= max_tokens:
                        return

    def generate_many(self, prompts: Sequence[Union[str, Iterable[int]]], *, max_tokens: int = 128,
                      stop_at_eog: bool = True) -> list[list[int]]:
        """Generate for several prompts at once, one sequence each, in shared batches."""
        if len(prompts) != self.n_seq:
            raise InvalidArgumentError(f"need exactly {self.n_seq} prompts (one per sequence)")
        for seq_id, prompt in enumerate(prompts):
            self.prefill(prompt, seq_id)
        model = self._target.model
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * self.n_seq
        while not all(done):
            produced = self.step()
            for seq_id, tokens in enumerate(produced):
                for token in tokens:
                    if done[seq_id]:
                        break
                    if stop_at_eog and model.is_eog(token):
                        done[seq_id] = True
                        break
                    outputs[seq_id].append(token)
                    if len(outputs[seq_id]) >= max_tokens:
                        done[seq_id] = True
            for seq_id in range(self.n_seq):
                if done[seq_id] and self._native.seq_state(seq_id)[0]:
                    self._native.reset_seq(seq_id)
        return outputs

    def cancel(self) -> None:
        """Stop the running step (or the next one) with AbortedError. Thread-safe."""
        self._target.cancel()
        self._draft_ctx.cancel()

    def time_limit(self, seconds: Optional[float]) -> "contextlib.AbstractContextManager[None]":
        """``with decoder.time_limit(2.0):`` steps in the block raise
        :class:`DecodeTimeoutError` once 2 s have passed; the decoder stays consistent."""
        return time_limit((native_handle(self._target), native_handle(self._draft_ctx)), seconds)

    # -- memory -----------------------------------------------------------------------
    def memory_report(self) -> "MemoryReport":
        """What MTP costs in memory here: MTP weights, the draft context, and the
        recurrent-state snapshots that rollback needs in the target context."""
        model = self._target.model
        return MemoryReport(
            mtp_weights=model.mtp_weight_bytes,
            model_weights=model.size,
            target=self._target.memory_breakdown(),
            draft=self._draft_ctx.memory_breakdown(),
            recurrent_snapshots=snapshot_bytes(model, self._target.n_seq_max, self._target.n_rs_seq),
        )

    # -- statistics -------------------------------------------------------------------
    @property
    def stats(self) -> SpeculativeStats:
        return SpeculativeStats.from_counters(self._native.stats(), self._wall_s)

    def reset_stats(self) -> None:
        self._native.reset_stats()
        self._wall_s = 0.0
