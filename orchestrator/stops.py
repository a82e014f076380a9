"""Stop sequences: where one ends the output, and the hold-back of a tail that may still become one.

Segments are given to the caller only up to where a tail of the output that may still become a
stop sequence begins (as vLLM, TGI and OpenAI hold such a tail back), so nothing of a stop
sequence ever reaches the caller, even when it spans several segments.
"""

from __future__ import annotations

from collections.abc import Sequence

from .results import Segment


def find_stop(text: str, stops: Sequence[str], search_from: int) -> int | None:
    """Offset of the earliest stop sequence that ends at or after ``search_from``."""
    hits = []
    for stop in stops:
        at = text.find(stop, max(0, search_from - len(stop) + 1))
        if at >= 0:
            hits.append(at)
    return min(hits) if hits else None


def stop_prefix_start(text: str, stops: Sequence[str]) -> int:
    """Offset of the longest tail of ``text`` that is a proper prefix of a stop sequence (the
    text from there may still become a stop sequence); ``len(text)`` when there is none."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return len(text) - longest


class HeldOutput:
    """The fused output so far, and the segments not given to the caller yet."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.text = ""
        self.held: list[Segment] = []
        self.released = 0  # characters of the output given to the caller

    def add(self, segment: Segment) -> tuple[list[Segment], str | None]:
        """Appends a chosen segment. Returns the segments the caller may have now and the finish
        reason when the output ends here ("stop": the text is cut before the stop; "eos")."""
        stop_at = find_stop(self.text + segment.text, self.stops, len(self.text)) if self.stops else None
        self.text += segment.text
        self.held.append(segment)
        if stop_at is not None:
            # The stop may begin in a held segment: each is cut there (one inside it, to "").
            start = self.released
            for s in self.held:
                end = start + len(s.text)
                s.text = s.text[: max(0, stop_at - start)]
                start = end
            self.text = self.text[:stop_at]
            return self.flush(), "stop"
        if segment.eos:
            return self.flush(), "eos"
        safe = stop_prefix_start(self.text, self.stops) if self.stops else len(self.text)
        ready = []
        while self.held and self.released + len(self.held[0].text) <= safe:
            s = self.held.pop(0)
            self.released += len(s.text)
            ready.append(s)
        return ready, None

    def flush(self) -> list[Segment]:
        """Every held segment (the output ends: nothing more can complete a stop sequence)."""
        ready, self.held = self.held, []
        self.released += sum(len(s.text) for s in ready)
        return ready
