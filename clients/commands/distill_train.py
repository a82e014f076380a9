"""``coolfusion distill train`` and ``coolfusion distill export`` (``distill/train.py``,
``distill/export.py``); ``clients/commands/distill.py`` adds them beside ``prepare``."""

from __future__ import annotations

import json
import sys


def _defaults():
    from ...distill.train_options import TrainOptions

    return TrainOptions(prepared="", out="")


def add_parsers(sub) -> None:
    """Add ``train`` and ``export`` to the ``distill`` subcommand's subparsers."""
    d = _defaults()
    t = sub.add_parser(
        "train",
        help="continue training a target on fused soft targets (λ·CLM + (1−λ)·soft CE; FuseLLM)",
    )
    t.add_argument("prepared", help="a `coolfusion distill prepare` output directory")
    t.add_argument("--out", required=True, help="run directory (checkpoints, loss.jsonl, model/); rerun to resume")
    t.add_argument("--target", help="model spec NAME[=SOURCE] (default: the target the data was prepared for)")
    t.add_argument(
        "--lambda",
        dest="lam",
        metavar="LAMBDA",
        type=float,
        default=d.lam,
        help="weight of the CLM loss, in [0, 1] (default %(default)s)",
    )
    t.add_argument("--fusion", default=d.fusion, help="minCE | avgCE (default %(default)s)")
    t.add_argument("--k", type=int, default=None, help="soft-target entries per token (default: the prepared k)")
    t.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default %(default)s)")
    t.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        help="linear warm-up steps before the cosine decay (default %(default)s)",
    )
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    t.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    t.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (default %(default)s)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="packed blocks per step (default %(default)s)")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per packed block (default %(default)s)")
    t.add_argument(
        "--save-steps", type=int, default=d.save_steps, help="checkpoint every this many steps (default %(default)s)"
    )
    t.add_argument(
        "--save-total-limit", type=int, default=d.save_total_limit, help="checkpoints kept (default %(default)s)"
    )
    t.add_argument("--chunk", type=int, default=d.chunk, help="positions per output-layer chunk (default %(default)s)")
    t.set_defaults(func=run_train)

    e = sub.add_parser("export", help="a trained model as a directory `--models NAME=DIR` serves")
    e.add_argument("source", help="a train run directory, a checkpoint-N folder or a model directory")
    e.add_argument("dest", help="the directory to write (refused if it exists, unless --force)")
    e.add_argument("--force", action="store_true", help="replace an existing destination")
    e.add_argument(
        "--gguf",
        choices=["f32", "f16"],
        help="also write DEST/model-F.gguf for the llama.cpp backend (Llama-architecture targets: SmolLM2)",
    )
    e.set_defaults(func=run_export)


def run_train(args) -> int:
    from ...distill.train import curve_summary, train
    from ...distill.train_options import TrainError, TrainOptions

    options = TrainOptions(
        prepared=args.prepared,
        out=args.out,
        target=args.target,
        lam=args.lam,
        fusion=args.fusion,
        k=args.k,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        chunk=args.chunk,
    )
    try:
        model_dir = train(options)
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"model": str(model_dir), **curve_summary(args.out)}))
    return 0


def run_export(args) -> int:
    from ...distill.export import export
    from ...distill.train_options import TrainError

    try:
        dest = export(args.source, args.dest, force=args.force, gguf=args.gguf)
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(dest)
    return 0
