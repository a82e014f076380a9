"""Sampled token picks (NextText ``sampling``, ``api.Sampling``).

A drawn token is a function of the request's seed and the token ids before it, nothing else: the
uniform behind the draw is a keyed hash of (seed, every id before the token), and the token is
where that uniform falls in the cumulative distribution of the tempered, cut logits. So whatever
path produced the logits - a replay of kept lookahead, a regeneration after another model's
candidate was committed, a batched step, a multi-token forward that checks draft or looked-up
tokens - the same prefix draws the same token, and the same request with the same seed gives the
same text on any number of concurrent clients. (A batched forward may differ from a lone one in
the last bits of float rounding; that moves a draw only when its uniform falls within rounding
distance of the edge between two tokens, see ``choose``.)

Keyed on the whole prefix rather than on the position alone: a model whose candidate lost
regenerates at the same positions from another text, and reusing the uniforms its rejected
candidate consumed there would tie the new tokens to the ones the scoring rule just turned down.

Speculation stays exact under this rule: a proposed token (another model's draft, a looked-up
one) is kept only while it is the very token this model draws after the tokens before it, so the
continuation is the model's own sampled text with or without proposals.
"""

from __future__ import annotations

import hashlib
from array import array

from . import logits as ops
from .api import Sampling
from .logits import Logits, token_at

PERSON = b"coolfusion.draw1"  # blake2b personalisation: these draws and no other hash's


def _packed(ids) -> bytes:
    return array("q", ids).tobytes()


class PrefixKeys:
    """The draw keys of one session: a running hash of its committed ids (which only grow), so a
    key costs the hash of the uncommitted tokens only."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=32, person=PERSON)
        self._count = 0

    def key(self, committed: list[int], extra: list[int]) -> bytes:
        """The key of the token after ``committed + extra``."""
        if self._count > len(committed):  # cannot happen with append-only ids; rebuild anyway
            self.__init__()
        if self._count < len(committed):
            self._hash.update(_packed(committed[self._count :]))
            self._count = len(committed)
        h = self._hash.copy()
        h.update(_packed(extra))
        h.update(_packed([len(committed) + len(extra)]))  # the length ends the key: no prefix collides
        return h.digest()


def uniform(seed: int, key: bytes) -> float:
    """The uniform in [0, 1) of the draw at ``key`` under ``seed`` (53 random bits)."""
    digest = hashlib.blake2b(key, digest_size=8, key=seed.to_bytes(8, "little"), person=PERSON).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def choose(logits: Logits, sampling: Sampling, u: float) -> int:
    """The token at ``u`` in the distribution ``sampling`` makes of ``logits`` (one row)."""
    return token_at(cumulative(logits, sampling), u)


def cumulative(logits: Logits, sampling: Sampling):
    """The cumulative distribution (float64, not normalised) that ``sampling`` makes of ``logits``
    (a torch tensor or a numpy array, ``logits.py``): temperature, then top-k, then top-p
    (transformers' and vLLM's order; as there, tokens tied with the last one kept stay).

    It runs over the token ids in id order, never in probability order: near-equal probabilities
    (a model's long tail) swap places under float rounding (a batched forward, a cached one),
    which in probability order would hand whole intervals of ``u`` to another token; in id order
    rounding only moves each edge by its own size."""
    return ops.cumulative(logits, sampling.temperature, sampling.top_k, sampling.top_p)


def draw(logits: Logits, sampling: Sampling, keys: PrefixKeys, committed: list[int], extra: list[int]) -> int:
    """The token ``sampling`` draws after ``committed + extra`` from ``logits``."""
    return choose(logits, sampling, uniform(sampling.seed, keys.key(committed, extra)))
