"""What the worker core's calls return (paper Table 1: M1-M4, T1 and batched scoring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


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
