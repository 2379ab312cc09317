"""Plain slots: the sequences of one context, no MTP (``pyllama-mtp serve --no-mtp``), with
the same prefix reuse and prompts fed inside the step as :mod:`pyllama_mtp.slots`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .context import Batch, Context
from .errors import GrammarDeadEndError, NonFiniteLogitsError
from .generation import Sampler
from .session import Session
from .slots import Slots, StepResult

__all__ = ["PlainSlots"]


class PlainSlots(Slots):
    """Slots are the sequences of one context; no MTP (``--no-mtp``)."""

    def __init__(self, context: Context, **cache: Any) -> None:
        model = context.model
        super().__init__(context.n_seq_max, model.is_hybrid or model.is_recurrent, **cache)
        self.context = context
        self.samplers: list[Optional[Sampler]] = [None] * self.n_slots
        # Prompts fed inside the steps: tokens to evaluate, the position of the first, and
        # whether the last is evaluated too (for the first token) or stays pending.
        self._queue: list[list[int]] = [[] for _ in range(self.n_slots)]
        self._queue_at = [0] * self.n_slots
        self._ready = [False] * self.n_slots
        self.compute_s = 0.0  # seconds in llama.cpp's decode

    def _configure(self, slot: int, session: Session) -> None:
        self._close_sampler(slot)
        self.samplers[slot] = Sampler(grammar=session.prompt.grammar, **session.sampling.as_kwargs())

    def _enqueue(self, slot: int, tokens: list[int], ready: bool) -> None:
        held = self._held[slot].tokens  # its pending token, if any, is evaluated first
        self._queue[slot] = held[-1:] + list(tokens)
        self._queue_at[slot] = len(held) - 1 if held else 0
        self._ready[slot] = ready

    def _part_done(self, slot: int) -> bool:
        return not self._queue[slot]

    def _evaluate_fresh(self, slot: int, tokens: list[int]) -> None:
        """Evaluate all but the last of ``tokens`` into the slot's (cleared) memory now."""
        for begin in range(0, len(tokens) - 1, self.context.n_batch):
            chunk = tokens[begin:min(begin + self.context.n_batch, len(tokens) - 1)]
            self.context.decode(Batch(chunk, np.arange(begin, begin + len(chunk)), seq_ids=slot, outputs=False))

    def _cut(self, slot: int, n_keep: int) -> int:
        self.context.seq_rm(slot, n_keep - 1)
        return n_keep - 1

    def _save(self, slot: int) -> Any:
        return _StateCheckpoint(self.context.save_state(slot, partial=True), len(self._held[slot].tokens))

    def _restore(self, slot: int, checkpoint: "_StateCheckpoint") -> None:
        self.context.load_state(checkpoint.data, slot, partial=True)
        self.context.seq_rm(slot, checkpoint.n_tokens - 1)  # attention memory past it

    def _reset(self, slot: int) -> None:
        self.context.seq_rm(slot)
        self._queue[slot] = []

    def _park(self, slot: int) -> None:
        self._close_sampler(slot)

    def _unpark(self, slot: int) -> None:
        pass

    def _close_sampler(self, slot: int) -> None:
        sampler, self.samplers[slot] = self.samplers[slot], None
        if sampler is not None:
            sampler.close()

    def _step(self, sessions: Sequence[Optional[Session]]) -> StepResult:
        tokens: list[int] = []
        positions: list[int] = []
        seq_ids: list[int] = []
        outputs: list[bool] = []
        sampled: list[tuple[int, int]] = []  # (slot, batch index) of each slot that samples

        def add(slot: int, token: int, position: int, output: bool) -> None:
            if output:
                sampled.append((slot, len(tokens)))
            tokens.append(token), positions.append(position), seq_ids.append(slot), outputs.append(output)

        for slot, session in enumerate(sessions):
            if session is not None and not self._queue[slot]:
                held = self._held[slot].tokens
                add(slot, held[-1], len(held) - 1, True)
        # Queued prompts fill what the batch leaves, shortest first, as the MTP step does
        # (pmtp_spec_enqueue).
        fed: dict[int, tuple[int, bool]] = {}
        for slot in sorted(range(self.n_slots), key=lambda s: len(self._queue[s])):
            queue = self._queue[slot]
            room = self.context.n_batch - len(tokens)
            if not queue or sessions[slot] is None or room <= 0:
                continue
            rest = len(queue) - 1
            count = min(room, rest)
            end = count == rest and (not self._ready[slot] or room > count)
            for i in range(count):
                add(slot, queue[i], self._queue_at[slot] + i, False)
            if end and self._ready[slot]:
                add(slot, queue[rest], self._queue_at[slot] + count, True)
            fed[slot] = (count, end)
        if tokens:
            start = time.perf_counter()
            self.context.decode(Batch(tokens, positions, seq_ids=seq_ids, outputs=outputs))
            self.compute_s += time.perf_counter() - start
        for slot, (count, end) in fed.items():
            self._queue[slot] = [] if end else self._queue[slot][count:]
            self._queue_at[slot] += count
        produced: list[list[int]] = [[] for _ in sessions]
        failed: dict[int, Exception] = {}
        for slot, index in sampled:
            sampler = self.samplers[slot]
            assert sampler is not None
            try:
                produced[slot] = [self.context.sample(sampler, index)]
            except (NonFiniteLogitsError, GrammarDeadEndError) as error:  # that request fails, the others go on
                failed[slot] = error
        suspects = [slot for slot, error in failed.items() if isinstance(error, NonFiniteLogitsError)]
        if suspects:
            slots = [slot for slot, _ in sampled]
            for slot in self._rebuild(slots, suspects, failed, produced):
                del failed[slot]  # only reached by another's NaN: it goes on next step
        return produced, [0] * len(sessions), failed

    def _rebuild(self, slots: list[int], suspects: list[int], failed: dict[int, Exception],
                 produced: list[list[int]]) -> list[int]:
        """llama.cpp lets NaN in one sequence's memory reach others (see pmtp_spec_rebuild):
        each suspect is evaluated alone in cleared memory; those whose logits are then
        finite were only reached. The memory is cleared, data included, and every slot but
        the failed ones is evaluated again (parked slots lose their cache). Returns the
        suspects that were only reached; they produce nothing this step."""
        # A failed slot's pending token was evaluated; any other's new token was not.
        held = {slot: self._held[slot].tokens for slot in slots}
        reached = []
        for slot in suspects:
            self.context.clear()
            self._evaluate(slot, held[slot])
            self.context.decode(Batch([held[slot][-1]], [len(held[slot]) - 1], seq_ids=slot, outputs=True))
            if np.isfinite(self.context.logits(-1)).all():
                reached.append(slot)
        if len(reached) == len(suspects):  # no source alone: they fail together
            reached = []
        self.context.clear()
        for slot in range(self.n_slots):
            if slot not in slots and self._queue[slot]:  # a prompt being fed: fed again from its start
                self._queue[slot] = self._held[slot].tokens[:self._queue_at[slot]] + self._queue[slot]
                self._queue_at[slot] = 0
            elif slot not in slots:  # a parked cache is gone with the memory
                self._held[slot].tokens, self._held[slot].checkpoints = [], []
        for slot in slots:
            if slot not in failed or slot in reached:
                self._evaluate(slot, held[slot] + produced[slot])
        return reached

    def _evaluate(self, slot: int, tokens: list[int]) -> None:
        """Into cleared memory: all but the last of ``tokens`` (the slot's holding stays)."""
        kept, self._held[slot].tokens = self._held[slot].tokens, []
        try:
            self._evaluate_fresh(slot, tokens)
        finally:
            self._held[slot].tokens = kept

    def acceptance_at(self) -> list[tuple[int, int]]:
        return []

    def close(self) -> None:
        super().close()
        for slot in range(self.n_slots):
            self._close_sampler(slot)


@dataclass(frozen=True)
class _StateCheckpoint:
    data: bytes
    n_tokens: int

    @property
    def nbytes(self) -> int:
        return len(self.data)
