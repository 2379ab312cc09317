"""n-gram lookup drafts combined with MTP drafts, on the low-level stepping API.

When text repeats (code, quoting the prompt), the tokens that followed the last
occurrence of the current n-gram are a draft that is often right for many tokens; the
MTP head covers the rest. Each step takes the lookup draft when there is one of at least
``min_lookup`` tokens and the MTP draft otherwise; verification is the same greedy
target batch either way, so the output is plain greedy decoding's.

The same policy runs inside the C step with ``SpeculativeDecoder.create(model,
lookup_ngram=3, lookup_max=8)``; this Python version is the worked example of a custom
policy in docs/low-level-api.md (tests check that both make the same choices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .speculative import SpeculativeDecoder


def lookup_draft(history: Sequence[int], ngram: int, max_tokens: int) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the last ``ngram`` tokens."""
    if len(history) <= ngram:
        return []
    key = list(history[-ngram:])
    for start in range(len(history) - ngram - 1, -1, -1):
        if list(history[start:start + ngram]) == key:
            follow = history[start + ngram:start + ngram + max_tokens]
            return list(follow)
    return []


@dataclass
class LookupStats:
    """Steps drafted by each source and how many of their tokens were accepted."""

    steps: dict = field(default_factory=lambda: {"lookup": 0, "mtp": 0})
    drafted: dict = field(default_factory=lambda: {"lookup": 0, "mtp": 0})
    accepted: dict = field(default_factory=lambda: {"lookup": 0, "mtp": 0})

    def acceptance(self, source: str) -> float:
        return self.accepted[source] / self.drafted[source] if self.drafted[source] else 0.0


def generate_with_lookup(decoder: SpeculativeDecoder, prompt: Sequence[int], *, max_tokens: int,
                         ngram: int = 3, min_lookup: int = 2, n_mtp: int = 3,
                         stats: LookupStats | None = None) -> Iterator[int]:
    """Greedy generation on sequence 0, each step drafted by n-gram lookup or by MTP.

    The decoder must allow drafts as long as the lookups (``n_draft`` at creation is the
    longest draft, e.g. 8).
    """
    stats = stats if stats is not None else LookupStats()
    history = list(prompt)
    decoder.prefill(history)
    longest = decoder.n_draft
    produced = 0
    while produced < max_tokens:
        proposal = lookup_draft(history, ngram, longest)
        if len(proposal) >= min_lookup:
            source = "lookup"
            decoder.set_draft(proposal)
        else:
            source, proposal = "mtp", decoder.draft(min(n_mtp, longest))
        choices = decoder.verify()[0]
        kept = 0
        while kept < len(proposal) and proposal[kept] == choices[kept]:
            kept += 1
        stats.steps[source] += 1
        stats.drafted[source] += len(proposal)
        stats.accepted[source] += kept
        for token in decoder.accept(kept):
            history.append(token)
            yield token
            produced += 1
            if produced >= max_tokens:
                return
