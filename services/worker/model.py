"""Model worker core (paper Table 1: M1-M4 and T1): one causal LM, many sessions with KV caches.

Plain synchronous Python over a backend (transformers, or llama.cpp, which needs no torch);
``server.py`` wraps it in gRPC. Every method is thread-safe: a lock per session serialises the
calls on one session, different sessions run concurrently.

``WorkerCore`` is the façade over the parts, one idea per module:

* ``loading.py``: the model, its tokenizer and their facts (EOS ids, vocabulary, positions);
* ``sessions.py``: a session's state, and the table of live sessions with its limits;
* ``forward.py``: the forwards (the call ``generate`` makes, batched steps, batch fills) and
  cache cropping;
* ``prefix_cache.py``: kept caches of prefilled contexts, so an Open prefills only what is new;
* ``states.py``: temp states and committing them (M4);
* ``generation.py``: NextText, generation to a word boundary common to the tokenizers;
* ``drafting.py``: another model's draft and looked-up tokens checked inside due forwards;
* ``scoring.py``: ScoreCandidates and FeedTokens rows in one batched forward;
* ``results.py`` and ``api.py``: what the calls return; NextText's options.

Greedy NextText/UpdateState output is bitwise what ``model.generate(do_sample=False)`` produces
(``forward.py`` says how).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ..common.errors import InvalidArgument, ResourceExhausted
from ..sources import ModelSpec
from ..tokenizer.context import context_ids, render, render_messages
from ..tokenizer.core import TokenizerRegistry
from . import logits as ops
from .api import NextTextOptions
from .config import MIB, WORKER
from .distributions import LLAMACPP_CELL_SHARE, Distributions
from .forward import PREFILL_CHUNK, Cancelled, Fill, fill_rows
from .generation import (
    DEFAULT_SEGMENT_CAP,
    DRAFT_CALL_FORWARDS,
    MAX_DRAFT_TOKENS,
    MAX_FOLLOW_SEGMENTS,
    MAX_LOOKUP_TOKENS,
    BoundaryFn,
    Generator,
)
from .llamacpp import DECODE_TOKENS as LLAMACPP_PREFILL
from .llamacpp import MAX_SESSIONS as LLAMACPP_SESSIONS
from .llamacpp import PREFIX_ENTRIES as LLAMACPP_PREFIX_ENTRIES
from .llamacpp import PREFIX_MIN_TOKENS as LLAMACPP_PREFIX_MIN_TOKENS
from .llamacpp import LlamaCppForwards, resolve_backend
from .loading import load_model
from .prefix_cache import PrefixCache
from .results import (
    CandidateScore,
    CommitResult,
    FeedResult,
    FollowingSegment,
    NextTextResult,
    NextTokenResult,
    OpenResult,
    TextDistributions,
    perplexity,
)
from .scoring import Scorer
from .sessions import Session, SessionTable, cache_bytes
from .states import commit

if TYPE_CHECKING:
    import torch

__all__ = [
    "BoundaryFn",
    "CandidateScore",
    "CommitResult",
    "DEFAULT_SEGMENT_CAP",
    "DRAFT_CALL_FORWARDS",
    "FeedResult",
    "FollowingSegment",
    "MAX_DRAFT_TOKENS",
    "MAX_FOLLOW_SEGMENTS",
    "MAX_LOOKUP_TOKENS",
    "NextTextOptions",
    "NextTextResult",
    "NextTokenResult",
    "OpenResult",
    "WorkerCore",
    "perplexity",
]


class _Part:
    """An attribute of one of the core's parts, read and written through the core: setting
    ``core.kv_budget_bytes`` changes the session table's budget at once."""

    def __init__(self, part: str, name: str | None = None):
        self.part, self.name = part, name

    def __set_name__(self, owner, name: str) -> None:
        self.name = self.name or name

    def __get__(self, core, owner=None):
        return self if core is None else getattr(getattr(core, self.part), self.name)

    def __set__(self, core, value) -> None:
        setattr(getattr(core, self.part), self.name, value)


