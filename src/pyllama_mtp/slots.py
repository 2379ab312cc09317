"""Sequence slots with prefix reuse: the sequences of one MTP decoder or one plain
context, each running a :class:`~pyllama_mtp.session.Session` at a time.

:meth:`Slots.start` puts a request's prompt on a slot decoding only what the slot does not
hold yet: a finished request leaves its tokens in the slot's memory (parked: kept, not
stepped), and the next prompt keeps the longest prefix it shares with them. Attention
memory cuts back to any position; a hybrid or recurrent model's state cannot go back, so
a slot keeps checkpoints of it (at the end of each prompt; where a chat's generation
prompt starts, since templates render a past turn unlike the prompt that asked for it,
or four tokens before the end of a raw prompt; and every ``checkpoint_every`` tokens of a
long prompt; at most ``max_checkpoints`` per slot, the oldest dropped) and resumes from
the last one inside the shared prefix. The MTP drafter keeps its KV up to the same
point and the hidden row its next draft pairs with (saved with the checkpoint).
:meth:`Slots.step` advances every running slot in one batched step, feeding the prompts
of newly started slots inside it (``inline``; not for MTP on hybrid models, whose prompts
are evaluated at start: see SpeculativeSlots).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .errors import GrammarDeadEndError, InvalidArgumentError, NonFiniteLogitsError
from .session import Session
from .speculative import SpeculativeDecoder

__all__ = ["Slots", "SpeculativeSlots", "common_prefix"]

# Step results: each slot's tokens, each slot's verified draft length, the failed slots.
StepResult = tuple[list[list[int]], list[int], dict[int, Exception]]
# Without a hint from the template, a checkpoint this many tokens before a prompt's end
# survives a text that the next prompt continues with merged tokens (llama-server: 4).
_END_MARGIN = 4


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


@dataclass
class _Held:
    """What a slot's memory holds: its tokens (the pending one last) and checkpoints."""

    tokens: list[int] = field(default_factory=list)
    checkpoints: list[Any] = field(default_factory=list)  # each with .n_tokens, .nbytes; oldest first
    used_at: float = 0.0
    #: a prompt being fed inside the steps: it, where its later parts end (a checkpoint
    #: between two parts), and whether a part is in the decoder's queue now
    prompt: list[int] = field(default_factory=list)
    parts: list[int] = field(default_factory=list)
    feeding: bool = False


