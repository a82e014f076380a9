"""A fake of the services ``distill prepare`` calls (``distill/remote.py``'s ``Remote``), for the
control-flow tests of tests/test_distill_prepare.py, and a script that runs a prepare with it
(the SIGKILL test's child process).

Target "t" and source "words" tokenize into words (a space starts a word); source "triples" into
3-byte pieces (splitting characters, as byte-level tokens do), so only the target tokens starting
at a multiple of 3 bytes align with it. Ids are byte sums modulo
VOCAB; a source's top-k at token i is ``(id_i * 7 + j) % VOCAB`` with log-probs ``-1 - j``, mapped
onto the target as ``id // 2`` (so pairs of ids collide and are added).
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass

from coolfusion.services.worker.results import TextDistributions

VOCAB = 1000


def tokens(text: str, how: str) -> list[tuple[int, int]]:
    """UTF-8 byte spans of the tokens of ``text``: words (leading space kept) or 3-byte pieces."""
    data = text.encode("utf-8")
    if how == "triples":
        return [(a, min(a + 3, len(data))) for a in range(0, len(data), 3)]
    starts = [0] + [m.start() for m in re.finditer(rb" ", data) if m.start() > 0]
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(data)]) if b > a]


def token_id(text: str, span: tuple[int, int]) -> int:
    return sum(text.encode("utf-8")[span[0] : span[1]]) % VOCAB


@dataclass
class Alignment:  # the fields prepare reads of services/tokenizer/alignment.py's Alignment
    target_ids: list[int]
    target_spans: list[tuple[int, int]]
    source_index: list[int]
    mapped_ids: list[list[int]]
    mapped_logprobs: list[list[float]]


@dataclass
class Info:
    vocab_size: int


class FakeRemote:
    def __init__(self, served=("words", "triples"), delay: float = 0.0):
        self.served = list(served)
        self.delay = delay
        self.calls: list[tuple[str, int]] = []  # (source, texts) of each Distributions request

    def tokenizers(self) -> dict:
        return {name: Info(VOCAB) for name in ("t", "words", "triples")}

    def vocab_size(self, source: str) -> int:
        return VOCAB

    def distributions(self, source: str, texts, k: int) -> list[TextDistributions]:
        self.calls.append((source, len(texts)))
        out = []
        for index, text in enumerate(texts):
            time.sleep(self.delay)
            spans = tokens(text, source)
            ids = [token_id(text, s) for s in spans]
            out.append(
                TextDistributions(
                    text_index=index,
                    token_ids=ids,
                    starts=[a for a, _ in spans],
                    ends=[b for _, b in spans],
                    gold_logprobs=[-0.5 - 0.1 * t for t in range(len(ids))],
                    topk_ids=[[(i * 7 + j) % VOCAB for j in range(k)] for i in ids],
                    topk_logprobs=[[-1.0 - j for j in range(k)] for _ in ids],
                    n_bytes=len(text.encode("utf-8")),
                    window_starts=[0] if ids else [],
                )
            )
        return out

    def align(self, source, target, text, dist, method) -> Alignment:
        k = len(dist.topk_ids[0]) if dist.topk_ids else 0
        spans = tokens(text, "words")
        by_start = {s: i for i, s in enumerate(dist.starts)}
        index = [by_start.get(a, -1) for a, _ in spans]
        mapped_ids, mapped_lps = [], []
        for i in index:
            merged: dict[int, float] = {}
            for sid, lp in zip(dist.topk_ids[i], dist.topk_logprobs[i]) if i >= 0 else ():
                merged[sid // 2] = merged.get(sid // 2, 0.0) + math.exp(lp)
            row = list(merged.items())[:k]
            mapped_ids.append([t for t, _ in row] + [-1] * (k - len(row)))
            mapped_lps.append([math.log(p) for _, p in row] + [-math.inf] * (k - len(row)))
        return Alignment(
            target_ids=[token_id(text, s) for s in spans],
            target_spans=spans,
            source_index=index,
            mapped_ids=mapped_ids,
            mapped_logprobs=mapped_lps,
        )

    def close(self) -> None:
        pass


TEXTS = [
    "the cat sat on the mat",
    "héllo wörld, a small text",
    "numbers 12 and 345 too",
    "emoji 🙂 and 漢字 here",
    "one more line of words",
    "and the last one",
]


def options(corpus: str, out: str, **kw):
    from coolfusion.distill.prepare import PrepareOptions

    defaults = dict(target="t", sources=["words", "triples"], k=4, heldout=0.1, shard_texts=2, batch_texts=1)
    return PrepareOptions(corpus=[corpus], out=out, **{**defaults, **kw})


if __name__ == "__main__":  # python distill_fake.py CORPUS OUT DELAY: the child a test SIGKILLs
    from coolfusion.distill.prepare import prepare

    prepare(options(sys.argv[1], sys.argv[2]), FakeRemote(delay=float(sys.argv[3])))
