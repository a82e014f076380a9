"""Measures the alignment behind ``coolfusion distill prepare``: vocabulary maps and Align.

    .venv/bin/python bench/alignment_rate.py [--corpus arc-easy] [--texts 1000] [--k 10]

For a slice of a distillation corpus (``distill/corpus.py`` names) and both directions between
the bundled tokenizers:

* the vocabulary map's build time for the ids that occur in the slice's source tokenization (a
  fresh map: exact byte matches and MinED searches), and the mean cost of one MinED search over
  a random sample of source ids (what a top-k id the texts do not contain costs);
* Align's throughput in process (``span`` and ``dtw``) and over loopback gRPC (``span``, the
  synchronous client), with k-column rows made from the text's own next k tokens (the map is
  warm then: the first pass above filled it).
"""

from __future__ import annotations

import argparse
import random
import time


def _rows(ids: list[int], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """k-column rows: token t's row holds the ids of tokens t .. t+k-1 (a spread of real ids)."""
    rows = [(ids[t : t + k] + [-1] * k)[:k] for t in range(len(ids))]
    return rows, [[-1.0 - c if i >= 0 else float("-inf") for c, i in enumerate(row)] for row in rows]


def _vocab_maps(registry, texts: list[str], sample: int) -> list[dict]:
    from coolfusion.services.tokenizer.alignment import VocabMap, text_tokens

    out = []
    for source, target in (("gemma3", "smollm2"), ("smollm2", "gemma3")):
        src, tgt = registry.get(source), registry.get(target)
        start = time.perf_counter()
        occurring = sorted({i for text in texts for i in text_tokens(src, text)[0]})
        tokenize_s = time.perf_counter() - start
        start = time.perf_counter()
        vmap = VocabMap(src, tgt)
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        vmap.map_ids(occurring)
        map_s = time.perf_counter() - start
        exact, nearest = vmap.exact, vmap.nearest
        seen = set(occurring)
        pool = [i for i in range(src.vocab_size) if i not in seen]
        picked = random.Random(0).sample(pool, min(sample, len(pool)))
        before = vmap.nearest
        start = time.perf_counter()
        vmap.map_ids(picked)
        sample_s = time.perf_counter() - start
        searched = vmap.nearest - before
        out.append(
            {
                "pair": f"{source}->{target}",
                "ids": len(occurring),
                "exact": exact,
                "mined": nearest,
                "tokenize_s": tokenize_s,
                "index_s": index_s,
                "map_s": map_s,
                "sample": len(picked),
                "sample_mined": searched,
                "sample_ms_per_id": 1e3 * sample_s / max(1, len(picked)),
            }
        )
    return out


def _align_throughput(registry, texts: list[str], k: int, address: str) -> list[dict]:
    from coolfusion.services.tokenizer.alignment import align, text_tokens
    from coolfusion.services.tokenizer.client import TokenizerClient

    client = TokenizerClient(address, timeout=600)
    client.wait_ready(30)
    out = []
    try:
        for source, target in (("gemma3", "smollm2"), ("smollm2", "gemma3")):
            src, tgt = registry.get(source), registry.get(target)
            inputs = []
            for text in texts:
                ids, spans = text_tokens(src, text)
                inputs.append((text, ids, spans, *_rows(ids, k)))
            for method, via in (("span", "in-process"), ("dtw", "in-process"), ("span", "gRPC")):
                tokens = 0
                start = time.perf_counter()
                for text, ids, spans, rows, logprobs in inputs:
                    if via == "gRPC":
                        result = client.align(source, target, text, ids, spans, rows, logprobs, method)
                    else:
                        result = align(src, tgt, text, ids, spans, rows, logprobs, method)
                    tokens += len(result.target_ids)
                seconds = time.perf_counter() - start
                out.append(
                    {
                        "pair": f"{source}->{target}",
                        "method": method,
                        "via": via,
                        "texts_per_s": len(inputs) / seconds,
                        "target_tokens_per_s": tokens / seconds,
                    }
                )
    finally:
        client.close()
    return out


def main(argv: list[str] | None = None) -> None:
    from tokenizer_rpc import ServerThread

    from coolfusion.distill.corpus import load_corpus
    from coolfusion.services.tokenizer.loading import load_registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="arc-easy", help="a distill corpus: a task name or a jsonl file")
    parser.add_argument("--texts", type=int, default=1000, help="the first N texts of the corpus")
    parser.add_argument("--k", type=int, default=10, help="top-k columns per row")
    parser.add_argument("--sample", type=int, default=300, help="random source ids for the MinED cost")
    args = parser.parse_args(argv)
    texts = load_corpus([args.corpus], limit=args.texts).texts
    registry = load_registry("smollm2,gemma3")
    print(f"{len(texts)} texts of {args.corpus}, {sum(len(t.encode()) for t in texts)} bytes")
    print("vocabulary map, fresh, for the ids in the slice's source tokens (seconds)")
    for r in _vocab_maps(registry, texts, args.sample):
        print(
            f"  {r['pair']:<16} {r['ids']:>6} ids ({r['exact']} exact, {r['mined']} MinED):"
            f" target index {r['index_s']:.2f} s, map {r['map_s']:.2f} s (tokenizing {r['tokenize_s']:.2f} s);"
            f" {r['sample']} random ids ({r['sample_mined']} MinED): {r['sample_ms_per_id']:.2f} ms per id"
        )
    server = ServerThread(registry)
    try:
        rows = _align_throughput(registry, texts, args.k, f"127.0.0.1:{server.port}")
    finally:
        server.stop()
    print(f"Align, k={args.k}, warm maps")
    for r in rows:
        print(
            f"  {r['pair']:<16} {r['method']:<5} {r['via']:<11}"
            f" {r['texts_per_s']:>8.1f} texts/s {r['target_tokens_per_s']:>9.0f} target tokens/s"
        )


if __name__ == "__main__":
    main()
