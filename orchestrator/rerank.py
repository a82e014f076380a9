"""The rerank baselines (paper Table 3): whole answers first, then one choice among them.

``rerank``: each model writes a full answer alone; ``cool-rerank``: the cool answer joins them.
Every model scores every answer as a continuation of the prompt; the request's rule picks one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

from ..services.worker.results import CandidateScore
from .degraded import NEVER
from .fusion import FusionContext, fuse
from .request import FusionRequest
from .results import Segment, Timings, Usage, apply_rule, scored_report
from .rules import ScoreRule
from .sessions import close_sessions, open_sessions
from .workers import WorkerHandle


async def rerank(
    ctx: FusionContext,
    request: FusionRequest,
    rule: ScoreRule,
    names: Sequence[str],
    usage: dict[str, Usage],
    timings: Timings,
    with_cool: bool,
):
    """Yields the chosen answer as one Segment, then (text, finish_reason)."""
    labels = list(names)
    jobs = [answer(ctx, request, rule, [n], usage, timings) for n in names]
    if with_cool:
        labels.insert(0, "cool")
        jobs.insert(0, answer(ctx, request, rule, names, usage, timings))
    answers = await asyncio.gather(*jobs)
    texts = [(text, finish == "eos") for text, finish in answers]
    scored = await score_texts(ctx.workers, request, names, texts, usage, timings)
    reports = [
        scored_report(label, text, finish == "eos", finish, row)
        for label, (text, finish), row in zip(labels, answers, scored)
    ]
    w = apply_rule(rule.restricted(names), reports)
    text, finish = answers[w]
    yield Segment(0, text, labels[w], finish == "eos", [], reports)
    yield text, finish


async def answer(ctx: FusionContext, request, rule, names: Sequence[str], usage, timings) -> tuple[str, str]:
    """A whole answer by the fusion loop over ``names`` (one name: that model alone)."""
    text, finish = "", "length"
    async for item in fuse(ctx, request, rule, list(names), usage, timings, align=True):
        if not isinstance(item, Segment):
            text, finish = item
    return text, finish


async def score_texts(
    workers: Mapping[str, WorkerHandle],
    request: FusionRequest,
    names: Sequence[str],
    texts: Sequence[tuple[str, bool]],
    usage: dict[str, Usage] | None = None,
    timings: Timings | None = None,
) -> list[dict[str, CandidateScore]]:
    """Each model's score of each (text, eos) as a continuation of the request's prompt."""
    usage = usage if usage is not None else {n: Usage() for n in names}
    timings = timings or Timings()
    sessions = await open_sessions(workers, names, request, usage, timings, NEVER)
    try:
        t0 = time.perf_counter()
        scores = await asyncio.gather(*(workers[v].score(sessions[v], texts) for v in names))
        timings.score_s += time.perf_counter() - t0
    finally:
        await asyncio.shield(close_sessions(workers, sessions))  # frees the sessions even if cancelled again
    return [{v: scores[j][i] for j, v in enumerate(names)} for i in range(len(texts))]
