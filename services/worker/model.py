"""Model worker core (paper Table 1: M1-M4 and T1): one causal LM, many sessions with KV caches.

Plain synchronous Python over transformers; ``server.py`` wraps it in gRPC. Every method is
thread-safe: a lock per session serialises the calls on one session, different sessions run
concurrently.

Session state
-------------
A session holds the *committed* token ids (context + committed output), a ``DynamicCache`` and the
logits that predict the next token after the committed ids ("next logits"). The cache is created
with ``activate_past_recording()`` so that sliding-window layers (Gemma-3) keep the states needed
to roll back by cropping; after every commit it is trimmed again with ``crop(0)``.

Calls that look ahead create *temp states* (ids returned to the caller) that ``update_state``
commits without another forward:

* ``next_text`` generates into the session cache itself (the tokens past the committed ones are
  "lookahead"); committing its state keeps committed + candidate tokens and, by default, the
  lookahead beyond them (KV, logits, log-probs) for the next ``next_text`` to replay instead of
  recomputing (``reuse_lookahead``); any other commit drops it by cropping (never a cache copy).
* ``feed_tokens`` / ``score_candidates`` run on a copy of the committed cache; committing one of
  their rows adopts that copy (row selected, right padding cropped).

Committing any state invalidates every other temp state of the session; a new ``next_text``
invalidates the previous ``next_text`` state (its lookahead is cropped away). Using an
invalidated state raises :class:`StateError`.

Greedy decoding calls the model exactly like ``transformers`` ``generate`` does (same
``input_ids`` slices, all-ones 2-D ``attention_mask``, ``use_cache=True``, ``logits_to_keep=1``,
a lazily-fed last token), so the committed output of repeated ``next_text``/``update_state`` is
bitwise what ``model.generate(do_sample=False)`` produces. Every forward of a session goes through
the step batcher (``batching.py``): alone it is that exact call; while other sessions of the worker
are generating it may share one batched forward with theirs (same greedy picks, float noise).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

from ..sources import ModelSpec, load_hf_tokenizer
from ..tokenizer.core import IncrementalDecoder, TokenizerCore, TokenizerRegistry
from ..common.errors import ResourceExhausted
from .batching import StepBatcher, batchable, forward_sessions
from .errors import InvalidArgument, SessionNotFound, StateError
from .loading import load_hf_model

log = logging.getLogger(__name__)

BoundaryFn = Callable[[str, str, list, list], "int | None"]

CONTEXT_TAIL_CHARS = 64  # context given to the boundary check
DEFAULT_SEGMENT_CAP = 256  # tokens per next_text call when the caller gives no max_tokens
EVICTED_MEMORY = 4096  # ids of expired/evicted sessions remembered for a precise NOT_FOUND message
# Speculative verification (NextText ``draft_text``): the picked token and up to VERIFY_CHUNK - 1
# draft tokens in one forward. Every position's logits are kept (Gemma-3's 262k-row LM head makes
# each one cost ~20 % of a step at one thread) and the drafter is only ~1 token ahead: measured
# (bench, 2 cores, two prompts) fused 27.1 s with 3, 27.2 s with 2, 28.2-28.8 s with 8, and as many
# draft tokens verified with 3 as with 8 (41 + 42).
VERIFY_CHUNK = 3
# Drafting (NextText ``draft_tokens``): the drafter's call spends at most this many forwards in
# all, its own generation included, so drafting fills the calls that replayed their candidate and
# a call that first has to feed another model's winning candidate (the segment's slowest) drafts
# nothing. Measured (2 cores, the two bench prompts, following segments on, same-run pairs): a
# budget of 2 forwards 28.3 s vs a fixed 1 draft step per call 31.1 s; 2 forwards 26.6 s vs 3
# (with 4-token verifies) 28.4 s (the drafter loses its lead whenever another model's candidate wins).
DRAFT_CALL_FORWARDS = 2
MAX_DRAFT_TOKENS = 64
MAX_FOLLOW_SEGMENTS = 64
# Lookup drafting (NextText ``lookup_tokens``, prompt-lookup decoding): the tokens that followed the
# latest earlier occurrence of the last LOOKUP_NGRAM tokens (longest first, down to 1) in the
# session's own ids stand in as a draft, checked with the picked token in one forward.
LOOKUP_NGRAM = 3
MAX_LOOKUP_TOKENS = 16
BOUNDARY_MEMO = 1024  # boundary checks remembered (following-segment scans ask them again)
# Filling batches (``batching.Fill``): an idle session's kept greedy continuation grows by a step
# riding on a batch of other sessions' steps, up to this many tokens past its last candidate.
FILL_AHEAD = 4


# ---- results -----------------------------------------------------------------------------
class OpenResult(NamedTuple):
    session_id: str
    context_tokens: int
    context_text: str


class NextTokenResult(NamedTuple):
    token_id: int
    logprob: float
    eos: bool


class FeedResult(NamedTuple):
    state_id: str
    logprobs: list[float]
    ppl: float


class CandidateScore(NamedTuple):
    state_id: str
    token_ids: list[int]
    logprobs: list[float]
    ppl: float
    reused: bool = False  # log-probs taken from the session's own NextText (no forward)


class FollowingSegment(NamedTuple):
    """A segment that the next NextText would return once the one before it is committed, already
    decided by the kept greedy continuation (no forward); committing ``state_id`` commits it and
    every segment before it, one after the other."""

    state_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    generated_tokens: int  # tokens that decided it, lookahead included (that NextText's generated_tokens)
    lookahead: str  # complete text decided past it


class CommitResult(NamedTuple):
    committed_tokens: int  # output tokens committed so far (after the context)
    committed_text: str  # text this commit appended


@dataclass
class NextTextResult:
    state_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    eos: bool
    finish: str  # "boundary" | "eos" | "budget" | "segment_cap"
    generated_tokens: int  # tokens picked, lookahead included (minus reused_tokens: forward steps spent)
    lookahead: str = ""  # complete text generated past the candidate (shows why a boundary cannot move)
    reused_tokens: int = 0  # tokens replayed from the kept lookahead (no forward)
    boundary_s: float = 0.0  # time spent in boundary checks (tokenizer service)
    compute_s: float = 0.0  # time in this call, boundary checks excluded
    # Drafting: the complete text of the greedy continuation known past the candidate (lookahead
    # and the ``draft_tokens`` extension, up to an EOS), and the extra forward steps it took.
    draft: str = ""
    drafted_tokens: int = 0
    # Verification of ``draft_text``: draft tokens accepted as this model's own greedy picks, and
    # the multi-token forwards that checked them.
    verified_tokens: int = 0
    verify_forwards: int = 0
    # ``lookup_tokens``: tokens looked up in the session's own ids and accepted as greedy picks,
    # and the forwards that checked them.
    lookup_accepted: int = 0
    lookup_forwards: int = 0
    # ``follow_segments``: the next segments the kept continuation already decides (FollowingSegment).
    following: list = field(default_factory=list)


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(-mean logprob); inf for no tokens."""
    if not logprobs:
        return math.inf
    return math.exp(-sum(logprobs) / len(logprobs))


