"""``coolfusion distill prepare|train|export``: knowledge fusion (FuseLLM) into one model.

``prepare`` lives here; ``train`` and ``export`` come from ``distill_train.py``'s
``add_parsers(sub)``, called with the same subparsers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from ..launcher import add_backend_arg
from .common import default_models, models_arg


def add_parser(sub) -> None:
    d = sub.add_parser("distill", help="distill fused models into one target (FuseLLM): prepare, train, export")
    steps = d.add_subparsers(dest="distill_command", required=True)
    add_prepare_parser(steps)
    if importlib.util.find_spec(f"{__package__}.distill_train") is not None:
        importlib.import_module(f"{__package__}.distill_train").add_parsers(steps)


def add_prepare_parser(steps) -> None:
    from ...distill.options import PrepareOptions

    defaults = PrepareOptions(corpus=[], out="")
    p = steps.add_parser(
        "prepare",
        help="corpus -> every source's top-k distributions aligned onto the target's tokens, in shards",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "corpus", nargs="+", help="jsonl files of {'text': ...} and/or task names: arc-easy, arc-challenge, gsm8k"
    )
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json); rerun to resume")
    p.add_argument("--target", default=defaults.target, help="the target model: NAME or NAME=SOURCE (its tokenizer)")
    p.add_argument("--sources", default=default_models(), help="comma-separated source models: NAME or NAME=SOURCE")
    p.add_argument("--k", type=int, default=defaults.k, help="top-k entries kept per token and source")
    p.add_argument("--method", default=defaults.method, choices=["span", "dtw"], help="token alignment")
    p.add_argument("--heldout", type=float, default=defaults.heldout, help="fraction of texts held out (by hash)")
    p.add_argument("--limit", type=int, default=defaults.limit, help="first N texts of each corpus (0: all)")
    p.add_argument("--shard-texts", type=int, default=defaults.shard_texts, help="texts per shard")
    p.add_argument("--batch-texts", type=int, default=defaults.batch_texts, help="texts per Distributions request")
    p.add_argument("--connect", help="HOST:PORT of a running orchestrator (its workers serve the sources)")
    p.add_argument("--tokenizer-service", help="HOST:PORT of the deployment's tokenizer service (with --connect)")
    p.add_argument("--device", help="embedded workers: cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_backend_arg(p)
    p.set_defaults(func=run_prepare)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _options(args):
    from ...distill.options import PrepareOptions

    return PrepareOptions(
        corpus=list(args.corpus),
        out=args.out,
        target=args.target.split("=", 1)[0].strip(),
        sources=[s.split("=", 1)[0].strip() for s in models_arg(args.sources)],
        k=args.k,
        method=args.method,
        heldout=args.heldout,
        limit=args.limit,
        shard_texts=args.shard_texts,
        batch_texts=args.batch_texts,
    )


def run_prepare(args) -> int:
    from ...distill.corpus import CorpusError, load_corpus
    from ...distill.prepare import PrepareError, check_local, completed, prepare
    from ...distill.remote import RemoteError
    from ...distill.shards import ShardError
    from ...services.sources import parse_spec, parse_specs
    from ..distill_services import EmbeddedServices, connected, task_texts
    from ..launcher import StartError

    options = _options(args)
    try:  # the checks that need no service come before minutes of model loading
        check_local(options)
        corpus = load_corpus(options.corpus, options.limit, task_texts)
        done = completed(options, corpus)
    except (CorpusError, PrepareError, ShardError) as exc:
        return _fail(str(exc))
    if done is not None:
        print(json.dumps(done, indent=None if args.json else 2))
        return 0
    services = None
    try:
        if args.connect:
            if not args.tokenizer_service:
                return _fail("--connect needs --tokenizer-service HOST:PORT (the deployment's tokenizer service)")
            remote = connected(args.connect, args.tokenizer_service, options.sources)
        else:
            sources = models_arg(args.sources)
            parse_specs(sources)  # an unknown name fails here, before any process starts
            parse_spec(args.target)
            tokenizers = sources + ([args.target] if options.target not in options.sources else [])
            services = EmbeddedServices(
                sources, tokenizers, device=args.device, backend=args.backend, on_event=_start_event
            )
            services.start()
            remote = services.remote()
        with _ProgressReporter() as reporter:
            result = prepare(options, remote, reporter, corpus)
        remote.close()
    except (CorpusError, ShardError, RemoteError) as exc:
        return _fail(str(exc))
    except PrepareError as exc:
        return _fail(str(exc), exc.code)
    except StartError as exc:
        return _fail(str(exc).splitlines()[0])
    except KeyboardInterrupt:
        return 130
    finally:
        if services is not None:
            services.stop()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _start_event(name: str, state: str) -> None:
    print(f"{name}: {state}", file=sys.stderr)


class _ProgressReporter:
    """``distill.prepare.Reporter`` as a rich progress bar on stderr: texts done, target tokens/s."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("prepare"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.progress.start()
        self.task = None
        self.tokens = 0
        self.started = None
        return self

    def begin(self, texts: int) -> None:
        import time

        self.started = time.perf_counter()
        self.task = self.progress.add_task("prepare", total=texts, rate="")

    def skipped(self, texts: int, tokens: int) -> None:
        self.progress.advance(self.task, texts)

    def text_done(self, tokens: int) -> None:
        import time

        self.tokens += tokens
        elapsed = time.perf_counter() - self.started
        self.progress.update(self.task, advance=1, rate=f"{self.tokens / elapsed:.0f} tok/s" if elapsed > 0 else "")

    def __exit__(self, *exc) -> None:
        self.progress.stop()
