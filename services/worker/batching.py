"""Batching the decode steps of concurrent sessions into one forward.

A decode step of a small model on CPU (or any model on a GPU) costs about the same for one row as
for several: the time goes into reading the weights. So when several sessions of one worker are
generating at once, their next-token steps run as one forward with a row per session.

``StepBatcher`` is a group commit: a thread that needs a step queues it; if no batch is running it
becomes the leader, waits up to ``gather_s`` for the other sessions that are generating (each is
usually between two steps, in a boundary check) and for those that queued a forward in the last
``recent_s``: under load a session spends much of a segment outside its generation loop (scoring,
commit, RPCs, waiting for the other models) and is back within a forward's time, and a forward
for one row reads every weight for one session. Then it runs every queued step in one forward and
hands each thread its logits. Alone, a session never waits: a batch of one (with no idle session
to fill it) is the plain forward, so single-session output stays bitwise what ``generate`` gives.
docs/performance.md has the measurements behind both waits.

Filling: a batch costs little more with a few rows added (the weights are read once), so when
``fill`` is given the leader tops a batch of real steps up with steps of idle sessions (``Fill``:
sessions waiting for the other models, whose kept greedy continuation grows by one token; their
next NextText replays it).

The batched forward itself is the backend's (``Forwards._batched_step``): on transformers
``transformers_backend.forward_sessions``, on llama.cpp one ``llama_decode`` with a sequence per
row. Nothing here needs torch: the logits are whatever the backend hands over (``logits.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from . import logits as ops
from .config import WORKER
from .logits import Logits

log = logging.getLogger(__name__)


@dataclass
class _Step:
    cache: object
    tokens: list[int]
    logits_from: int
    logits: Logits | None = None
    error: BaseException | None = None
    done: bool = False


class Fill(Protocol):
    """A one-token step of an idle session added to a batch; ``release`` is always called, after
    ``done`` (only when the forward succeeded)."""

    cache: object
    token: int

    def done(self, logits: Logits) -> None: ...

    def release(self) -> None: ...


@dataclass
class BatchStats:
    batches: int = 0
    steps: int = 0
    tokens: int = 0  # tokens of the real steps (a row may carry several)
    filled: int = 0  # idle sessions' steps added to batches (``fill``)
    sizes: dict = field(default_factory=dict)  # batch size -> count


class StepBatcher:
    """Group commit of forwards of sessions. ``single(cache, tokens, logits_from)`` runs one
    session's forward alone (the exact ``generate`` call); ``many(caches, rows, logits_from)`` a
    batched one (``transformers_backend.forward_sessions``). ``max_batch=1`` turns batching off."""

    def __init__(
        self,
        single: Callable[[object, list[int], int], Logits],
        many: Callable[[list, list[list[int]], list[int]], list[Logits]],
        max_batch: int = WORKER.max_batch,
        gather_s: float = 0.020,
        recent_s: float = 0.5,
        on_batch: Callable[[int], None] | None = None,
        fill: Callable[[int], list[Fill]] | None = None,
    ):
        self.single = single
        self.many = many
        self.max_batch = max(1, int(max_batch))
        self.gather_s = gather_s
        self.recent_s = recent_s
        self.on_batch = on_batch
        self.fill = fill
        self.stats = BatchStats()
        self._cv = threading.Condition()
        self._queue: list[_Step] = []
        self._running = False
        self._generating = 0  # sessions inside a generation loop: the batch a leader waits for
        self._last_step: dict = {}  # owner -> monotonic time of its last queued forward

    # A generation loop announces itself so that a leader knows how many steps to wait for.
    def __enter__(self):
        with self._cv:
            self._generating += 1
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._generating -= 1
            self._cv.notify_all()

    @property
    def under_load(self) -> bool:
        """Other sessions are generating: a step queued now is likely to share a batch."""
        return self.max_batch > 1 and self._generating >= 2

    def _expected(self, now: float) -> int:
        """How many forwards a leader waits for: every session in a generation loop, and every
        session that queued one in the last ``recent_s`` (under load a session spends most of a
        segment outside the generation loop, in scoring, commits and RPCs, and comes back within
        a forward's time)."""
        horizon = now - self.recent_s
        for owner in [o for o, t in self._last_step.items() if t < horizon]:
            del self._last_step[owner]
        return min(max(self._generating, len(self._last_step)), self.max_batch)

    def forget(self, owner) -> None:
        """``owner`` will queue no more forwards (its session closed): no leader waits for it."""
        with self._cv:
            self._last_step.pop(owner, None)

    def run(self, cache, tokens: list[int], logits_from: int | None = None, owner=None) -> Logits:
        """Forward ``tokens`` on ``cache``, alone or in a batch with other sessions' forwards;
        returns float32 logits after each token from index ``logits_from`` (default: the last).
        ``owner`` names the session (a leader waits for sessions that stepped recently)."""
        first = len(tokens) - 1 if logits_from is None else logits_from
        if self.max_batch == 1:
            return self.single(cache, tokens, first)
        me = _Step(cache, list(tokens), first)
        with self._cv:
            if owner is not None:
                self._last_step[owner] = time.monotonic()
            self._queue.append(me)
            self._cv.notify_all()
            while not me.done:
                if self._running:
                    self._cv.wait()
                    continue
                # Lead: wait briefly for the other generating or recently stepping sessions.
                self._running = True
                now = time.monotonic()
                deadline, expected = now + self.gather_s, self._expected(now)
                while len(self._queue) < expected:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._running = False
                    self._cv.notify_all()
        if me.error is not None:
            raise me.error
        return me.logits

    def _run(self, batch: list[_Step]) -> None:
        extras: list[Fill] = []
        if self.fill is not None and len(batch) < self.max_batch:
            try:
                extras = self.fill(self.max_batch - len(batch))
            except Exception:  # filling is an optimisation: the real steps run regardless
                log.exception("picking idle sessions to fill a batch failed")
        logits: list[Logits] = []
        try:
            if len(batch) + len(extras) == 1:
                logits = [self.single(batch[0].cache, batch[0].tokens, batch[0].logits_from)]
            else:
                caches = [r.cache for r in batch] + [e.cache for e in extras]
                rows = [r.tokens for r in batch] + [[e.token] for e in extras]
                firsts = [r.logits_from for r in batch] + [0] * len(extras)
                logits = [ops.clone(t) for t in self.many(caches, rows, firsts)]
            for s, row in zip(batch, logits):
                s.logits = row
        except BaseException as exc:  # every waiting session gets the error, none hangs
            logits = []
            for s in batch:
                s.error = exc
        for e, row in zip(extras, logits[len(batch) :]):
            try:
                e.done(row[0])
            except Exception:
                log.exception("a filled step could not be kept")
        for e in extras:
            e.release()
        for s in batch:
            s.done = True
        n = len(batch) + len(extras)
        self.stats.batches += 1
        self.stats.steps += len(batch)
        self.stats.tokens += sum(len(r.tokens) for r in batch)
        self.stats.filled += len(extras)
        self.stats.sizes[n] = self.stats.sizes.get(n, 0) + 1
        if self.on_batch is not None:
            self.on_batch(n)
