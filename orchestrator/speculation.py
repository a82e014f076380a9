"""Bookkeeping of speculation across models (switches ``speculate`` and ``follow_segments``).

The drafter (the model with the fewest parameters) keeps its greedy text past its candidate; the
loop hands that draft to the other models' next NextText, where it is checked in their own tokens.
When the candidates of a round are identical, the segments past them that every model's kept
continuation already decided alike ("following" segments) are committed in the same round.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from ..services.worker.results import NextTextResult
from .results import CandidateReport, Segment, apply_rule, ppl_of
from .rules import ScoreRule
from .workers import WorkerHandle


class ModelSizes:
    """Each model's parameter count (``Info.parameters``), asked once per model; a failed or
    silent Info is asked again next time."""

    def __init__(self, workers: Mapping[str, WorkerHandle]):
        self.workers = workers
        self.parameters: dict[str, float] = {}

    async def smallest(self, names: Sequence[str]) -> str | None:
        """The drafter: the fewest parameters (config order on ties); None with fewer than two models."""
        if len(names) < 2:
            return None
        unknown = [n for n in names if n not in self.parameters]
        infos = await asyncio.gather(*(self.workers[n].info() for n in unknown), return_exceptions=True)
        for n, info in zip(unknown, infos):
            size = getattr(info, "parameters", 0) if not isinstance(info, BaseException) else 0
            if size:
                self.parameters[n] = size
        return min(names, key=lambda n: self.parameters.get(n, math.inf))


class Speculation:
    """What the fusion loops share of speculation: who drafts (the smallest model) and how many
    loops run now; speculation pauses while more than ``max_active`` run."""

    def __init__(self, sizes: ModelSizes, max_active: int):
        self.sizes, self.max_active, self.active = sizes, max_active, 0

    def allowed(self) -> bool:
        return self.active <= self.max_active

    @contextmanager
    def running(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


def agreed_following(proposals: Sequence[NextTextResult], budgets: Sequence[int], max_segment_tokens: int) -> int:
    """How many of the following segments (after identical candidates) every model decided alike,
    each within the token cap that round would have had (its NextText stops at the cap first
    when the segment took more tokens to decide); ``budgets``: each model's tokens left before this round."""
    left = [budget - len(p.token_ids) for budget, p in zip(budgets, proposals)]
    agreed = 0
    while all(agreed < len(p.following) for p in proposals):
        segs = [p.following[agreed] for p in proposals]
        if len({f.text for f in segs}) != 1:
            break
        if any(f.generated_tokens > min(max_segment_tokens, room) for f, room in zip(segs, left)):
            break
        left = [room - len(f.token_ids) for room, f in zip(left, segs)]
        agreed += 1
    return agreed


def following_segments(
    names: Sequence[str], proposals: Sequence[NextTextResult], followed: int, first_index: int, rule: ScoreRule
) -> list[Segment]:
    """The ``followed`` segments committed after identical candidates; each model's PPL of one is
    its own generation's (no scoring call), and the first model is named as its author."""
    segments = []
    for k in range(followed):
        segs = [p.following[k] for p in proposals]
        ppls = {v: (ppl_of(f.logprobs), len(f.token_ids)) for v, f in zip(names, segs)}
        logprobs = {v: sum(f.logprobs) for v, f in zip(names, segs)}
        reports = [
            CandidateReport(u, f.text, False, "boundary", ppls, f.lookahead, logprobs) for u, f in zip(names, segs)
        ]
        apply_rule(rule, reports)
        segments.append(Segment(first_index + k, segs[0].text, names[0], False, segs[0].token_ids, reports))
    return segments


def draft_after_commit(
    drafter: str | None,
    live: Sequence[str],
    names: Sequence[str],
    proposals: Sequence[NextTextResult],
    kept_own: Sequence[bool],
    followed: int,
) -> str:
    """The drafter's greedy text past what was just committed: its draft is still its greedy
    continuation only if it kept its own state (and past the following segments committed too).
    ``live``: the models still fusing; ``names``: who proposed ``proposals``, in order."""
    if drafter is None or drafter not in live:
        return ""
    d = list(names).index(drafter)
    if not kept_own[d]:
        return ""
    draft = proposals[d].draft
    if draft and followed:
        past = "".join(f.text for f in proposals[d].following[:followed])
        draft = draft[len(past) :] if draft.startswith(past) else ""
    return draft
