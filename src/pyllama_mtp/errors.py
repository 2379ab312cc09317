"""Every exception pyllama_mtp raises derives from :class:`LlamaError`.

Each class also inherits the builtin a Python user would reach for first, so
``except OSError`` around a model load or ``except ValueError`` around bad input
keeps working.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "LlamaError",
    "ModelLoadError",
    "LoadCancelledError",
    "ContextFullError",
    "DecodeError",
    "NonFiniteLogitsError",
    "GrammarDeadEndError",
    "AbortedError",
    "InvalidArgumentError",
    "ClosedError",
    "NoMTPError",
    "StateError",
]


class LlamaError(Exception):
    """Root of all pyllama_mtp errors."""


class ModelLoadError(LlamaError, OSError):
    """A model file could not be loaded (missing, unreadable, corrupt or unsupported)."""


class LoadCancelledError(ModelLoadError):
    """The progress callback returned False and the load was abandoned."""


class ContextFullError(LlamaError, RuntimeError):
    """No KV slot is free for the batch. Recoverable: remove tokens (``seq_rm``) or use
    a bigger context; nothing of the batch was kept."""


class DecodeError(LlamaError, RuntimeError):
    """llama.cpp failed to evaluate a batch."""


def _where(positions: "dict[int, int]") -> str:
    where = ", ".join(f"sequence {seq} at position {pos}" for seq, pos in sorted(positions.items()))
    return f" ({where})" if where else ""


class _SequencesFailed:
    """What a failure of some sequences of a step carries. ``positions``: each affected
    sequence and the position of the token whose row it was; nothing was produced for
    them and the decoder forgot them. ``produced``: the step's tokens for every sequence
    (empty for the affected ones), which the step still made for the others.
    ``failed``: each affected sequence's own error (a step can fail several ways)."""

    def _carry(self, positions: "dict[int, int]", produced: "Optional[list[list[int]]]") -> None:
        self.positions = dict(positions)
        self.produced = produced
        self.failed: "dict[int, LlamaError]" = {}


class NonFiniteLogitsError(_SequencesFailed, DecodeError):
    """A row of logits that a token had to be chosen from holds NaN or Inf (broken
    weights, or an input that overflows them). llama.cpp lets NaN left in memory reach
    other sequences, so the decoder rebuilds the others' memory; a :class:`Context` user
    clears its memory (``clear()``)."""

    def __init__(self, positions: "dict[int, int]", produced: "Optional[list[list[int]]]" = None) -> None:
        super().__init__(f"the model's logits hold NaN or Inf{_where(positions)}: no token can be chosen "
                         "from them")
        self._carry(positions, produced)


class AbortedError(LlamaError, RuntimeError):
    """A computation was stopped (cancel flag, time limit or Ctrl-C). The context stays
    usable: ubatches completed before the abort stay in its memory (``seq_pos_max`` tells
    how far), the interrupted one is removed."""


class DecodeTimeoutError(AbortedError, TimeoutError):
    """A computation ran past its time limit (``timeout=`` or ``time_limit()``)."""


class InvalidArgumentError(LlamaError, ValueError):
    """An argument was rejected before it could reach llama.cpp."""


class ClosedError(LlamaError, ValueError):
    """An object was used after ``close()``."""


class GrammarDeadEndError(_SequencesFailed, InvalidArgumentError):
    """The grammar allows none of the model's tokens at this point: the constrained
    output cannot go on (a grammar that asks for text the vocabulary cannot spell)."""

    def __init__(self, positions: "dict[int, int]", produced: "Optional[list[list[int]]]" = None) -> None:
        super().__init__(f"the grammar allows none of the model's tokens{_where(positions)}")
        self._carry(positions, produced)


class NoMTPError(LlamaError, ValueError):
    """MTP drafting was asked of a model (or load) without MTP layers."""


class StateError(LlamaError, RuntimeError):
    """Saving or restoring a sequence state failed."""
