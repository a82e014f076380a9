"""``bench/cost.py --score``: the Score RPC on multiple-choice questions against the models'
own forwards.

Reference, per model, in this process at the workers' thread count (cores / models): one forward
of the question's choices as a batch (each row prompt + `` choice``, right-padded), which is how
a harness scores a question with a model alone. Measured: one ``Score`` call per question (every
choice, every model) through the real services, one question at a time. Target:
Score <= 1.1 x (the sum of the models' reference forwards).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path


def _questions(path: Path, count: int) -> list[tuple[str, list[str]]]:
    from coolfusion.clients.evaluation.choice import choice_prompt, continuation, load_choice_items

    return [(choice_prompt(i.question), [continuation(c) for c in i.choices]) for i in load_choice_items(path)[:count]]


def reference_forwards(models: list[str], questions, threads: int, log) -> dict:
    import torch

    from coolfusion.services.sources import load_hf_tokenizer, parse_spec
    from coolfusion.services.worker.loading import load_hf_model

    torch.set_num_threads(threads)
    out = {}
    for spec_text in models:
        spec = parse_spec(spec_text)
        model, tok = load_hf_model(spec, "cpu", torch.float32), load_hf_tokenizer(spec)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        times = []
        for k, (prompt, texts) in enumerate([questions[0]] + list(questions)):  # the first is a warm-up
            rows = [tok(prompt + t)["input_ids"] for t in texts]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
            if k:
                times.append(time.perf_counter() - t0)
        out[spec.name] = {"median_s": statistics.median(times), "mean_s": statistics.fmean(times)}
        log(f"reference {spec.name}: {1000 * out[spec.name]['median_s']:.1f} ms per question")
        del model
    return out


async def score_rpc(address: str, questions, models: list[str]) -> list[float]:
    from coolfusion.clients.client import FusionClient

    times = []
    async with FusionClient(address) as client:
        await client.score(*questions[0], models=models)  # warm-up
        for prompt, texts in questions:
            t0 = time.perf_counter()
            await client.score(prompt, texts, models=models)
            times.append(time.perf_counter() - t0)
    return times


def run_score_bench(args, log) -> dict:
    from cost_floor import machine

    from coolfusion.clients.launcher import LocalCluster
    from coolfusion.data import data_dir

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [m.split("=", 1)[0] for m in models]
    data = Path(args.score_data) if args.score_data else data_dir() / "arc" / "ARC-Easy-validation.jsonl"
    questions = _questions(data, args.score_questions)
    threads = max(1, (os.cpu_count() or 2) // len(models))
    result = {
        "machine": machine(),
        "config": {"models": models, "data": str(data), "questions": len(questions), "threads": threads},
    }
    result["reference"] = reference_forwards(models, questions, threads, log)
    with LocalCluster(models) as cluster:
        times = asyncio.run(score_rpc(cluster.address, questions, names))
    ref_sum = sum(r["median_s"] for r in result["reference"].values())
    result["score_rpc"] = {"median_s": statistics.median(times), "mean_s": statistics.fmean(times)}
    result["ratio_to_sum_of_forwards"] = result["score_rpc"]["median_s"] / ref_sum
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    log(
        f"Score RPC {1000 * result['score_rpc']['median_s']:.1f} ms per question; models' forwards "
        f"{1000 * ref_sum:.1f} ms summed: x{result['ratio_to_sum_of_forwards']:.2f} (target <= 1.10)"
    )
    return result


def cmd_score_bench(args) -> int:
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", flush=True))
    result = run_score_bench(args, log)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0
