"""Training throughput of a distill target: one forward + backward of ``distill_loss`` (chunked
output layer, sparse soft CE) against the model's own dense CLM loss, on random tokens.

    .venv/bin/python scripts/bench_distill_train_step.py [--target smollm2] [--batch 2] [--seq-len 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from coolfusion.distill.soft_loss import distill_loss
from coolfusion.distill.train import load_target


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="smollm2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_target(args.target)[0].train()
    vocab = model.get_input_embeddings().weight.shape[0]
    shape = (args.batch, args.seq_len)
    ids = torch.randint(0, vocab, shape)
    soft_ids = torch.randint(0, vocab, (*shape, args.k), dtype=torch.int32)
    soft_probs = torch.full((*shape, args.k), 1.0 / args.k)
    losses = {
        "dense_clm": lambda: model(input_ids=ids, labels=ids).loss,
        "distill": lambda: distill_loss(model, ids, ids, soft_ids, soft_probs, 0.9).loss,
    }
    for name, loss_fn in losses.items():
        for rep in range(args.reps):
            start = time.perf_counter()
            loss_fn().backward()
            seconds = time.perf_counter() - start
            model.zero_grad()
            print(
                json.dumps(
                    {"loss": name, "rep": rep, "s": round(seconds, 2), "tokens_per_s": round(ids.numel() / seconds, 1)}
                )
            )


if __name__ == "__main__":
    main()
