"""The options of one NextText call (paper T1), as the fusion loop, the orchestrator's worker
handles, the gRPC conversion (``wire.py``) and ``WorkerCore.next_text`` all pass them.

Plain Python: the orchestrator imports this without torch (its image has none). The worker checks
the values (``generation.check_options``); this module only carries them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass


def _float32(value: float) -> float:
    """``value`` as the wire's float32 carries it, so an in-process caller and a gRPC one that
    ask for the same temperature sample with the very same number."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32: infinite, as the wire would make it
        return math.copysign(math.inf, value)


@dataclass(frozen=True)
class Sampling:
    """How a worker picks its tokens (``sampling.py``), applied in the usual order: logits divided
    by ``temperature``, then the ``top_k`` most likely tokens kept, then the smallest set of the
    most likely ones whose probabilities reach ``top_p``, then one drawn.

    ``temperature`` 0 is greedy (the argmax; the other fields are ignored). ``top_k`` 0 and
    ``top_p`` 0 or 1 cut nothing (0 is the wire's unset). ``seed``: the draws are a function of the
    seed and the tokens before the drawn one, so the same request gives the same text."""

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", _float32(float(self.temperature)))
        object.__setattr__(self, "top_p", _float32(float(self.top_p)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self) -> str | None:
        """What is wrong with the values (one line), or None."""
        if not 0.0 <= self.temperature < math.inf:  # also NaN
            return f"temperature must be a finite number >= 0, got {self.temperature!r}"
        if not 0.0 <= self.top_p <= 1.0:
            return f"top_p must be in [0, 1], got {self.top_p!r}"
        if not isinstance(self.top_k, int) or self.top_k < 0:
            return f"top_k must be >= 0, got {self.top_k!r}"
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            return f"seed must be in [0, 2**64), got {self.seed!r}"
        return None


GREEDY = Sampling()


@dataclass(frozen=True)
class NextTextOptions:
    """How far and how a NextText generates (every field has the proto's default meaning).

    The field order is the order ``next_text(session_id, ids, max_tokens, ...)`` takes them.

    ``boundary_tokenizer_ids``: the candidate ends at the first word boundary common to these
    tokenizers (empty: the worker's own). ``max_tokens``: tokens in the segment at most (0: the
    worker's segment cap).

    ``reuse_lookahead`` (None: the worker's default): tokens already generated past the committed
    state (the lookahead of an earlier NextText, kept by its commit) are replayed with their cached
    log-probs, logits and KV instead of being forwarded again; the output is the same either way.

    Speculative decoding across tokenizers (both need ``reuse_lookahead``):

    * ``draft_tokens`` (drafter): after the candidate, extend the kept greedy continuation towards
      this many tokens past it (within the call's forward budget) and return its text as ``draft``.
    * ``draft_text`` (verifier): another model's greedy continuation of the committed text. Encoded
      with this tokenizer, its tokens ride along in forwards that are due anyway and are kept only
      while each is this model's own argmax, so the tokens stay this model's greedy ones.

    ``commit_state_id``: commit that temp state first, exactly as UpdateState would (the fusion loop
    folds each segment's commit into the next NextText).

    ``follow_segments`` (needs ``reuse_lookahead``): also return up to this many segments past a
    boundary candidate that the kept greedy continuation already decides without a forward (each
    with the same ``max_tokens`` cap); committing one commits every segment up to it.

    ``lookup_tokens`` (prompt-lookup decoding): whenever a forward is due and no ``draft_text``
    applies, up to this many tokens that followed the latest earlier occurrence of the session's
    last few ids go into the same forward and are kept while they are greedy picks.

    ``sampling`` (default greedy): how tokens are picked (``Sampling``). With sampling, "greedy"
    above reads "drawn": a draft or looked-up token is kept only while it is the very token this
    model draws at its place, and the kept continuation is the model's own drawn text.
    """

    boundary_tokenizer_ids: tuple[str, ...] = ()
    max_tokens: int = 0
    reuse_lookahead: bool | None = None
    draft_text: str = ""
    draft_tokens: int = 0
    commit_state_id: str = ""
    follow_segments: int = 0
    lookup_tokens: int = 0
    sampling: Sampling = GREEDY

    def __post_init__(self) -> None:
        # Callers pass lists (and protobuf repeated fields); a tuple keeps the options immutable.
        object.__setattr__(self, "boundary_tokenizer_ids", tuple(self.boundary_tokenizer_ids))
