"""Deterministic release of native resources (``close()``, ``with``, a warning ``__del__``),
the parent/child protocol between them, and the one sanctioned way for the package's own
layers to reach another object's low-level handle."""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any

from .errors import ClosedError

# Held only to flip an object's "released" flag: two threads closing one object at once
# release it once.
_CLOSE_FLAG_LOCK = threading.Lock()
# Held while parents and children register or decide whether memory is still in use
# (never while freeing: a free waits for a running call).
_FAMILY_LOCK = threading.RLock()


class Resource:
    """Base of every public object that owns native memory.

    Subclasses set ``_native`` (their ``_lowlevel`` handle) and implement ``_release()``;
    ``close()`` calls it once. An object that is garbage-collected while open is
    released too, with a ``ResourceWarning``, because relying on the collector for
    native memory (hundreds of MB for a model) is a bug.

    Parents and children: a child holds its parent strongly and registers with
    :meth:`_adopt`; the parent tracks its children weakly. Closing a parent with open
    children is deferred (:meth:`_release_when_unused`) until the last child closes,
    and the parent refuses new children from the moment close was asked for. A parent
    whose children point into its own native memory (a context and its draft contexts and
    decoders) closes them too (:meth:`_close_children`). Either way a parent's native
    memory is freed only after every child's (:meth:`_free_when_unused`).

    ``close()`` may be called from any thread at any time: a native handle is freed under
    its lock, so a call running on it finishes first, and the next one raises ClosedError.
    """

    _released = True  # until a subclass finishes its __init__
    _close_requested = False
    _native: Any = None

    def _mark_open(self) -> None:
        # Made here, before any other thread can see the object, never lazily: two
        # threads adopting at once would each make a set and lose a child.
        self._children: "weakref.WeakSet[Resource]" = weakref.WeakSet()
        self._released = False

    @property
    def closed(self) -> bool:
        return self._released

    def _release(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        """Free the native resources. Safe to call more than once."""
        self._close_requested = True
        with _CLOSE_FLAG_LOCK:
            if self._released:
                return
            self._released = True
        self._release()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            warnings.warn(f"unclosed {self!r}; call close() or use 'with'",
                          ResourceWarning, source=self, stacklevel=2)
            self.close()

    # -- parent / child ---------------------------------------------------------------
    _constructing = False

    def _live_native(self) -> Any:
        """The native handle, or ClosedError from the moment close() was asked for."""
        if self._close_requested or self._native is None or self._native.closed:
            raise ClosedError(f"this {type(self).__name__.lower()} is closed")
        return self._native

    def _adopt(self, child: "Resource") -> Any:
        """Register a new child; returns this parent's native handle for it to use. The
        child counts as holding memory from now on (a close of this parent meanwhile
        waits for it) until it frees its own or gives up (:meth:`_abandon`)."""
        with _FAMILY_LOCK:
            native = self._live_native()
            self._children.add(child)
            child._constructing = True
            child.__dict__.setdefault("_parents", []).append(self)
        return native

    def _mark_open_child(self) -> None:
        """:meth:`_mark_open` for an object with parents: ClosedError (and nothing kept)
        if a parent's close was asked for while this one was being made."""
        self._mark_open()
        self._constructing = False
        if any(parent._close_requested for parent in getattr(self, "_parents", ())):
            self.close()
            raise ClosedError(f"the parent of this {type(self).__name__.lower()} was closed while it was made")

    def _abandon(self) -> None:
        """A constructor failed before its native handle existed: stop counting as a child."""
        self._constructing = False
        for parent in getattr(self, "_parents", ()):
            parent._child_closed(self)

    def _holds_native(self) -> bool:
        native = self._native
        return self._constructing or (native is not None and not native.closed)

    def _open_children(self) -> list["Resource"]:
        """Children whose native memory (which may point into this object's) still exists."""
        return [child for child in list(self._children) if child._holds_native()]

    def _close_children(self) -> None:
        """Close every child now (they cannot outlive this object's memory)."""
        for child in list(self._children):
            child.close()

    def _child_closed(self, child: "Resource") -> None:
        """A child freed its native handle (or never made one)."""
        self._children.discard(child)
        if self._close_requested:
            self._free_when_unused()

    def _free_when_unused(self) -> None:
        """Free the native handle once no child holds memory pointing into it (now, or
        when the last one frees its own), then tell the parents. Children always free
        before their parents, whatever order the closes come in."""
        with _FAMILY_LOCK:
            native = self._native
            if native is None or native.closed or self._open_children():
                return
        native.free()  # under the handle's own lock: a running call finishes first
        for parent in getattr(self, "_parents", ()):
            parent._child_closed(self)


def native_handle(resource: Resource) -> Any:
    """The ``_lowlevel`` handle of another pyllama_mtp object, for the package's own layers
    (a decoder driving its contexts, a sampler reading a context's outputs)."""
    return resource._native
