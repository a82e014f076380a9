"""The Cool-Fusion loop (paper section 2), over any set of ``WorkerHandle``s.

One iteration produces one fused text segment:

1. Propose (2.2): every model u generates from its committed state until its decoded text
   reaches a word boundary common to all tokenizers; that text is its candidate s_u. It stops
   early at EOS (the candidate then means "stop here"), or at its token cap.
2. Score (2.3): every model v scores every candidate with its own tokenizer on top of its KV
   cache, PPL_v(s_u) = exp(mean NLL); an EOS candidate is scored with v's own EOS appended.
   One batched call per worker, one row per distinct candidate; no call at all when every
   candidate is the same (each model's PPL of it is then its generation's).
3. Choose: s* by the request's scoring rule (``rules.py``); the paper's is ``mean-ppl``,
   s* = argmin_u (1/k) sum_v PPL_v(s_u) (eq. 3); ties go to the first model.
4. Commit (M4): every model adopts the state that holds exactly s* - its own generated tokens
   when its candidate is s*, otherwise the state it built while scoring s*. Nothing is
   re-encoded from the start.
5. Emit s* to the caller, holding back a tail that may still become a stop sequence (``stops.py``).

Stop when s* carries EOS, a stop sequence appears, or a model's output reaches
``max_new_tokens`` of its own tokens. Around the loop: ``engine.py`` (request checks, sessions,
modes), the performance switches (``options.py``), speculation across models (``speculation.py``),
dropping a failed worker (``degraded.py``) and the rerank modes (``rerank.py``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..services.worker.api import NextTextOptions
from ..services.worker.results import CandidateScore, NextTextResult
from .degraded import NEVER, Degraded, Dropping, gather_live
from .options import DRAFT_TOKENS, FOLLOW_SEGMENTS, LOOKUP_TOKENS, FusionOptions
from .request import FusionRequest
from .results import CandidateReport, Segment, Timings, Usage, apply_rule, own_score, scored_report
from .rules import ScoreRule
from .sessions import close_sessions, open_sessions
from .speculation import Speculation, agreed_following, draft_after_commit, following_segments
from .stops import HeldOutput
from .turns import TurnEnds
from .workers import WorkerHandle


@dataclass
class FusionContext:
    """What a fused generation needs of its surroundings: the workers, the default options, the
    speculation shared by the generations running now, and the models' turn ends."""

    workers: Mapping[str, WorkerHandle]
    options: FusionOptions
    speculation: Speculation
    turns: TurnEnds


async def fuse(
    ctx: FusionContext,
    request: FusionRequest,
    rule: ScoreRule,
    names: Sequence[str],
    usage: dict[str, Usage],
    timings: Timings,
    align: bool = True,
    dropping: Dropping = NEVER,
) -> AsyncIterator[Segment | tuple[str, str]]:
    """One fused generation over new sessions (one name: that model alone); a chat request
    also stops where any of the models' turn ends (``turns.py``)."""
    request = await ctx.turns.request_for(request, list(names))
    sessions = await open_sessions(ctx.workers, names, request, usage, timings, dropping)
    try:
        with ctx.speculation.running():
            async for item in FusionLoop(ctx, request, rule, sessions, usage, timings, align, dropping).run():
                yield item
    finally:
        await asyncio.shield(close_sessions(ctx.workers, sessions))  # frees the sessions even if cancelled again


@dataclass
class LoopState:
    """What one generation carries from segment to segment."""

    names: list[str]  # models still fusing, in config order (degraded fusion drops failed ones)
    sessions: dict[str, str]
    committed: dict[str, int]  # output tokens each model has committed
    output: HeldOutput
    index: int = 0  # the next segment's index
    to_commit: dict[str, str] = field(default_factory=dict)  # each model's commit of s*, sent with its next NextText
    drafter: str | None = None  # speculate: the model that drafts
    draft: str = ""  # the drafter's greedy text past the committed output


@dataclass
class Round:
    """One segment's work: each model's candidate and every model's score of every candidate."""

    names: list[str]  # who proposed, in the order of ``proposals``
    proposals: list[NextTextResult]
    scores: list[list[CandidateScore]] = field(default_factory=list)  # scores[j][i]: model j's score of candidate i
    identical: bool = False  # every candidate the same (text and eos)
    reports: list[CandidateReport] = field(default_factory=list)
    winner: int = 0  # index of s*
    followed: int = 0  # following segments committed with s* (follow_segments)