class Slots:
    """The prefix logic, written once; subclasses give the sequence operations."""

    def __init__(self, n_slots: int, recurrent: bool, *, max_checkpoints: int = 8,
                 checkpoint_every: int = 2048) -> None:
        for name, value in (("max_checkpoints", max_checkpoints), ("checkpoint_every", checkpoint_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_checkpoints" else 1):
                raise InvalidArgumentError(f"{name} must be an int >= {0 if name == 'max_checkpoints' else 1}, "
                                           f"got {value!r}")
        self.n_slots = n_slots
        self.recurrent = recurrent
        self.max_checkpoints = max_checkpoints
        self.checkpoint_every = checkpoint_every
        self._held = [_Held() for _ in range(n_slots)]
        #: prompts fed inside the steps (else evaluated at start, in calls of their own)
        self.inline = True

    # -- what subclasses provide ------------------------------------------------------
    def _enqueue(self, slot: int, tokens: list[int], ready: bool) -> None:
        """Feed ``tokens`` inside the next steps (after the slot's pending token); ready:
        the step that ends them gives the first token, else the last stays pending."""
    def _part_done(self, slot: int) -> bool:
        """Whether the tokens given to :meth:`_enqueue` were all taken in."""
        raise NotImplementedError
    def _prefill(self, slot: int, tokens: list[int]) -> None:
        """Where prompts are not fed inside the steps (``inline`` False): evaluate now."""
        raise NotImplementedError
    def _cut(self, slot: int, n_keep: int) -> int:
        """Keep the first n_keep tokens (the last pending); returns those not decoded again."""
        raise NotImplementedError
    def _save(self, slot: int) -> Any: ...
    def _restore(self, slot: int, checkpoint: Any) -> None: ...
    def _reset(self, slot: int) -> None: ...
    def _park(self, slot: int) -> None: ...
    def _unpark(self, slot: int) -> None: ...
    def _configure(self, slot: int, session: Session) -> None: ...
    def _step(self, sessions: Sequence[Optional[Session]]) -> StepResult: ...
    def _holds(self, slot: int) -> bool:
        """Whether the slot's memory still holds its tokens (a rebuild after NaN drops caches)."""
        return True

    # -- reuse ------------------------------------------------------------------------
    def _plan(self, slot: int, tokens: list[int]) -> tuple[str, Any, int]:
        """(how, argument, prompt tokens not decoded again) for starting ``tokens`` here."""
        held = self._held[slot]
        shared = common_prefix(held.tokens, tokens)
        if held.tokens and shared == len(held.tokens):
            return "continue", None, shared - 1  # the pending token is evaluated with the rest
        keep = min(shared, len(tokens))
        if not self.recurrent and keep >= 2:
            return "cut", keep, keep - 2
        usable = [c for c in held.checkpoints if c.n_tokens <= keep]
        if usable:
            best = max(usable, key=lambda c: c.n_tokens)
            return "restore", best, best.n_tokens - 1
        return "reset", None, 0

    def reusable(self, slot: int, tokens: list[int]) -> int:
        """Prompt tokens a start on this slot would not decode again."""
        return self._plan(slot, tokens)[2]

    def choose(self, free: Sequence[int], tokens: list[int]) -> int:
        """The free slot that reuses most of ``tokens``; among equals the least recently
        used (so other cached prefixes live longer)."""
        return max(free, key=lambda slot: (self.reusable(slot, tokens), -self._held[slot].used_at))

    @property
    def checkpoint_bytes(self) -> int:
        return sum(c.nbytes for held in self._held for c in held.checkpoints)

    @property
    def checkpoint_count(self) -> int:
        return sum(len(held.checkpoints) for held in self._held)

    # -- a session's life -------------------------------------------------------------
    def start(self, slot: int, session: Session, *, reuse: bool = True) -> int:
        """Put the session's prompt on ``slot``; returns the prompt tokens reused (none
        without ``reuse``: the prompt is evaluated cold)."""
        tokens = list(session.prompt.tokens)
        held = self._held[slot]
        held.used_at = time.monotonic()
        if held.tokens and (not reuse or not self._holds(slot)):
            self._drop(slot)
        how, argument, reused = self._plan(slot, tokens)
        self._configure(slot, session)
        try:
            if how == "continue":
                at = len(held.tokens)
            elif how == "cut":
                reused = self._cut(slot, argument)
                at = argument
            elif how == "restore":
                self._restore(slot, argument)
                at = argument.n_tokens
            else:
                self._reset(slot)
                at = 0
            held.checkpoints = [c for c in held.checkpoints if c.n_tokens <= at]
            held.tokens = tokens[:at]
            self._feed(slot, tokens, at, session.prompt.checkpoint_at)
        except BaseException:
            self._drop(slot)
            raise
        session.prompt_done(reused)
        return reused

    def _feed(self, slot: int, tokens: list[int], at: int, hints: Sequence[int]) -> None:
        """Feed tokens[at:] inside the coming steps, in parts that end at checkpoint places
        (recurrent models only): the prompt's ``hints`` (else a few tokens before its end)
        and every ``checkpoint_every`` tokens."""
        held = self._held[slot]
        end = len(tokens)
        if at >= end:  # all held: its pending token goes in with the next step
            self._unpark(slot)
            return
        stops: set[int] = set()
        checkpoints = self.recurrent and self.max_checkpoints > 0
        if checkpoints:
            stops.update(range((at // self.checkpoint_every + 1) * self.checkpoint_every, end, self.checkpoint_every))
            stops.update(hints or [end - _END_MARGIN])
        held.prompt = tokens
        held.parts = sorted(stop for stop in stops if at + 1 < stop < end) + [end]
        if self.inline:
            self._next_part(slot)
            return
        # Evaluated now, part by part; the prompt's end is a place at rest for a checkpoint too.
        while held.parts:
            stop = held.parts.pop(0)
            self._prefill(slot, tokens[len(held.tokens):stop])
            held.tokens = tokens[:stop]
            if checkpoints:
                self._add_checkpoint(slot)
        held.prompt = []

    def _next_part(self, slot: int) -> None:
        held = self._held[slot]
        stop = held.parts.pop(0)
        self._enqueue(slot, held.prompt[len(held.tokens):stop], not held.parts)
        held.tokens = held.prompt[:stop]
        held.feeding = True

    def _fed(self) -> None:
        """After a step: parts of prompts that ended get their checkpoint and the next part."""
        for slot, held in enumerate(self._held):
            if not held.feeding or not self._part_done(slot):
                continue
            if not held.parts:
                held.feeding, held.prompt = False, []
                continue
            self._add_checkpoint(slot)
            self._next_part(slot)

    def _add_checkpoint(self, slot: int) -> None:
        held = self._held[slot]
        stop = len(held.tokens)
        held.checkpoints = [c for c in held.checkpoints if c.n_tokens != stop]
        held.checkpoints.append(self._save(slot))
        while len(held.checkpoints) > self.max_checkpoints:
            self._free(held.checkpoints.pop(0))

    def step(self, sessions: Sequence[Optional[Session]]) -> StepResult:
        """One batched step over the slots with a session; their tokens join what the slot
        holds. A failed slot forgets its sequence (its error is returned)."""
        produced, drafted, failed = self._step(sessions)
        for slot, tokens in enumerate(produced):
            if sessions[slot] is not None and tokens:
                self._held[slot].tokens.extend(tokens)
        for slot in failed:
            self._drop(slot)
        self._fed()
        return produced, drafted, failed

    def finish(self, slot: int) -> None:
        """The session left: the slot keeps its memory for the next prompt (not a prompt
        it left half fed)."""
        held = self._held[slot]
        held.used_at = time.monotonic()
        if held.feeding:
            self._drop(slot)
        self._park(slot)

    def forget(self, slot: int) -> None:
        """Drop what the slot holds (a failed or abandoned request)."""
        self._drop(slot)

    def _drop(self, slot: int) -> None:
        held = self._held[slot]
        for checkpoint in held.checkpoints:
            self._free(checkpoint)
        held.checkpoints = []
        held.tokens, held.prompt, held.parts, held.feeding = [], [], [], False
        self._reset(slot)

    def _free(self, checkpoint: Any) -> None:
        free = getattr(checkpoint, "free", None)
        if free is not None:
            free()

    def close(self) -> None:
        for held in self._held:
            for checkpoint in held.checkpoints:
                self._free(checkpoint)
            held.checkpoints = []


class SpeculativeSlots(Slots):
    """Slots are the sequences of one MTP speculative decoder."""

    def __init__(self, decoder: SpeculativeDecoder, *, n_draft: Optional[int] = None, **cache: Any) -> None:
        model = decoder.target.model
        super().__init__(decoder.n_seq, model.is_hybrid or model.is_recurrent, **cache)
        self.decoder = decoder
        self.n_draft = decoder.n_draft if n_draft is None else n_draft
        self.adaptive = bool(decoder.policies)
        # Measured: with prompt chunks inside the verify batches of a hybrid model (qwen35),
        # greedy answers under load left plain decoding's (2 of 24 in the 32-request server
        # test; cause not found, suspected in llama.cpp's recurrent snapshots across the
        # ubatches of a mixed batch). Those prompts get calls of their own.
        self.inline = not self.recurrent

    def _configure(self, slot: int, session: Session) -> None:
        self.decoder.set_sampling(grammar=session.prompt.grammar, seq_id=slot, **session.sampling.as_kwargs())

    def _enqueue(self, slot: int, tokens: list[int], ready: bool) -> None:
        self.decoder.enqueue(tokens, slot, ready=ready)

    def _part_done(self, slot: int) -> bool:
        return self.decoder.is_active(slot)

    def _prefill(self, slot: int, tokens: list[int]) -> None:
        self.decoder.prefill(tokens, slot)

    def _cut(self, slot: int, n_keep: int) -> int:
        self.decoder.truncate(n_keep, slot)  # evaluates token n_keep - 2 again
        return n_keep - 2

    def _save(self, slot: int) -> Any:
        return self.decoder.checkpoint(slot)

    def _restore(self, slot: int, checkpoint: Any) -> None:
        self.decoder.restore(checkpoint, slot)

    def _reset(self, slot: int) -> None:
        self.decoder.reset(slot)

    def _park(self, slot: int) -> None:
        if self._held[slot].tokens:
            self.decoder.park(slot)
        self.decoder.set_sampling(seq_id=slot)  # frees the request's grammar

    def _unpark(self, slot: int) -> None:
        self.decoder.park(slot, False)

    def _holds(self, slot: int) -> bool:
        return self.decoder.is_active(slot)

    def _step(self, sessions: Sequence[Optional[Session]]) -> StepResult:
        lengths: list[Optional[int]] = []
        for slot, session in enumerate(sessions):
            if session is None or self._held[slot].feeding:
                lengths.append(0)
            elif session.n_draft is not None:
                lengths.append(min(session.n_draft, self.decoder.n_draft))
            elif self.adaptive and session.sampling.temperature <= 0:
                lengths.append(None)  # the batch-aware plan
            else:
                # A sampled request's draft length never depends on the load, so a fixed
                # seed gives the same answer alone or among others.
                lengths.append(self.n_draft)
        try:
            produced = self.decoder.step(lengths)
        except (NonFiniteLogitsError, GrammarDeadEndError) as error:  # those fail; the others' tokens came
            assert error.produced is not None
            return error.produced, self.decoder.last_drafted, dict(error.failed)
        return produced, self.decoder.last_drafted, {}

    def acceptance_at(self) -> list[tuple[int, int]]:
        stats = self.decoder.stats
        return list(zip(stats.drafted_at, stats.accepted_at))

    @property
    def compute_s(self) -> float:
        """Seconds llama.cpp computed (target batches and drafts, timed in C)."""
        stats = self.decoder.stats
        return stats.target_s + stats.draft_s
