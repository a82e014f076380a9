"""Fused generation against the cost of running the source models alone::

    .venv/bin/python bench/cost.py [--max-new-tokens 128] [--prompts 2] [--concurrency 1,4,8] [--out FILE]
    .venv/bin/python bench/cost.py --score      # the Score RPC (cost_score.py)
    .venv/bin/python bench/cost.py --gateway    # the HTTP gateway against gRPC (cost_gateway.py)

In one run on one machine:

* floor: each source model's own ``generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)``
  per prompt, loaded as the workers load it (``services.worker.loading.load_hf_model``), all cores;
* fused ``cool`` through the real services (``LocalCluster``: tokenizer service, one worker
  process per model with cores / models torch threads, orchestrator), and the ratios
  T_fused / sum(T_model) and T_fused / max(T_model);
* a per-segment breakdown from the final message's timings (generation, scoring, commit,
  worker compute vs RPC + tokenizer-service time), segment count and length, identical share;
* each optimisation switch off (with the switches that need it) and all off, against all on (an
  engine in this process over the same worker processes, ``FusionOptions``), with a check that
  every configuration produced the same text;
* memory: per-session KV bytes (in-process core) and a worker process's RSS before/after 100
  sessions opened, generated into and closed;
* throughput with 1, 4, 8 concurrent clients, and at the top level again with workers that do
  not batch decode steps (``--max-batch 1``) and with workers that batch but do
  not fill batches with idle sessions' steps (``--fill-ahead 0``).

Prompts are open-ended so neither side stops early at EOS; fused generation still stops at EOS,
so the tokens it actually produced are reported next to every time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from cost_floor import PROMPTS, floor, machine, median, rss_bytes


# ---- fused -------------------------------------------------------------------------------------
def _timings(t) -> dict:
    return {f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields}


def _final_row(reply, seconds: float) -> dict:
    segs = list(reply.segments)
    usage = {
        u.model: {"output": u.output_tokens, "generated": u.generated_tokens, "scored": u.scored_tokens}
        for u in reply.usage
    }
    return {
        "s": seconds,
        "text": reply.text,
        "finish": reply.finish_reason,
        "chars": len(reply.text),
        "tokens": {m: u["output"] for m, u in usage.items()},
        "usage": usage,
        "segments": len(segs),
        "winners": [s.model for s in segs],
        "timings": _timings(reply.timings),
    }


def breakdown(rows: list[dict]) -> dict:
    """Per-segment means and shares of the fused wall time, summed over prompts."""
    total = sum(r["timings"]["total_s"] for r in rows)
    segs = sum(r["segments"] for r in rows)
    t = {k: sum(r["timings"][k] for r in rows) for k in rows[0]["timings"]}
    worker = t["worker_generate_s"] - t["worker_boundary_s"] + t["worker_score_s"] + t["worker_commit_s"]
    overhead = total - t["open_s"] - worker  # RPC, tokenizer-service boundary checks, Python glue
    tokens = sum(max(r["tokens"].values()) for r in rows)
    return {
        "segments": segs,
        "mean_segment_tokens": tokens / max(1, segs),
        "mean_segment_chars": sum(r["chars"] for r in rows) / max(1, segs),
        "identical_share": t["identical_segments"] / max(1, segs),
        "per_segment_ms": {
            "generate_wall": 1000 * t["generate_s"] / max(1, segs),
            "generate_worker": 1000 * (t["worker_generate_s"] - t["worker_boundary_s"]) / max(1, segs),
            "boundary_checks": 1000 * t["worker_boundary_s"] / max(1, segs),
            "score_wall": 1000 * t["score_s"] / max(1, segs),
            "score_worker": 1000 * t["worker_score_s"] / max(1, segs),
            "commit_wall": 1000 * t["commit_s"] / max(1, segs),
            "commit_worker": 1000 * t["worker_commit_s"] / max(1, segs),
        },
        "share_of_wall": {
            "open_prefill": t["open_s"] / total,
            "generate_worker": (t["worker_generate_s"] - t["worker_boundary_s"]) / total,
            "score_worker": t["worker_score_s"] / total,
            "commit_worker": t["worker_commit_s"] / total,
            "boundary_checks": t["worker_boundary_s"] / total,
            "rpc_and_glue": (overhead - t["worker_boundary_s"]) / total,
            "orchestration_overhead": overhead / total,
        },
        "skipped_scores": t["skipped_scores"],
        "scored_rows": t["scored_rows"],
        "reused_rows": t["reused_rows"],
        "reused_tokens": t["reused_tokens"],
        # Tokens that came several per forward (speculate, lookup_draft) and segments committed
        # without a round of their own (follow_segments).
        "speculation": {
            k: t[k]
            for k in (
                "drafted_tokens",
                "verified_tokens",
                "verify_forwards",
                "lookup_accepted",
                "lookup_forwards",
                "followed_segments",
            )
        },
    }


async def fused(address: str, names: list[str], prompts: list[str], n: int, repeats: int, log) -> list[dict]:
    from coolfusion.clients.client import FusionClient

    rows = []
    async with FusionClient(address) as client:
        await client.generate(prompts[0], mode="cool", models=names, max_new_tokens=8)  # warm-up
        for p in prompts:
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                reply = await client.generate(p, mode="cool", models=names, max_new_tokens=n)
                runs.append(_final_row(reply, time.perf_counter() - t0))
            best = sorted(runs, key=lambda r: r["s"])[len(runs) // 2]
            best["runs"] = [r["s"] for r in runs]
            rows.append(best)
            log(f"fused: {best['tokens']} tokens, {best['segments']} segments in {best['s']:.2f} s")
    return rows


async def switches(worker_addresses: dict, prompts: list[str], n: int, log) -> dict:
    """Each optimisation off (and all off) against all on, through an in-process engine over the
    same worker processes; outputs are compared with the unoptimised loop's."""
    from coolfusion.orchestrator.engine import FusionEngine
    from coolfusion.orchestrator.options import FusionOptions
    from coolfusion.orchestrator.request import FusionRequest
    from coolfusion.orchestrator.results import Segment
    from coolfusion.orchestrator.workers import RemoteWorker

    workers = [RemoteWorker(name, addr) for name, addr in worker_addresses.items()]
    engine = FusionEngine(workers)
    configs = {"all": FusionOptions(), "none": FusionOptions.none()}
    for name in FusionOptions.NAMES:
        configs[f"-{name}"] = FusionOptions.without(name)  # and the switches that need it (see "options")
    out = {}
    try:
        for label, opts in configs.items():
            total, texts, winners, segs, identical = 0.0, [], [], 0, 0
            for p in prompts:
                t0 = time.perf_counter()
                final = None
                models = []
                async for item in engine.generate(
                    FusionRequest(prompt=p, models=list(worker_addresses), max_new_tokens=n, options=opts)
                ):
                    if isinstance(item, Segment):
                        models.append(item.model)
                    else:
                        final = item
                total += time.perf_counter() - t0
                texts.append(final.text)
                winners.append(models)
                segs += final.segments
                identical += final.timings.identical_segments
            out[label] = {
                "options": opts.as_dict(),
                "s": total,
                "texts": texts,
                "winners": winners,
                "segments": segs,
            }
            log(f"switches {label}: {total:.2f} s")
    finally:
        for w in workers:
            await w.aclose()
    ref = out["none"]
    for row in out.values():
        row["same_output_as_none"] = row["texts"] == ref["texts"] and row["winners"] == ref["winners"]
        row["speedup_vs_none"] = ref["s"] / row["s"]
        row["time_vs_all"] = row["s"] / out["all"]["s"]
    for row in out.values():
        row.pop("texts"), row.pop("winners")
    return out


