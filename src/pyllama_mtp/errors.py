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


class NonFiniteLogitsError(DecodeError):
    """A row of logits that a token had to be chosen from holds NaN or Inf (broken
    weights, or an input that overflows them). ``positions`` maps each sequence affected
    to the position of the token whose logits they are; nothing was produced for those
    sequences. ``produced``: a speculative step's tokens for every sequence (empty for the
    affected ones), which the step still made; the decoder then forgets the affected
    sequences and rebuilds the others' memory (llama.cpp lets NaN left in freed memory
    reach other sequences). A :class:`Context` user clears its memory (``clear()``)."""

    def __init__(self, positions: "dict[int, int]", produced: "Optional[list[list[int]]]" = None) -> None:
        where = ", ".join(f"sequence {seq} at position {pos}" for seq, pos in sorted(positions.items()))
        super().__init__(f"the model's logits hold NaN or Inf{f' ({where})' if where else ''}: no token can "
                         "be chosen from them")
        self.positions = dict(positions)
        self.produced = produced


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


class NoMTPError(LlamaError, ValueError):
    """MTP drafting was asked of a model (or load) without MTP layers."""


class StateError(LlamaError, RuntimeError):
    """Saving or restoring a sequence state failed."""
