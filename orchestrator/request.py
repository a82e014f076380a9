"""What a fused generation is asked to do: ``FusionRequest``, checked against the modes (paper
Table 3; ``protos/fusion_wire.py``) and the models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coolfusion.protos.fusion_wire import FUSED_MODES, MODES, SINGLE_PREFIX

from ..services.common.errors import InvalidArgument
from ..services.worker.api import GREEDY, Sampling
from .options import FusionOptions
from .rules import RuleError, ScoreRule


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
    # Each model samples its own candidates (rerank: its whole answer); the rule still chooses.
    sampling: Sampling = GREEDY


def resolve_models(request: FusionRequest, available: Sequence[str]) -> tuple[str, list[str]]:
    """Validate mode and models against the ``available`` ones (config order); returns the mode
    and the request's models in config order (config order decides ties)."""
    mode, names = request.mode or "cool", list(request.models) or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise InvalidArgument(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(available)}")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"models listed twice: {names}")
    if mode.startswith(SINGLE_PREFIX):
        model = mode.removeprefix(SINGLE_PREFIX)
        if model not in available:
            raise InvalidArgument(f"unknown model {model!r} in mode {mode!r}; available: {', '.join(available)}")
        return mode, [model]
    if mode not in FUSED_MODES:
        raise InvalidArgument(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    return mode, [n for n in available if n in names]


def rule_for(request: FusionRequest, names: Sequence[str], default: ScoreRule) -> ScoreRule:
    """The request's own rule (it may only name the request's models), else ``default``
    restricted to the request's models."""
    if request.score_rule is None:
        return default.restricted(names)
    try:
        request.score_rule.check_models(names)
    except RuleError as exc:
        raise InvalidArgument(str(exc)) from None
    return request.score_rule
