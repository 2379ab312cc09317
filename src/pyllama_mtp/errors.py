"""Every exception pyllama_mtp raises derives from :class:`LlamaError`.

Each class also inherits the builtin a Python user would reach for first, so
``except OSError`` around a model load or ``except ValueError`` around bad input
keeps working.
"""

from __future__ import annotations

__all__ = [
    "LlamaError",
    "ModelLoadError",
    "LoadCancelledError",
    "ContextFullError",
    "DecodeError",
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
