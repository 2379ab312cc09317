"""What a speculative decoder reports: its statistics and what MTP costs in memory."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

__all__ = ["SpeculativeStats", "MemoryReport"]


@dataclass
class SpeculativeStats:
    """What a decoder did since creation (or :meth:`SpeculativeDecoder.reset_stats`)."""

    n_draft_max: int
    steps: int
    drafted: int
    accepted: int
    generated: int
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    target_s: float = 0.0
    draft_s: float = 0.0
    wall_s: float = 0.0
    lookup_steps: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0

    @classmethod
    def from_counters(cls, counters: dict, wall_s: float) -> "SpeculativeStats":
        """From the C step's counters, named as in ``pmtp_spec_stats``: ``n_steps`` ->
        ``steps``, ``t_target_us`` -> ``target_s`` (seconds), other names unchanged."""
        names = {f.name for f in fields(cls)}
        values: dict = {"wall_s": wall_s}
        for name, value in counters.items():
            if name.startswith("t_") and name.endswith("_us"):
                values[name[2:-3] + "_s"] = value / 1e6
            elif name not in names and name.startswith("n_"):
                values[name[2:]] = value
            else:
                values[name] = value
        return cls(**values)

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_at(self) -> list[float]:
        """Acceptance at each draft position (position 0 is the first drafted token)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    @property
    def lookup_acceptance(self) -> float:
        """Accepted / drafted tokens of the steps drafted by n-gram lookup."""
        return self.lookup_accepted / self.lookup_drafted if self.lookup_drafted else 0.0

    @property
    def mtp_acceptance(self) -> float:
        """Accepted / drafted tokens of the steps drafted by the MTP head."""
        drafted = self.drafted - self.lookup_drafted
        return (self.accepted - self.lookup_accepted) / drafted if drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per step (accepted drafts + the target's own token)."""
        return self.generated / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def python_s(self) -> float:
        """Wall time spent outside llama.cpp's decodes (Python and the C bookkeeping)."""
        return max(0.0, self.wall_s - self.target_s - self.draft_s)

    def __str__(self) -> str:
        per_position = " ".join(f"{p:.0%}" for p in self.acceptance_at)
        lookup = (f"; n-gram lookup drafted {self.lookup_steps} steps, {self.lookup_drafted} tokens, "
                  f"{self.lookup_acceptance:.1%} accepted; MTP {self.mtp_acceptance:.1%}"
                  if self.lookup_steps else "")
        return (
            f"steps {self.steps}, generated {self.generated}, drafted {self.drafted}, "
            f"accepted {self.accepted} ({self.acceptance:.1%}; by position {per_position or '-'}{lookup}), "
            f"mean accepted length {self.mean_accepted_length:.2f}, "
            f"{self.tokens_per_second:.1f} tokens/s, time: target {self.target_s * 1e3:.1f} ms, "
            f"draft {self.draft_s * 1e3:.1f} ms, other {self.python_s * 1e3:.1f} ms"
        )


@dataclass
class MemoryReport:
    """Bytes that MTP costs, next to what the model costs anyway.

    ``target`` and ``draft`` are :meth:`Context.memory_breakdown` lists (per buffer type,
    i.e. per device): their ``model`` entries are the *same* shared weights, counted once.
    """

    mtp_weights: int
    model_weights: int
    target: list
    draft: list
    recurrent_snapshots: int

    @property
    def draft_context(self) -> int:
        """The draft context's own memory: its KV cache and compute buffers."""
        return sum(entry["context"] + entry["compute"] for entry in self.draft)

    @property
    def mtp_total(self) -> int:
        """Everything MTP adds: its weights, the draft context, the rollback snapshots."""
        return self.mtp_weights + self.draft_context + self.recurrent_snapshots

    def __str__(self) -> str:
        mib = 1 / (1 << 20)
        devices = ", ".join(f"{e['buffer_type']}: ctx {e['context'] * mib:.1f} + compute "
                            f"{e['compute'] * mib:.1f} MiB" for e in self.draft)
        return (f"MTP costs {self.mtp_total * mib:.1f} MiB: weights {self.mtp_weights * mib:.1f} MiB "
                f"(of {self.model_weights * mib:.1f} MiB), draft context {self.draft_context * mib:.1f} MiB "
                f"[{devices}], recurrent snapshots {self.recurrent_snapshots * mib:.1f} MiB")
