"""What the fusion loop reports: each segment with its scored candidates, then a ``Final``
(text, finish reason, per-model usage, timings)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..services.worker.results import CandidateScore, NextTextResult
from .rules import ScoreRule


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
    model: str, text: str, eos: bool, finish: str, scores: dict[str, CandidateScore], lookahead: str = ""
) -> CandidateReport:
    """A candidate's report from each scorer's score of it."""
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


def ppl_of(logprobs: Sequence[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else math.inf


def own_score(p: NextTextResult) -> CandidateScore:
    """A model's score of its own candidate from its generation log-probs (no scoring call)."""
    logprobs = p.logprobs if (p.text or p.eos) else []
    return CandidateScore(p.state_id, list(p.token_ids), list(logprobs), ppl_of(logprobs), True)


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
    skipped_scores: int = 0  # segments whose scoring call was skipped (identical candidates)
    scored_rows: int = 0  # candidate rows forwarded for scoring, over all workers
    reused_rows: int = 0  # candidate rows scored from generation log-probs (reuse_own_logprobs)
    reused_tokens: int = 0  # lookahead tokens replayed instead of recomputed
    drafted_tokens: int = 0  # greedy steps the drafter spent past its candidates (speculate)
    verified_tokens: int = 0  # draft tokens other models accepted as their own greedy picks
    verify_forwards: int = 0  # multi-token forwards that checked draft tokens
    followed_segments: int = 0  # segments committed from the following ones of a NextText (follow_segments)
    lookup_accepted: int = 0  # looked-up tokens the models accepted as their own greedy picks (lookup_draft)
    lookup_forwards: int = 0  # forwards that checked looked-up tokens

    def count_proposals(
        self, usage: dict[str, Usage], names: Sequence[str], proposals: Sequence[NextTextResult], elapsed_s: float
    ) -> None:
        """A round's NextText calls (``names[i]`` proposed ``proposals[i]``)."""
        self.generate_s += elapsed_s
        slowest = max(proposals, key=lambda p: p.compute_s + p.boundary_s)
        self.worker_generate_s += slowest.compute_s + slowest.boundary_s
        self.worker_boundary_s += slowest.boundary_s
        for name, p in zip(names, proposals):
            usage[name].generated_tokens += p.generated_tokens
            self.reused_tokens += p.reused_tokens
            self.drafted_tokens += p.drafted_tokens
            self.verified_tokens += p.verified_tokens
            self.verify_forwards += p.verify_forwards
            self.lookup_accepted += p.lookup_accepted
            self.lookup_forwards += p.lookup_forwards

    def count_scores(
        self, usage: dict[str, Usage], names: Sequence[str], rows: Sequence[Sequence[CandidateScore]]
    ) -> None:
        """A round's scoring calls (``names[j]`` scored ``rows[j]``)."""
        self.worker_score_s += max(getattr(row, "compute_s", 0.0) for row in rows)
        for name, row in zip(names, rows):
            forwarded = [s for s in row if not s.reused]
            usage[name].scored_tokens += sum(len(s.token_ids) for s in forwarded)
            self.scored_rows += sum(1 for s in forwarded if s.token_ids)
            self.reused_rows += len(row) - len(forwarded)


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
    seed: int | None = None  # the sampling seed (None: greedy)
