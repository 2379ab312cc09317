"""Stop strings over streamed text: output ends exactly where a stop string starts, and a
streaming caller never sees any part of one, however many tokens arrive at once."""

from __future__ import annotations

from typing import Iterable


class StopMatcher:
    """Feed text pieces; get back the text that is safe to emit.

    Only the tail that could still grow into a stop string is held back.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add ``text``; return what can be emitted now (``stopped`` says if a stop matched)."""
        if self.stopped:
            return ""
        buffer = self._held + text
        hits = [at for at in (buffer.find(stop) for stop in self.stops) if at >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[:min(hits)]
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:size]):
                    hold = size
                    break
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold]

    def flush(self) -> str:
        """The end of the output: what was held back was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