class FusionLoop:
    """One fused generation over open sessions; ``run`` yields Segments, then (text, finish_reason)."""

    def __init__(
        self,
        ctx: FusionContext,
        request: FusionRequest,
        rule: ScoreRule,
        sessions: dict[str, str],
        usage: dict[str, Usage],
        timings: Timings,
        align: bool,
        dropping: Dropping,
    ):
        self.speculation, self.workers, self.request = ctx.speculation, ctx.workers, request
        self.opts = request.options or ctx.options
        names = list(sessions)  # the models whose session opened, in config order
        self.rule = rule.restricted(names)
        self.usage, self.timings, self.align, self.dropping = usage, timings, align, dropping
        self.state = LoopState(names, sessions, {n: 0 for n in names}, HeldOutput(request.stop))

    def budget(self, name: str) -> int:
        return self.request.max_new_tokens - self.state.committed[name]

    async def run(self) -> AsyncIterator[Segment | tuple[str, str]]:
        state = self.state
        while min(self.budget(n) for n in state.names) > 0:
            if self.opts.speculate and state.drafter not in state.names:  # first segment, or the drafter was dropped
                state.drafter, state.draft = await self.speculation.sizes.smallest(state.names), ""
            try:
                r = await self.propose()
                await self.score(r)
            except Degraded:
                continue  # models were dropped: this segment again with the others
            if not self.choose(r):
                break  # no model produced a complete character within its budget
            await self.commit(r)
            ready, finish = self.emit(r)
            for segment in ready:
                yield segment
            if finish:
                yield state.output.text, finish
                return
        for segment in state.output.flush():
            yield segment
        yield state.output.text, "length"

    # 1. Propose -----------------------------------------------------------------------------
    async def propose(self) -> Round:
        """Each model generates up to a boundary common to all tokenizers (cool-noalign: to its
        own word boundary only); its commit of the last s* rides on the same call."""
        state, t0 = self.state, time.perf_counter()
        drafting = state.drafter is not None and self.speculation.allowed()
        boundary = tuple(state.names)

        def call(i: int, name: str):
            return self.workers[name].next_text(state.sessions[name], self.next_text_options(name, boundary, drafting))

        try:
            proposals = await gather_live(state.names, call, self.dropping)
        finally:
            state.to_commit.clear()  # the models left committed s* with their NextText
        self.timings.count_proposals(self.usage, state.names, proposals, time.perf_counter() - t0)
        return Round(list(state.names), proposals)

    def next_text_options(self, name: str, boundary: tuple[str, ...], drafting: bool) -> NextTextOptions:
        """Every option of a model's NextText, built here only. ``drafting``: speculation is on
        for this segment (fewer generations run than ``speculate_max_active``)."""
        state, budget = self.state, self.budget(name)
        is_drafter = drafting and name == state.drafter
        return NextTextOptions(
            boundary_tokenizer_ids=boundary if self.align else (name,),
            max_tokens=min(self.request.max_segment_tokens, budget),
            draft_text=state.draft if drafting and not is_drafter else "",
            draft_tokens=min(DRAFT_TOKENS, budget) if is_drafter else 0,
            commit_state_id=state.to_commit.get(name, ""),
            follow_segments=FOLLOW_SEGMENTS if self.opts.follow_segments and drafting else 0,
            lookup_tokens=LOOKUP_TOKENS if self.opts.lookup_draft else 0,
            sampling=self.request.sampling,
        )

    # 2. Score -------------------------------------------------------------------------------
    async def score(self, r: Round) -> None:
        """Every model scores every distinct candidate in one batched call; none when all are the
        same (every model's own state then holds s*, and its PPL of s* is its generation's)."""
        t0 = time.perf_counter()
        candidates = [(p.text, p.eos) for p in r.proposals]
        r.identical = len(set(candidates)) == 1
        self.timings.identical_segments += r.identical
        if r.identical:
            self.timings.skipped_scores += 1
            r.scores = [[own_score(p) for _ in r.names] for p in r.proposals]
        else:
            unique = list(dict.fromkeys(candidates))

            def call(j: int, name: str):
                own = {"own_state_id": r.proposals[j].state_id} if self.opts.reuse_own_logprobs else {}
                return self.workers[name].score(self.state.sessions[name], unique, **own)

            rows = await gather_live(self.state.names, call, self.dropping)  # nothing committed yet on Degraded
            self.timings.count_scores(self.usage, self.state.names, rows)
            r.scores = [[row[unique.index(c)] for c in candidates] for row in rows]
        self.timings.score_s += time.perf_counter() - t0

    # 3. Choose ------------------------------------------------------------------------------
    def choose(self, r: Round) -> bool:
        """s* by the scoring rule; False when no candidate holds a complete character. With
        identical candidates, also how many following segments every model decided alike."""
        r.reports = [
            scored_report(u, p.text, p.eos, p.finish, {v: r.scores[j][i] for j, v in enumerate(r.names)}, p.lookahead)
            for i, (u, p) in enumerate(zip(r.names, r.proposals))
        ]
        if all(math.isinf(c.mean_ppl) for c in r.reports):
            return False
        r.winner = apply_rule(self.rule, r.reports)
        if self.opts.follow_segments and r.identical:
            budgets = [self.budget(n) for n in r.names]
            r.followed = agreed_following(r.proposals, budgets, self.request.max_segment_tokens)
        return True

    # 4. Commit ------------------------------------------------------------------------------
    async def commit(self, r: Round) -> None:
        """Each model adopts its own state when its candidate is s*, else the state it built while
        scoring s* (past following segments: the last one's). The commit travels with the next
        NextText (fold_commits), else as an UpdateState now."""
        state = self.state
        chosen = [self.state_to_commit(r, j) for j in range(len(r.names))]
        kept_own = [bool(r.followed) or c == p.state_id for c, p in zip(chosen, r.proposals)]
        state.to_commit.update(zip(r.names, chosen))
        results = None if self.opts.fold_commits else await self.update_states()
        for j, (name, p) in enumerate(zip(r.names, r.proposals)):
            if name not in state.names:  # dropped by a failed commit
                continue
            if results is not None:
                state.committed[name] = results[j].committed_tokens
            else:  # counted here: the worker commits with the next NextText
                state.committed[name] += len(p.token_ids if kept_own[j] else r.scores[j][r.winner].token_ids)
                state.committed[name] += sum(len(f.token_ids) for f in p.following[: r.followed])
                self.usage[name].generated_tokens += sum(f.generated_tokens for f in p.following[: r.followed])
            self.usage[name].output_tokens = state.committed[name]
        state.draft = draft_after_commit(state.drafter, state.names, r.names, r.proposals, kept_own, r.followed)

    def state_to_commit(self, r: Round, j: int) -> str:
        own, winner = r.proposals[j], r.proposals[r.winner]
        if r.followed:
            return own.following[r.followed - 1].state_id
        if (own.text, own.eos) == (winner.text, winner.eos):
            return own.state_id
        return r.scores[j][r.winner].state_id

    async def update_states(self) -> list:
        """One UpdateState per model; a model whose worker is down is dropped (the others committed s*)."""
        state, t0 = self.state, time.perf_counter()

        def call(j: int, name: str):
            return self.workers[name].update_state(state.sessions[name], state.to_commit[name])

        try:
            results = await gather_live(state.names, call, self.dropping)
        except Degraded as degraded:
            results = degraded.args[0]
        state.to_commit.clear()
        self.timings.commit_s += time.perf_counter() - t0
        self.timings.worker_commit_s += max(getattr(c, "compute_s", 0.0) for c in results if c is not None)
        return results

    # 5. Emit --------------------------------------------------------------------------------
    def emit(self, r: Round) -> tuple[list[Segment], str | None]:
        """s* and the following segments committed with it, to the output; returns the segments
        the caller may have now and the finish reason when the output ends here."""
        state, winner = self.state, r.proposals[r.winner]
        segments = [Segment(state.index, winner.text, r.names[r.winner], winner.eos, winner.token_ids, r.reports)]
        segments += following_segments(r.names, r.proposals, r.followed, state.index + 1, self.rule)
        self.timings.identical_segments += r.followed
        self.timings.skipped_scores += r.followed
        self.timings.followed_segments += r.followed
        ready: list[Segment] = []
        for i, segment in enumerate(segments):
            state.index += 1
            released, finish = state.output.add(segment)
            ready += released
            if finish:
                self.uncount_following(r, kept=i)
                return ready, finish
        return ready, None

    def uncount_following(self, r: Round, kept: int) -> None:
        """The output ended inside s*'s following segments: the ones after the ``kept`` first were
        committed with s* but are not output, so no model's output tokens count them (the
        unoptimised loop would have stopped before generating them as output)."""
        for name, p in zip(r.names, r.proposals):
            if name in self.state.names:
                self.state.committed[name] -= sum(len(f.token_ids) for f in p.following[kept : r.followed])
                self.usage[name].output_tokens = self.state.committed[name]
