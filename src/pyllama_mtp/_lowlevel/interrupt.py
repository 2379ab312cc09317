"""Stopping long C calls: a context's cancel flag, its deadline, and Ctrl-C.

The abort state of each context is read by C on every graph node (no Python, no GIL in
that check); :class:`Stoppable` arms it around one call and turns the reason a call was
stopped into the matching exception.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from .._ffi import lib
from .status import check_status

class Stoppable:
    """Arms the abort states of contexts for one long C call, under their locks.

    On the main thread, while Python would turn Ctrl-C into KeyboardInterrupt, C watches
    SIGINT instead of Python during the call, so the call stops within one graph node
    instead of running to its end; the signal then becomes KeyboardInterrupt here.
    A context whose memory cannot undo a half-computed ubatch (``between_calls_only``) is
    never stopped inside a graph: its cancel flag and deadline are checked here, before
    the call, and Python's own Ctrl-C handling covers the time between calls.
    """

    __slots__ = ("_handles", "_locks", "_held", "_states", "_watching", "_mark")

    def __init__(self, handles: tuple[Any, ...], states: tuple[Any, ...]) -> None:
        # Locks in the order given (the one order: decoder, target, draft, sampler, model).
        self._handles = handles
        self._locks = tuple(handle.lock for handle in handles)
        self._held = 0
        self._states = states
        self._watching = False
        self._mark = 0

    def __enter__(self) -> "Stoppable":
        self._held = 0
        try:
            for lock in self._locks:
                lock.acquire()
                self._held += 1  # a KeyboardInterrupt between two acquires releases what was taken
            for handle in self._handles:
                handle.ptr()  # ClosedError if closed before we held its lock
            for state in self._states:
                state.reason = lib.PMTP_ABORT_NONE
                if state.between_calls_only:
                    if state.cancel:
                        state.reason = lib.PMTP_ABORT_CANCEL
                    elif state.deadline_us and lib.pmtp_monotonic_us() >= state.deadline_us:
                        state.reason = lib.PMTP_ABORT_TIMEOUT
                    if state.reason:
                        self.check(lib.PMTP_ERR_ABORTED, "before the call")
        except BaseException:
            self._release()
            raise
        self._watching = (threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        self._mark = lib.pmtp_sigint_watch_begin() if self._watching else 0
        for state in self._states:
            state.watch_sigint = self._watching
            state.sigint_mark = self._mark
        return self

    def check(self, status: int, action: str) -> int:
        """check_status with the reason of an abort; a cancel that stopped a call is spent."""
        reason = 0
        if status == lib.PMTP_ERR_ABORTED:
            reason = next((int(state.reason) for state in self._states if state.reason), 0)
            if reason == lib.PMTP_ABORT_CANCEL:
                for state in self._states:
                    state.cancel = 0
            elif reason == lib.PMTP_ABORT_SIGINT:
                raise KeyboardInterrupt
        return check_status(status, action, reason)

    def _release(self) -> None:
        for lock in reversed(self._locks[:self._held]):
            lock.release()
        self._held = 0

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        interrupted = False
        if self._watching:
            for state in self._states:
                state.watch_sigint = 0
            lib.pmtp_sigint_watch_end()
            interrupted = lib.pmtp_sigint_count() != self._mark
        self._release()
        # A Ctrl-C that came too late to stop the call is not lost.
        if interrupted and not isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt from exc


def monotonic_us() -> int:
    """The clock of every deadline (microseconds, monotonic)."""
    return int(lib.pmtp_monotonic_us())
