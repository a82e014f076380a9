"""``coolfusion distill prepare``: a corpus -> every source's top-k distributions on the target's
tokens, in shards (``shards.py``), through the workers and the tokenizer service (``remote.py``).

Per text, for every source s (the sources run in parallel, one thread each):

1. s's worker streams its Distributions: s's own tokens with byte spans, gold log-probs and the
   top-k of the distribution AT each token (``services/worker/distributions.py``);
2. the tokenizer service's Align gives the target's tokenization of the text and, per target
   token, the source token starting at the same byte (same conditioning prefix) or none, with
   that token's top-k mapped onto the target vocabulary (colliding ids added);
3. an aligned target token gets s's mapped row; an unaligned one the fallback one-hot on the
   gold target token at that position.

The texts are cut into shards of ``shard_texts`` (held-out texts into their own shards) and each
shard into requests of ``batch_texts``: fixed by the options and the corpus alone, so a resumed run
sends the very requests an uninterrupted one sends and writes the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from ..services.worker.results import TextDistributions
from .corpus import Corpus, load_corpus, split_heldout
from .options import PrepareError, PrepareOptions, check_local
from .remote import Remote, RemoteError
from .shards import MANIFEST, ShardStore, SourceRows, TextRecord, fallback_rows


class Reporter:
    """Progress callbacks (the CLI draws a bar; a test can stop the run after N texts)."""

    def begin(self, texts: int) -> None: ...

    def skipped(self, texts: int, tokens: int) -> None:
        """Texts of shards a previous run completed."""

    def text_done(self, tokens: int) -> None: ...


@dataclass
class Stats:
    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0  # target tokens computed by this run
    texts: int = 0
    busy_s: dict[str, float] = field(default_factory=dict)  # per source: seconds in its Distributions calls
    align_s: dict[str, float] = field(default_factory=dict)  # per source: seconds in its Align calls
    source_tokens: dict[str, int] = field(default_factory=dict)


def check_options(options: PrepareOptions, remote: Remote) -> None:
    """Bad options and what the deployment cannot serve, before anything is written."""
    check_local(options)
    hosted = remote.tokenizers()
    if options.target not in hosted:
        raise PrepareError(
            f"unknown target tokenizer {options.target!r}: the tokenizer service hosts {', '.join(hosted) or 'none'}"
        )
    unhosted = [s for s in options.sources if s not in hosted]
    if unhosted:
        raise PrepareError(f"the tokenizer service hosts no tokenizer for source {', '.join(unhosted)}")
    vocab = {options.target: hosted[options.target].vocab_size}
    vocab.update({s: remote.vocab_size(s) for s in options.sources})
    for name, size in vocab.items():
        if options.k > size:
            raise PrepareError(f"k={options.k} is larger than {name}'s vocabulary ({size} tokens)")


def source_rows(alignment, dist: TextDistributions, k: int) -> SourceRows:
    """One source's rows on the target's tokens: mapped where aligned, else the gold one-hot."""
    n = len(alignment.target_ids)
    ids, logprobs = fallback_rows(alignment.target_ids, k)
    aligned = np.asarray([i >= 0 for i in alignment.source_index], dtype=np.bool_).reshape(n)
    if aligned.any():
        mapped_ids = np.asarray(alignment.mapped_ids, dtype=np.int32).reshape(n, k)
        mapped = np.asarray(alignment.mapped_logprobs, dtype=np.float32).reshape(n, k)
        mapped = np.where(mapped_ids >= 0, mapped, -np.inf)
        ids[aligned] = mapped_ids[aligned]
        logprobs[aligned] = mapped[aligned].astype(np.float16)
    return SourceRows(ids, logprobs, aligned, dist.nll_per_byte, dist.ce, len(dist.token_ids))


def _one_source(remote: Remote, options: PrepareOptions, source: str, texts: Sequence[str], stats: Stats):
    started = time.perf_counter()
    dists = remote.distributions(source, texts, options.k)
    stats.busy_s[source] = stats.busy_s.get(source, 0.0) + time.perf_counter() - started
    stats.source_tokens[source] = stats.source_tokens.get(source, 0) + sum(len(d.token_ids) for d in dists)
    started = time.perf_counter()
    aligned = [
        (remote.align(source, options.target, text, dist, options.method), dist) for text, dist in zip(texts, dists)
    ]
    stats.align_s[source] = stats.align_s.get(source, 0.0) + time.perf_counter() - started
    return aligned


def batch_records(
    remote: Remote, options: PrepareOptions, texts: Sequence[str], pool: ThreadPoolExecutor, stats: Stats
) -> list[TextRecord]:
    """The records of one request batch: every source at once, then assembled text by text."""
    futures = {s: pool.submit(_one_source, remote, options, s, texts, stats) for s in options.sources}
    per_source = {s: f.result() for s, f in futures.items()}
    records = []
    for i, text in enumerate(texts):
        first = per_source[options.sources[0]][i][0]
        record = TextRecord(list(first.target_ids), len(text.encode("utf-8")))
        for s in options.sources:
            alignment, dist = per_source[s][i]
            if alignment.target_ids != first.target_ids:
                raise PrepareError(f"the tokenizer service tokenized text {i} of a batch differently for {s}", 1)
            record.sources[s] = source_rows(alignment, dist, options.k)
        records.append(record)
    return records


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def prepare(
    options: PrepareOptions, remote: Remote, reporter: Reporter | None = None, corpus: Corpus | None = None
) -> dict:
    """Run (or resume) a prepare into ``options.out``; returns the summary the CLI prints.
    ``corpus``: the texts of ``options.corpus`` when the caller loaded them already."""
    reporter = reporter or Reporter()
    try:
        check_options(options, remote)
        corpus = corpus or load_corpus(options.corpus, options.limit)
        train, heldout = split_heldout(corpus.texts, options.heldout)
        store = ShardStore(options.out, options.settings(corpus))
        resumed = store.open()
        stats = Stats()
        reporter.begin(len(train) + len(heldout))
        with ThreadPoolExecutor(len(options.sources), thread_name_prefix="distill") as pool:
            for split, texts in (("train", train), ("heldout", heldout)):
                _prepare_split(remote, options, store, split, texts, pool, stats, reporter)
    except grpc.RpcError as exc:
        code = 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
        raise PrepareError(f"{exc.code().name}: {exc.details()}", code) from None
    except RemoteError as exc:
        raise PrepareError(str(exc), 1) from None
    manifest = store.write_manifest(complete=True)
    return summary(manifest, stats, resumed, options)


def _prepare_split(remote, options, store: ShardStore, split: str, texts, pool, stats: Stats, reporter) -> None:
    """The shards of one split that a previous run did not complete."""
    for index, shard_texts in enumerate(_chunks(texts, options.shard_texts)):
        if index < store.done(split):
            reporter.skipped(len(shard_texts), store.entries[split][index]["tokens"])
            continue
        records = []
        for batch in _chunks(shard_texts, options.batch_texts):
            for record in batch_records(remote, options, batch, pool, stats):
                records.append(record)
                stats.texts += 1
                stats.tokens += len(record.input_ids)
                reporter.text_done(len(record.input_ids))
        store.write(split, index, records)


def completed(options: PrepareOptions, corpus: Corpus) -> dict | None:
    """The summary when ``options.out`` already holds this prepare complete (a rerun needs no
    service); None when there is work left. A folder of another prepare is a ShardError."""
    if not (Path(options.out) / MANIFEST).exists():
        return None
    train, heldout = split_heldout(corpus.texts, options.heldout)
    store = ShardStore(options.out, options.settings(corpus))
    resumed = store.open()
    if store.done("train") < len(_chunks(train, options.shard_texts)):
        return None
    if store.done("heldout") < len(_chunks(heldout, options.shard_texts)):
        return None
    return summary(store.write_manifest(complete=True), Stats(), resumed, options)


def summary(manifest: dict, stats: Stats, resumed: int, options: PrepareOptions) -> dict:
    seconds = time.perf_counter() - stats.started
    return {
        "out": options.out,
        "target": manifest["target"],
        "texts": manifest["texts"],
        "tokens": manifest["tokens"],
        "heldout_texts": manifest["heldout"]["texts"],
        "resumed_shards": resumed,
        "computed_texts": stats.texts,
        "computed_tokens": stats.tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(stats.tokens / seconds, 1) if stats.tokens and seconds > 0 else None,
        "bytes_per_token_per_source": round(manifest["bytes_per_token_per_source"], 1),
        "text_bytes_per_token": manifest["text_bytes_per_token"],
        "aligned_fraction": manifest["aligned_fraction"],
        "sources": {
            s: {
                "tokens_per_s": round(stats.source_tokens[s] / stats.busy_s[s], 1) if stats.busy_s.get(s) else None,
                "distributions_s": round(stats.busy_s.get(s, 0.0), 2),
                "align_s": round(stats.align_s.get(s, 0.0), 2),
                "text_bytes_per_token": round(manifest["text_bytes_per_token"]["sources"][s], 3),
            }
            for s in options.sources
        },
    }