class WorkerCore:
    """One loaded model and its sessions.

    ``boundary(context_tail, text, tokenizer_ids, allowed_offsets) -> int | None`` finds the word
    boundary common to several tokenizers (the tokenizer service in production); by default a
    local registry holding only this model's tokenizer.
    """

    session_ttl = _Part("_table")
    max_sessions = _Part("_table")
    kv_budget_bytes = _Part("_table")
    _sessions = _Part("_table", "sessions")  # id -> Session
    batcher = _Part("_forwards")
    prefill_chunk = _Part("_forwards")
    segment_cap = _Part("_generator")
    reuse_lookahead = _Part("_generator")
    fill_ahead = _Part("_generator")
    reuse_own_logprobs = _Part("_scorer")
    distributions_window = _Part("_distributions", "window")  # tokens per context window (None: the model's)

    def __init__(
        self,
        name: str,
        spec: ModelSpec,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        boundary: BoundaryFn | None = None,
        segment_cap: int = DEFAULT_SEGMENT_CAP,
        model=None,
        hf_tokenizer=None,
        reuse_lookahead: bool = True,
        reuse_own_logprobs: bool = True,
        session_ttl: float | None = WORKER.session_ttl,
        max_sessions: int = WORKER.max_sessions,
        kv_budget_bytes: int = int(WORKER.kv_budget_mb * MIB),
        max_batch: int = WORKER.max_batch,
        pack_weights: str = WORKER.pack_weights,
        fill_ahead: int = WORKER.fill_ahead,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache_bytes: int = int(WORKER.prefix_cache_mb * MIB),
        backend: str | None = WORKER.backend,
        kv_cells: int = WORKER.kv_cells,
        threads: int = WORKER.threads,
    ):
        """Load the model (or take ``model`` and ``hf_tokenizer``) and set up the parts.

        ``reuse_lookahead``: NextText's default for its option of that name (``api.py``).
        ``reuse_own_logprobs``: scoring takes the own NextText candidate's log-probs (``scoring.py``).
        Session limits (0/None: none) ``session_ttl``, ``max_sessions``, ``kv_budget_bytes``:
        ``sessions.SessionTable``. ``max_batch``: decode steps of up to this many sessions run as
        one forward (``batching.py``; 1: off). ``fill_ahead``: batches grow idle sessions' greedy
        continuations up to this many tokens past their last candidate (0: off).
        ``prefill_chunk``: tokens per prefill forward (a cancelled Open stops within one).
        ``prefix_cache_bytes``: KV kept of prefilled contexts (``prefix_cache.py``; 0: off).
        ``pack_weights``: "all", "head" or "none" linear weights get a oneDNN-packed copy when this
        core loads the model on CPU (``packing.py``). ``backend``: "transformers", "llamacpp" (a context
        of ``kv_cells`` cells on ``threads`` threads, 0: ``loading.default_threads``) or "auto" (both
        ``llamacpp.py``); a given ``model`` is transformers, which runs on torch's threads. Only the
        transformers backend imports torch."""
        backend = "transformers" if model is not None else resolve_backend(backend, spec, device)
        loaded = load_model(name, spec, device, dtype, model, hf_tokenizer, pack_weights, backend, kv_cells, threads)
        self.backend = backend
        self._take(loaded)
        self.boundary = boundary if boundary is not None else TokenizerRegistry([self.tokenizer]).common_boundary
        if backend == "llamacpp":
            max_sessions = min(max_sessions or LLAMACPP_SESSIONS, LLAMACPP_SESSIONS)
        self._table = SessionTable(
            name, session_ttl, max_sessions, kv_budget_bytes, forget=lambda session_id: self.batcher.forget(session_id)
        )
        fill_ahead = max(0, int(fill_ahead))
        self._forwards = self._make_forwards(max_batch, self._fill_rows if fill_ahead else None, prefill_chunk)
        self._generator = Generator(loaded, self._forwards, self.boundary, segment_cap, reuse_lookahead, fill_ahead)
        self._scorer = Scorer(loaded, self._forwards, reuse_own_logprobs)
        self.prefix_cache = self._make_prefix_cache(prefix_cache_bytes)
        self._kv_per_token: int | None = None  # measured when a KV budget first needs it
        self._distributions = Distributions(loaded, self._forwards, self._batch_room, self._batch_window)

    # ---- info ----------------------------------------------------------------------------
    def info(self) -> dict:
        return {
            "name": self.name,
            "model_id": self.spec.gguf_file if self.spec.is_gguf else self.spec.source,
            "tokenizer_id": self.tokenizer.id,
            "dtype": "gguf" if self.backend == "llamacpp" else str(self.model.dtype).removeprefix("torch."),
            "backend": self.backend,
            "device": str(self.device),
            "eos_token_ids": list(self.eos_token_ids),
            "has_chat_template": self.tokenizer.has_chat_template,
            "vocab_size": self.vocab_size,
            "live_sessions": len(self._table.live()),
            "threads": self._threads(),
            "kv_cells": getattr(self.model, "kv_cells", 0),
            "parameters": self.parameters,
            "context_length": self.max_positions or 0,
            "prefix_cache_bytes": self.prefix_cache.nbytes(),
            "prefix_cache_hits": self.prefix_cache.hits,
            "prefix_cache_reused_tokens": self.prefix_cache.reused_tokens,
        }

    # ---- M1 ------------------------------------------------------------------------------
    def render_messages(self, messages: list[dict]) -> tuple[str, bool]:
        """Context text for chat messages and whether it already holds its special tokens
        (``tokenizer.context.render_messages``: the model's chat template, else plain lines)."""
        context = render_messages(self.tokenizer, messages, self.name)
        return context.text, context.templated

    def open(
        self, prompt: str | None = None, messages: list[dict] | None = None, cancelled: Cancelled | None = None
    ) -> OpenResult:
        """Encode the context (prompt or chat messages), prefill it, start a session.

        The session is live (counted, its KV budgeted) from the first prefill chunk on;
        ``cancelled()`` is asked between chunks (``Forwards.prefill``): when the caller left, the
        session is freed and ``PrefillCancelled`` raised."""
        context = render(self.tokenizer, prompt, messages, self.name)
        ids = context_ids(self.tokenizer, context)
        if not ids:
            raise InvalidArgument("context encodes to no tokens")
        if self.max_positions and len(ids) >= self.max_positions:
            more = " (raise --kv-cells)" if self.backend == "llamacpp" else ""
            raise InvalidArgument(
                f"context has {len(ids)} tokens; {self.name} supports fewer than {self.max_positions}{more}"
            )
        start = self.prefix_cache.restore(ids)
        cache = start.cache if start else self._forwards.new_cache()
        session = Session(uuid.uuid4().hex, ids, len(ids), context.text, cache, next_logits=None, fed=0)
        if self.kv_budget_bytes:
            session.reserved_bytes = len(ids) * self._kv_bytes_per_token()
        session.lock.acquire()  # held until the prefill is done: no other call, batch fill or eviction
        try:
            self._table.add(session)
            if start and start.logits is not None:
                session.next_logits = start.logits
            else:
                done = start.tokens if start else 0
                _, session.next_logits = self._forwards.prefill(ids, session.cache, cancelled, done=done)
                self.prefix_cache.store(ids, session.cache, session.next_logits)
            session.fed = len(ids)
        except BaseException:
            session.lock.release()
            self._table.close(session.id)
            raise
        session.last_used = time.monotonic()
        session.reserved_bytes = 0
        session.lock.release()
        self._table.enforce_budget(keep=session.id)
        return OpenResult(session.id, len(ids), context.text)

    # ---- M2 ------------------------------------------------------------------------------
    def next_token(self, session_id: str) -> NextTokenResult:
        """Greedy next token after the committed state (no state change)."""
        with self._table.get(session_id) as s, self._forwards.inference():
            logits = self._forwards.ready(s)
            token = ops.argmax(logits)
            return NextTokenResult(token, float(ops.log_softmax(logits)[token]), token in self._eos_set)

    # ---- M3 ------------------------------------------------------------------------------
    def feed_tokens(self, session_id: str, token_ids: Sequence[int]) -> FeedResult:
        """Log-probs and PPL of ``token_ids`` after the committed state; a temp state to commit."""
        ids = self._scorer.check_ids(token_ids)
        with self._table.get(session_id) as s, self._forwards.inference():
            ((state_id, logprobs),) = self._scorer.score_rows(s, [ids])
            return FeedResult(state_id, logprobs, perplexity(logprobs))

    # ---- Score ---------------------------------------------------------------------------
    def score_candidates(
        self, session_id: str, candidates: Sequence[tuple[str, bool]], own_state_id: str = ""
    ) -> list[CandidateScore]:
        """Score candidate texts (each encoded as a continuation, + own EOS when eos) in one batched
        forward; ``own_state_id``: this session's current NextText state, whose candidate costs no
        forward (``scoring.Scorer.score``)."""
        rows = self._scorer.encode(candidates)
        with self._table.get(session_id) as s, self._forwards.inference():
            return self._scorer.score(s, rows, own_state_id)

    # ---- T1 ------------------------------------------------------------------------------
    def next_text(self, session_id: str, options: NextTextOptions) -> NextTextResult:
        """Greedy-generate from the committed state up to the first word boundary common to the
        tokenizers (``generation.py``), as ``options`` ask."""
        call = self._generator.prepare(options)
        with self._table.get(session_id) as s, self._forwards.inference(), self.batcher:
            # Looked up at each call: the drafter's forward budget is tuned on this module (tests do).
            return self._generator.run(s, call, DRAFT_CALL_FORWARDS)

    # ---- M4 ------------------------------------------------------------------------------
    def update_state(self, session_id: str, state_id: str) -> CommitResult:
        """Make a temp state the committed one (by cropping or adopting a cache; no forward).

        Committing a NextText state keeps the greedy tokens generated past it (their KV stays in
        the cache, their logits and log-probs in the session) for the next NextText to reuse;
        scoring and feeding ignore them (they work on the committed prefix), and any other
        commit or a NextText without reuse crops them away.
        """
        with self._table.get(session_id) as s, self._forwards.inference():
            return commit(s, state_id, self.tokenizer, self.device)

    # ---- batch work ----------------------------------------------------------------------
    def distributions(
        self, texts: Sequence[str], top_k: int, cancelled: Cancelled | None = None
    ) -> Iterator[TextDistributions]:
        """Per token of each text, the distribution that predicted it (``distributions.py``).
        The request is checked at once (InvalidArgument); the texts are computed as the iterator
        is advanced, in order, beside the sessions."""
        return self._distributions.run(texts, top_k, cancelled)

    def _batch_window(self) -> int:
        """Most tokens batch work holds in one cache (0: no limit past the model's context): on
        llama.cpp a share of the KV cells that the sessions share, under a KV budget what it holds."""
        limits = [self.model.kv_cells // LLAMACPP_CELL_SHARE] if self.backend == "llamacpp" else []
        if self.kv_budget_bytes:
            limits.append(max(2, self.kv_budget_bytes // self._kv_bytes_per_token()))
        return min(limits, default=0)

    def _batch_room(self, tokens: int) -> None:
        """Under a KV budget: RESOURCE_EXHAUSTED when the sessions leave no room for ``tokens``
        tokens of batch work's KV now."""
        if not self.kv_budget_bytes:
            return
        need, used = tokens * self._kv_bytes_per_token(), self.stats()[1]
        if need + used > self.kv_budget_bytes:
            mib = 2**20
            raise ResourceExhausted(
                f"worker {self.name!r}: a window of {tokens} tokens needs {need / mib:.1f} MiB of KV; sessions "
                f"hold {used / mib:.1f} of the {self.kv_budget_bytes / mib:g} MiB budget; retry later"
            )

    # ---- close and session limits --------------------------------------------------------
    def close(self, session_id: str) -> bool:
        """Free a session; False when there was none (idempotent)."""
        return self._table.close(session_id)

    def stats(self) -> tuple[int, int]:
        """(live sessions, KV bytes over all sessions); unlocked, for gauges and budgets."""
        return self._table.stats()

    def reap(self, now: float | None = None) -> list[str]:
        """Free sessions idle past the TTL, then evict to the session cap and KV budget
        (``SessionTable.reap``). Returns the ids freed."""
        return self._table.reap(now)

    def trim_when_idle(self) -> bool:
        """With no live session, hand the heap freed since the last time back to the operating
        system (``SessionTable.trim_when_idle``)."""
        return self._table.trim_when_idle()

    def heap_trimmed(self) -> bool:
        """No live session, and the heap was trimmed since the last one was freed."""
        return self._table.heap_trimmed()

    def session_bytes(self, session_id: str) -> dict:
        """Memory held by a session: KV cache tensors and kept logits, in bytes."""
        with self._table.get(session_id) as s:
            logits = sum(ops.nbytes(t) for t in s.ahead_logits)
            if s.next_logits is not None:
                logits += ops.nbytes(s.next_logits)
            return {"kv_bytes": s.kv_bytes(), "logits_bytes": logits, "tokens": len(s.ids), "lookahead": s.lookahead}

    # ---- internals -----------------------------------------------------------------------
    def _take(self, loaded) -> None:
        """The loaded model and its facts as the core's attributes."""
        self.name, self.spec, self.device, self.dtype = loaded.name, loaded.spec, loaded.device, loaded.dtype
        self.tokenizer, self.model = loaded.tokenizer, loaded.model
        self.eos_token_ids, self._eos_set = list(loaded.eos_token_ids), loaded.eos_set
        self.eos_token_id, self.vocab_size = loaded.eos_token_id, loaded.vocab_size
        self.max_positions, self.parameters = loaded.max_positions, loaded.parameters

    def _make_prefix_cache(self, budget_bytes: int) -> PrefixCache:
        if self.backend != "llamacpp":
            return PrefixCache(budget_bytes, self._forwards.restore_align)
        # A restore shares the entry's cells at any length; entries hold sequences and cells that
        # sessions need too, so they are few and keep at most a quarter of the cells.
        # When sessions need the cells after all, the entries give theirs back (oldest first).
        cells_bytes = self.model.kv_cells // 4 * self.model.kv_bytes_per_token
        cache = PrefixCache(
            min(budget_bytes, cells_bytes),
            self._forwards.restore_align,
            LLAMACPP_PREFIX_MIN_TOKENS,
            max_entries=LLAMACPP_PREFIX_ENTRIES,
        )
        self.model.make_room = cache.drop_oldest
        return cache

    def _make_forwards(self, max_batch: int, fill, prefill_chunk: int):
        if self.backend == "llamacpp":
            return LlamaCppForwards(self.model, max_batch, fill=fill, prefill_chunk=LLAMACPP_PREFILL)
        from .transformers_backend import TransformersForwards  # imports torch: this backend alone needs it

        return TransformersForwards(self.model, self.device, max_batch, fill=fill, prefill_chunk=prefill_chunk)

    def _threads(self) -> int:
        """Threads a forward runs on: the llama.cpp context's, else torch's."""
        if self.backend == "llamacpp":
            return self.model.threads
        import torch

        return torch.get_num_threads()

    def _kv_bytes_per_token(self) -> int:
        """KV bytes per context token, measured once on a one-token prefill: every layer holds a
        state per token (a sliding layer at most its window, so this bounds it from above)."""
        if self._kv_per_token is None:
            cache, _ = self._forwards.prefill([self.eos_token_id or 0])
            self._kv_per_token = cache_bytes(cache)
        return self._kv_per_token

    def _fill_rows(self, n: int) -> list[Fill]:
        """Idle sessions' steps to top a batch up with (``forward.fill_rows``)."""
        return fill_rows(self._table.live(), n, self._eos_set, self.max_positions)
