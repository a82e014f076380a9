"""The Fusion service's vocabulary on the wire, defined once for every side of it: the modes, a
``ScoreRule`` message from its fields, and a ``Segment`` as JSON. The orchestrator, the client
library, the CLI, the HTTP gateway and lm-eval import these; nothing here needs torch."""

from __future__ import annotations

import math
from collections.abc import Mapping

from coolfusion.protos import fusion_pb2 as pb

# cool (the default), cool-noalign (each candidate ends at its own model's word boundary only),
# rerank (each model writes a full answer; the best-scored wins), cool-rerank (rerank among the
# cool answer and every model's own); single:<model> is that model alone.
FUSED_MODES = ("cool", "cool-noalign", "rerank", "cool-rerank")
RERANK_MODES = ("rerank", "cool-rerank")
SINGLE_PREFIX = "single:"
MODES = (*FUSED_MODES, f"{SINGLE_PREFIX}<model>")
MODES_HELP = " | ".join(MODES)


def is_mode(mode: str) -> bool:
    """A fused mode or ``single:<something>`` (whether that model exists is the server's call)."""
    return mode in FUSED_MODES or mode.startswith(SINGLE_PREFIX)


def score_rule_message(
    name: str = "", weights: Mapping[str, float] | None = None, primary: str = "", threshold: float = 0.0
) -> pb.ScoreRule:
    """A ``ScoreRule`` message; empty fields leave the server's defaults (fusion.proto)."""
    return pb.ScoreRule(name=name, weights=dict(weights or {}), primary=primary, threshold=threshold)


def names_a_rule(rule: pb.ScoreRule) -> bool:
    """False when every field is empty: the request leaves the server's rule."""
    return bool(rule.name or rule.weights or rule.primary or rule.threshold)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity


def segment_json(segment: pb.Segment) -> dict:
    """A segment with the candidates it was chosen among, as JSON (no infinities)."""
    return {
        "index": segment.index,
        "text": segment.text,
        "model": segment.model,
        "eos": segment.eos,
        "candidates": [
            {
                "model": c.model,
                "text": c.text,
                "eos": c.eos,
                "finish": c.finish,
                "mean_ppl": _finite(c.mean_ppl),
                "ppl": {p.scorer: _finite(p.ppl) for p in c.ppl},
                "score": _finite(c.score),
            }
            for c in segment.candidates
        ],
    }
