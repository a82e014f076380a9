"""``coolfusion generate``: one fused generation, streamed to stdout or printed as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from coolfusion.protos.fusion_wire import FUSED_MODES, MODES_HELP, segment_json

from ..launcher import add_backend_arg, start_cluster
from .common import add_rule_args, default_models, models_arg, rule_from_args

TIMINGS = ("total_s", "first_segment_s", "open_s", "generate_s", "score_s", "commit_s")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="fused generation (starts local services unless --connect)")
    g.add_argument("prompt", nargs="?", default="")
    g.add_argument("--messages", help='chat messages as JSON: [{"role": "user", "content": "..."}]')
    g.add_argument("--mode", default=FUSED_MODES[0], help=MODES_HELP)
    g.add_argument("--models", help=f"comma-separated: bundled names or NAME=SOURCE (default {default_models()})")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--max-segment-tokens", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument(
        "--provenance", action="store_true", help="after the text, show which model wrote each segment and its rivals"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus cut when sampling (0 or 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens when sampling (0: off)")
    g.add_argument("--seed", type=seed_arg, help="sampling seed (default: drawn and reported, so it can be reused)")
    g.add_argument("--connect", help="HOST:PORT of a running orchestrator")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_backend_arg(g)
    add_rule_args(g)
    g.set_defaults(func=run)


def seed_arg(text: str) -> int:
    seed = int(text)
    if not 0 <= seed < 2**64:
        raise argparse.ArgumentTypeError(f"a seed is in [0, 2**64), got {seed}")
    return seed


def run(args) -> int:
    from ..launcher import StartError

    if not args.prompt and not args.messages:
        print("error: give a PROMPT or --messages", file=sys.stderr)
        return 2
    if args.connect:
        return asyncio.run(generate(args.connect, args))
    try:
        cluster = start_cluster(models_arg(args.models or default_models()), args.device, backend=args.backend)
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(generate(cluster.address, args))
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.stop()


async def generate(address: str, args) -> int:
    """Stream one generation from the orchestrator at ``address``; 2 on an RPC error."""
    import grpc

    from ..client import FusionClient

    options = dict(
        # Embedded services run exactly --models; a remote orchestrator gets the subset when given.
        models=models_arg(args.models) if args.models and args.connect else [],
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop or [],
        max_segment_tokens=args.max_segment_tokens,
        score_rule=rule_from_args(args),
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    messages = json.loads(args.messages) if args.messages else None
    prompt = None if messages else args.prompt
    segments, final = [], None
    async with FusionClient(address) as client:
        try:
            async for item in client.stream_raw(prompt, messages, **options):
                if item.HasField("segment"):
                    segments.append(item.segment)
                    if not args.json:
                        sys.stdout.write(item.segment.text)
                        sys.stdout.flush()
                else:
                    final = item.final
        except grpc.RpcError as exc:
            if not args.json:
                sys.stdout.write("\n")
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    assert final is not None  # a stream that ends without an error ends with its final message
    if args.json:
        print(json.dumps(result_json(final, segments), ensure_ascii=False, indent=2))
    else:
        if args.provenance:
            print_provenance(segments)
        seed = f"; seed {final.seed}" if final.HasField("seed") else ""
        print(
            f"\n[{final.finish_reason}; {final.segments} segments; {final.timings.total_s:.1f} s{seed}]",
            file=sys.stderr,
        )
    return 0


def print_provenance(segments) -> None:
    """One row per segment on stderr: the model whose candidate won, its text, and every candidate
    with its mean perplexity (what the scoring rule chose between)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("#", "winner", "segment", "candidates (mean PPL)", title="provenance", title_justify="left")
    for i, segment in enumerate(segments, 1):
        rivals = "  ".join(f"{c.model}: {c.text!r} ({c.mean_ppl:.2f})" for c in segment.candidates)
        table.add_row(str(i), segment.model, repr(segment.text), rivals)
    console = Console(stderr=True)
    console.print()
    console.print(table)
    wins: dict[str, int] = {}
    for segment in segments:
        wins[segment.model] = wins.get(segment.model, 0) + 1
    console.print("segments won: " + ", ".join(f"{m} {n}" for m, n in wins.items()))


def result_json(final, segments) -> dict:
    return {
        "text": final.text,
        "finish_reason": final.finish_reason,
        "mode": final.mode,
        "seed": final.seed if final.HasField("seed") else None,
        "segments": [segment_json(s) for s in segments],
        "usage": {
            u.model: {
                "prompt_tokens": u.prompt_tokens,
                "generated_tokens": u.generated_tokens,
                "output_tokens": u.output_tokens,
                "scored_tokens": u.scored_tokens,
            }
            for u in final.usage
        },
        "timings": {k: getattr(final.timings, k) for k in TIMINGS},
    }
