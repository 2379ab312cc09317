"""Adaptive draft lengths: each step, choose every sequence's n_draft from what drafting
has been paying, for the batch as a whole.

A sequence drafting n tokens expects ``1 + a_1 + a_1 a_2 + ... + a_1...a_n`` tokens from
the step, where ``a_i`` is its recent acceptance at draft position i given the earlier
ones were accepted (:class:`AdaptiveDraft`, one per sequence). What a step costs is
measured, not modelled: :class:`StepCost` keeps the recent wall time of steps by the
number of active sequences and the number of draft rounds (the longest draft), since
verify batches, the drafter's catch-up and each MTP round have fixed costs that no
straight line in the rows captured (a fit of that kind drafted nothing at 8 sequences
where 3 drafts each paid). :func:`plan_drafts` picks the number of rounds with the most
expected tokens per second for the batch at hand, each sequence stopping where its own
next draft is unlikely to be kept. So a head that is often wrong drafts less, and as
more sequences share the verify batch drafting must earn more: drafts shrink as a
server's slots fill. Drafting nothing is one of the choices. Every combination is tried
once per batch size, and every ``explore_every`` steps a neighbour of the best is tried
again, so a head that recovers (or a machine that got busier) is noticed.
"""

from __future__ import annotations

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
    """Recent wall seconds of a step, by (active sequences, draft rounds)."""

    explore_every = 8

    def __init__(self, decay: float = 0.8) -> None:
        self.decay = decay
        self.steps = 0
        self._seconds: dict[tuple[int, int], float] = {}

    def observe(self, active: int, rounds: int, seconds: float) -> None:
        self.steps += 1
        if active <= 0 or seconds <= 0:
            return
        key = (active, rounds)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def seconds(self, active: int, rounds: int) -> Optional[float]:
        return self._seconds.get((active, rounds))


#: a sequence drafts position i only while the chance that it is kept (all earlier ones
#: kept too) is at least this: a row that is usually thrown away costs more than it brings.
MIN_KEEP_CHANCE = 0.2


def plan_drafts(policies: Sequence[AdaptiveDraft], active: Sequence[bool], cost: StepCost,
                fixed: Optional[Sequence[Optional[int]]] = None) -> list[int]:
    """Each sequence's draft length for the next step (0 for inactive ones); a sequence
    with a ``fixed`` length drafts that."""
    lengths = [0] * len(policies)
    fixed = fixed or [None] * len(policies)
    members = [seq for seq, on in enumerate(active) if on]
    planned = [seq for seq in members if fixed[seq] is None]
    for seq in members:
        if fixed[seq] is not None:
            lengths[seq] = int(fixed[seq])
    if not planned:
        return lengths
    gains = {seq: policies[seq].gains() for seq in members}
    # How far each sequence's drafts are likely kept; one further now and then, so a head
    # that recovers gets the evidence.
    useful = {seq: int(np.argmin(np.append(gains[seq], 0.0) >= MIN_KEEP_CHANCE)) + policies[seq].exploring
              for seq in planned}
    n_max = max(policies[seq].n_max for seq in planned)

    def lengths_for(rounds: int) -> dict[int, int]:
        return {seq: min(rounds, useful[seq]) for seq in planned}

    def rounds_of(chosen: dict[int, int]) -> int:
        return max([*chosen.values(), *(lengths[seq] for seq in members)])

    def expected_rate(rounds: int) -> Optional[float]:
        chosen = lengths_for(rounds)
        seconds = cost.seconds(len(members), rounds_of(chosen))
        if seconds is None:
            return None
        tokens = sum(1.0 + float(gains[seq][:chosen.get(seq, lengths[seq])].sum()) for seq in members)
        return tokens / seconds

    rates = {rounds: expected_rate(rounds) for rounds in range(n_max + 1)}
    untried = [rounds for rounds, rate in rates.items() if rate is None]
    if untried:
        best = untried[-1]  # the longest first: optimistic, and where drafting pays most
    else:
        best = max(rates, key=lambda rounds: rates[rounds] or 0.0)
        # Now and then a neighbour, to follow changes; rarely one that measured far worse.
        neighbour = min(best + 1, n_max) if (cost.steps // cost.explore_every) % 2 else max(best - 1, 0)
        close = (rates[neighbour] or 0.0) >= 0.9 * (rates[best] or 0.0)
        period = cost.explore_every if close else 4 * cost.explore_every
        if cost.steps % period == period - 1:
            best = neighbour
    for seq, length in lengths_for(best).items():
        lengths[seq] = length
        policies[seq].n = length
    return lengths
