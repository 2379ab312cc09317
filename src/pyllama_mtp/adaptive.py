"""Adaptive draft lengths: each step, choose every sequence's n_draft from what drafting
has been paying, for the batch as a whole.

A sequence drafting n tokens expects ``1 + a_1 + a_1 a_2 + ... + a_1...a_n`` tokens from
the step, where ``a_i`` is its recent acceptance at draft position i given the earlier
ones were accepted (:class:`AdaptiveDraft`, one per sequence). The step costs the
verify batch and the drafter's catch-up, measured per row (every active sequence's
pending token plus its drafts), plus the MTP passes, measured per drafted token
(:class:`StepCost`, one per decoder). :func:`plan_drafts` adds draft tokens one at a time where
they are expected to pay most, while they raise the batch's tokens per second. So a
sequence whose head is often wrong drafts less, and as more sequences share the verify
batch (its fixed cost spread over more of them) every draft must earn more: drafts
shrink as a server's slots fill. Drafting nothing is one of the choices; every
``explore_every`` steps a sequence drafts one more than planned, so a head that
recovers is noticed.
"""

from __future__ import annotations

import heapq
from typing import Optional, Sequence

import numpy as np


class AdaptiveDraft:
    """One sequence's recent acceptance at each draft position."""

    #: every this many steps, draft one more than planned: positions past the current
    #: length get evidence.
    explore_every = 8

    def __init__(self, n_max: int, initial: int, decay: float = 0.9) -> None:
        self.n_max = n_max
        self.decay = decay
        self.steps = 0
        self.accept = np.full(n_max, 0.6)  # optimistic start: drafting gets tried
        self.n = max(0, min(initial, n_max))  # the length last planned

    def observe(self, n_drafted: int, n_accepted: int) -> None:
        """One step's outcome for this sequence: drafts verified and kept."""
        for i in range(min(n_drafted, self.n_max)):
            if i > n_accepted:
                break  # positions after the first rejection say nothing
            hit = 1.0 if i < n_accepted else 0.0
            self.accept[i] = self.decay * self.accept[i] + (1 - self.decay) * hit
        self.steps += 1

    def gains(self) -> np.ndarray:
        """Expected extra tokens from drafting position i (all earlier ones accepted)."""
        return np.cumprod(self.accept)

    @property
    def exploring(self) -> bool:
        return self.steps % self.explore_every == self.explore_every - 1


class StepCost:
    """Measured seconds of a step (verify batch, the drafter's catch-up over the verified
    rows, MTP drafts) as ``a + b * rows + c * drafted``: least squares, recent steps
    weighing most, with a weak prior (b and c a twentieth of a step) for what the steps
    so far cannot tell apart."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)

    def observe(self, rows: int, drafted: int, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        x = np.array([1.0, rows, drafted])
        self._xtx = self.decay * self._xtx + np.outer(x, x)
        self._xty = self.decay * self._xty + x * seconds

    def coefficients(self) -> tuple[float, float, float]:
        """(a, b, c): fixed seconds per step, per verified row, per drafted token."""
        count = self._xtx[0, 0]
        if count == 0:
            return 1.0, 0.05, 0.05
        mean_t = self._xty[0] / count
        weight = 0.01 * count
        prior = np.array([0.0, 0.05 * mean_t, 0.05 * mean_t])
        penalty = np.diag([0.0, weight, weight])
        a, b, c = np.linalg.solve(self._xtx + penalty, self._xty + penalty @ prior)
        return max(a, 1e-9), max(b, 0.0), max(c, 0.0)


def plan_drafts(policies: Sequence[AdaptiveDraft], active: Sequence[bool], cost: StepCost,
                fixed: Optional[Sequence[Optional[int]]] = None) -> list[int]:
    """Each sequence's draft length for the next step (0 for inactive ones); a sequence
    with a ``fixed`` length drafts that and shares the batch's cost."""
    lengths = [0] * len(policies)
    fixed = fixed or [None] * len(policies)
    members = [seq for seq, on in enumerate(active) if on]
    if not members:
        return lengths
    intercept, per_row, per_drafted = cost.coefficients()
    per_draft = per_row + per_drafted  # a draft token adds a verified row too
    tokens, seconds = float(len(members)), intercept + per_row * len(members)
    planned = []
    for seq in members:
        if fixed[seq] is None:
            planned.append(seq)
        else:
            lengths[seq] = int(fixed[seq])
            tokens += float(policies[seq].gains()[:lengths[seq]].sum())
            seconds += per_draft * lengths[seq]
    gains = {seq: policies[seq].gains() for seq in planned}
    # Greedy on the best marginal gain: each sequence's gains fall with length, so this
    # finds the lengths with the most tokens per second.
    heap = [(-gains[seq][0], seq) for seq in planned]
    heapq.heapify(heap)
    while heap:
        gain, seq = heapq.heappop(heap)
        gain = -gain
        if gain * seconds <= per_draft * tokens:
            break  # the best remaining draft would lower tokens per second
        tokens += gain
        seconds += per_draft
        lengths[seq] += 1
        if lengths[seq] < policies[seq].n_max:
            heapq.heappush(heap, (-gains[seq][lengths[seq]], seq))
    for seq in planned:
        if policies[seq].exploring and lengths[seq] < policies[seq].n_max:
            lengths[seq] += 1
        policies[seq].n = lengths[seq]
    return lengths
