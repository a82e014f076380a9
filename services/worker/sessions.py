"""A worker's sessions: one session's state, and the table of live sessions with its limits
(idle TTL, session cap and KV budget, enforced by evicting the least recently used idle ones).

A session holds the *committed* token ids (context + committed output), a ``DynamicCache`` and the
logits that predict the next token after the committed ids ("next logits"), plus the greedy
continuation generated past them and the temp states that can be committed (``states.py``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..common.errors import ResourceExhausted
from . import logits as ops
from .api import GREEDY, Sampling
from .errors import SessionNotFound
from .logits import Logits
from .memory import release_free_heap
from .sampling import PrefixKeys, draw

log = logging.getLogger(__name__)

EVICTED_MEMORY = 4096  # ids of expired/evicted sessions remembered for a precise NOT_FOUND message


@dataclass
class Session:
    id: str
    ids: list[int]  # committed ids: context + output
    n_context: int
    text: str  # context text + committed output text
    cache: object
    next_logits: Logits | None
    fed: int  # committed ids present in the cache (len(ids) or len(ids) - 1)
    lookahead: int = 0  # uncommitted NextText tokens in the cache after the committed ones
    # The greedy continuation of the committed state generated so far (kept across commits when the
    # committed state is a NextText prefix): ahead_tokens[j] was picked with log-prob ahead_lps[j];
    # ahead_logits[j] are the logits after forwarding ahead_tokens[j]. len(ahead_logits) == lookahead
    # (the tokens in the cache), len(ahead_tokens) is that or one more (the last pick, not forwarded).
    ahead_tokens: list = field(default_factory=list)
    ahead_lps: list = field(default_factory=list)
    ahead_logits: list = field(default_factory=list)
    epoch: int = 0  # commits so far
    gen: int = 0  # NextText calls so far
    states: dict = field(default_factory=dict)
    counter: itertools.count = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    closed_reason: str = "was closed"
    last_used: float = field(default_factory=time.monotonic)  # end of the last call (LRU, idle TTL)
    fill_until: int = 0  # batches may grow ahead_tokens up to this length while the session is idle
    # How the continuation's tokens are picked (the last NextText's); the draws' keys.
    sampling: Sampling = GREEDY
    keys: PrefixKeys = field(default_factory=PrefixKeys)
    reserved_bytes: int = 0  # KV its prefill will hold (the budget counts it from the start)

    def pick(self, logits: Logits) -> tuple[int, float]:
        """The next token of the continuation after ``logits`` (greedy, or drawn as ``sampling``
        says) and its log-prob under the unmodified distribution, appended to the continuation."""
        if self.sampling.greedy:
            token = ops.argmax(logits)
        else:
            token = self.draw(logits, [])
        lp = float(ops.log_softmax(logits)[token])
        self.ahead_tokens.append(token)
        self.ahead_lps.append(lp)
        return token, lp

    def draw(self, logits: Logits, proposed: list[int]) -> int:
        """The token ``sampling`` draws after the continuation and then ``proposed``."""
        return draw(logits, self.sampling, self.keys, self.ids, self.ahead_tokens + proposed)

    def clear_ahead(self) -> None:
        self.ahead_tokens.clear()
        self.ahead_lps.clear()
        self.ahead_logits.clear()

    def kv_bytes(self) -> int:
        return cache_bytes(self.cache)

    def budgeted_bytes(self) -> int:
        """What the KV budget counts: the cache, or what its prefill will fill while it runs."""
        return max(self.kv_bytes(), self.reserved_bytes)


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):  # a backend's own cache (llama.cpp) knows its size
        return cache.nbytes()
    kv = 0
    for layer in getattr(cache, "layers", ()) if cache is not None else ():
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None:  # a transformers cache layer's tensor (None before its first update)
                kv += ops.nbytes(t)
    return kv


class Locked:
    """``with table.get(id) as s``: the session, locked; NOT_FOUND when closed meanwhile."""

    def __init__(self, session: Session, worker: str):
        self.session = session
        self.worker = worker

    def __enter__(self) -> Session:
        self.session.lock.acquire()
        if self.session.closed:
            self.session.lock.release()
            raise SessionNotFound(f"session {self.session.id!r} on worker {self.worker!r} {self.session.closed_reason}")
        return self.session

    def __exit__(self, *exc) -> None:
        self.session.last_used = time.monotonic()
        self.session.lock.release()


class SessionTable:
    """The live sessions of worker ``worker`` by id. Every method is thread-safe.

    Limits (0/None: none): ``session_ttl`` seconds idle before ``reap()`` frees a session;
    ``max_sessions`` live sessions, ``kv_budget_bytes`` of KV cache over all sessions: beyond them
    the least recently used idle sessions are evicted (at ``add`` and ``reap``). A call on an
    expired or evicted session gets NOT_FOUND saying so. ``forget(session_id)`` is called for
    every session freed (the step batcher's: no batch waits for it)."""

    def __init__(
        self,
        worker: str,
        session_ttl: float | None = None,
        max_sessions: int = 0,
        kv_budget_bytes: int = 0,
        forget: Callable[[str], None] = lambda session_id: None,
    ):
        self.worker = worker
        self.session_ttl = session_ttl or None
        self.max_sessions = int(max_sessions or 0)
        self.kv_budget_bytes = int(kv_budget_bytes or 0)
        self.forget = forget
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._admit = threading.Lock()
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self._freed_since_trim = 0

    def add(self, session: Session) -> None:
        """Register a new session, evicting idle ones to keep within the limits. When sessions in
        calls hold so much KV that ``session.reserved_bytes`` does not fit the budget even then:
        RESOURCE_EXHAUSTED (a burst of long prompts is refused, not run out of memory)."""
        if self.max_sessions:
            self._make_room(self.max_sessions - 1)
        with self._admit:  # one admission at a time: two Opens cannot both take the last room
            with self._lock:
                self.sessions[session.id] = session
            if self.kv_budget_bytes:
                self._enforce_budget(keep=session.id)
                used = self.stats()[1]
                if used > self.kv_budget_bytes:
                    with self._lock:
                        self.sessions.pop(session.id, None)
                    mib = 2**20
                    raise ResourceExhausted(
                        f"worker {self.worker!r}: a context of {session.n_context} tokens needs "
                        f"{session.reserved_bytes / mib:.1f} MiB of KV; sessions in calls hold "
                        f"{(used - session.reserved_bytes) / mib:.1f} of the {self.kv_budget_bytes / mib:g} MiB "
                        "budget; retry later"
                    )

    def get(self, session_id: str) -> Locked:
        with self._lock:
            s = self.sessions.get(session_id)
            reason = self._evicted.get(session_id) if s is None else None
        if reason is not None:
            raise SessionNotFound(f"session {session_id!r} on worker {self.worker!r} {reason}")
        if s is None:
            raise SessionNotFound(f"no session {session_id!r} on worker {self.worker!r} (closed or never opened)")
        return Locked(s, self.worker)

    def close(self, session_id: str) -> bool:
        """Free a session; False when there was none (idempotent)."""
        with self._lock:
            s = self.sessions.pop(session_id, None)
            self._freed_since_trim += s is not None
        if s is None:
            return False
        with s.lock:
            s.closed = True
            s.cache = None
            s.next_logits = None
            s.states.clear()
        self.forget(session_id)
        return True

    def live(self) -> list[Session]:
        """The live sessions now (unlocked)."""
        with self._lock:
            return list(self.sessions.values())

    def ids(self) -> list[str]:
        with self._lock:
            return list(self.sessions)

    def stats(self) -> tuple[int, int]:
        """(live sessions, KV bytes over all sessions); unlocked, for gauges and budgets."""
        sessions = self.live()
        return len(sessions), sum(s.budgeted_bytes() for s in sessions)

    def reap(self, now: float | None = None) -> list[str]:
        """Free sessions idle longer than ``session_ttl``, then enforce ``max_sessions`` and
        ``kv_budget_bytes`` (LRU idle sessions first). Returns the ids freed."""
        now = time.monotonic() if now is None else now
        freed = []
        if self.session_ttl:
            with self._lock:
                stale = [s for s in self.sessions.values() if now - s.last_used > self.session_ttl]
            for s in stale:
                idle = now - s.last_used
                if self._evict(s, f"expired after {idle:.0f} s idle (session TTL {self.session_ttl:g} s)", now):
                    freed.append(s.id)
        if self.max_sessions:
            freed += self._make_room(self.max_sessions, strict=False)
        if self.kv_budget_bytes:
            freed += self._enforce_budget()
        return freed

    def trim_when_idle(self) -> bool:
        """Give the freed heap back to the operating system (``memory.py``) when no session is live
        and some were freed since the last time; True when it did."""
        with self._lock:
            if self.sessions or not self._freed_since_trim:
                return False
            freed = self._freed_since_trim
        trimmed = release_free_heap()
        with self._lock:
            self._freed_since_trim -= freed  # frees during the trim count toward the next one
        return trimmed

    def heap_trimmed(self) -> bool:
        """No session is live and none was freed since the last trim: what an idle reaper pass
        leaves (what a memory check asserts before it measures)."""
        with self._lock:
            return not self.sessions and not self._freed_since_trim

    def _lru_idle(self, keep: str | None = None) -> list[Session]:
        with self._lock:
            sessions = [s for s in self.sessions.values() if s.id != keep]
        return sorted((s for s in sessions if not s.lock.locked()), key=lambda s: s.last_used)

    def _make_room(self, limit: int, strict: bool = True) -> list[str]:
        """Evict LRU idle sessions until at most ``limit`` are live; RESOURCE_EXHAUSTED when
        ``strict`` and every remaining session is in a call."""
        freed = []
        while True:
            with self._lock:
                live = len(self.sessions)
            if live <= limit:
                return freed
            victims = self._lru_idle()
            evicted = next(
                (
                    s
                    for s in victims
                    if self._evict(s, f"was evicted (least recently used; max {self.max_sessions} sessions)")
                ),
                None,
            )
            if evicted is None:
                if strict:
                    raise ResourceExhausted(
                        f"worker {self.worker!r} holds {live} sessions (max {self.max_sessions}), all in use; retry later"
                    )
                return freed
            freed.append(evicted.id)

    def enforce_budget(self, keep: str | None = None) -> list[str]:
        """Evict LRU idle sessions (never ``keep``) while the KV bytes exceed the budget."""
        return self._enforce_budget(keep) if self.kv_budget_bytes else []

    def _enforce_budget(self, keep: str | None = None) -> list[str]:
        """Evict LRU idle sessions (never ``keep``) while the KV bytes exceed the budget."""
        freed = []
        mb = self.kv_budget_bytes / 2**20
        for s in self._lru_idle(keep):
            if self.stats()[1] <= self.kv_budget_bytes:
                break
            if self._evict(s, f"was evicted (least recently used; KV budget {mb:g} MiB exceeded)"):
                freed.append(s.id)
        return freed

    def _evict(self, s: Session, reason: str, now: float | None = None) -> bool:
        """Free an idle session (False when it is in a call, was used since ``now`` or is gone)."""
        if not s.lock.acquire(blocking=False):
            return False
        try:
            if s.closed or (now is not None and self.session_ttl and now - s.last_used <= self.session_ttl):
                return False
            with self._lock:
                if self.sessions.get(s.id) is not s:
                    return False
                del self.sessions[s.id]
                self._freed_since_trim += 1
                self._evicted[s.id] = reason
                while len(self._evicted) > EVICTED_MEMORY:
                    self._evicted.popitem(last=False)
            s.closed, s.closed_reason = True, reason
            s.cache = None
            s.next_logits = None
            s.states.clear()
            s.clear_ahead()
            self.forget(s.id)
            log.info("session %s on %s %s", s.id, self.worker, reason)
            return True
        finally:
            s.lock.release()
