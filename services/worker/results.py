"""What the worker core's calls return (paper Table 1: M1-M4, T1 and batched scoring).

Plain Python without torch: the orchestrator's worker handles return these same types (its image
has no torch), converted from the protos by ``wire.py``, whose field names they share.
"""

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


class CandidateScores(list[CandidateScore]):
    """A ScoreCandidates reply: one ``CandidateScore`` per candidate, in order. ``compute_s``: the
    worker's time in the call, which the servicer measures around the core's call (the core itself
    returns a plain list)."""

    compute_s: float = 0.0


class FollowingSegment(NamedTuple):
    """A segment that the next NextText would return once the one before it is committed, already
    decided by the kept greedy continuation (no forward); committing ``state_id`` commits it and
    every segment before it, one after the other."""

    state_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    generated_tokens: int  # tokens that decided it, lookahead included (that NextText's generated_tokens)
    lookahead: str = ""  # complete text decided past it


class CommitResult(NamedTuple):
    committed_tokens: int  # output tokens committed so far (after the context)
    committed_text: str  # text this commit appended
    # The worker's time in the call: the servicer measures it around the core's call (the core leaves 0).
    compute_s: float = 0.0


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
    # ``follow_segments``: the next segments the kept continuation already decides.
    following: list[FollowingSegment] = field(default_factory=list)


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(-mean logprob); inf for no tokens."""
    if not logprobs:
        return math.inf
    return math.exp(-sum(logprobs) / len(logprobs))


@dataclass(frozen=True)
class TextDistributions:
    """The Distributions RPC's answer for one text (``distributions.py``; the wire's
    ``TextDistribution``): per token of the worker's own tokenization, the distribution that
    predicted it. Plain Python (no torch), so that clients and shard writers can hold it.

    ``topk_ids[t]`` / ``topk_logprobs[t]``: the ``top_k`` most likely ids at token t, most likely
    first, with log-probs normalized over the whole vocabulary (their ``exp`` sums to the kept
    mass). ``starts``/``ends``: UTF-8 byte spans in the text. ``window_starts``: token indices
    where a fresh context window starts (``[0]`` for a text that fits the context; empty for a
    text with no tokens)."""

    text_index: int
    token_ids: list[int]
    starts: list[int]
    ends: list[int]
    gold_logprobs: list[float]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    n_bytes: int
    window_starts: list[int]

    @property
    def ce(self) -> float:
        """Mean cross-entropy per token on the text (nats); 0 for no tokens."""
        return -sum(self.gold_logprobs) / len(self.gold_logprobs) if self.gold_logprobs else 0.0

    @property
    def nll_per_byte(self) -> float:
        """Negative log-likelihood of the text per UTF-8 byte (nats; comparable across tokenizers)."""
        return -sum(self.gold_logprobs) / self.n_bytes if self.n_bytes else 0.0
