"""The Cool-Fusion loop (paper section 2), over any set of ``WorkerHandle``s.

One iteration produces one fused text segment:

1. Propose (2.2): every model u generates from its committed state until its decoded text
   reaches a word boundary common to all tokenizers; that text is its candidate s_u. It stops
   early at EOS (the candidate then means "stop here"), or at its token cap (cut at a clean
   UTF-8 end).
2. Score (2.3): every model v scores every candidate with its own tokenizer on top of its KV
   cache, PPL_v(s_u) = exp(mean NLL); an EOS candidate is scored with v's own EOS appended.
   One batched call per worker.
3. Choose: s* by the request's scoring rule (``rules.py``); the paper's is ``mean-ppl``,
   s* = argmin_u (1/k) sum_v PPL_v(s_u) (eq. 3); ties go to the first model.
4. Commit (M4): every model adopts the state that holds exactly s* - its own generated tokens
   when its candidate is s*, otherwise the state it built while scoring s*. Nothing is
   re-encoded from the start.

Stop when s* carries EOS, a stop sequence appears, or a model's output reaches
``max_new_tokens`` of its own tokens.

Modes (paper Table 3): ``single:<model>``, ``cool``, ``cool-noalign`` (each candidate ends at
its own model's word boundary only), ``rerank`` (each model writes a full answer; the lowest
average PPL wins) and ``cool-rerank`` (rerank among the cool answer and every model's own).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from ..services.common.errors import InvalidArgument, Unavailable
from ..services.worker.api import NextTextOptions
from .opening import open_all
from .rules import RuleError, ScoreRule, default_rule
from .workers import Opened, Proposal, Score, WorkerHandle

log = logging.getLogger(__name__)

MODES = ("cool", "cool-noalign", "rerank", "cool-rerank", "single:<model>")
DRAFT_TOKENS = 4  # most greedy tokens the drafter keeps ahead of its candidate (speculate)
# Speculation buys one generation's latency with extra compute (draft steps, multi-token verify
# forwards that are not batched across sessions). With more generations running in the engine the
# workers' batched decode steps do more per forward (bench, 2 cores, 8 clients: 16.0 tokens/s
# without speculation, 14.3 with), so segments only speculate while at most this many run.
SPECULATE_MAX_ACTIVE = 1
# Most following segments a NextText reports (follow_segments). The verifier's continuation rarely
# decides more than one (measured: 22 segments followed with 1, 2 or 8, two bench prompts); each
# costs boundary checks. Asked only while speculating: under load (8 clients) following segments
# measured 19.8-21.5 tokens/s against 21.7-21.9 without, with more tokenizer-service CPU.
FOLLOW_SEGMENTS = 2
# Looked-up tokens a model checks per forward (lookup_draft): each costs a row of the forward
# (Gemma-3's 262k-row output layer included). Measured (two bench prompts, one client): 2 tokens
# 20.2-20.6 s, 3 tokens 21.4 s.
LOOKUP_TOKENS = 2


@dataclass(frozen=True)
class FusionOptions:
    """Performance switches of the loop (issue 5). Every combination gives the same output.

    1. ``reuse_own_logprobs``: a model scores its own candidate with the log-probs it computed
       while generating it (when its tokens equal the candidate's encoding): no forward for that row.
    2. ``skip_identical``: when every candidate is the same (text and eos), no scoring call at all;
       each model commits its own NextText state (the PPLs reported come from the generation).
    3. ``dedup_candidates``: each distinct candidate is sent for scoring once (one row per distinct
       text in each worker's single batched forward).
    4. ``reuse_lookahead``: the tokens a model generated past the boundary stay (KV, logits) for its
       next NextText after it commits its own state, instead of being recomputed.
    5. ``speculate`` (needs ``reuse_lookahead``): the smallest model keeps up to ``DRAFT_TOKENS`` of
       its greedy text ahead of its candidate; every other model checks that text, in its own
       tokens, several tokens per forward inside its NextText (or in the forward that feeds a
       committed candidate) and keeps the tokens that are its own greedy picks. Only while at
       most ``speculate_max_active`` generations run in the engine (default 1).
    6. ``fold_commits``: each model's commit of s* (M4) travels with its next NextText instead of
       a separate UpdateState round trip (segments are ~1-2 tokens, so round trips add up).
    7. ``follow_segments`` (needs ``reuse_lookahead``, ``skip_identical`` and ``fold_commits``):
       each NextText also reports the segments past its candidate that its kept greedy
       continuation already decides (drafted or verified tokens); when the candidates are
       identical, the following segments every model decided alike are committed in the same
       round (each is what the next NextTexts would have proposed, identically, and skipped).
       Only while speculating (the drafter's and the verifiers' continuations are what decide them).
    8. ``lookup_draft``: prompt-lookup decoding inside each model. Whenever a forward is due and
       no draft from another model applies, the ``LOOKUP_TOKENS`` tokens that followed the latest
       earlier occurrence of the last few ids of its own text (prompt and output) go into the same
       forward and are kept while they are its greedy picks. Repeated names, numbers and phrases
       (and a small model's loops) cost one forward for several tokens. Also under load: a
       worker's batched forward takes rows of any length, so the checked tokens ride along.
    """

    reuse_own_logprobs: bool = True
    skip_identical: bool = True
    dedup_candidates: bool = True
    reuse_lookahead: bool = True
    speculate: bool = True
    fold_commits: bool = True
    follow_segments: bool = True
    lookup_draft: bool = True

    NAMES = (
        "reuse_own_logprobs",
        "skip_identical",
        "dedup_candidates",
        "reuse_lookahead",
        "speculate",
        "fold_commits",
        "follow_segments",
        "lookup_draft",
    )

    @classmethod
    def none(cls) -> FusionOptions:
        """The unoptimised loop (the paper's prototype protocol)."""
        return cls(**{n: False for n in cls.NAMES})

    @classmethod
    def parse(cls, text: str) -> FusionOptions:
        """``all`` | ``none`` | comma-separated names to turn on, or ``-name`` to turn off from all."""
        text = (text or "all").strip()
        if text in ("all", ""):
            return cls()
        if text == "none":
            return cls.none()
        items = [t.strip() for t in text.split(",") if t.strip()]
        off = [t[1:] for t in items if t.startswith("-")]
        on = [t for t in items if not t.startswith("-")]
        unknown = [t for t in on + off if t not in cls.NAMES]
        if unknown:
            raise ValueError(f"unknown optimisation(s) {unknown}; known: {', '.join(cls.NAMES)}")
        if on and off:
            raise ValueError("give names to turn on, or -names to turn off, not both")
        if on:
            return cls(**{n: n in on for n in cls.NAMES})
        return cls(**{n: n not in off for n in cls.NAMES})


@dataclass
class FusionRequest:
    prompt: str | None = None
    messages: list[dict] | None = None
    models: list[str] = field(default_factory=list)
    mode: str = "cool"
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    max_segment_tokens: int = 16
    options: FusionOptions | None = None  # None: the engine's
    # A worker failing mid-generation (UNAVAILABLE) is dropped and the others go on (cool modes).
    allow_degraded: bool = False
    score_rule: ScoreRule | None = None  # None: the engine's


@dataclass
class CandidateReport:
    model: str
    text: str
    eos: bool
    finish: str
    ppl: dict[str, tuple[float, int]]  # scorer -> (ppl, tokens scored)
    lookahead: str = ""
    logprob: dict[str, float] = field(default_factory=dict)  # scorer -> sum of its log-probs
    score: float = 0.0  # fused log-likelihood under the request's rule

    @property
    def mean_ppl(self) -> float:
        return sum(p for p, _ in self.ppl.values()) / len(self.ppl)

    def model_scores(self) -> dict[str, tuple[float, int]]:
        """scorer -> (sum of log-probs, tokens): what a scoring rule reads."""
        return {v: (self.logprob.get(v, 0.0), n) for v, (_, n) in self.ppl.items()}


def scored_report(
    model: str, text: str, eos: bool, finish: str, scores: dict[str, Score], lookahead: str = ""
) -> CandidateReport:
    """A candidate's report from each scorer's Score of it."""
    return CandidateReport(
        model=model,
        text=text,
        eos=eos,
        finish=finish,
        ppl={v: (s.ppl, len(s.token_ids)) for v, s in scores.items()},
        lookahead=lookahead,
        logprob={v: sum(s.logprobs) for v, s in scores.items()},
    )


def apply_rule(rule: ScoreRule, reports: Sequence[CandidateReport]) -> int:
    """Sets each report's fused score; returns the index of the winner."""
    table = [r.model_scores() for r in reports]
    for r, value in zip(reports, rule.loglikelihood(table)):
        r.score = value
    return rule.choose(table)


@dataclass
class Segment:
    index: int
    text: str
    model: str
    eos: bool
    token_ids: list[int]
    candidates: list[CandidateReport]


@dataclass
class Usage:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    output_tokens: int = 0
    scored_tokens: int = 0


@dataclass
class Timings:
    total_s: float = 0.0
    first_segment_s: float = 0.0
    open_s: float = 0.0
    generate_s: float = 0.0
    score_s: float = 0.0
    commit_s: float = 0.0
    # Worker-side time on the critical path (per segment the slowest worker of each phase, summed):
    worker_generate_s: float = 0.0  # NextText, boundary checks included
    worker_boundary_s: float = 0.0  # of which boundary checks (tokenizer service calls)
    worker_score_s: float = 0.0
    worker_commit_s: float = 0.0
    identical_segments: int = 0  # segments where every candidate was the same (text and eos)
    skipped_scores: int = 0  # segments whose scoring call was skipped (skip_identical)
    scored_rows: int = 0  # candidate rows forwarded for scoring, over all workers
    reused_rows: int = 0  # candidate rows scored from generation log-probs (reuse_own_logprobs)
    reused_tokens: int = 0  # lookahead tokens replayed instead of recomputed (reuse_lookahead)
    drafted_tokens: int = 0  # greedy steps the drafter spent past its candidates (speculate)
    verified_tokens: int = 0  # draft tokens other models accepted as their own greedy picks
    verify_forwards: int = 0  # multi-token forwards that checked draft tokens
    followed_segments: int = 0  # segments committed from the following ones of a NextText (follow_segments)
    lookup_accepted: int = 0  # looked-up tokens the models accepted as their own greedy picks (lookup_draft)
    lookup_forwards: int = 0  # forwards that checked looked-up tokens


@dataclass
class Final:
    text: str
    finish_reason: str
    usage: dict[str, Usage]
    timings: Timings
    segments: int
    mode: str
    degraded_models: list[str] = field(default_factory=list)  # dropped after a worker failure
    score_rule: str = ""  # label of the rule that chose the segments


def pick_winner(mean_ppls: Sequence[float]) -> int:
    """Index of the lowest average perplexity; the first model wins ties (config order)."""
    best = 0
    for i, value in enumerate(mean_ppls):
        if value < mean_ppls[best]:
            best = i
    return best


def find_stop(text: str, stops: Sequence[str], search_from: int) -> int | None:
    """Offset of the earliest stop sequence that ends at or after ``search_from``."""
    hits = []
    for stop in stops:
        at = text.find(stop, max(0, search_from - len(stop) + 1))
        if at >= 0:
            hits.append(at)
    return min(hits) if hits else None


def stop_prefix_start(text: str, stops: Sequence[str]) -> int:
    """Offset of the longest tail of ``text`` that is a proper prefix of a stop sequence (the
    text from there may still become a stop sequence); ``len(text)`` when there is none."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return len(text) - longest


def worker_down(exc: BaseException) -> bool:
    """A worker failure that degraded fusion may survive (UNAVAILABLE: process gone, unreachable)."""
    if isinstance(exc, Unavailable):
        return True
    return (
        isinstance(exc, grpc.RpcError)
        and callable(getattr(exc, "code", None))
        and exc.code() == grpc.StatusCode.UNAVAILABLE
    )


class _Degraded(Exception):
    """Internal: models were dropped in this phase; the caller redoes the segment with the rest."""


def _ppl(logprobs: Sequence[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else math.inf


def _own_score(p: Proposal, identical_text) -> Score:
    """A model's score of its own candidate from its generation log-probs (no scoring call)."""
    text, eos = identical_text
    logprobs = p.logprobs if (text or eos) else []
    return Score(p.state_id, list(p.token_ids), list(logprobs), _ppl(logprobs), True)


def agreed_following(proposals: Sequence[Proposal], budgets: Sequence[int], max_segment_tokens: int) -> int:
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


class FusionEngine:
    def __init__(
        self,
        workers: Sequence[WorkerHandle],
        options: FusionOptions | None = None,
        speculate_max_active: int = SPECULATE_MAX_ACTIVE,
        score_rule: ScoreRule | None = None,
    ):
        self.workers = {w.name: w for w in workers}
        self.options = options or FusionOptions()
        self.score_rule = score_rule or default_rule()
        self.speculate_max_active = speculate_max_active
        self._parameters: dict[str, float] = {}  # model -> parameter count (drafter choice)
        self._fusing = 0  # fusion loops running now (speculation is off above speculate_max_active)

    # ---- request checks ------------------------------------------------------------------
    def resolve(self, request: FusionRequest) -> tuple[str, list[str]]:
        """Validate mode and models; returns (mode, model names in config order)."""
        mode = request.mode or "cool"
        names = list(request.models) or list(self.workers)
        unknown = [n for n in names if n not in self.workers]
        if unknown:
            raise InvalidArgument(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(self.workers)}")
        if len(set(names)) != len(names):
            raise InvalidArgument(f"models listed twice: {names}")
        names = [n for n in self.workers if n in names]  # config order decides ties
        if mode.startswith("single:"):
            model = mode.split(":", 1)[1]
            if model not in self.workers:
                raise InvalidArgument(f"unknown model {model!r} in mode {mode!r}; available: {', '.join(self.workers)}")
            return mode, [model]
        if mode not in ("cool", "cool-noalign", "rerank", "cool-rerank"):
            raise InvalidArgument(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        return mode, names

    def rule_for(self, request: FusionRequest, names: Sequence[str]) -> ScoreRule:
        """The request's own rule (it may only name the request's models), else the engine's
        default restricted to the request's models."""
        if request.score_rule is None:
            return self.score_rule.restricted(names)
        try:
            request.score_rule.check_models(names)
        except RuleError as exc:
            raise InvalidArgument(str(exc)) from None
        return request.score_rule

    # ---- public entry --------------------------------------------------------------------
    async def generate(self, request: FusionRequest) -> AsyncIterator[Segment | Final]:
        mode, names = self.resolve(request)
        rule = self.rule_for(request, names)
        request.score_rule = rule
        started = time.perf_counter()
        usage = {n: Usage() for n in names}
        timings = Timings()
        dropped: dict[str, str] = {}  # degraded fusion (cool modes): model -> why it was dropped
        if mode in ("rerank", "cool-rerank"):
            gen = self._rerank(request, names, usage, timings, with_cool=mode == "cool-rerank")
        else:
            gen = self._fuse_stream(request, names, usage, timings, align=mode != "cool-noalign", dropped=dropped)
        text, finish, count = "", "length", 0
        async for item in gen:
            if isinstance(item, Segment):
                if count == 0:
                    timings.first_segment_s = time.perf_counter() - started
                count += 1
                yield item
            else:
                text, finish = item
        timings.total_s = time.perf_counter() - started
        yield Final(text, finish, usage, timings, count, mode, list(dropped), rule.label())

    # ---- the loop ------------------------------------------------------------------------
    async def _open(self, names, request, usage, timings, dropped: dict | None = None) -> dict[str, str]:
        """Open a session per model. On a failure the sessions opened are closed again, unless
        ``dropped`` is given (degraded fusion) and only workers that are down failed."""
        t0 = time.perf_counter()
        # A fatal failure cancels the other Opens (their workers stop prefilling), as does the caller leaving.
        opened = await open_all(
            [self.workers[n].open(request.prompt, request.messages) for n in names],
            fatal=lambda exc: dropped is None or not request.allow_degraded or not worker_down(exc),
            close_orphans=lambda done: asyncio.ensure_future(
                self._close({names[i]: o.session_id for i, o in done.items()})
            ),
        )
        timings.open_s += time.perf_counter() - t0
        sessions = {n: o.session_id for n, o in zip(names, opened) if not isinstance(o, BaseException)}
        errors = [(n, o) for n, o in zip(names, opened) if isinstance(o, BaseException)]
        errors = [
            e for e in errors if not isinstance(e[1], asyncio.CancelledError)
        ] or errors  # the cause, not its victims
        if errors:
            fatal = [e for _, e in errors if dropped is None or not worker_down(e)]
            if fatal or not sessions or not request.allow_degraded:
                await self._close(sessions)
                raise (fatal or [errors[0][1]])[0]
            assert dropped is not None  # without it every error was fatal above
            for n, exc in errors:
                self._drop(n, exc, dropped)
        for n, o in zip(names, opened):
            if n in sessions and isinstance(o, Opened):
                usage[n].prompt_tokens += o.context_tokens
        return sessions

    def _drop(self, name: str, exc: BaseException, dropped: dict) -> None:
        log.warning("degraded fusion: dropping model %s after a worker failure: %s", name, exc)
        dropped[name] = str(exc)

    async def _gather_live(self, names: list[str], call, request, dropped: dict | None) -> list:
        """``call(i, name)`` for every model at once. A worker that is down is dropped from
        ``names`` (in place) when the request allows degraded fusion and another model remains;
        then ``_Degraded`` carries the results of the others (None for the dropped)."""
        results = await asyncio.gather(*(call(i, n) for i, n in enumerate(names)), return_exceptions=True)
        errors = [(n, r) for n, r in zip(names, results) if isinstance(r, BaseException)]
        if not errors:
            return results
        for _, r in errors:
            if not isinstance(r, Exception):
                raise r  # cancellation
        fatal = [r for _, r in errors if not worker_down(r)]
        if fatal or dropped is None or not request.allow_degraded or len(errors) == len(names):
            raise (fatal or [errors[0][1]])[0]
        for n, r in errors:
            self._drop(n, r, dropped)
            names.remove(n)
        raise _Degraded([None if isinstance(r, BaseException) else r for r in results])

    async def _drafter(self, names: list[str]) -> str | None:
        """The model that drafts for speculation: the fewest parameters (config order on ties);
        None with fewer than two models."""
        if len(names) < 2:
            return None
        unknown = [n for n in names if n not in self._parameters]
        infos = await asyncio.gather(*(self.workers[n].info() for n in unknown), return_exceptions=True)
        for n, info in zip(unknown, infos):
            size = getattr(info, "parameters", 0) if not isinstance(info, BaseException) else 0
            if size:
                self._parameters[n] = size  # a failed or silent Info is asked again next time
        return min(names, key=lambda n: self._parameters.get(n, math.inf))

    async def _close(self, sessions: dict[str, str]) -> None:
        await asyncio.gather(*(self.workers[n].close(s) for n, s in sessions.items()), return_exceptions=True)

    async def _fuse_stream(self, request, names, usage, timings, align: bool, dropped: dict | None = None):
        """Yields Segments, then (text, finish_reason). ``dropped``: degraded fusion allowed
        (when the request asks), models dropped are recorded there."""
        sessions = await self._open(names, request, usage, timings, dropped)
        live = [n for n in names if n in sessions]
        try:
            async for item in self._fuse(request, live, sessions, usage, timings, align, dropped):
                yield item
        finally:
            await asyncio.shield(self._close(sessions))  # frees the sessions even if cancelled again

    async def _fuse(self, request, names, sessions, usage, timings, align: bool, dropped: dict | None = None):
        self._fusing += 1
        try:
            async for item in self._fuse_loop(request, names, sessions, usage, timings, align, dropped):
                yield item
        finally:
            self._fusing -= 1

    async def _fuse_loop(self, request, names, sessions, usage, timings, align: bool, dropped: dict | None = None):
        opts = request.options or self.options
        rule = (request.score_rule or self.score_rule).restricted(names)
        names = list(names)  # models still in the fusion (degraded fusion drops failed ones)
        speculate = opts.speculate and opts.reuse_lookahead
        follow = opts.follow_segments and opts.reuse_lookahead and opts.skip_identical and opts.fold_commits
        drafter: str | None = None
        draft = ""  # the drafter's greedy text past the committed output (its own state was committed)
        output = ""
        committed = {n: 0 for n in names}
        # Each segment's commit (M4) rides on the next NextText (one round trip less per segment);
        # the last segment's is never sent (the sessions close).
        to_commit: dict[str, str] = {}
        index = 0
        # Segments not given to the caller yet: from the one where a tail of the output that may
        # still become a stop sequence begins (as vLLM, TGI and OpenAI hold such a tail back).
        held: list[Segment] = []
        released = 0  # characters of the output given to the caller
        while True:
            budget = {n: request.max_new_tokens - committed[n] for n in names}
            if min(budget.values()) <= 0:
                for segment in held:
                    yield segment
                yield output, "length"
                return
            if speculate and drafter not in names:  # first segment, or the drafter was dropped
                drafter, draft = await self._drafter(names), ""

            quiet = self._fusing <= self.speculate_max_active  # else batched steps do more per forward
            drafting = drafter is not None and quiet
            lookup = LOOKUP_TOKENS if opts.lookup_draft else 0

            def propose(i: int, n: str):
                is_drafter = drafting and n == drafter
                options = NextTextOptions(
                    boundary_tokenizer_ids=tuple(boundary_names) if align else (n,),
                    max_tokens=min(request.max_segment_tokens, budget[n]),
                    reuse_lookahead=None if opts.reuse_lookahead else False,  # None: the worker's default
                    draft_text=draft if drafting and not is_drafter else "",
                    draft_tokens=min(DRAFT_TOKENS, budget[n]) if is_drafter else 0,
                    commit_state_id=to_commit.get(n, ""),
                    follow_segments=FOLLOW_SEGMENTS if follow and drafting else 0,
                    lookup_tokens=lookup,
                )
                return self.workers[n].next_text(sessions[n], options)

            # 1. Propose: each model generates up to a boundary common to all tokenizers
            #    (cool-noalign: to its own word boundary only).
            t0 = time.perf_counter()
            boundary_names = list(names)
            try:
                proposals: list[Proposal] = await self._gather_live(names, propose, request, dropped)
            except _Degraded:
                to_commit.clear()  # the models left committed s* with their NextText
                continue  # propose again with the models left
            to_commit.clear()
            t1 = time.perf_counter()
            timings.generate_s += t1 - t0
            slowest = max(proposals, key=lambda p: p.compute_s + p.boundary_s)
            timings.worker_generate_s += slowest.compute_s + slowest.boundary_s
            timings.worker_boundary_s += slowest.boundary_s
            for n, p in zip(names, proposals):
                usage[n].generated_tokens += p.generated_tokens
                timings.reused_tokens += p.reused_tokens
                timings.drafted_tokens += p.drafted_tokens
                timings.verified_tokens += p.verified_tokens
                timings.verify_forwards += p.verify_forwards
                timings.lookup_accepted += p.lookup_accepted
                timings.lookup_forwards += p.lookup_forwards

            # 2. Score: every model scores every candidate in one batched call.
            candidates = [(p.text, p.eos) for p in proposals]
            identical = len(set(candidates)) == 1
            timings.identical_segments += identical
            if identical and opts.skip_identical:
                # Every model's own state holds s*; its PPL of s* is its generation's.
                timings.skipped_scores += 1
                scores = [[_own_score(p, identical_text=(p.text, p.eos)) for _ in names] for p in proposals]
            else:
                unique = list(dict.fromkeys(candidates)) if opts.dedup_candidates else candidates
                where = [unique.index(c) for c in candidates]

                async def score(j: int, v: str):
                    kwargs = {"own_state_id": proposals[j].state_id} if opts.reuse_own_logprobs else {}
                    return await self.workers[v].score(sessions[v], unique, **kwargs)

                try:
                    rows = list(await self._gather_live(names, score, request, dropped))
                except _Degraded:
                    continue  # nothing committed yet: redo the segment with the models left
                timings.worker_score_s += max(getattr(r, "compute_s", 0.0) for r in rows)
                for v, row in zip(names, rows):
                    forwarded = [s for s in row if not s.reused]
                    usage[v].scored_tokens += sum(len(s.token_ids) for s in forwarded)
                    timings.scored_rows += sum(1 for s in forwarded if s.token_ids)
                    timings.reused_rows += len(row) - len(forwarded)
                scores = [[row[where[i]] for i in range(len(candidates))] for row in rows]
            t2 = time.perf_counter()
            timings.score_s += t2 - t1

            # 3. Choose s* by the scoring rule (the paper's: argmin of the mean PPL over scorers, eq. 3).
            reports = [
                scored_report(u, p.text, p.eos, p.finish, {v: scores[j][i] for j, v in enumerate(names)}, p.lookahead)
                for i, (u, p) in enumerate(zip(names, proposals))
            ]
            if all(math.isinf(r.mean_ppl) for r in reports):
                for segment in held:
                    yield segment
                yield output, "length"  # no model produced a complete character within its budget
                return
            w = apply_rule(rule, reports)
            winner = proposals[w]
            # 5. Following segments decided alike by every model: the next rounds would propose them
            #    identically and skip scoring; they are committed with this one.
            followed = (
                agreed_following(proposals, [budget[n] for n in names], request.max_segment_tokens)
                if follow and identical
                else 0
            )

            # 4. Commit: each model keeps its own tokens when its candidate is s*, else the
            #    state it built while scoring s*.
            def state_for(j: int) -> str:
                own = proposals[j]
                if followed:
                    return own.following[followed - 1].state_id
                if (own.text, own.eos) == (winner.text, winner.eos):
                    return own.state_id
                return scores[j][w].state_id

            aligned = list(names)  # names[i] proposed proposals[i] (a failed commit may drop a model)
            chosen = [state_for(j) for j in range(len(aligned))]
            kept_own = [bool(followed) or state == p.state_id for state, p in zip(chosen, proposals)]
            to_commit.update(zip(aligned, chosen))
            if not opts.fold_commits:
                t3 = time.perf_counter()
                try:
                    results = await self._gather_live(
                        names, lambda j, n: self.workers[n].update_state(sessions[n], to_commit[n]), request, dropped
                    )
                except _Degraded as degraded:
                    # The others committed s*: the segment stands without the dropped models.
                    results = degraded.args[0]
                to_commit.clear()
                timings.commit_s += time.perf_counter() - t3
                timings.worker_commit_s += max(getattr(r, "compute_s", 0.0) for r in results if r is not None)
            for j, n in enumerate(aligned):
                if n not in names:  # dropped by a failed commit
                    continue
                if not opts.fold_commits:
                    committed[n] = results[j].committed_tokens
                else:  # counted here: the worker commits with the next NextText
                    committed[n] += len(proposals[j].token_ids if kept_own[j] else scores[j][w].token_ids)
                    committed[n] += sum(len(f.token_ids) for f in proposals[j].following[:followed])
                    usage[n].generated_tokens += sum(f.generated_tokens for f in proposals[j].following[:followed])
                usage[n].output_tokens = committed[n]
            # The drafter's text past s* is still its greedy continuation only if it kept its own state.
            d = aligned.index(drafter) if drafter in names else -1
            draft = proposals[d].draft if d >= 0 and kept_own[d] else ""
            if draft and followed:  # past the following segments committed too
                past = "".join(f.text for f in proposals[d].following[:followed])
                draft = draft[len(past) :] if draft.startswith(past) else ""

            emit = [Segment(index, winner.text, aligned[w], winner.eos, winner.token_ids, reports)]
            for k in range(followed):  # identical candidates: each model's PPL is its own generation's
                segs = [p.following[k] for p in proposals]
                ppls = {v: (_ppl(f.logprobs), len(f.token_ids)) for v, f in zip(aligned, segs)}
                logprobs = {v: sum(f.logprobs) for v, f in zip(aligned, segs)}
                reports = [
                    CandidateReport(u, f.text, False, "boundary", ppls, f.lookahead, logprobs)
                    for u, f in zip(aligned, segs)
                ]
                apply_rule(rule, reports)
                emit.append(Segment(index + 1 + k, segs[0].text, aligned[0], False, segs[0].token_ids, reports))
            timings.identical_segments += followed
            timings.skipped_scores += followed
            timings.followed_segments += followed
            for segment in emit:
                stop_at = find_stop(output + segment.text, request.stop, len(output)) if request.stop else None
                output += segment.text
                held.append(segment)
                index += 1
                if stop_at is not None:
                    # The stop may begin in a held segment: each is cut there (one inside it, to "").
                    start = released
                    for s in held:
                        end = start + len(s.text)
                        s.text = s.text[: max(0, stop_at - start)]
                        start = end
                        yield s
                    yield output[:stop_at], "stop"
                    return
                if segment.eos:
                    for s in held:
                        yield s
                    yield output, "eos"
                    return
                safe = stop_prefix_start(output, request.stop) if request.stop else len(output)
                while held and released + len(held[0].text) <= safe:
                    s = held.pop(0)
                    released += len(s.text)
                    yield s

    # ---- rerank baselines ----------------------------------------------------------------
    async def _answer(self, request, names, usage, timings, align: bool) -> tuple[str, str]:
        """A whole answer by the fusion loop over ``names`` (one name: that model alone)."""
        text, finish = "", "length"
        async for item in self._fuse_stream(request, names, usage, timings, align):
            if not isinstance(item, Segment):
                text, finish = item
        return text, finish

    async def score_texts(
        self, request: FusionRequest, names: Sequence[str], texts: Sequence[tuple[str, bool]], usage=None, timings=None
    ) -> list[dict[str, Score]]:
        """Each model's Score of each (text, eos) as a continuation of the request's prompt."""
        usage = usage if usage is not None else {n: Usage() for n in names}
        timings = timings or Timings()
        sessions = await self._open(names, request, usage, timings)
        try:
            t0 = time.perf_counter()
            scores = await asyncio.gather(*(self.workers[v].score(sessions[v], texts) for v in names))
            timings.score_s += time.perf_counter() - t0
        finally:
            await asyncio.shield(self._close(sessions))  # frees the sessions even if cancelled again
        return [{v: scores[j][i] for j, v in enumerate(names)} for i in range(len(texts))]

    async def _rerank(self, request, names, usage, timings, with_cool: bool):
        """Paper's Rerank: full answers, each scored by every model from the prompt."""
        labels = list(names)
        jobs = [self._answer(request, [n], usage, timings, align=True) for n in names]
        if with_cool:
            labels.insert(0, "cool")
            jobs.insert(0, self._answer(request, names, usage, timings, align=True))
        answers = await asyncio.gather(*jobs)
        scored = await self.score_texts(request, names, [(t, f == "eos") for t, f in answers], usage, timings)
        reports = [
            scored_report(label, text, finish == "eos", finish, row)
            for label, (text, finish), row in zip(labels, answers, scored)
        ]
        w = apply_rule((request.score_rule or self.score_rule).restricted(names), reports)
        text, finish = answers[w]
        yield Segment(0, text, labels[w], finish == "eos", [], reports)
        yield text, finish
