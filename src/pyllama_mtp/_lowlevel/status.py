"""The one place where C status codes become exceptions."""

from __future__ import annotations

from .._ffi import lib
from ..errors import (
    AbortedError,
    ContextFullError,
    DecodeError,
    DecodeTimeoutError,
    InvalidArgumentError,
    LlamaError,
    NoMTPError,
    GrammarDeadEndError,
    NonFiniteLogitsError,
    StateError,
)

_STATUS_ERRORS: dict[int, type[LlamaError]] = {
    lib.PMTP_ERR_ARGUMENT: InvalidArgumentError,
    lib.PMTP_ERR_NO_KV_SLOT: ContextFullError,
    lib.PMTP_ERR_DECODE: DecodeError,
    lib.PMTP_ERR_ABORTED: AbortedError,
    lib.PMTP_ERR_NO_MTP: NoMTPError,
    lib.PMTP_ERR_ALLOC: DecodeError,
    lib.PMTP_ERR_INTERNAL: DecodeError,
    lib.PMTP_ERR_STATE: StateError,
}

_STATUS_TEXT: dict[int, str] = {
    lib.PMTP_ERR_ARGUMENT: "llama.cpp rejected the input",
    lib.PMTP_ERR_NO_KV_SLOT: "no free KV slot: the context is full",
    lib.PMTP_ERR_DECODE: "llama.cpp failed to evaluate the batch",
    lib.PMTP_ERR_ABORTED: "aborted",
    lib.PMTP_ERR_NO_MTP: "the model has no MTP layers loaded",
    lib.PMTP_ERR_ALLOC: "out of memory",
    lib.PMTP_ERR_INTERNAL: "llama.cpp raised an internal error",
    lib.PMTP_ERR_STATE: "the memory cannot be rolled back that far",
}


_ABORT_REASONS: dict[int, tuple[type[LlamaError], str]] = {
    lib.PMTP_ABORT_CANCEL: (AbortedError, "cancelled"),
    lib.PMTP_ABORT_TIMEOUT: (DecodeTimeoutError, "the time limit passed"),
}


def check_status(status: int, action: str, abort_reason: int = 0, message: str = "") -> int:
    """Return a non-negative status unchanged; raise the matching exception otherwise.

    ``abort_reason`` (a PMTP_ABORT_* value) says why an aborted call was stopped;
    ``message``, what the C side said about the failure (if it said anything).
    """
    if status >= 0:
        return status
    if status == lib.PMTP_ERR_ABORTED and abort_reason in _ABORT_REASONS:
        error, text = _ABORT_REASONS[abort_reason]
        raise error(f"{action}: {text}")
    if status == lib.PMTP_ERR_NONFINITE:
        raise NonFiniteLogitsError({})  # where: the caller knows, and says
    if status == lib.PMTP_ERR_GRAMMAR:
        raise GrammarDeadEndError({})
    error = _STATUS_ERRORS.get(status, LlamaError)
    text = message or _STATUS_TEXT.get(status, f"unknown status {status}")
    raise error(f"{action}: {text}")
