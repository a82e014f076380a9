"""Throughput of the worker's Distributions RPC: tokens per second of the whole call, each bundled
model behind a real gRPC worker on loopback, on the texts that distillation reads (GSM8K train
question + solution).

    .venv/bin/python scripts/bench_distributions.py --backend llamacpp --texts 4 --top-k 10

Prints one JSON line per model (tokens, seconds, tokens/s; one warm-up call first, not timed),
with ``plain_tokens_per_s``: the same tokens through one plain forward per text in process (all
logits kept: transformers' model call, or llama-cpp-python's ``Llama(logits_all=True)``), measured
right after on the same machine: what the RPC's chunks, top-k and wire cost against the model's
own speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

from coolfusion.data import data_dir
from coolfusion.protos import worker_pb2_grpc
from coolfusion.services.common.server import GrpcService
from coolfusion.services.sources import parse_spec
from coolfusion.services.worker.client import distributions
from coolfusion.services.worker.model import WorkerCore
from coolfusion.services.worker.server import SERVICE_NAME, WorkerServicer


def corpus(n: int) -> list[str]:
    with open(data_dir() / "gsm8k" / "train.jsonl") as fh:
        rows = [json.loads(next(fh)) for _ in range(n)]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


async def bench(name: str, backend: str, texts: list[str], top_k: int) -> dict:
    core = WorkerCore(name, parse_spec(name), device="cpu", backend=backend)
    servicer = WorkerServicer(core)
    service = GrpcService(lambda s: worker_pb2_grpc.add_ModelWorkerServicer_to_server(servicer, s), [SERVICE_NAME])
    address = f"127.0.0.1:{await service.start()}"
    try:
        [_ async for _ in distributions(address, texts[:1], top_k)]  # warm-up
        started = time.perf_counter()
        rows = [d async for d in distributions(address, texts, top_k)]
        seconds = time.perf_counter() - started
    finally:
        await service.stop(0)
        await servicer.stop_reaper()
    tokens = sum(len(d.token_ids) for d in rows)
    plain = plain_seconds(core, [core._distributions.start + d.token_ids for d in rows])
    return {
        "model": name,
        "backend": core.backend,
        "texts": len(texts),
        "top_k": top_k,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "plain_tokens_per_s": round(tokens / plain, 1),
        "threads": torch.get_num_threads(),
    }


def plain_seconds(core, contexts: list[list[int]]) -> float:
    """Seconds of one plain forward per context: transformers' model call, or llama-cpp-python's own
    ``Llama(logits_all=True).eval`` (a fresh state per text)."""
    if core.backend == "llamacpp":
        from llama_cpp import Llama

        llm = Llama(
            str(core.spec.gguf_path),
            n_ctx=max(map(len, contexts)) + 8,
            n_threads=torch.get_num_threads(),
            flash_attn=False,
            logits_all=True,
            verbose=False,
        )
        try:
            started = time.perf_counter()
            for ids in contexts:
                llm.reset()
                llm.eval(ids)
            return time.perf_counter() - started
        finally:
            llm.close()
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in contexts:
            core.model(input_ids=torch.tensor([ids]))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "llamacpp"))
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    texts = corpus(args.texts)
    for name in args.models.split(","):
        print(json.dumps(asyncio.run(bench(name, args.backend, texts, args.top_k))), flush=True)


if __name__ == "__main__":
    main()
