"""What the test files share: the exact context settings, the plain greedy reference.

(Model fixtures and the backend under test are pytest fixtures, in conftest.py.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Union

import numpy as np

PROMPT = "The quick brown fox"

# Flash attention on CPU changes logits by up to ~0.3 between batched and single-token
# evaluation, enough to flip near-ties; comparisons of a speculative run with plain
# decoding want exact arithmetic paths, so those contexts run without it (measured: the
# difference stays < 4e-3 then), on one thread.
EXACT = dict(n_threads=1, flash_attn=False)


def plain_greedy(model, prompt: Union[str, Iterable[int]] = PROMPT, n_tokens: int = 150, *,
                 n_ctx: int = 512, seq_id: int = 0) -> list[int]:
    """Plain greedy decoding (llama.cpp's greedy sampler), one token at a time."""
    with model.context(n_ctx=n_ctx, **EXACT) as ctx:
        return list(ctx.generate(prompt, max_tokens=n_tokens, seq_id=seq_id, stop_at_eog=False))


@dataclass
class GreedyReference:
    """Greedy tokens with, at each step, the logits and the gap between the top two."""

    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)


def greedy_reference(model, prompt: str = PROMPT, n_tokens: int = 150, *, n_ctx: int = 2048) -> GreedyReference:
    """Plain greedy decoding by numpy argmax over the logits, independent of any sampler."""
    reference = GreedyReference()
    with model.context(n_ctx=n_ctx, **EXACT) as ctx:
        ctx.decode(model.tokenize(prompt))
        for _ in range(n_tokens):
            logits = ctx.logits()
            top2 = np.sort(logits)[-2:]
            reference.tokens.append(int(np.argmax(logits)))
            reference.logits.append(logits)
            reference.margins.append(float(top2[1] - top2[0]))
            ctx.decode([reference.tokens[-1]])
    return reference


def run_threads(target, n: int) -> list:
    """Run target(i) for i in range(n) on n threads; the exceptions they raised (none hung)."""
    errors = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread hung (deadlock?)"
    return errors