async def rss_sessions(worker_address: str, name: str, pid: int, prompt: str, count: int = 100) -> dict:
    from coolfusion.orchestrator.workers import RemoteWorker
    from coolfusion.services.worker.api import NextTextOptions

    w = RemoteWorker(name, worker_address)
    try:

        async def one():
            o = await w.open(prompt, None)
            p = await w.next_text(o.session_id, NextTextOptions((), 8))
            await w.update_state(o.session_id, p.state_id)
            await w.close(o.session_id)

        for _ in range(5):  # warm allocator pools
            await one()
        before = rss_bytes(pid)
        for _ in range(count):
            await one()
        after = rss_bytes(pid)
        for _ in range(count):
            await one()
        after2 = rss_bytes(pid)
    finally:
        await w.aclose()
    return {
        "sessions": count,
        "rss_before": before,
        "rss_after": after,
        "rss_after_200": after2,
        "growth_bytes": after - before,
    }


async def throughput(address: str, names: list[str], prompts: list[str], n: int, levels: list[int], log) -> dict:
    from coolfusion.clients.client import FusionClient

    out = {}
    async with FusionClient(address) as client:
        for c in levels:
            # Every level runs the same mix of prompts: a client sends its requests one after
            # another, as many rounds as it takes for every prompt to run at least once (one client
            # runs all of them in turn; with one prompt per level, a slow prompt would flatter or
            # spoil a level).
            rounds = -(-len(prompts) // c)

            async def one(i, rounds=rounds, c=c):
                tokens = chars = 0
                for r in range(rounds):
                    prompt = prompts[(i + r * c) % len(prompts)]
                    reply = await client.generate(prompt, mode="cool", models=names, max_new_tokens=n)
                    tokens += max(u.output_tokens for u in reply.usage)
                    chars += len(reply.text)
                return tokens, chars

            t0 = time.perf_counter()
            done = await asyncio.gather(*(one(i) for i in range(c)))
            wall = time.perf_counter() - t0
            tokens = sum(t for t, _ in done)
            out[str(c)] = {
                "clients": c,
                "requests": c * rounds,
                "wall_s": wall,
                "tokens": tokens,
                "tokens_per_s": tokens / wall,
            }
            log(f"throughput c={c}: {tokens / wall:.1f} tokens/s")
    base = out[str(levels[0])]["tokens_per_s"]
    for row in out.values():
        row["vs_first"] = row["tokens_per_s"] / base
    return out


def fused_ratios(rows: list[dict], floors: dict, names: list[str]) -> dict:
    """Fused time against the sum and the max of the models' own floors, per prompt and in total."""
    per_prompt = []
    for i, row in enumerate(rows):
        prompt_floors = {m: floors[m]["prompts"][i]["s"] for m in names}
        per_prompt.append(
            {
                "fused_s": row["s"],
                "fused_tokens": row["tokens"],
                "floor_s": prompt_floors,
                "ratio_sum": row["s"] / sum(prompt_floors.values()),
                "ratio_max": row["s"] / max(prompt_floors.values()),
            }
        )
    fused_total = sum(r["s"] for r in rows)
    floor_total = {m: sum(p["s"] for p in floors[m]["prompts"]) for m in names}
    ratios = {
        "per_prompt": per_prompt,
        "fused_total_s": fused_total,
        "floor_total_s": floor_total,
        "T_fused/sum(T_model)": fused_total / sum(floor_total.values()),
        "T_fused/max(T_model)": fused_total / max(floor_total.values()),
        "fused_tokens_per_prompt": median([max(r["tokens"].values()) for r in rows]),
        "note": "floor forces N tokens; fused stops at EOS (tokens actually produced are in fused_tokens)",
    }
    if all("lookup_s" in p for m in names for p in floors[m]["prompts"]):  # transformers' floor only
        lookup_total = {m: sum(p["lookup_s"] for p in floors[m]["prompts"]) for m in names}
        ratios["lookup_total_s"] = lookup_total
        ratios["T_fused/sum(T_model with prompt lookup)"] = fused_total / sum(lookup_total.values())
    return ratios


def variant_throughput(
    models: list[str], names: list[str], prompts: list[str], n: int, clients: int, log, backend: str | None = None
) -> dict:
    """Throughput at the top concurrency with workers that never batch decode steps, and with
    workers that batch but do not fill batches with idle sessions' continuation steps."""
    from coolfusion.clients.launcher import LocalCluster

    out = {}
    for key, env in (
        ("throughput_unbatched", {"COOLFUSION_MAX_BATCH": "1"}),
        ("throughput_unfilled", {"COOLFUSION_FILL_AHEAD": "0"}),
    ):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        variant = LocalCluster(models, backend=backend)
        try:
            address = variant.start()
            out[key] = asyncio.run(throughput(address, names, prompts, n, [clients], log))
        finally:
            variant.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


# ---- driver ------------------------------------------------------------------------------------
def run(args) -> dict:
    from coolfusion.clients.launcher import LocalCluster
    from coolfusion.services.common.security import INTERNAL_TOKEN_ENV, new_internal_token

    # Its own clients call the workers directly: the bench and every cluster it starts share one
    # internal token (LocalCluster takes $COOLFUSION_INTERNAL_TOKEN when set).
    os.environ[INTERNAL_TOKEN_ENV] = os.environ.get(INTERNAL_TOKEN_ENV) or new_internal_token()

    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [m.split("=", 1)[0] for m in models]
    prompts = PROMPTS[: args.prompts]
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    n = args.max_new_tokens
    result = {
        "machine": machine(),
        "config": {"models": models, "max_new_tokens": n, "prompts": prompts, "repeats": args.repeats},
    }

    t0 = time.perf_counter()
    backend = getattr(args, "backend", None)
    result["config"]["backend"] = backend or "auto"
    floor_backend = "llamacpp" if backend == "llamacpp" else "transformers"
    result["floor"], result["memory"] = floor(models, prompts, n, args.repeats, log, floor_backend)
    cluster = LocalCluster(models, backend=backend)
    address = cluster.start()
    try:
        worker_addresses = {
            p.name.split(":", 1)[1]: p.address for p in cluster.processes if p.name.startswith("worker:")
        }
        pids = {p.name.split(":", 1)[1]: p.proc.pid for p in cluster.processes if p.name.startswith("worker:")}
        rows = asyncio.run(fused(address, names, prompts, n, args.repeats, log))
        result["fused"] = {"prompts": rows, "breakdown": breakdown(rows)}
        result["ratios"] = fused_ratios(rows, result["floor"], names)
        if not args.skip_switches:
            result["switches"] = asyncio.run(switches(worker_addresses, prompts[: args.switch_prompts], n, log))
        result["rss"] = {
            name: asyncio.run(rss_sessions(worker_addresses[name], name, pids[name], prompts[0])) for name in names
        }
        result["throughput"] = asyncio.run(throughput(address, names, prompts, n, levels, log))
        result["worker_threads"] = {name: asyncio.run(_threads(worker_addresses[name], name)) for name in names}
    finally:
        cluster.stop()
    if not args.skip_unbatched and levels[-1] > 1:
        result.update(variant_throughput(models, names, prompts, n, levels[-1], log, backend))
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["bench_s"] = time.perf_counter() - t0
    return result


async def _threads(address: str, name: str) -> int:
    from coolfusion.orchestrator.workers import RemoteWorker
    from coolfusion.protos import worker_pb2 as pb

    w = RemoteWorker(name, address)
    try:
        return (await w._call(w.stub.Info, pb.InfoRequest())).threads
    finally:
        await w.aclose()


def summary(r: dict) -> str:
    lines = []
    m = r["machine"]
    lines.append(
        f"machine: {m['cores']} cores, {m['cpu_model']}, torch {m['torch']}, load {m['loadavg_start']} -> {m.get('loadavg_end')}"
    )
    for name, f in r["floor"].items():
        lines.append(
            f"floor {name}: median {f['median_s']:.2f} s / prompt, {f['ms_per_token']:.1f} ms/token ({f['threads']} threads)"
        )
    rt = r["ratios"]
    lines.append(
        f"fused cool: {rt['fused_total_s']:.2f} s total, {rt['fused_tokens_per_prompt']} tokens/prompt; "
        f"T_fused/sum = {rt['T_fused/sum(T_model)']:.2f}, T_fused/max = {rt['T_fused/max(T_model)']:.2f}"
    )
    if "T_fused/sum(T_model with prompt lookup)" in rt:
        lines.append(
            f"reference, generate with prompt lookup: {sum(rt['lookup_total_s'].values()):.2f} s; "
            f"T_fused/sum = {rt['T_fused/sum(T_model with prompt lookup)']:.2f}"
        )
    b = r["fused"]["breakdown"]
    lines.append(
        f"segments {b['segments']}, mean {b['mean_segment_tokens']:.2f} tokens, identical {100 * b['identical_share']:.0f} %"
    )
    lines.append("per segment ms: " + ", ".join(f"{k} {v:.1f}" for k, v in b["per_segment_ms"].items()))
    lines.append("share of wall: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in b["share_of_wall"].items()))
    for name, mem in r["memory"].items():
        lines.append(
            f"KV {name}: {mem['kv_bytes'] / 2**20:.1f} MiB for {mem['context_tokens']}+{mem['output_tokens']} tokens"
        )
    for name, x in r.get("rss", {}).items():
        lines.append(
            f"RSS {name}: {x['rss_before'] / 2**20:.0f} -> {x['rss_after'] / 2**20:.0f} MiB after {x['sessions']} sessions ({x['rss_after_200'] / 2**20:.0f} after 200)"
        )
    for label, s in r.get("switches", {}).items():
        lines.append(
            f"switch {label:28s} {s['s']:.2f} s  x{s['speedup_vs_none']:.2f} vs none  same output: {s['same_output_as_none']}"
        )
    for c, t in r.get("throughput", {}).items():
        lines.append(f"throughput {c} clients: {t['tokens_per_s']:.1f} tokens/s (x{t['vs_first']:.2f})")
    for c, t in r.get("throughput_unbatched", {}).items():
        lines.append(f"throughput {c} clients, workers with --max-batch 1: {t['tokens_per_s']:.1f} tokens/s")
    for c, t in r.get("throughput_unfilled", {}).items():
        lines.append(f"throughput {c} clients, workers with --fill-ahead 0: {t['tokens_per_s']:.1f} tokens/s")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    if args.gateway:
        from cost_gateway import cmd_gateway_bench

        return cmd_gateway_bench(args)
    if args.score:
        from cost_score import cmd_score_bench

        return cmd_score_bench(args)
    result = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from coolfusion.services.sources import DEFAULT_MODELS

    b = argparse.ArgumentParser(prog="bench/cost.py", description="fused generation vs the source models alone")
    b.add_argument("--models", default=",".join(DEFAULT_MODELS))
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--prompts", type=int, default=3, help=f"open-ended prompts to use (at most {len(PROMPTS)})")
    b.add_argument("--repeats", type=int, default=1, help="runs per prompt (the median is reported)")
    b.add_argument("--concurrency", default="1,4,8")
    b.add_argument(
        "--backend",
        choices=["transformers", "llamacpp"],
        default="transformers",
        help="the workers' backend; the floor is that backend's own greedy generation "
        "(transformers generate(), or llama.cpp's)",
    )
    b.add_argument("--switch-prompts", type=int, default=1, help="prompts per switch configuration")
    b.add_argument("--skip-switches", action="store_true")
    b.add_argument(
        "--skip-unbatched",
        action="store_true",
        help="skip the top-concurrency runs with step batching off and with batch filling off",
    )
    b.add_argument("--json", action="store_true", help="print the full JSON result")
    b.add_argument("--out", help="also write the JSON result to this file")
    b.add_argument("--quiet", action="store_true")
    b.add_argument(
        "--score", action="store_true", help="only the Score RPC on multiple-choice questions vs the models' forwards"
    )
    b.add_argument("--score-questions", type=int, default=40)
    b.add_argument(
        "--gateway",
        action="store_true",
        help="only the HTTP gateway's overhead on streamed fused generations vs gRPC (use --max-new-tokens 64)",
    )
    b.add_argument("--score-data", help="ARC JSONL for --score (default ../shared/data/arc/ARC-Easy-validation.jsonl)")
    return b


if __name__ == "__main__":
    sys.exit(cmd_bench(build_parser().parse_args()))
