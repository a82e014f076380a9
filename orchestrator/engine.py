"""``FusionEngine``: fused generations over a fixed set of workers.

It checks a request (mode, models, scoring rule), opens a session per model, runs the fusion
loop (``fusion.py``) or the rerank baselines (``rerank.py``) and reports a ``Final``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from .degraded import NEVER, Dropping
from .fusion import FusionLoop
from .options import SPECULATE_MAX_ACTIVE, FusionOptions
from .request import RERANK_MODES, FusionRequest, resolve_models, rule_for
from .rerank import rerank, score_texts
from .results import Final, Segment, Timings, Usage
from .rules import ScoreRule, default_rule
from .sessions import close_sessions, open_sessions
from .speculation import ModelSizes
from .turns import TurnEnds
from .workers import Score, WorkerHandle


class FusionEngine:
    """Fused generations over a fixed set of workers (config order decides ties)."""

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
        self.sizes = ModelSizes(self.workers)  # the drafter is the smallest model
        self.turns = TurnEnds(self.workers)  # a chat answer's stops where its models' turns end
        self.fusing = 0  # fusion loops running now (speculation pauses above speculate_max_active)

    def resolve(self, request: FusionRequest) -> tuple[str, list[str]]:
        """Validate mode and models; returns (mode, model names in config order)."""
        return resolve_models(request, list(self.workers))

    def rule_for(self, request: FusionRequest, names: Sequence[str]) -> ScoreRule:
        """The request's own rule (checked against its models), else the engine's restricted to them."""
        return rule_for(request, names, self.score_rule)

    async def generate(self, request: FusionRequest) -> AsyncIterator[Segment | Final]:
        mode, names = self.resolve(request)
        rule = self.rule_for(request, names)
        started, usage, timings = time.perf_counter(), {n: Usage() for n in names}, Timings()
        dropping = Dropping(allowed=request.allow_degraded and mode not in RERANK_MODES)
        if mode in RERANK_MODES:
            items = rerank(self.fuse, self.workers, request, rule, names, usage, timings, mode == "cool-rerank")
        else:
            items = self.fuse(request, rule, names, usage, timings, mode != "cool-noalign", dropping)
        text, finish, count = "", "length", 0
        async for item in items:
            if isinstance(item, Segment):
                if count == 0:
                    timings.first_segment_s = time.perf_counter() - started
                count += 1
                yield item
            else:
                text, finish = item
        timings.total_s = time.perf_counter() - started
        seed = None if request.sampling.greedy else request.sampling.seed
        yield Final(text, finish, usage, timings, count, mode, list(dropping.dropped), rule.label(), seed)

    async def fuse(self, request, rule, names, usage, timings, align: bool = True, dropping: Dropping = NEVER):
        """One fused generation over new sessions (one name: that model alone); a chat request
        also stops where any of the models' turn ends (``turns.py``)."""
        request = await self.turns.request_for(request, names)
        sessions = await open_sessions(self.workers, names, request, usage, timings, dropping)
        self.fusing += 1
        try:
            async for item in FusionLoop(self, request, rule, sessions, usage, timings, align, dropping).run():
                yield item
        finally:
            self.fusing -= 1
            await asyncio.shield(close_sessions(self.workers, sessions))  # frees the sessions even if cancelled again

    async def score_texts(
        self, request: FusionRequest, names, texts, usage=None, timings=None
    ) -> list[dict[str, Score]]:
        """Each model's Score of each (text, eos) as a continuation of the request's prompt."""
        return await score_texts(self.workers, request, names, texts, usage, timings)
