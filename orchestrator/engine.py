"""``FusionEngine``: fused generations over a fixed set of workers.

It checks a request (mode, models, scoring rule), opens a session per model, runs the fusion
loop (``fusion.py``) or the rerank baselines (``rerank.py``) and reports a ``Final``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from coolfusion.protos.fusion_wire import RERANK_MODES

from ..services.worker.results import CandidateScore
from .degraded import Dropping
from .fusion import FusionContext, fuse
from .options import SPECULATE_MAX_ACTIVE, FusionOptions
from .request import FusionRequest, resolve_models, rule_for
from .rerank import rerank, score_texts
from .results import Final, Segment, Timings, Usage
from .rules import ScoreRule, default_rule
from .speculation import ModelSizes, Speculation
from .turns import TurnEnds
from .workers import WorkerHandle


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
        self.speculation = Speculation(ModelSizes(self.workers), speculate_max_active)
        self.turns = TurnEnds(self.workers)  # a chat answer's stops where its models' turns end

    @property
    def speculate_max_active(self) -> int:
        """Speculation pauses while more fused generations than this run."""
        return self.speculation.max_active

    @speculate_max_active.setter
    def speculate_max_active(self, value: int) -> None:
        self.speculation.max_active = value

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
        ctx = FusionContext(self.workers, self.options, self.speculation, self.turns)
        if mode in RERANK_MODES:
            items = rerank(ctx, request, rule, names, usage, timings, mode == "cool-rerank")
        else:
            items = fuse(ctx, request, rule, names, usage, timings, mode != "cool-noalign", dropping)
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

    async def score_texts(
        self, request: FusionRequest, names, texts, usage=None, timings=None
    ) -> list[dict[str, CandidateScore]]:
        """Each model's score of each (text, eos) as a continuation of the request's prompt."""
        return await score_texts(self.workers, request, names, texts, usage, timings)
