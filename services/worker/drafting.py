"""Checking proposed tokens inside forwards that are due anyway (speculative decoding).

Proposed tokens come from another model's draft (NextText ``draft_text``, encoded with this
tokenizer) or from the session's own ids (prompt-lookup decoding, ``lookup_tokens``). A forward
of the picked, not yet forwarded token plus the proposed ones keeps each proposed token only
while it is this model's own argmax after the tokens before it, so the continuation stays this
model's greedy text; a mismatch costs nothing but the rows of that forward.

Sampling keeps the same rule with "argmax" read as "the token the session draws there"
(``sampling.py``): a draw depends on the seed and the tokens before it only, so a kept proposal
is exactly the token plain sampling would have produced, and the output does not depend on what
was proposed. (Speculative sampling's accept-with-probability rule would keep more proposals but
draw tokens that depend on the proposal, so the same seed could give different texts depending
on batching, which decides whether lookup runs.)
"""

from __future__ import annotations

from . import logits as ops
from .forward import Forwards, crop_tail
from .logits import Logits
from .sessions import Session

# Lookup drafting: the tokens that followed the latest earlier occurrence of the last LOOKUP_NGRAM
# tokens (longest first, down to 1) in the session's own ids stand in as a draft.
LOOKUP_NGRAM = 3


class Drafts:
    """Forwards of one worker that check proposed tokens on a session's greedy continuation."""

    def __init__(self, forwards: Forwards, eos: frozenset):
        self.forwards = forwards
        self.eos = eos

    def lookup(self, ids: list[int], count: int) -> list[int]:
        """Prompt-lookup draft: up to ``count`` tokens that followed the latest earlier occurrence
        of the last n ids (n = ``LOOKUP_NGRAM`` down to 1), cut after an EOS; [] when none."""
        last = len(ids)
        for n in range(min(LOOKUP_NGRAM, last - 1), 0, -1):
            tail = ids[last - n :]
            for start in range(last - n - 1, -1, -1):
                if ids[start] == tail[0] and ids[start : start + n] == tail:
                    proposed = ids[start + n : start + n + count]
                    for i, token in enumerate(proposed):
                        if token in self.eos:
                            return proposed[: i + 1]
                    return proposed
        return []

    def advance(self, s: Session, lookup: int) -> tuple[int, int]:
        """Forward the continuation's last pick: with up to ``lookup`` looked-up tokens checked in
        the same forward when ``lookup`` finds some, else as a plain decode step.
        Returns the looked-up tokens kept and 1 if some were checked, else (0, 0)."""
        proposed = self.lookup(s.ids + s.ahead_tokens, lookup) if lookup else []
        return self.verify(s, proposed), int(bool(proposed))

    def verify(self, s: Session, proposed: list[int]) -> int:
        """One forward (alone or in a batch) of the picked, not yet forwarded token
        ``ahead_tokens[-1]`` and the ``proposed`` tokens after it (``_accept`` keeps those
        greedy decoding picks; none proposed: a decode step). Returns the proposed tokens kept."""
        j = len(s.ahead_logits)  # == len(s.ahead_tokens) - 1
        logits = self.forwards.run(s.cache, [s.ahead_tokens[j]] + proposed, 0, owner=s.id)
        s.ahead_logits.append(ops.clone(logits[0]) if proposed else logits[0])
        s.lookahead += 1
        return self._accept(s, logits, proposed) if proposed else 0

    def ready_verifying(self, s: Session, proposed: list[int]) -> int:
        """``Forwards.ready`` when committed tokens wait to be fed: the same forward also checks the
        ``proposed`` tokens after them (as ``verify``). Returns the proposed tokens kept."""
        assert s.lookahead == 0 and not s.ahead_tokens, "unfed committed tokens with a continuation"
        unfed = s.ids[s.fed :]
        logits = self.forwards.run(s.cache, unfed + proposed, len(unfed) - 1, owner=s.id)
        s.next_logits = ops.clone(logits[0])
        s.fed = len(s.ids)
        return self._accept(s, logits, proposed)

    def _accept(self, s: Session, logits: Logits, proposed: list[int]) -> int:
        """After a forward of ``proposed`` (just fed on top of the session's continuation, with
        ``logits[i]`` the logits before ``proposed[i]``): keep the longest prefix that greedy
        decoding picks (each token the argmax after the ones before it) as continuation tokens
        with their log-probs and logits, and crop the rest from the cache. Returns tokens kept."""
        kept = 0
        if s.sampling.greedy:
            picks = ops.argmax_rows(logits[: len(proposed)])
            while kept < len(proposed) and picks[kept] == proposed[kept]:
                kept += 1
        else:
            while kept < len(proposed) and s.draw(logits[kept], proposed[:kept]) == proposed[kept]:
                kept += 1
        if kept < len(proposed):
            crop_tail(s.cache, len(proposed) - kept)
        if kept:
            logprobs = ops.log_softmax(logits[:kept])
            for i in range(kept):
                s.ahead_tokens.append(proposed[i])
                s.ahead_lps.append(float(logprobs[i, proposed[i]]))
                s.ahead_logits.append(ops.clone(logits[i + 1]))
        s.lookahead += kept
        return kept

    def extend(self, s: Session, n: int, want: int, max_steps: int, lookup: int = 0) -> tuple[int, int, int]:
        """Grow the kept greedy continuation towards ``want`` tokens past the first ``n`` (the
        candidate), with at most ``max_steps`` forwards (each may check ``lookup`` looked-up
        tokens); stops at EOS. Returns forwards, looked-up tokens kept, forwards that checked some."""
        steps = accepted = checks = 0
        while len(s.ahead_tokens) - n < want and s.ahead_tokens[-1] not in self.eos:
            if len(s.ahead_logits) < len(s.ahead_tokens):
                if steps >= max_steps:
                    break
                kept, checked = self.advance(s, lookup)
                accepted += kept
                checks += checked
                steps += 1
                if s.ahead_tokens[-1] in self.eos:
                    break
            s.pick(s.ahead_logits[len(s.ahead_tokens) - 1])
        return steps, accepted, checks