# ---- internal state ----------------------------------------------------------------------
@dataclass
class _GenState:
    """A NextText candidate; its forwarded tokens sit in the session cache as lookahead."""

    epoch: int
    gen: int
    tokens: list[int]
    logprobs: list[float]  # of ``tokens``, from the generation steps (reused by score_candidates)
    parts: tuple = ()  # following segments: the _GenStates committed one after the other


@dataclass
class _Batch:
    """The cache of one batched forward (FeedTokens: one row; ScoreCandidates: one row per candidate)."""

    cache: object
    width: int  # padded row length
    rows: int


@dataclass
class _RowState:
    epoch: int
    batch: _Batch | None  # None for an empty row
    row: int
    tokens: list[int]
    next_logits: torch.Tensor | None


@dataclass
class _AheadState:
    """A scored candidate whose log-probs all came from the session's greedy continuation (its
    tokens but the last are a prefix of it): committing keeps the shared tokens' KV and leaves the
    rest committed but not yet fed (the next call forwards them)."""

    epoch: int
    tokens: list[int]


@dataclass
class _Session:
    id: str
    ids: list[int]  # committed ids: context + output
    n_context: int
    text: str  # context text + committed output text
    cache: object
    next_logits: torch.Tensor | None
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


class _SegmentScan:
    """NextText's candidate search over picked tokens, decoded from the committed text ``text`` on:
    ``push`` returns ``(n, text, finish)`` at the first word boundary common to the tokenizers
    (``n`` candidate tokens), at an EOS token, or at the ``limit``-th token (cut at the last
    complete character; ``cap_finish``), else None."""

    def __init__(self, core: "WorkerCore", text: str, tokenizer_ids: list, limit: int, cap_finish: str):
        self.core = core
        self.tail = text[-CONTEXT_TAIL_CHARS:]
        self.tokenizer_ids = tokenizer_ids
        self.limit = limit
        self.cap_finish = cap_finish
        self.decoder = IncrementalDecoder(core.tokenizer)
        self.pushed = 0
        self.boundary_s = 0.0

    def push(self, token: int) -> tuple[int, str, str] | None:
        decoder = self.decoder
        self.pushed += 1
        grew = bool(decoder.push(token))
        if token in self.core._eos_set:
            return self.pushed, decoder.text, "eos"
        # A boundary can only change when text grew; it must be a token end (0 < b < len).
        ends = [e for e in decoder.token_ends if 0 < e < len(decoder.text)] if grew else []
        if ends:
            t_b = time.perf_counter()
            b = self.core._boundary(self.tail, decoder.text, self.tokenizer_ids, ends)
            self.boundary_s += time.perf_counter() - t_b
            if b is not None:
                if b not in decoder.token_ends:
                    raise RuntimeError(f"boundary {b} is not a token end (allowed: {ends})")
                return decoder.token_ends.index(b) + 1, decoder.text[:b], "boundary"
        if self.pushed >= self.limit:
            n = max((i + 1 for i, e in enumerate(decoder.token_ends) if e >= 0), default=0)
            return n, decoder.text[: decoder.token_ends[n - 1]] if n else "", self.cap_finish
        return None


class _Fill:
    """A step of an idle session's greedy continuation added to a batch (``batching.Fill``); the
    session stays locked from ``_fill_rows`` until ``release``."""

    def __init__(self, session: _Session, pick):
        self.session = session
        self.cache = session.cache
        self.token = session.ahead_tokens[-1]
        self._pick = pick

    def done(self, logits: torch.Tensor) -> None:
        s = self.session
        s.ahead_logits.append(logits)
        s.lookahead += 1
        self._pick(s, logits)

    def release(self) -> None:
        self.session.lock.release()


_COMPUTE_LOCKS_GUARD = threading.Lock()


def _compute_lock(model) -> threading.Lock:
    """The lock of one model object, shared by every core that holds it (in-process replicas get
    the cached model): a batched forward switches the model's attention implementation for its
    call, so no other forward of that model may run meanwhile."""
    with _COMPUTE_LOCKS_GUARD:
        lock = model.__dict__.get("_coolfusion_compute_lock")
        if lock is None:
            lock = threading.Lock()
            model.__dict__["_coolfusion_compute_lock"] = lock
        return lock


