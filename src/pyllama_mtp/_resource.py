"""Deterministic release of native resources: ``close()``, ``with``, and a warning ``__del__``."""

from __future__ import annotations

import warnings
from typing import Any


class Resource:
    """Base of every public object that owns native memory.

    Subclasses implement ``_release()``; ``close()`` calls it once. An object that is
    garbage-collected while open is released too, with a ``ResourceWarning``, because
    relying on the collector for native memory (hundreds of MB for a model) is a bug.
    """

    _released = True  # until a subclass finishes its __init__

    def _mark_open(self) -> None:
        self._released = False

    @property
    def closed(self) -> bool:
        return self._released

    def _release(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        """Free the native resources. Safe to call more than once."""
        if not self._released:
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
