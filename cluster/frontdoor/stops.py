"""Stop sequences on streamed text: hold back what could still become a stop sequence."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text as it streams; get back the text that is safe to show and the stop sequence
    that ended it, if one did (the text returned then ends just before that sequence)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.matched is not None:
            return ""
        self._buffer += text
        hits = [(self._buffer.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            at, stop = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
            self.matched = stop
            shown, self._buffer = self._buffer[:at], ""
            return shown
        cut = max(0, len(self._buffer) - self._hold)
        shown, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return shown

    def flush(self) -> str:
        """The text held back (call at the end of a message or stream)."""
        shown, self._buffer = self._buffer, ""
        return shown
