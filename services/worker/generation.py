"""NextText (paper T1): generation (greedy, or sampled: ``sampling.py``) from the committed state
to a word boundary.

Generation stops at the first boundary b common to the tokenizers (candidate = text[:b] and the
tokens whose text ends at b; tokens past b are lookahead, not part of the candidate), at an EOS
token (candidate = all complete text, EOS included in the ids, ``eos=True``) or after
``max_tokens`` tokens (``finish="budget"``; 0 means the worker's ``segment_cap``,
``finish="segment_cap"``). A capped candidate is cut at the last token that ends on a complete
character. The options (``api.NextTextOptions``) say what else a call does: replay kept
lookahead, check another model's draft or looked-up tokens in the forwards it makes
(``drafting.py``), extend the drafter's continuation, commit the previous segment first, report
the following segments its kept continuation already decides.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..common.errors import InvalidArgument
from ..tokenizer.core import IncrementalDecoder
from .api import NextTextOptions, Sampling
from .drafting import Drafts
from .forward import Forwards
from .loading import LoadedModel
from .results import FollowingSegment, NextTextResult
from .sessions import Session
from .states import GenState, commit, drop_gen_states, drop_lookahead, new_state

BoundaryFn = Callable[[str, str, list, list], "int | None"]

CONTEXT_TAIL_CHARS = 64  # context given to the boundary check
DEFAULT_SEGMENT_CAP = 256  # tokens per next_text call when the caller gives no max_tokens
# Speculative verification (NextText ``draft_text``): the picked token and up to VERIFY_CHUNK - 1
# draft tokens in one forward. Every position's logits are kept, which a large LM head makes dear,
# and the drafter is only about a token ahead, so longer chunks verified no more draft tokens and
# made fusion slower (docs/performance.md).
VERIFY_CHUNK = 3
# Drafting (NextText ``draft_tokens``): the drafter's call spends at most this many forwards in
# all, its own generation included, so drafting fills the calls that replayed their candidate and
# a call that first has to feed another model's winning candidate (the segment's slowest) drafts
# nothing. A fixed draft step per call was slower, and so was a budget of 3: the drafter loses its
# lead whenever another model's candidate wins (docs/performance.md).
DRAFT_CALL_FORWARDS = 2
MAX_DRAFT_TOKENS = 64
MAX_FOLLOW_SEGMENTS = 64
MAX_LOOKUP_TOKENS = 16
BOUNDARY_MEMO = 1024  # boundary checks remembered (following-segment scans ask them again)


def check_options(options: NextTextOptions) -> None:
    """INVALID_ARGUMENT for options out of range."""
    o = options
    if not isinstance(o.max_tokens, int) or o.max_tokens < 0:
        raise InvalidArgument(f"max_tokens must be >= 0, got {o.max_tokens!r}")
    if not isinstance(o.draft_tokens, int) or not 0 <= o.draft_tokens <= MAX_DRAFT_TOKENS:
        raise InvalidArgument(f"draft_tokens must be in [0, {MAX_DRAFT_TOKENS}], got {o.draft_tokens!r}")
    if not isinstance(o.draft_text, str):
        raise InvalidArgument("draft_text must be a string")
    if not isinstance(o.follow_segments, int) or not 0 <= o.follow_segments <= MAX_FOLLOW_SEGMENTS:
        raise InvalidArgument(f"follow_segments must be in [0, {MAX_FOLLOW_SEGMENTS}], got {o.follow_segments!r}")
    if not isinstance(o.lookup_tokens, int) or not 0 <= o.lookup_tokens <= MAX_LOOKUP_TOKENS:
        raise InvalidArgument(f"lookup_tokens must be in [0, {MAX_LOOKUP_TOKENS}], got {o.lookup_tokens!r}")
    if not isinstance(o.sampling, Sampling) or (problem := o.sampling.check()):
        raise InvalidArgument(problem or "sampling must be a Sampling")


class BoundaryMemo:
    """``boundary`` with a small memo (it is a pure function of its arguments): a following-
    segment scan asks what the next NextText's candidate search asks again when the segment
    is not committed with the candidate (same committed tail, same tokens)."""

    def __init__(self, boundary: BoundaryFn):
        self.boundary = boundary
        self._memo: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, tail: str, text: str, tokenizer_ids: list, ends: list) -> int | None:
        key = (tail, text, tuple(tokenizer_ids), tuple(ends))
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        b = self.boundary(tail, text, tokenizer_ids, ends)
        with self._lock:
            self._memo[key] = b
            while len(self._memo) > BOUNDARY_MEMO:
                self._memo.popitem(last=False)
        return b


class SegmentScan:
    """NextText's candidate search over picked tokens, decoded from the committed text ``text`` on:
    ``push`` returns ``(n, text, finish)`` at the first word boundary common to the tokenizers
    (``n`` candidate tokens), at an EOS token, or at the ``limit``-th token (cut at the last
    complete character; ``cap_finish``), else None."""

    def __init__(self, gen: Generator, text: str, tokenizer_ids: list, limit: int, cap_finish: str):
        self.gen = gen
        self.tail = text[-CONTEXT_TAIL_CHARS:]
        self.tokenizer_ids = tokenizer_ids
        self.limit = limit
        self.cap_finish = cap_finish
        self.decoder = IncrementalDecoder(gen.tokenizer)
        self.pushed = 0
        self.boundary_s = 0.0

    def push(self, token: int) -> tuple[int, str, str] | None:
        decoder = self.decoder
        self.pushed += 1
        grew = bool(decoder.push(token))
        if token in self.gen.eos:
            return self.pushed, decoder.text, "eos"
        # A boundary can only change when text grew; it must be a token end (0 < b < len).
        ends = [e for e in decoder.token_ends if 0 < e < len(decoder.text)] if grew else []
        if ends:
            t_b = time.perf_counter()
            b = self.gen.boundary(self.tail, decoder.text, self.tokenizer_ids, ends)
            self.boundary_s += time.perf_counter() - t_b
            if b is not None:
                if b not in decoder.token_ends:
                    raise RuntimeError(f"boundary {b} is not a token end (allowed: {ends})")
                return decoder.token_ends.index(b) + 1, decoder.text[:b], "boundary"
        if self.pushed >= self.limit:
            n = max((i + 1 for i, e in enumerate(decoder.token_ends) if e >= 0), default=0)
            return n, decoder.text[: decoder.token_ends[n - 1]] if n else "", self.cap_finish
        return None


@dataclass
class _Call:
    """One NextText: its options as resolved for this worker, and what it spent."""

    options: NextTextOptions
    reuse: bool  # replay the kept lookahead
    draft: list[int]  # the other model's draft in this tokenizer's ids ([] once it diverged)
    tokenizer_ids: list
    limit: int  # tokens in the segment at most
    cap_finish: str  # the finish of a segment cut at ``limit``
    forwards: int = 0
    reused: int = 0
    verified: int = 0
    verify_forwards: int = 0
    looked: int = 0
    lookup_forwards: int = 0


class Generator:
    """NextText for one worker. ``reuse_lookahead``: the default of the per-call option;
    ``fill_ahead``: after a boundary candidate, batches may grow the session's kept continuation
    up to this many tokens past the candidate (and its following segments) while it is idle."""

    def __init__(
        self,
        loaded: LoadedModel,
        forwards: Forwards,
        boundary: BoundaryFn,
        segment_cap: int,
        reuse_lookahead: bool,
        fill_ahead: int,
    ):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.eos = loaded.eos_set
        self.forwards = forwards
        self.drafts = Drafts(forwards, self.eos)
        self.boundary = BoundaryMemo(boundary)
        self.segment_cap = segment_cap
        self.reuse_lookahead = reuse_lookahead
        self.fill_ahead = fill_ahead

    def prepare(self, options: NextTextOptions) -> _Call:
        """Check the options and resolve them for this worker (before the session is locked)."""
        check_options(options)
        if options.lookup_tokens and not self.forwards.cheap_rows:
            # Looked-up tokens ride along only where a forward's extra rows cost little.
            options = replace(options, lookup_tokens=0)
        reuse = self.reuse_lookahead if options.reuse_lookahead is None else bool(options.reuse_lookahead)
        draft = self.tokenizer.encode_ids(options.draft_text, continuation=True) if options.draft_text and reuse else []
        max_tokens = options.max_tokens
        limit = self.segment_cap if max_tokens == 0 else min(max_tokens, self.segment_cap)
        cap_finish = "budget" if 0 < max_tokens <= self.segment_cap else "segment_cap"
        tokenizer_ids = list(options.boundary_tokenizer_ids) or [self.tokenizer.id]
        return _Call(options, reuse, draft, tokenizer_ids, limit, cap_finish)

    def run(self, s: Session, call: _Call, draft_forwards: int) -> NextTextResult:
        """The NextText ``call`` on the locked session ``s``; a drafter's call spends at most
        ``draft_forwards`` forwards in all."""
        t_start = time.perf_counter()
        options = call.options
        if options.commit_state_id:
            commit(s, options.commit_state_id, self.tokenizer, self.loaded.device)
        if call.reuse and s.sampling == options.sampling:
            drop_gen_states(s)
        else:  # also when the kept continuation was picked under other sampling settings
            drop_lookahead(s)
            s.sampling = options.sampling
        s.gen += 1
        self._feed_committed(s, call)
        found, tokens, logprobs, scan = self._scan(s, call)
        n, text, finish = found
        drafted, draft_out = self._draft(s, call, found, scan, draft_forwards)
        state = GenState(s.epoch, s.gen, tokens[:n], logprobs[:n])
        state_id = new_state(s, state)
        following, follow_boundary_s = [], 0.0
        if options.follow_segments and call.reuse and finish == "boundary":
            following, follow_boundary_s = self._following(s, state, call, options.follow_segments)
        boundary_s = scan.boundary_s + follow_boundary_s
        # While the caller waits for the other models, batches may grow the continuation.
        ahead = n + sum(len(f.token_ids) for f in following)
        s.fill_until = ahead + self.fill_ahead if call.reuse and finish == "boundary" else 0
        return NextTextResult(
            state_id=state_id,
            text=text,
            token_ids=tokens[:n],
            logprobs=logprobs[:n],
            eos=finish == "eos",
            finish=finish,
            generated_tokens=len(tokens),
            lookahead=scan.decoder.text[len(text) :],
            reused_tokens=call.reused,
            boundary_s=boundary_s,
            compute_s=time.perf_counter() - t_start - boundary_s,
            draft=draft_out,
            drafted_tokens=drafted,
            verified_tokens=call.verified,
            verify_forwards=call.verify_forwards,
            lookup_accepted=call.looked,
            lookup_forwards=call.lookup_forwards,
            following=following,
        )

    def _feed_committed(self, s: Session, call: _Call) -> None:
        """Committed tokens not in the cache yet (another model's candidate won) are fed now; the
        same forward checks the draft's first tokens, or looked-up ones."""
        if s.fed >= len(s.ids):
            return
        call.forwards = 1
        lookup = call.options.lookup_tokens
        if call.draft:
            call.verified += self.drafts.ready_verifying(s, call.draft[: VERIFY_CHUNK - 1])
            call.verify_forwards += 1
        elif lookup and (proposed := self.drafts.lookup(s.ids, lookup)):
            call.looked += self.drafts.ready_verifying(s, proposed)
            call.lookup_forwards += 1

    def _scan(self, s: Session, call: _Call) -> tuple[tuple[int, str, str], list[int], list[float], SegmentScan]:
        """Greedy tokens (replayed from the kept continuation, else picked) until the scan finds
        the candidate: (n, text, finish), the tokens and log-probs picked, the scan."""
        logits = self.forwards.ready(s)
        scan = SegmentScan(self, s.text, call.tokenizer_ids, call.limit, call.cap_finish)
        tokens: list[int] = []
        logprobs: list[float] = []
        kept = len(s.ahead_tokens)  # continuation known before this call (replays count as reused)
        j = 0  # index into the session's greedy continuation (s.ahead_*)
        while True:
            if j < len(s.ahead_tokens):
                token, lp = s.ahead_tokens[j], s.ahead_lps[j]
                call.reused += j < kept
            else:
                token, lp = s.pick(logits)
            tokens.append(token)
            logprobs.append(lp)
            found = scan.push(token)
            if found:
                return found, tokens, logprobs, scan
            # Like generate(): a picked token is forwarded only when generation goes on.
            if j >= len(s.ahead_logits):
                self._step(s, call, j)
            logits = s.ahead_logits[j]
            j += 1

    def _step(self, s: Session, call: _Call, j: int) -> None:
        """Forward the pick ``ahead_tokens[j]``, with the next draft tokens while the draft agrees
        with every pick so far, else with looked-up tokens (or alone)."""
        draft = call.draft
        if draft and len(draft) > j + 1 and draft[: j + 1] == s.ahead_tokens[: j + 1]:
            call.verified += self.drafts.verify(s, draft[j + 1 : j + VERIFY_CHUNK])
            call.verify_forwards += 1
        else:
            call.draft = []  # diverged: the rest of the draft cannot be this model's greedy text
            accepted, checked = self.drafts.advance(s, call.options.lookup_tokens)
            call.looked += accepted
            call.lookup_forwards += checked
        call.forwards += 1

    def _draft(self, s: Session, call: _Call, found: tuple, scan: SegmentScan, max_forwards: int) -> tuple[int, str]:
        """Drafter (``draft_tokens``): grow the continuation past the candidate ``found`` with the
        forwards left of ``max_forwards``, and decode it (up to an EOS) into the scan's decoder.
        Returns the forwards spent and the complete text past the candidate ("" after an EOS)."""
        options = call.options
        if not (options.draft_tokens and call.reuse):
            return 0, ""
        n, text, finish = found
        drafted, accepted, checks = self.drafts.extend(
            s, n, options.draft_tokens, max_forwards - call.forwards, options.lookup_tokens
        )
        call.looked += accepted
        call.lookup_forwards += checks
        decoder = scan.decoder
        for token in s.ahead_tokens[scan.pushed :]:
            if token in self.eos:
                break
            decoder.push(token)
        return drafted, decoder.text[len(text) :] if finish != "eos" else ""

    def _following(self, s: Session, state: GenState, call: _Call, count: int) -> tuple[list[FollowingSegment], float]:
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
            scan = SegmentScan(self, text, call.tokenizer_ids, call.limit, "cap")
            found, j = None, start
            while not found:
                if j == len(s.ahead_tokens):
                    if len(s.ahead_logits) < j:
                        break  # the last pick is not forwarded yet
                    s.pick(s.ahead_logits[j - 1])  # the pick the next NextText makes from kept logits
                found = scan.push(s.ahead_tokens[j])
                j += 1
            boundary_s += scan.boundary_s
            if not found or found[2] != "boundary":
                break  # undecided without a forward, EOS or the cap: the next NextText's to find
            n = found[0]
            tokens, logprobs = s.ahead_tokens[start : start + n], s.ahead_lps[start : start + n]
            parts.append(GenState(s.epoch, s.gen, tokens, logprobs))
            whole = GenState(
                s.epoch,
                s.gen,
                [t for p in parts for t in p.tokens],
                [x for p in parts for x in p.logprobs],
                tuple(parts),
            )
            out.append(
                FollowingSegment(
                    state_id=new_state(s, whole),
                    text=found[1],
                    token_ids=tokens,
                    logprobs=logprobs,
                    generated_tokens=scan.pushed,
                    lookahead=scan.decoder.text[len(found[1]) :],
                )
            )
            text += self.tokenizer.decode(tokens, prefix_ids=prefix)[0]
            prefix = prefix + tokens
            start += n
        return out, boundary_s