class WorkerCore:
    """One loaded model and its sessions.

    ``boundary(context_tail, text, tokenizer_ids, allowed_offsets) -> int | None`` finds the word
    boundary common to several tokenizers (the tokenizer service in production); by default a
    local registry holding only this model's tokenizer.
    """

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
        session_ttl: float | None = None,
        max_sessions: int = 0,
        kv_budget_bytes: int = 0,
        max_batch: int = 8,
        pack_weights: str = "all",
        fill_ahead: int = FILL_AHEAD,
    ):
        """``reuse_lookahead``: NextText replays the greedy tokens kept past a committed NextText
        state instead of recomputing them (per-call override in ``next_text``).
        ``reuse_own_logprobs``: ``score_candidates(..., own_state_id=...)`` takes a candidate's
        log-probs from that NextText state when its tokens equal the candidate's encoding.

        Session limits (0/None: none): ``session_ttl`` seconds idle before ``reap()`` frees a
        session; ``max_sessions`` live sessions, ``kv_budget_bytes`` of KV cache over all sessions:
        beyond them the least recently used idle sessions are evicted (at ``open`` and ``reap``).
        A call on an expired or evicted session gets NOT_FOUND saying so.

        ``max_batch``: decode steps of up to this many sessions generating at the same time run as
        one forward (``batching.py``); 1 turns batching off.
        ``fill_ahead``: a batch of decode steps is topped up with steps that grow idle
        sessions' kept greedy continuations, up to this many tokens past their last
        candidate (0: off).
        ``pack_weights``: which linear weights get a oneDNN-packed copy for multi-row forwards
        when this core loads the model on CPU ("all", "head", "none"; ``packing.py``)."""
        self.session_ttl = session_ttl or None
        self.max_sessions = int(max_sessions or 0)
        self.kv_budget_bytes = int(kv_budget_bytes or 0)
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self.name = name
        self.reuse_lookahead = reuse_lookahead
        self.reuse_own_logprobs = reuse_own_logprobs
        self.spec = spec
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        hf_tokenizer = hf_tokenizer if hf_tokenizer is not None else load_hf_tokenizer(spec)
        self.tokenizer = TokenizerCore(name, hf_tokenizer, spec.describe())
        self.model = model if model is not None else load_hf_model(spec, str(self.device), dtype, pack_weights)
        self.boundary = boundary if boundary is not None else TokenizerRegistry([self.tokenizer]).common_boundary
        self._boundaries: OrderedDict = OrderedDict()  # memo of boundary checks (``_boundary``)
        self._boundaries_lock = threading.Lock()
        self.segment_cap = segment_cap

        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids: list[int] = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        self._eos_set = frozenset(self.eos_token_ids)
        # The EOS appended to an eos=True candidate: the tokenizer's EOS when generation stops on it.
        tok_eos = self.tokenizer.eos_token_id
        self.eos_token_id = tok_eos if tok_eos in self._eos_set or not self.eos_token_ids else self.eos_token_ids[0]
        embed_rows = self.model.get_input_embeddings().weight.shape[0]
        self.vocab_size = int(min(embed_rows, self.tokenizer.vocab_size))
        self.max_positions = getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._compute = _compute_lock(self.model)  # one forward at a time: each uses every thread torch has
        from transformers import DynamicCache

        if not batchable(DynamicCache(config=self.model.config)):
            max_batch = 1
        self.fill_ahead = max(0, int(fill_ahead))
        self.batcher = StepBatcher(
            self._single_step, self._batched_step, max_batch, fill=self._fill_rows if self.fill_ahead else None
        )

    # ---- info ----------------------------------------------------------------------------
    def info(self) -> dict:
        with self._lock:
            live = len(self._sessions)
        return {
            "name": self.name,
            "model_id": self.spec.gguf_file if self.spec.is_gguf else self.spec.source,
            "tokenizer_id": self.tokenizer.id,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.device),
            "eos_token_ids": list(self.eos_token_ids),
            "has_chat_template": self.tokenizer.has_chat_template,
            "vocab_size": self.vocab_size,
            "live_sessions": live,
            "threads": torch.get_num_threads(),
            "parameters": self.parameters,
        }

    # ---- M1 ------------------------------------------------------------------------------
    def render_messages(self, messages: list[dict]) -> tuple[str, bool]:
        """Context text for chat messages and whether it already holds its special tokens.

        With a chat template: ``apply_chat_template(messages, tokenize=False,
        add_generation_prompt=True)`` (encoded without adding special tokens again, as
        ``apply_chat_template(tokenize=True)`` does). Without one, a plain rendering: one line
        ``"{Role}: {content}\\n"`` per message (role capitalised: ``System``, ``User``,
        ``Assistant``) followed by ``"Assistant:"``; it is encoded like a prompt (BOS added when
        the tokenizer adds one).
        """
        if not messages:
            raise InvalidArgument("messages is empty")
        clean = []
        for i, m in enumerate(messages):
            role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
            if not isinstance(role, str) or not role or not isinstance(content, str):
                raise InvalidArgument(f"message {i} needs a non-empty string 'role' and a string 'content'")
            clean.append({"role": role, "content": content})
        if self.tokenizer.has_chat_template:
            try:
                text = self.tokenizer.hf.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # templates raise on e.g. unsupported roles
                raise InvalidArgument(f"chat template of {self.name!r} rejected the messages: {exc}") from None
            return text, True
        lines = "".join(f"{m['role'][:1].upper()}{m['role'][1:]}: {m['content']}\n" for m in clean)
        return lines + "Assistant:", False

    def open(self, prompt: str | None = None, messages: list[dict] | None = None) -> OpenResult:
        """Encode the context (prompt or chat messages), prefill it in one forward, start a session."""
        if (prompt is None) == (messages is None):
            raise InvalidArgument("give exactly one of prompt and messages")
        if messages is not None:
            text, templated = self.render_messages(messages)
        else:
            if not isinstance(prompt, str):
                raise InvalidArgument("prompt must be a string")
            if not prompt:
                raise InvalidArgument("prompt is empty")
            text, templated = prompt, False
        # The tokenizer's own call, exactly what the generate() oracle sees.
        ids = list(self.tokenizer.hf(text, add_special_tokens=not templated)["input_ids"])
        if not ids:
            raise InvalidArgument("context encodes to no tokens")
        if self.max_positions and len(ids) >= self.max_positions:
            raise InvalidArgument(f"context has {len(ids)} tokens; {self.name} supports fewer than {self.max_positions}")
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        cache.activate_past_recording()
        with torch.inference_mode():
            logits = self._forward([ids], cache, keep_last=True)
        session = _Session(
            id=uuid.uuid4().hex,
            ids=ids,
            n_context=len(ids),
            text=text,
            cache=cache,
            next_logits=logits[0, -1].to(copy=True, dtype=torch.float32),
            fed=len(ids),
        )
        if self.max_sessions:
            self._make_room(self.max_sessions - 1)
        with self._lock:
            self._sessions[session.id] = session
        if self.kv_budget_bytes:
            self._enforce_budget(keep=session.id)
        return OpenResult(session.id, len(ids), text)

    # ---- M2 ------------------------------------------------------------------------------
    def next_token(self, session_id: str) -> NextTokenResult:
        """Greedy next token after the committed state (no state change)."""
        with self._session(session_id) as s, torch.inference_mode():
            logits = self._ready(s)
            token = int(torch.argmax(logits))
            return NextTokenResult(token, float(torch.log_softmax(logits, -1)[token]), token in self._eos_set)

    # ---- M3 ------------------------------------------------------------------------------
    def feed_tokens(self, session_id: str, token_ids: Sequence[int]) -> FeedResult:
        """Log-probs and PPL of ``token_ids`` after the committed state; a temp state to commit."""
        ids = self._check_ids(token_ids)
        with self._session(session_id) as s, torch.inference_mode():
            (state_id, logprobs), = self._score_rows(s, [ids])
            return FeedResult(state_id, logprobs, perplexity(logprobs))

    # ---- Score ---------------------------------------------------------------------------
    def score_candidates(
        self, session_id: str, candidates: Sequence[tuple[str, bool]], own_state_id: str = ""
    ) -> list[CandidateScore]:
        """Score candidate texts (each encoded as a continuation, + own EOS when eos) in one batched forward.

        ``own_state_id``: this session's current NextText state. A candidate whose encoding equals
        that state's tokens is not forwarded: its log-probs are the generation's, and its state is
        the NextText state (``reused=True``). Only the other rows go into the batch.
        """
        rows = []
        for i, cand in enumerate(candidates):
            try:
                text, eos = cand
            except (TypeError, ValueError):
                raise InvalidArgument(f"candidate {i} must be a (text, eos) pair") from None
            if not isinstance(text, str):
                raise InvalidArgument(f"candidate {i}: text must be a string")
            ids = self.tokenizer.encode_ids(text, continuation=True) if text else []
            if eos:
                if not self.eos_token_ids:
                    raise InvalidArgument(f"{self.name} has no EOS token to score an eos candidate with")
                ids.append(self.eos_token_id)
            rows.append(ids)
        with self._session(session_id) as s, torch.inference_mode():
            own = None
            if own_state_id and self.reuse_own_logprobs:
                state = s.states.get(own_state_id)
                if isinstance(state, _GenState) and state.gen == s.gen and state.epoch == s.epoch:
                    own = state
            known = {i: (own_state_id, list(own.logprobs)) for i, r in enumerate(rows) if own and r and r == own.tokens}
            if own_state_id and self.reuse_own_logprobs:
                for i, r in enumerate(rows):
                    logprobs = None if i in known or not r else self._ahead_logprobs(s, r)
                    if logprobs is not None:
                        known[i] = (self._new_state(s, _AheadState(s.epoch, list(r))), logprobs)
            todo = [i for i in range(len(rows)) if i not in known]
            scored = self._score_rows(s, [rows[i] for i in todo]) if todo else []
        results = dict(known)
        results.update(zip(todo, scored))
        return [
            CandidateScore(results[i][0], ids, results[i][1], perplexity(results[i][1]), i in known)
            for i, ids in enumerate(rows)
        ]

    def _ahead_logprobs(self, s: _Session, ids: list[int]) -> list[float] | None:
        """Log-probs of ``ids`` after the committed state when every token but the last follows a
        prefix of the forwarded greedy continuation (its logits are kept); else None."""
        forwarded = len(s.ahead_logits)
        if len(ids) - 1 > forwarded or ids[:-1] != s.ahead_tokens[: len(ids) - 1]:
            return None
        dists = [self._ready(s)] + s.ahead_logits[: len(ids) - 1]
        return [float(torch.log_softmax(d, -1)[t]) for d, t in zip(dists, ids)]

    # ---- T1 ------------------------------------------------------------------------------
    def next_text(
        self,
        session_id: str,
        boundary_tokenizer_ids: Sequence[str] = (),
        max_tokens: int = 0,
        reuse_lookahead: bool | None = None,
        draft_text: str = "",
        draft_tokens: int = 0,
        commit_state_id: str = "",
        follow_segments: int = 0,
        lookup_tokens: int = 0,
    ) -> NextTextResult:
        """Greedy-generate from the committed state up to the first word boundary common to the tokenizers.

        Stops at the first boundary b (candidate = text[:b] and the tokens whose text ends at b;
        tokens past b are lookahead, not part of the candidate), at an EOS token (candidate = all
        complete text, EOS included in the ids, ``eos=True``) or after ``max_tokens`` tokens
        (``finish="budget"``; ``0`` means the worker's ``segment_cap``, ``finish="segment_cap"``).
        A capped candidate is cut at the last token that ends on a complete character.

        ``reuse_lookahead`` (default: the worker's ``reuse_lookahead``): tokens already generated
        past the committed state (the lookahead of an earlier NextText, kept by its commit) are
        replayed with their cached log-probs, logits and KV instead of being forwarded again. The
        tokens, log-probs and text are the same either way (the same forward calls made them).

        Speculative decoding across tokenizers (both need ``reuse_lookahead``):

        * ``draft_tokens`` (drafter): after the candidate, extend the kept greedy continuation
          towards ``draft_tokens`` tokens past it (with what is left of ``DRAFT_CALL_FORWARDS``
          forwards in this call) and return its complete text as ``draft``.
        * ``draft_text`` (verifier): another model's greedy continuation of the committed text.
          Encoded with this tokenizer, its tokens stand in for single decode steps: when generation
          needs a forward and the draft agrees with every token picked so far, the picked token and
          up to ``VERIFY_CHUNK - 1`` draft tokens after it are forwarded at once, and each draft
          token is kept only while it is this model's own argmax after the tokens before it. So
          the tokens are still this model's greedy ones; a mismatch costs nothing but the forward.

        ``commit_state_id``: commit that temp state first, exactly as ``update_state`` would (the
        fusion loop folds each segment's commit into the next NextText).

        ``follow_segments`` (needs ``reuse_lookahead``): also return up to this many segments past a
        boundary candidate that the next NextTexts would return after committing it, as far as the
        kept greedy continuation decides them without a forward (``following``; each with the
        same ``max_tokens`` cap). Committing a following segment's state commits the candidate and
        every segment up to it, exactly as one commit after the other would.

        ``lookup_tokens`` (prompt-lookup decoding): whenever a forward is due and no ``draft_text``
        applies, up to this many tokens that followed the latest earlier occurrence of the last few
        ids (``_lookup``: prompt, committed output, continuation) go into the same forward and are
        kept while they are this model's greedy picks, as draft tokens are. Repeated names,
        numbers and phrases then cost one forward for several tokens. Under load the checking
        forward shares a batch with other sessions' forwards (rows of any length).
        """
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be >= 0, got {max_tokens!r}")
        if not isinstance(draft_tokens, int) or not 0 <= draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidArgument(f"draft_tokens must be in [0, {MAX_DRAFT_TOKENS}], got {draft_tokens!r}")
        if not isinstance(draft_text, str):
            raise InvalidArgument("draft_text must be a string")
        if not isinstance(follow_segments, int) or not 0 <= follow_segments <= MAX_FOLLOW_SEGMENTS:
            raise InvalidArgument(f"follow_segments must be in [0, {MAX_FOLLOW_SEGMENTS}], got {follow_segments!r}")
        if not isinstance(lookup_tokens, int) or not 0 <= lookup_tokens <= MAX_LOOKUP_TOKENS:
            raise InvalidArgument(f"lookup_tokens must be in [0, {MAX_LOOKUP_TOKENS}], got {lookup_tokens!r}")
        reuse = self.reuse_lookahead if reuse_lookahead is None else bool(reuse_lookahead)
        draft = self.tokenizer.encode_ids(draft_text, continuation=True) if draft_text and reuse else []
        verified = verify_forwards = 0
        looked = lookup_forwards = 0
        limit = self.segment_cap if max_tokens == 0 else min(max_tokens, self.segment_cap)
        cap_finish = "budget" if 0 < max_tokens <= self.segment_cap else "segment_cap"
        tokenizer_ids = list(boundary_tokenizer_ids) or [self.tokenizer.id]
        boundary_s = 0.0
        with self._session(session_id) as s, torch.inference_mode(), self.batcher:
            t_start = time.perf_counter()
            if commit_state_id:
                self._commit(s, commit_state_id)
            if reuse:
                self._drop_gen_states(s)
            else:
                self._drop_lookahead(s)
            s.gen += 1
            forwards = int(s.fed < len(s.ids))  # feeding a committed candidate
            lookup = lookup_tokens
            if draft and s.fed < len(s.ids):
                verified += self._ready_verifying(s, draft[: VERIFY_CHUNK - 1])
                verify_forwards += 1
            elif lookup and s.fed < len(s.ids) and (proposed := self._lookup(s.ids, lookup)):
                looked += self._ready_verifying(s, proposed)
                lookup_forwards += 1
            logits = self._ready(s)
            scan = _SegmentScan(self, s.text, tokenizer_ids, limit, cap_finish)
            tokens: list[int] = []
            logprobs: list[float] = []
            reused = 0
            kept = len(s.ahead_tokens)  # continuation known before this call (replays count as reused)
            j = 0  # index into the session's greedy continuation (s.ahead_*)
            while True:
                if j < len(s.ahead_tokens):
                    token, lp = s.ahead_tokens[j], s.ahead_lps[j]
                    reused += j < kept
                else:
                    token, lp = self._pick(s, logits)
                tokens.append(token)
                logprobs.append(lp)
                found = scan.push(token)
                if found:
                    n, text, finish = found
                    break
                # Like generate(): a picked token is forwarded only when generation goes on.
                if j < len(s.ahead_logits):
                    logits = s.ahead_logits[j]
                else:
                    if draft and len(draft) > j + 1 and draft[: j + 1] == s.ahead_tokens[: j + 1]:
                        verified += self._verify_draft(s, draft[j + 1 : j + VERIFY_CHUNK])
                        verify_forwards += 1
                    else:
                        draft = []  # diverged: the rest of the draft cannot be this model's greedy text
                        accepted, checked = self._advance(s, lookup)
                        looked += accepted
                        lookup_forwards += checked
                    forwards += 1
                    logits = s.ahead_logits[j]
                j += 1
            drafted, draft_out = 0, ""
            decoder = scan.decoder
            if draft_tokens and reuse:
                drafted, accepted, checks = self._extend_draft(s, n, draft_tokens, DRAFT_CALL_FORWARDS - forwards, lookup)
                looked += accepted
                lookup_forwards += checks
                for token in s.ahead_tokens[len(tokens) :]:
                    if token in self._eos_set:
                        break
                    decoder.push(token)
                draft_out = decoder.text[len(text) :] if finish != "eos" else ""
            state = _GenState(s.epoch, s.gen, tokens[:n], logprobs[:n])
            state_id = self._new_state(s, state)
            following, follow_boundary_s = [], 0.0
            if follow_segments and reuse and finish == "boundary":
                following, follow_boundary_s = self._following(s, state, tokenizer_ids, limit, follow_segments)
            boundary_s += scan.boundary_s + follow_boundary_s
            # While the caller waits for the other models, batches may grow the continuation.
            ahead = n + sum(len(f.token_ids) for f in following)
            s.fill_until = ahead + self.fill_ahead if reuse and finish == "boundary" else 0
            return NextTextResult(
                state_id=state_id,
                text=text,
                token_ids=tokens[:n],
                logprobs=logprobs[:n],
                eos=finish == "eos",
                finish=finish,
                generated_tokens=len(tokens),
                lookahead=decoder.text[len(text) :],
                reused_tokens=reused,
                boundary_s=boundary_s,
                compute_s=time.perf_counter() - t_start - boundary_s,
                draft=draft_out,
                drafted_tokens=drafted,
                verified_tokens=verified,
                verify_forwards=verify_forwards,
                lookup_accepted=looked,
                lookup_forwards=lookup_forwards,
                following=following,
            )

    def _boundary(self, tail: str, text: str, tokenizer_ids: list, ends: list) -> int | None:
        """``boundary`` with a small memo (it is a pure function of its arguments): a following-
        segment scan asks what the next NextText's candidate search asks again when the segment
        is not committed with the candidate (same committed tail, same tokens)."""
        key = (tail, text, tuple(tokenizer_ids), tuple(ends))
        with self._boundaries_lock:
            if key in self._boundaries:
                self._boundaries.move_to_end(key)
                return self._boundaries[key]
        b = self.boundary(tail, text, tokenizer_ids, ends)
        with self._boundaries_lock:
            self._boundaries[key] = b
            while len(self._boundaries) > BOUNDARY_MEMO:
                self._boundaries.popitem(last=False)
        return b

    def _following(
        self, s: _Session, state: _GenState, tokenizer_ids: list, limit: int, count: int
    ) -> tuple[list[FollowingSegment], float]:
        """Up to ``count`` segments past ``state`` (a boundary candidate) that the kept continuation
        decides: each is what NextText would return, with the same cap, after committing the ones
        before it (same committed text and boundary context). Each gets a commit-through state.
        Returns them and the seconds spent in boundary checks."""
        out, boundary_s = [], 0.0
        prefix = s.ids[s.n_context :] + state.tokens
        text = s.text + self.tokenizer.decode(state.tokens, prefix_ids=s.ids[s.n_context :])[0]
        parts = [state]
        start = len(state.tokens)
        while len(out) < count:
            scan = _SegmentScan(self, text, tokenizer_ids, limit, "cap")
            found, j = None, start
            while not found:
                if j == len(s.ahead_tokens):
                    if len(s.ahead_logits) < j:
                        break  # the last pick is not forwarded yet
                    self._pick(s, s.ahead_logits[j - 1])  # the pick the next NextText makes from kept logits
                found = scan.push(s.ahead_tokens[j])
                j += 1
            boundary_s += scan.boundary_s
            if not found or found[2] != "boundary":
                break  # undecided without a forward, EOS or the cap: the next NextText's to find
            n = found[0]
            tokens, logprobs = s.ahead_tokens[start : start + n], s.ahead_lps[start : start + n]
            parts.append(_GenState(s.epoch, s.gen, tokens, logprobs))
            whole = _GenState(
                s.epoch, s.gen, [t for p in parts for t in p.tokens], [x for p in parts for x in p.logprobs], tuple(parts)
            )
            lookahead = scan.decoder.text[len(found[1]) :]
            out.append(FollowingSegment(self._new_state(s, whole), found[1], tokens, logprobs, scan.pushed, lookahead))
            text += self.tokenizer.decode(tokens, prefix_ids=prefix)[0]
            prefix = prefix + tokens
            start += n
        return out, boundary_s

    def _lookup(self, ids: list[int], count: int) -> list[int]:
        """Prompt-lookup draft: up to ``count`` tokens that followed the latest earlier occurrence
        of the last n ids (n = ``LOOKUP_NGRAM`` down to 1), cut after an EOS; [] when none."""
        last = len(ids)
        for n in range(min(LOOKUP_NGRAM, last - 1), 0, -1):
            tail = ids[last - n :]
            for start in range(last - n - 1, -1, -1):
                if ids[start] == tail[0] and ids[start : start + n] == tail:
                    proposed = ids[start + n : start + n + count]
                    for i, token in enumerate(proposed):
                        if token in self._eos_set:
                            return proposed[: i + 1]
                    return proposed
        return []

    def _advance(self, s: _Session, lookup: int) -> tuple[int, int]:
        """Forward the continuation's last pick: with up to ``lookup`` looked-up tokens checked in
        the same forward when ``_lookup`` finds some, else as a plain decode step.
        Returns the looked-up tokens kept and 1 if some were checked, else (0, 0)."""
        proposed = self._lookup(s.ids + s.ahead_tokens, lookup) if lookup else []
        return self._verify_draft(s, proposed), int(bool(proposed))

    def _verify_draft(self, s: _Session, proposed: list[int]) -> int:
        """One forward (alone or in a batch) of the picked, not yet forwarded token
        ``ahead_tokens[-1]`` and the ``proposed`` tokens after it (``_accept_draft`` keeps those
        greedy decoding picks; none proposed: a decode step). Returns the proposed tokens kept."""
        j = len(s.ahead_logits)  # == len(s.ahead_tokens) - 1
        logits = self.batcher.run(s.cache, [s.ahead_tokens[j]] + proposed, 0, owner=s.id)
        s.ahead_logits.append(logits[0].clone() if proposed else logits[0])
        s.lookahead += 1
        return self._accept_draft(s, logits, proposed) if proposed else 0

    def _ready_verifying(self, s: _Session, proposed: list[int]) -> int:
        """``_ready`` when committed tokens wait to be fed: the same forward also checks the
        ``proposed`` tokens after them (as ``_verify_draft``). Returns the proposed tokens kept."""
        assert s.lookahead == 0 and not s.ahead_tokens, "unfed committed tokens with a continuation"
        unfed = s.ids[s.fed :]
        logits = self.batcher.run(s.cache, unfed + proposed, len(unfed) - 1, owner=s.id)
        s.next_logits = logits[0].clone()
        s.fed = len(s.ids)
        return self._accept_draft(s, logits, proposed)

    def _accept_draft(self, s: _Session, logits: torch.Tensor, proposed: list[int]) -> int:
        """After a forward of ``proposed`` (just fed on top of the session's continuation, with
        ``logits[i]`` the logits before ``proposed[i]``): keep the longest prefix that greedy
        decoding picks (each token the argmax after the ones before it) as continuation tokens
        with their log-probs and logits, and crop the rest from the cache. Returns tokens kept."""
        picks = torch.argmax(logits[: len(proposed)], -1).tolist()
        kept = 0
        while kept < len(proposed) and picks[kept] == proposed[kept]:
            kept += 1
        if kept < len(proposed):
            self._crop_tail(s.cache, len(proposed) - kept)
        if kept:
            logprobs = torch.log_softmax(logits[:kept], -1)
            for i in range(kept):
                s.ahead_tokens.append(proposed[i])
                s.ahead_lps.append(float(logprobs[i, proposed[i]]))
                s.ahead_logits.append(logits[i + 1].clone())
        s.lookahead += kept
        return kept

    @staticmethod
    def _crop_tail(cache, tokens: int) -> None:
        """Remove the last ``tokens`` states of every layer. Unlike ``crop(-tokens)``, sliding
        layers keep all the states they hold (the kept lookahead must stay croppable)."""
        for layer in getattr(cache, "layers", ()):
            if not getattr(layer, "is_initialized", False):
                continue
            if getattr(layer, "is_sliding", False) and hasattr(layer, "cumulative_length"):
                layer.keys = layer.keys[..., :-tokens, :]
                layer.values = layer.values[..., :-tokens, :]
                layer.cumulative_length -= tokens
            else:
                layer.crop(-tokens)

    def _extend_draft(self, s: _Session, n: int, want: int, max_steps: int, lookup: int = 0) -> tuple[int, int, int]:
        """Grow the kept greedy continuation towards ``want`` tokens past the first ``n`` (the
        candidate), with at most ``max_steps`` forwards (each may check ``lookup`` looked-up
        tokens); stops at EOS. Returns forwards, looked-up tokens kept, forwards that checked some."""
        steps = accepted = checks = 0
        while len(s.ahead_tokens) - n < want and s.ahead_tokens[-1] not in self._eos_set:
            if len(s.ahead_logits) < len(s.ahead_tokens):
                if steps >= max_steps:
                    break
                kept, checked = self._advance(s, lookup)
                accepted += kept
                checks += checked
                steps += 1
                if s.ahead_tokens[-1] in self._eos_set:
                    break
            self._pick(s, s.ahead_logits[len(s.ahead_tokens) - 1])
        return steps, accepted, checks

    @staticmethod
    def _pick(s: _Session, logits: torch.Tensor) -> tuple[int, float]:
        """The greedy token after ``logits`` and its log-prob, appended to the continuation."""
        token = int(torch.argmax(logits))
        lp = float(torch.log_softmax(logits, -1)[token])
        s.ahead_tokens.append(token)
        s.ahead_lps.append(lp)
        return token, lp

    # ---- M4 ------------------------------------------------------------------------------
    def update_state(self, session_id: str, state_id: str) -> CommitResult:
        """Make a temp state the committed one (by cropping or adopting a cache; no forward).

        Committing a NextText state keeps the greedy tokens generated past it (their KV stays in
        the cache, their logits and log-probs in the session) for the next NextText to reuse;
        scoring and feeding ignore them (they work on the committed prefix), and any other
        commit or a NextText without reuse crops them away.
        """
        with self._session(session_id) as s, torch.inference_mode():
            return self._commit(s, state_id)

    def _commit(self, s: _Session, state_id: str) -> CommitResult:
        """``update_state`` on a locked session (also NextText's ``commit_state_id``)."""
        state = self._state(s, state_id)
        if isinstance(state, _GenState) and state.parts:  # a following segment: one commit per segment
            committed = [self._commit_state(s, part) for part in state.parts]
            return CommitResult(committed[-1].committed_tokens, "".join(c.committed_text for c in committed))
        return self._commit_state(s, state)

    def _commit_state(self, s: _Session, state) -> CommitResult:
        prefix = s.ids[s.n_context :]
        s.fill_until = 0
        if isinstance(state, _GenState):
            n = len(state.tokens)
            in_cache = min(n, len(s.ahead_logits))
            if n == 0:
                next_logits = s.next_logits
            else:
                next_logits = s.ahead_logits[n - 1] if n <= len(s.ahead_logits) else None
            del s.ahead_tokens[:n], s.ahead_lps[:n], s.ahead_logits[:in_cache]
            s.lookahead -= in_cache
            s.fed += in_cache
        elif isinstance(state, _AheadState):
            if s.fed < len(s.ids):  # nothing of the continuation is in the cache
                self._drop_lookahead(s)
            shared = 0
            limit = min(len(state.tokens), len(s.ahead_logits))
            while shared < limit and s.ahead_tokens[shared] == state.tokens[shared]:
                shared += 1
            if s.lookahead > shared:
                self._crop_tail(s.cache, s.lookahead - shared)
            s.lookahead = 0
            whole = shared == len(state.tokens)
            if not whole:
                next_logits = None  # the next call feeds the tokens past ``shared``
            elif shared:
                next_logits = s.ahead_logits[shared - 1]
            else:
                next_logits = s.next_logits
            s.fed = min(s.fed, len(s.ids)) + shared  # the tokens past ``shared`` get fed by the next call
            self._clear_ahead(s)
        elif state.batch is None:  # empty row: nothing to add
            self._drop_lookahead(s)
            next_logits = s.next_logits
        else:
            self._clear_ahead(s)
            s.lookahead = 0  # the adopted copy holds no lookahead
            batch = state.batch
            cache = batch.cache
            if batch.rows > 1:
                cache.batch_select_indices(torch.tensor([state.row], device=self.device))
            pad = batch.width - len(state.tokens)
            if pad:
                cache.crop(-pad)
            s.cache = cache
            s.fed = len(s.ids) + len(state.tokens)
            next_logits = state.next_logits
        self._trim(s)  # sliding layers back to their window (+ kept lookahead)
        s.ids.extend(state.tokens)
        s.next_logits = next_logits
        s.epoch += 1
        s.states.clear()
        text, _pending = self.tokenizer.decode(state.tokens, prefix_ids=prefix)
        s.text += text
        return CommitResult(len(s.ids) - s.n_context, text)

    # ---- close ---------------------------------------------------------------------------
    def close(self, session_id: str) -> bool:
        """Free a session; False when there was none (idempotent)."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            return False
        with s.lock:
            s.closed = True
            s.cache = None
            s.next_logits = None
            s.states.clear()
        self.batcher.forget(session_id)  # no batch waits for a closed session
        return True

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    # ---- session limits ------------------------------------------------------------------
    def stats(self) -> tuple[int, int]:
        """(live sessions, KV bytes over all sessions); unlocked, for gauges and budgets."""
        with self._lock:
            sessions = list(self._sessions.values())
        return len(sessions), sum(self._kv_bytes(s) for s in sessions)

    def reap(self, now: float | None = None) -> list[str]:
        """Free sessions idle longer than ``session_ttl``, then enforce ``max_sessions`` and
        ``kv_budget_bytes`` (LRU idle sessions first). Returns the ids freed."""
        now = time.monotonic() if now is None else now
        freed = []
        if self.session_ttl:
            with self._lock:
                stale = [s for s in self._sessions.values() if now - s.last_used > self.session_ttl]
            for s in stale:
                idle = now - s.last_used
                if self._evict(s, f"expired after {idle:.0f} s idle (session TTL {self.session_ttl:g} s)", now):
                    freed.append(s.id)
        if self.max_sessions:
            freed += self._make_room(self.max_sessions, strict=False)
        if self.kv_budget_bytes:
            freed += self._enforce_budget()
        return freed

    def _lru_idle(self, keep: str | None = None) -> list[_Session]:
        with self._lock:
            sessions = [s for s in self._sessions.values() if s.id != keep]
        return sorted((s for s in sessions if not s.lock.locked()), key=lambda s: s.last_used)

    def _make_room(self, limit: int, strict: bool = True) -> list[str]:
        """Evict LRU idle sessions until at most ``limit`` are live; RESOURCE_EXHAUSTED when
        ``strict`` and every remaining session is in a call."""
        freed = []
        while True:
            with self._lock:
                live = len(self._sessions)
            if live <= limit:
                return freed
            victims = self._lru_idle()
            evicted = next(
                (s for s in victims if self._evict(s, f"was evicted (least recently used; max {self.max_sessions} sessions)")),
                None,
            )
            if evicted is None:
                if strict:
                    raise ResourceExhausted(
                        f"worker {self.name!r} holds {live} sessions (max {self.max_sessions}), all in use; retry later"
                    )
                return freed
            freed.append(evicted.id)

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

    def _evict(self, s: _Session, reason: str, now: float | None = None) -> bool:
        """Free an idle session (False when it is in a call, was used since ``now`` or is gone)."""
        if not s.lock.acquire(blocking=False):
            return False
        try:
            if s.closed or (now is not None and self.session_ttl and now - s.last_used <= self.session_ttl):
                return False
            with self._lock:
                if self._sessions.get(s.id) is not s:
                    return False
                del self._sessions[s.id]
                self._evicted[s.id] = reason
                while len(self._evicted) > EVICTED_MEMORY:
                    self._evicted.popitem(last=False)
            s.closed, s.closed_reason = True, reason
            s.cache = None
            s.next_logits = None
            s.states.clear()
            self._clear_ahead(s)
            self.batcher.forget(s.id)
            log.info("session %s on %s %s", s.id, self.name, reason)
            return True
        finally:
            s.lock.release()

    @staticmethod
    def _kv_bytes(s: _Session) -> int:
        kv = 0
        for layer in getattr(s.cache, "layers", ()) if s.cache is not None else ():
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    kv += t.numel() * t.element_size()
        return kv

    # ---- internals -----------------------------------------------------------------------
    def _session(self, session_id: str):
        with self._lock:
            s = self._sessions.get(session_id)
            reason = self._evicted.get(session_id) if s is None else None
        if reason is not None:
            raise SessionNotFound(f"session {session_id!r} on worker {self.name!r} {reason}")
        if s is None:
            raise SessionNotFound(f"no session {session_id!r} on worker {self.name!r} (closed or never opened)")
        return _Locked(s, self.name)

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = []
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidArgument(f"token id {t!r} out of range for {self.name} (vocab size {self.vocab_size})")
            ids.append(int(t))
        return ids

    def _forward(self, rows: list[list[int]], cache, keep_last: bool) -> torch.Tensor:
        """One forward of equally long rows on ``cache``, called the way ``generate`` calls it."""
        input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        past = cache.get_seq_length()
        kwargs = dict(
            input_ids=input_ids,
            past_key_values=cache,
            attention_mask=torch.ones((input_ids.shape[0], past + input_ids.shape[1]), dtype=torch.long, device=self.device),
            use_cache=True,
            return_dict=True,
        )
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1 if keep_last else 0
        with self._compute:
            return self.model(**kwargs).logits

    def _fill_rows(self, n: int) -> list[_Fill]:
        """Up to ``n`` idle sessions whose greedy continuation may grow by a step (``_Fill``, locked).

        Only right after a NextText (``fill_until``): every committed token is in the cache, the
        continuation's last pick is not forwarded yet and is no EOS."""
        with self._lock:
            sessions = list(self._sessions.values())
        fills = []
        for s in sessions:
            if len(fills) == n:
                break
            if len(s.ahead_tokens) >= s.fill_until or not s.lock.acquire(blocking=False):
                continue
            ready = (
                not s.closed
                and len(s.ahead_tokens) < s.fill_until
                and s.fed == len(s.ids)
                and len(s.ahead_tokens) == len(s.ahead_logits) + 1 == s.lookahead + 1
                and s.ahead_tokens[-1] not in self._eos_set
                and (not self.max_positions or len(s.ids) + s.lookahead + 1 < self.max_positions)
            )
            if ready:
                fills.append(_Fill(s, self._pick))
            else:
                s.lock.release()
        return fills

    def _single_step(self, cache, tokens: list[int], logits_from: int) -> torch.Tensor:
        """One session's forward alone, called exactly as ``generate`` calls it: float32 logits
        after each token from index ``logits_from``."""
        keep_last = logits_from == len(tokens) - 1
        out = self._forward([tokens], cache, keep_last=keep_last)[0]
        return (out[-1:] if keep_last else out[logits_from:]).to(copy=True, dtype=torch.float32)

    def _batched_step(self, caches: list, rows: list[list[int]], logits_from: list[int]) -> list[torch.Tensor]:
        with self._compute:
            return forward_sessions(self.model, caches, rows, logits_from, self.device)

    def _ready(self, s: _Session) -> torch.Tensor:
        """Next logits of the committed state, forwarding a committed-but-unfed last token first."""
        if s.fed < len(s.ids):
            assert s.lookahead == 0, "unfed committed tokens with lookahead in the cache"
            # One forward, alone or sharing a batch with other sessions' forwards.
            s.next_logits = self.batcher.run(s.cache, s.ids[s.fed :], owner=s.id)[0]
            s.fed = len(s.ids)
        return s.next_logits

    def _drop_gen_states(self, s: _Session) -> None:
        for key in [k for k, v in s.states.items() if isinstance(v, _GenState)]:
            del s.states[key]

    @staticmethod
    def _clear_ahead(s: _Session) -> None:
        s.ahead_tokens.clear()
        s.ahead_lps.clear()
        s.ahead_logits.clear()

    def _drop_lookahead(self, s: _Session) -> None:
        """Crop the greedy lookahead from the session cache (NextText states die)."""
        if s.lookahead:
            s.cache.crop(-s.lookahead)
            s.cache.crop(0)
            s.lookahead = 0
        self._clear_ahead(s)
        self._drop_gen_states(s)

    def _trim(self, s: _Session) -> None:
        """After a commit: sliding-window layers keep window - 1 states plus the kept lookahead
        (so that it can still be cropped away), like ``crop(0)`` does without lookahead."""
        if not s.lookahead:
            s.cache.crop(0)
            return
        for layer in getattr(s.cache, "layers", ()):
            window = getattr(layer, "sliding_window", None)
            if not getattr(layer, "is_sliding", False) or not window or not getattr(layer, "is_initialized", False):
                continue
            keep = window - 1 + s.lookahead
            if layer.keys.shape[-2] > keep:
                layer.keys = layer.keys[:, :, -keep:, :]
                layer.values = layer.values[:, :, -keep:, :]

    def session_bytes(self, session_id: str) -> dict:
        """Memory held by a session: KV cache tensors and kept logits, in bytes."""
        with self._session(session_id) as s:
            kv = self._kv_bytes(s)
            logits = sum(t.numel() * t.element_size() for t in s.ahead_logits)
            if s.next_logits is not None:
                logits += s.next_logits.numel() * s.next_logits.element_size()
            return {"kv_bytes": kv, "logits_bytes": logits, "tokens": len(s.ids), "lookahead": s.lookahead}

    def _committed_copy(self, s: _Session):
        """A copy of the session cache holding exactly the committed tokens."""
        cache = copy.deepcopy(s.cache)
        if s.lookahead:
            cache.crop(-s.lookahead)
        return cache

    def _score_rows(self, s: _Session, rows: list[list[int]]) -> list[tuple[str, list[float]]]:
        """Forward all non-empty rows (right-padded) in one batch on the committed state.

        Returns (state_id, logprobs) per row; empty rows get no logprobs.
        """
        first = torch.log_softmax(self._ready(s), -1)
        live = [i for i, r in enumerate(rows) if r]
        results: list[tuple[str, list[float]]] = [("", [])] * len(rows)
        if live:
            width = max(len(rows[i]) for i in live)
            pad_id = self.eos_token_id if self.eos_token_id is not None else 0
            batch_rows = [rows[i] + [pad_id] * (width - len(rows[i])) for i in live]
            cache = self._committed_copy(s)
            if len(live) > 1:
                cache.batch_repeat_interleave(len(live))
            if len(live) == 1:  # one row may share a batch with other sessions' forwards
                logits = self.batcher.run(cache, batch_rows[0], 0, owner=s.id)[None]
            else:
                logits = self._forward(batch_rows, cache, keep_last=False)
            batch = _Batch(cache, width, len(live))
            for b, i in enumerate(live):
                ids = rows[i]
                row_logits = logits[b, : len(ids)].float()
                lps = [float(first[ids[0]])]
                if len(ids) > 1:
                    tail = torch.log_softmax(row_logits[:-1], -1)
                    lps += tail.gather(1, torch.tensor(ids[1:], device=tail.device)[:, None])[:, 0].tolist()
                state = _RowState(s.epoch, batch, b, list(ids), row_logits[-1].clone())
                results[i] = (self._new_state(s, state), lps)
            del logits
        for i, r in enumerate(rows):
            if not r:
                results[i] = (self._new_state(s, _RowState(s.epoch, None, -1, [], None)), [])
        return results

    def _new_state(self, s: _Session, state) -> str:
        state_id = f"{s.epoch}.{next(s.counter)}"
        s.states[state_id] = state
        return state_id

    def _state(self, s: _Session, state_id: str):
        state = s.states.get(state_id)
        if state is not None:
            return state
        epoch, dot, _ = str(state_id).partition(".")
        if dot and epoch.isdigit() and int(epoch) < s.epoch:
            raise StateError(
                f"state {state_id!r} of session {s.id!r} is stale: the session committed another state since"
            )
        if dot and epoch.isdigit() and int(epoch) == s.epoch:
            raise StateError(
                f"state {state_id!r} of session {s.id!r} is no longer valid (superseded by a later NextText) or unknown"
            )
        raise StateError(f"unknown state {state_id!r} for session {s.id!r}")


class _Locked:
    """``with self._session(id) as s``: the session, locked; NOT_FOUND when closed meanwhile."""

    def __init__(self, session: _Session, worker: str):
        self.session = session
        self.worker = worker

    def __enter__(self) -> _Session:
        self.session.lock.acquire()
        if self.session.closed:
            self.session.lock.release()
            raise SessionNotFound(f"session {self.session.id!r} on worker {self.worker!r} {self.session.closed_reason}")
        return self.session

    def __exit__(self, *exc) -> None:
        self.session.last_used = time.monotonic()
        self.session.lock.release()
