"""The speculative step taken apart (draft, verify, accept, rollback) for custom policies,
and what a sequence keeps between requests (truncate, park, checkpoints): the
:class:`~pyllama_mtp.SpeculativeDecoder` methods that act on one sequence at a time."""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from . import _lowlevel
from ._args import int_arg
from ._resource import native_handle
from .errors import InvalidArgumentError


class StepByStep:
    """Mixed into :class:`~pyllama_mtp.SpeculativeDecoder` (which sets ``_native``,
    ``_target``, ``n_draft``, ``p_min`` and ``n_seq``)."""

    _native: _lowlevel.NativeSpeculative
    _queued: set  # sequences with a queued prompt (their steps say nothing of draft costs)

    def _check_seq(self, seq_id: int) -> int:
        if not isinstance(seq_id, (int, np.integer)) or not 0 <= seq_id < self._native.n_seq:
            raise InvalidArgumentError(f"sequence id {seq_id!r} is outside [0, {self._native.n_seq})")
        return int(seq_id)

    def draft(self, n: Optional[int] = None, seq_id: int = 0) -> list[int]:
        """Draft up to ``n`` tokens for a sequence with the MTP head (nothing evaluated yet)."""
        seq_id = self._check_seq(seq_id)
        n = int_arg("n", self.n_draft if n is None else n, 1, self._native.n_draft_max)
        limits = np.zeros(self.n_seq, dtype=np.int32)
        limits[seq_id] = n
        self._native.draft(limits, self.p_min)
        return self._native.get_draft(seq_id)[0]

    def draft_probabilities(self, seq_id: int = 0) -> list[float]:
        """The MTP head's probability of each token of the current draft."""
        return self._native.get_draft(self._check_seq(seq_id))[1]

    def set_draft(self, tokens: Iterable[int], seq_id: int = 0) -> None:
        """Propose a draft of your own (n-gram lookup, another model) for :meth:`verify`."""
        array = self._target.model.check_tokens(list(tokens))
        if len(array) > self._native.n_draft_max:
            raise InvalidArgumentError(f"a draft holds at most {self._native.n_draft_max} tokens")
        self._native.set_draft(self._check_seq(seq_id), np.ascontiguousarray(array, dtype=np.int32))

    def verify(self) -> list[list[int]]:
        """Evaluate pending token + draft of every active sequence in one target batch.

        Returns, per sequence, the target's greedy choice after the pending token and
        after each draft token (draft length + 1 tokens).
        """
        self._native.verify()
        return [self._native.target_choices(seq) for seq in range(self.n_seq)]

    def verified_logits(self, row: int, seq_id: int = 0) -> np.ndarray:
        """Target logits at verify row ``row`` (0: after the pending token) of the last verify."""
        index = self._native.verify_row(self._check_seq(seq_id), row)
        return native_handle(self._target).logits(index, self._target.model.n_vocab)

    def accept(self, n: int, next_token: Optional[int] = None, seq_id: int = 0) -> list[int]:
        """Keep the first ``n`` verified draft tokens; the rest are rolled back everywhere.

        ``next_token`` becomes the new pending token; by default the target's greedy choice
        after the last kept token. Returns the tokens this produced (kept drafts + next).
        """
        seq_id = self._check_seq(seq_id)
        draft, _ = self._native.get_draft(seq_id)
        choices = self._native.target_choices(seq_id)
        if not choices:
            raise InvalidArgumentError("nothing to accept: call verify() first")
        n = int_arg("n", n, 0, len(draft))  # at most the verified draft length
        token = choices[n] if next_token is None else int(next_token)
        self._target.model.check_tokens([token])
        self._native.accept(seq_id, n, token)
        return draft[:n] + [token]

    def rollback(self, seq_id: int = 0) -> list[int]:
        """Reject the whole verified draft: keep only the target's own next token."""
        return self.accept(0, seq_id=seq_id)

    def pending(self, seq_id: int = 0) -> tuple[int, int]:
        """(pending token, its position): the token produced but not yet evaluated."""
        active, token, n_past = self._native.seq_state(self._check_seq(seq_id))
        if not active:
            raise InvalidArgumentError(f"sequence {seq_id} has not been prefilled")
        return token, n_past

    def truncate(self, n_keep: int, seq_id: int = 0) -> None:
        """Keep the first ``n_keep`` tokens of a sequence (its pending token included), the
        last of them pending: a conversation then continues from a common prefix with
        :meth:`prefill`. A recurrent target goes back only as far as its snapshots:
        further back, :class:`StateError` is raised and the sequence is reset."""
        seq_id = self._check_seq(seq_id)
        active, _, n_past = self._native.seq_state(seq_id)
        if not active or not isinstance(n_keep, int) or not 2 <= n_keep <= n_past:
            raise InvalidArgumentError(f"n_keep must be an int in [2, {n_past}] (tokens the sequence has "
                                       f"evaluated), got {n_keep!r}")
        self._native.truncate(seq_id, n_keep)

    def reset(self, seq_id: int = 0) -> None:
        """Forget a sequence in both contexts."""
        self._native.reset_seq(self._check_seq(seq_id))
        self._queued.discard(int(seq_id))

    def enqueue(self, prompt: Iterable[int], seq_id: int = 0, *, ready: bool = True) -> None:
        """Queue a prompt on a sequence (continuing it if active): rather than a
        :meth:`prefill` of its own, it is evaluated in chunks inside the next steps'
        batches, beside the other sequences' decoding, so it stalls none of them. With
        ``ready`` the step that ends it gives the sequence its first token; otherwise the
        sequence ends it like a prefill and parks (for a :meth:`checkpoint`, then the next
        part). Until then :meth:`is_active` is False."""
        array = self._target.model.check_tokens(list(prompt))
        if len(array) == 0:
            raise InvalidArgumentError("the prompt is empty")
        seq_id = self._check_seq(seq_id)
        self._native.enqueue(seq_id, np.ascontiguousarray(array, dtype=np.int32), bool(ready))
        self._queued.add(seq_id)

    def park(self, seq_id: int = 0, parked: bool = True) -> None:
        """Keep a sequence's memory (for a later :meth:`truncate`, :meth:`restore` or
        continuation) but leave it out of steps until its next :meth:`prefill` (or
        ``park(seq_id, False)``)."""
        self._native.park(self._check_seq(seq_id), bool(parked))

    def is_active(self, seq_id: int = 0) -> bool:
        """Whether the sequence holds tokens (prefilled and not reset)."""
        return self._native.seq_state(self._check_seq(seq_id))[0]

    def checkpoint(self, seq_id: int = 0) -> "Checkpoint":
        """Save what the sequence cannot cut back (a hybrid model's recurrent state) at
        its pending token. Take it right after :meth:`prefill`; :meth:`restore` resumes
        there while the sequence still starts with the checkpoint's tokens."""
        return Checkpoint(self._native.checkpoint(self._check_seq(seq_id)), int(seq_id))

    def restore(self, checkpoint: "Checkpoint", seq_id: int = 0) -> None:
        """Go back to ``checkpoint`` (taken on this sequence): the sequence then holds its
        :attr:`Checkpoint.n_tokens` tokens, the last one pending. :class:`StateError`
        (the sequence unchanged) when the sequence no longer starts with them."""
        seq_id = self._check_seq(seq_id)
        if not isinstance(checkpoint, Checkpoint) or checkpoint.seq_id != seq_id or checkpoint.native.ptr is None:
            raise InvalidArgumentError("restore() takes a live checkpoint of the same sequence")
        self._native.restore(seq_id, checkpoint.native)


class Checkpoint:
    """A sequence's saved state (:meth:`StepByStep.checkpoint`); ``free()`` returns its
    memory at once (otherwise when it is no longer referenced)."""

    def __init__(self, native: _lowlevel.NativeCheckpoint, seq_id: int) -> None:
        self.native = native
        self.seq_id = seq_id
        self.n_tokens = native.n_tokens
        self.nbytes = native.nbytes

    def free(self) -> None:
        self.native.free()
