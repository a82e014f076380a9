"""The options of one NextText call (paper T1), as the fusion loop, the orchestrator's worker
handles, the gRPC conversion and ``WorkerCore.next_text`` all pass them.

Plain Python: the orchestrator imports this without torch (its image has none). The worker checks
the values (``generation.check_options``); this module only carries them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields


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
    """

    boundary_tokenizer_ids: tuple[str, ...] = ()
    max_tokens: int = 0
    reuse_lookahead: bool | None = None
    draft_text: str = ""
    draft_tokens: int = 0
    commit_state_id: str = ""
    follow_segments: int = 0
    lookup_tokens: int = 0

    def __post_init__(self) -> None:
        # Callers pass lists (and protobuf repeated fields); a tuple keeps the options immutable.
        object.__setattr__(self, "boundary_tokenizer_ids", tuple(self.boundary_tokenizer_ids))

    @classmethod
    def of(cls, options: NextTextOptions | Sequence[str] = (), *args, **kwargs) -> NextTextOptions:
        """``options`` itself, or options built from the fields as arguments (the older
        ``next_text(session_id, boundary_tokenizer_ids, max_tokens, draft_text=...)`` form)."""
        if isinstance(options, cls):
            if args or kwargs:
                raise TypeError("give NextTextOptions or its fields, not both")
            return options
        return cls(options, *args, **kwargs)

    def request_fields(self) -> dict:
        """Keyword arguments of a ``NextTextRequest`` (besides ``session_id``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_request(cls, request) -> NextTextOptions:
        """The options a ``NextTextRequest`` carries (an unset ``reuse_lookahead``: None)."""
        values = {f.name: getattr(request, f.name) for f in fields(cls)}
        values["reuse_lookahead"] = request.reuse_lookahead if request.HasField("reuse_lookahead") else None
        return cls(**values)
