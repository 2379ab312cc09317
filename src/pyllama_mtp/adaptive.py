"""Adaptive draft length: choose n_draft each step from what drafting has been paying.

The expected number of tokens a step yields with n drafts is
``1 + a_1 + a_1 a_2 + ... + a_1...a_n``, where ``a_i`` is the recent acceptance of draft
position i given that the earlier ones were accepted. Its cost is the target's verify
batch (measured, as a line in n) plus n MTP draft passes (measured per token). Each step
takes the n with the most expected tokens per unit of cost, so a head that is often
wrong (or a verify batch that is expensive on this machine) drafts less.
"""

from __future__ import annotations

import numpy as np


class AdaptiveDraft:
    """Per-decoder state of the adaptive policy (see the module docstring)."""

    #: every this many steps, draft one more than the best guess: positions past the
    #: current length get evidence, so a head that improves is noticed.
    explore_every = 8

    def __init__(self, n_max: int, initial: int, decay: float = 0.9) -> None:
        self.n_max = n_max
        self.decay = decay
        self.steps = 0
        self.accept = np.full(n_max, 0.6)  # optimistic start: drafting gets tried
        self.n = max(1, min(initial, n_max))
        # Least-squares sums for verify time = a + b * n, with a weak prior b = 0.1 a.
        self._fit = np.zeros(5)  # count, sum n, sum t, sum n*n, sum n*t
        self.draft_s_per_token = 0.0
        self.verify_s = 0.0

    def observe(self, n_drafted: int, n_accepted: int, verify_s: float, draft_s: float) -> None:
        """One step's outcome: drafts made and kept, target and MTP seconds spent."""
        for i in range(min(n_drafted, self.n_max)):
            if i > n_accepted:
                break  # positions after the first rejection say nothing
            hit = 1.0 if i < n_accepted else 0.0
            self.accept[i] = self.decay * self.accept[i] + (1 - self.decay) * hit
        if verify_s > 0:
            self._fit *= self.decay  # recent steps count most
            self._fit += (1.0, n_drafted, verify_s, n_drafted * n_drafted, n_drafted * verify_s)
            self.verify_s = verify_s
        if n_drafted > 0 and draft_s > 0:
            per_token = draft_s / n_drafted
            self.draft_s_per_token = (per_token if self.draft_s_per_token == 0.0 else
                                      self.decay * self.draft_s_per_token + (1 - self.decay) * per_token)
        self.steps += 1
        best = self.best()
        self.n = min(best + 1, self.n_max) if self.steps % self.explore_every == 0 else best

    def verify_cost(self, n: np.ndarray) -> np.ndarray:
        count, sum_n, sum_t, sum_nn, sum_nt = self._fit
        if count == 0:
            return 1.0 + 0.1 * n
        mean_t = sum_t / count
        variance = sum_nn / count - (sum_n / count) ** 2
        slope = (sum_nt / count - (sum_n / count) * mean_t) / variance if variance > 1e-9 else 0.1 * mean_t
        slope = max(slope, 0.0)
        intercept = max(mean_t - slope * sum_n / count, 1e-9)
        return intercept + slope * n

    def best(self) -> int:
        n = np.arange(1, self.n_max + 1)
        expected = 1.0 + np.cumsum(np.cumprod(self.accept[:self.n_max]))
        cost = self.verify_cost(n) + n * self.draft_s_per_token
        return int(n[np.argmax(expected / cost)])
