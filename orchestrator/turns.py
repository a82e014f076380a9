"""Where a chat answer's turn ends: the stop sequences the orchestrator adds to a chat request.

A model with a chat template ends its turn with its own end-of-turn token, which is in its EOS set
(SmolLM2: ``<|im_end|>``): the worker ends the candidate there (finish ``eos``), and a special
token's text never reaches the output, so no text stop is needed for it. A model without one reads
the plain transcript (``services.tokenizer.context``) and, left alone, writes the next turn too
(``"\\nUser: ..."``); for it the request gets the transcript's role-line starts as stop sequences.
They are held back and cut like the request's own (``stops.py``): nothing of them reaches the text
or the stream, and the finish reason is ``stop``. A prompt request gets none.

Which models read the plain transcript comes from their worker's ``Info.has_chat_template`` (the
flag the worker's own rendering goes by), asked once per model and again after ``INFO_TTL_S``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence

from ..services.tokenizer.context import fallback_turn_stops
from .admission import INFO_TTL_S
from .request import FusionRequest
from .workers import WorkerHandle


def chat_stops(messages: Sequence[dict] | None, templated: Sequence[bool]) -> list[str]:
    """The stop sequences a request adds: none for a prompt or when every model (``templated``:
    one flag per fused model) has a chat template; else the plain transcript's role-line starts
    (the standard roles and every role among ``messages``)."""
    if messages is None or all(templated):
        return []
    return fallback_turn_stops(m["role"] for m in messages)


def with_stops(request: FusionRequest, added: Sequence[str]) -> FusionRequest:
    """``request`` with ``added`` after its own stop sequences (the same request when none is new)."""
    new = [s for s in dict.fromkeys(added) if s not in request.stop]
    return dataclasses.replace(request, stop=[*request.stop, *new]) if new else request


class TurnEnds:
    """Each model's ``has_chat_template`` (cached ``INFO_TTL_S``) and the request it makes."""

    def __init__(self, workers: Mapping[str, WorkerHandle]):
        self.workers = workers  # the engine's, so replaced handles are seen
        self._templated: dict[str, tuple[float, bool]] = {}

    async def templated(self, names: Sequence[str]) -> list[bool]:
        """Whether each model renders chat with its own template. A worker whose Info fails counts
        as without one: its role-line stops can only end a runaway turn early, never let one pass."""
        now = time.monotonic()
        stale = [n for n in names if n not in self._templated or now - self._templated[n][0] > INFO_TTL_S]
        infos = await asyncio.gather(*(self.workers[n].info() for n in stale), return_exceptions=True)
        for name, info in zip(stale, infos):
            if not isinstance(info, BaseException):
                self._templated[name] = (now, bool(getattr(info, "has_chat_template", False)))
        return [self._templated[n][1] if n in self._templated else False for n in names]

    async def request_for(self, request: FusionRequest, names: Sequence[str]) -> FusionRequest:
        """``request`` with the stop sequences that end the turn of the models ``names``."""
        if request.messages is None:
            return request
        return with_stops(request, chat_stops(request.messages, await self.templated(names)))
