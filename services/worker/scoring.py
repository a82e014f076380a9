"""Scoring candidate texts on a session's committed state (ScoreCandidates, and M3 FeedTokens):
every row that needs a forward goes into one batched forward on a copy of the committed cache;
rows the session already knows the log-probs of (its own NextText candidate, or a prefix of its
kept greedy continuation) cost no forward.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..common.errors import InvalidArgument
from . import logits as ops
from .forward import Forwards, committed_copy
from .loading import LoadedModel
from .results import CandidateScore, perplexity
from .sessions import Session
from .states import AheadState, GenState, RowBatch, RowState, new_state


class Scorer:
    """``reuse_own_logprobs``: ``score(..., own_state_id=...)`` takes a candidate's log-probs from
    that NextText state when its tokens equal the candidate's encoding."""

    def __init__(self, loaded: LoadedModel, forwards: Forwards, reuse_own_logprobs: bool = True):
        self.loaded = loaded
        self.forwards = forwards
        self.reuse_own_logprobs = reuse_own_logprobs

    def check_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids, vocab = [], self.loaded.vocab_size
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidArgument(f"token id {t!r} out of range for {self.loaded.name} (vocab size {vocab})")
            ids.append(int(t))
        return ids

    def encode(self, candidates: Sequence[tuple[str, bool]]) -> list[list[int]]:
        """Each candidate's ids: its text encoded as a continuation, + the EOS when ``eos``."""
        rows = []
        for i, cand in enumerate(candidates):
            try:
                text, eos = cand
            except (TypeError, ValueError):
                raise InvalidArgument(f"candidate {i} must be a (text, eos) pair") from None
            if not isinstance(text, str):
                raise InvalidArgument(f"candidate {i}: text must be a string")
            ids = self.loaded.tokenizer.encode_ids(text, continuation=True) if text else []
            if eos:
                if not self.loaded.eos_token_ids:
                    raise InvalidArgument(f"{self.loaded.name} has no EOS token to score an eos candidate with")
                ids.append(self.loaded.eos_token_id)
            rows.append(ids)
        return rows

    def score(self, s: Session, rows: list[list[int]], own_state_id: str = "") -> list[CandidateScore]:
        """Score ``rows`` (from ``encode``) on the locked session ``s``.

        ``own_state_id``: this session's current NextText state. A row equal to that state's
        tokens is not forwarded: its log-probs are the generation's, and its state is the NextText
        state (``reused=True``); so is a row whose tokens but the last follow the kept greedy
        continuation (scored from its kept logits). Only the other rows go into the batch."""
        own = None
        if own_state_id and self.reuse_own_logprobs:
            state = s.states.get(own_state_id)
            if isinstance(state, GenState) and state.gen == s.gen and state.epoch == s.epoch:
                own = state
        known = {i: (own_state_id, list(own.logprobs)) for i, r in enumerate(rows) if own and r and r == own.tokens}
        if own_state_id and self.reuse_own_logprobs:
            for i, r in enumerate(rows):
                logprobs = None if i in known or not r else self._ahead_logprobs(s, r)
                if logprobs is not None:
                    known[i] = (new_state(s, AheadState(s.epoch, list(r))), logprobs)
        todo = [i for i in range(len(rows)) if i not in known]
        scored = self.score_rows(s, [rows[i] for i in todo]) if todo else []
        results = dict(known)
        results.update(zip(todo, scored))
        return [
            CandidateScore(
                state_id=results[i][0],
                token_ids=ids,
                logprobs=results[i][1],
                ppl=perplexity(results[i][1]),
                reused=i in known,
            )
            for i, ids in enumerate(rows)
        ]

    def _ahead_logprobs(self, s: Session, ids: list[int]) -> list[float] | None:
        """Log-probs of ``ids`` after the committed state when every token but the last follows a
        prefix of the forwarded greedy continuation (its logits are kept); else None."""
        forwarded = len(s.ahead_logits)
        if len(ids) - 1 > forwarded or ids[:-1] != s.ahead_tokens[: len(ids) - 1]:
            return None
        dists = [self.forwards.ready(s)] + s.ahead_logits[: len(ids) - 1]
        return [float(ops.log_softmax(d)[t]) for d, t in zip(dists, ids)]

    def score_rows(self, s: Session, rows: list[list[int]]) -> list[tuple[str, list[float]]]:
        """Forward all non-empty rows (right-padded) in one batch on the committed state.

        Returns (state_id, logprobs) per row; empty rows get no logprobs.
        """
        first = ops.log_softmax(self.forwards.ready(s))
        live = [i for i, r in enumerate(rows) if r]
        results: list[tuple[str, list[float]]] = [("", [])] * len(rows)
        if live:
            width = max(len(rows[i]) for i in live)
            pad_id = self.loaded.eos_token_id if self.loaded.eos_token_id is not None else 0
            batch_rows = [rows[i] + [pad_id] * (width - len(rows[i])) for i in live]
            cache = committed_copy(s)
            if len(live) > 1:
                cache.batch_repeat_interleave(len(live))
            if len(live) == 1:  # one row may share a batch with other sessions' forwards
                logits = self.forwards.run(cache, batch_rows[0], 0, owner=s.id)[None]
            else:
                logits = self.forwards.forward(batch_rows, cache, keep_last=False)
            batch = RowBatch(cache, width, len(live))
            for b, i in enumerate(live):
                ids = rows[i]
                row_logits = ops.float32(logits[b, : len(ids)])
                lps = [float(first[ids[0]])]
                if len(ids) > 1:
                    lps += ops.gather(ops.log_softmax(row_logits[:-1]), ids[1:])
                state = RowState(s.epoch, batch, b, list(ids), ops.clone(row_logits[-1]))
                results[i] = (new_state(s, state), lps)
            del logits
        for i, r in enumerate(rows):
            if not r:
                results[i] = (new_state(s, RowState(s.epoch, None, -1, [], None)), [])
        return results
