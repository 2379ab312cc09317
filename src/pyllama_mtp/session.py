"""One request on one sequence, tokens in and text out: what :class:`~pyllama_mtp.LLM`
(one session, driven inline) and the server's engine (one per busy slot) both run.

A :class:`Session` turns the tokens its slot produced into text (end of generation,
stop strings, the token budget) and keeps this sequence's own usage and timings: prompt
tokens reused from the slot's cache, tokens drafted and accepted, time to the end of the
prompt and of the answer. :mod:`pyllama_mtp.slots` decides which tokens it gets.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from .answer import Prompt, Sampling, TokenOutput, Usage

__all__ = ["Session"]


class Session:
    """A request's answer on one slot. ``n_draft``: this request's MTP draft length (None:
    the decoder's policy)."""

    def __init__(self, model: Any, prompt: Prompt, budget: int, sampling: Sampling,
                 n_draft: Optional[int] = None) -> None:
        self.prompt = prompt
        self.sampling = sampling
        self.n_draft = n_draft
        self.output = TokenOutput(model, prompt, budget)
        self.reused = 0
        self.drafted = 0
        self.accepted = 0
        self.started = time.perf_counter()
        self.prompt_s = 0.0

    @property
    def done(self) -> bool:
        return self.output.done

    @property
    def finish_reason(self) -> str:
        return self.output.finish_reason or "length"

    def prompt_done(self, reused: int) -> None:
        """The slot took the prompt (``reused`` of its tokens are not decoded again)."""
        self.reused = reused

    def push(self, tokens: list[int], drafted: int) -> str:
        """One step's tokens (accepted drafts and the target's next); the text they show."""
        if tokens:
            if not self.output.produced and not self.prompt_s:  # the prompt's end: the first token
                self.prompt_s = time.perf_counter() - self.started
            self.drafted += drafted
            self.accepted += len(tokens) - 1
        pieces = []
        for token in tokens:
            pieces.append(self.output.push(token))
            if self.output.done:
                break
        return "".join(pieces)

    def close(self) -> str:
        """The end of the answer: text held back that turned out to be no stop string."""
        return self.output.close()

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt.tokens), self.output.produced, self.reused, self.drafted, self.accepted)

    @property
    def timings(self) -> dict[str, float]:
        """llama-server's names: prompt_n (tokens decoded), prompt_ms (to the first token),
        cache_n, predicted_n, predicted_ms, predicted_per_second, draft_n, draft_n_accepted."""
        generation_s = max(time.perf_counter() - self.started - self.prompt_s, 1e-9)
        produced = self.output.produced
        return {"prompt_n": len(self.prompt.tokens) - self.reused, "prompt_ms": self.prompt_s * 1e3,
                "cache_n": self.reused, "predicted_n": produced, "predicted_ms": generation_s * 1e3,
                "predicted_per_second": produced / generation_s,
                "draft_n": self.drafted, "draft_n_accepted": self.accepted}
