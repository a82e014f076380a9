"""Temp states of a session and committing them (paper M4).

Calls that look ahead create *temp states* (ids returned to the caller) that ``commit`` makes the
committed state without another forward:

* NextText generates into the session cache itself (the tokens past the committed ones are
  "lookahead"); committing its state keeps committed + candidate tokens and, by default, the
  lookahead beyond them (KV, logits, log-probs) for the next NextText to replay instead of
  recomputing (``reuse_lookahead``); any other commit drops it by cropping (never a cache copy).
* FeedTokens / ScoreCandidates run on a copy of the committed cache; committing one of their rows
  adopts that copy (row selected, right padding cropped).

Committing any state invalidates every other temp state of the session; a new NextText
invalidates the previous NextText state (its lookahead is cropped away). Using an invalidated
state raises :class:`StateError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import StateError
from .forward import crop_tail, trim
from .logits import Logits
from .results import CommitResult
from .sessions import Session


@dataclass
class GenState:
    """A NextText candidate; its forwarded tokens sit in the session cache as lookahead."""

    epoch: int
    gen: int
    tokens: list[int]
    logprobs: list[float]  # of ``tokens``, from the generation steps (reused by score_candidates)
    parts: tuple = ()  # following segments: the GenStates committed one after the other


@dataclass
class RowBatch:
    """The cache of one batched forward (FeedTokens: one row; ScoreCandidates: one row per candidate)."""

    cache: object
    width: int  # padded row length
    rows: int


@dataclass
class RowState:
    epoch: int
    batch: RowBatch | None  # None for an empty row
    row: int
    tokens: list[int]
    next_logits: Logits | None  # None for an empty row


@dataclass
class AheadState:
    """A scored candidate whose log-probs all came from the session's greedy continuation (its
    tokens but the last are a prefix of it): committing keeps the shared tokens' KV and leaves the
    rest committed but not yet fed (the next call forwards them)."""

    epoch: int
    tokens: list[int]


def new_state(s: Session, state) -> str:
    state_id = f"{s.epoch}.{next(s.counter)}"
    s.states[state_id] = state
    return state_id


def find_state(s: Session, state_id: str):
    state = s.states.get(state_id)
    if state is not None:
        return state
    epoch, dot, _ = str(state_id).partition(".")
    if dot and epoch.isdigit() and int(epoch) < s.epoch:
        raise StateError(f"state {state_id!r} of session {s.id!r} is stale: the session committed another state since")
    if dot and epoch.isdigit() and int(epoch) == s.epoch:
        raise StateError(
            f"state {state_id!r} of session {s.id!r} is no longer valid (superseded by a later NextText) or unknown"
        )
    raise StateError(f"unknown state {state_id!r} for session {s.id!r}")


def drop_gen_states(s: Session) -> None:
    for key in [k for k, v in s.states.items() if isinstance(v, GenState)]:
        del s.states[key]


def drop_lookahead(s: Session) -> None:
    """Crop the greedy lookahead from the session cache (NextText states die)."""
    if s.lookahead:
        s.cache.crop(-s.lookahead)
        s.cache.crop(0)
        s.lookahead = 0
    s.clear_ahead()
    drop_gen_states(s)


def commit(s: Session, state_id: str, tokenizer, device) -> CommitResult:
    """Make a temp state of the locked session ``s`` the committed one (UpdateState, and
    NextText's ``commit_state_id``); ``tokenizer`` decodes the committed text."""
    state = find_state(s, state_id)
    if isinstance(state, GenState) and state.parts:  # a following segment: one commit per segment
        committed = [_commit_one(s, part, tokenizer, device) for part in state.parts]
        return CommitResult(committed[-1].committed_tokens, "".join(c.committed_text for c in committed))
    return _commit_one(s, state, tokenizer, device)


def _commit_one(s: Session, state, tokenizer, device) -> CommitResult:
    prefix = s.ids[s.n_context :]
    s.fill_until = 0
    if isinstance(state, GenState):
        next_logits = _keep_generated(s, state)
    elif isinstance(state, AheadState):
        next_logits = _keep_continuation(s, state)
    elif state.batch is None:  # empty row: nothing to add
        drop_lookahead(s)
        next_logits = s.next_logits
    else:
        next_logits = _adopt_row(s, state, device)
    trim(s)  # sliding layers back to their window (+ kept lookahead)
    s.ids.extend(state.tokens)
    s.next_logits = next_logits
    s.epoch += 1
    s.states.clear()
    text, _pending = tokenizer.decode(state.tokens, prefix_ids=prefix)
    s.text += text
    return CommitResult(len(s.ids) - s.n_context, text)


def _keep_generated(s: Session, state: GenState) -> Logits | None:
    """A NextText candidate: its tokens leave the lookahead; the rest stays for the next call."""
    n = len(state.tokens)
    in_cache = min(n, len(s.ahead_logits))
    if n == 0:
        next_logits = s.next_logits
    else:
        next_logits = s.ahead_logits[n - 1] if n <= len(s.ahead_logits) else None
    del s.ahead_tokens[:n], s.ahead_lps[:n], s.ahead_logits[:in_cache]
    s.lookahead -= in_cache
    s.fed += in_cache
    return next_logits


def _keep_continuation(s: Session, state: AheadState) -> Logits | None:
    """A candidate scored from the continuation: the KV of the tokens it shares with the
    continuation stays, the rest of the continuation is cropped away."""
    if s.fed < len(s.ids):  # nothing of the continuation is in the cache
        drop_lookahead(s)
    shared = 0
    limit = min(len(state.tokens), len(s.ahead_logits))
    while shared < limit and s.ahead_tokens[shared] == state.tokens[shared]:
        shared += 1
    if s.lookahead > shared:
        crop_tail(s.cache, s.lookahead - shared)
    s.lookahead = 0
    whole = shared == len(state.tokens)
    if not whole:
        next_logits = None  # the next call feeds the tokens past ``shared``
    elif shared:
        next_logits = s.ahead_logits[shared - 1]
    else:
        next_logits = s.next_logits
    s.fed = min(s.fed, len(s.ids)) + shared  # the tokens past ``shared`` get fed by the next call
    s.clear_ahead()
    return next_logits


def _adopt_row(s: Session, state: RowState, device) -> Logits | None:
    """A scored or fed row: its batch's cache becomes the session's (row selected, padding cropped)."""
    s.clear_ahead()
    s.lookahead = 0  # the adopted copy holds no lookahead
    batch = state.batch
    cache = batch.cache
    if batch.rows > 1:
        _select_row(cache, state.row, device)
    pad = batch.width - len(state.tokens)
    if pad:
        cache.crop(-pad)
    s.cache = cache
    s.fed = len(s.ids) + len(state.tokens)
    return state.next_logits


def _select_row(cache, row: int, device) -> None:
    """Keep one row of a batch's cache: a backend's own cache (llama.cpp) takes the row number, a
    transformers cache indexes its tensors with a tensor on their ``device``."""
    if hasattr(cache, "crop_tail"):
        cache.batch_select_indices([row])
        return
    import torch

    cache.batch_select_indices(torch.tensor([row], device=device))
