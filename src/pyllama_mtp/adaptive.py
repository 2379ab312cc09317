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
server's slots fill. Drafting nothing is one of the choices. Every useful number of
rounds is tried, the shortest first (other batch sizes start from the nearest one measured), and every
``explore_every`` steps a neighbour of the best is tried again (every eighth time only if
it measured far worse), so a head that recovers or a machine that got busier is noticed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _keep(weight: float, decay: float) -> float:
    """The share an estimate keeps of itself when a new observation comes: the estimate
    holds ``weight`` observations' worth; until the running average's share is reached,
    each observation weighs as much as those before it together (a bias-corrected mean)."""
    return min(decay, weight / (weight + 1))


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
        # Observations at each position, the prior counted as one: until there are enough
        # for the running average, each weighs as much as the rest together, so a few
        # steps tell a head that is nearly always right (or wrong) from the prior.
        self.seen = np.ones(n_max)
        self.n = max(0, min(initial, n_max))  # the length last planned

    def observe(self, n_drafted: int, n_accepted: int) -> None:
        """One step's outcome for this sequence: drafts verified and kept."""
        for i in range(min(n_drafted, self.n_max)):
            if i > n_accepted:
                break  # positions after the first rejection say nothing
            hit = 1.0 if i < n_accepted else 0.0
            keep = _keep(self.seen[i], self.decay)
            self.accept[i] = keep * self.accept[i] + (1 - keep) * hit
            self.seen[i] += 1
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
        self._count: dict[tuple[int, int], int] = {}

    def observe(self, active: int, rounds: int, seconds: float) -> None:
        self.steps += 1
        if active <= 0 or seconds <= 0:
            return
        key = (active, rounds)
        count = self._count.get(key, 0)
        # The first step of a shape also builds its graphs: it counts for nothing once a
        # second one comes.
        keep = _keep(max(0, count - 1), self.decay)
        self._seconds[key] = keep * self._seconds.get(key, 0.0) + (1 - keep) * seconds
        self._count[key] = count + 1

    def seconds(self, active: int, rounds: int) -> Optional[float]:
        """Measured for this many sequences; else taken from the nearest count measured,
        relative to a length measured at both counts where there is one (a server's batch
        size changes all the time: each need not be explored anew, and the plan only
        compares lengths at one batch size)."""
        measured = self._seconds.get((active, rounds))
        if measured is not None:
            return measured
        known = sorted((count for count, r in self._seconds if r == rounds), key=lambda count: abs(count - active))
        for count in known:
            for (here, anchor), seconds in self._seconds.items():
                if here == active and (count, anchor) in self._seconds:
                    return seconds * self._seconds[(count, rounds)] / self._seconds[(count, anchor)]
        return self._seconds[(known[0], rounds)] if known else None

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

    # One option per number of draft rounds the step would really run (a cap past every
    # sequence's useful length runs the same step as a shorter one).
    options: dict[int, dict[int, int]] = {}
    for cap in range(n_max + 1):
        chosen = {seq: min(cap, useful[seq]) for seq in planned}
        options.setdefault(max([*chosen.values(), *(lengths[seq] for seq in members)]), chosen)

    def expected_rate(rounds: int) -> Optional[float]:
        seconds = cost.seconds(len(members), rounds)
        if seconds is None:
            return None
        chosen = options[rounds]
        return sum(1.0 + float(gains[seq][:chosen.get(seq, lengths[seq])].sum()) for seq in members) / seconds

    rates = {rounds: expected_rate(rounds) for rounds in options}
    untried = [rounds for rounds, rate in rates.items() if rate is None]
    if untried:
        # The shortest first: a head that is often wrong is found out by one cheap step
        # (its acceptance then cuts the longer options away untried), and a good one
        # climbs a round per step while its drafts are kept.
        best = min(untried)
    else:
        best = max(rates, key=lambda rounds: rates[rounds] or 0.0)
        # Now and then a neighbour, to follow changes; rarely one that measured far worse.
        ordered = sorted(rates)
        at = ordered.index(best)
        up = (cost.steps // cost.explore_every) % 2
        neighbour = ordered[min(at + 1, len(ordered) - 1)] if up else ordered[max(at - 1, 0)]
        close = (rates[neighbour] or 0.0) >= 0.97 * (rates[best] or 0.0)
        period = cost.explore_every if close else 8 * cost.explore_every
        if cost.steps % period == period - 1:
            best = neighbour
    for seq, length in options[best].items():
        lengths[seq] = length
        policies[seq].n = length
    return lengths
