"""Milliseconds per float32 decode step of each bundled model on transformers, with the share of
``aten::mm`` (docs/testing.md, "Where the time goes").

    .venv/bin/python bench/decode_step.py [--threads 1] [--steps 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from coolfusion.services.sources import parse_spec
from coolfusion.services.worker.loading import load_hf_model


def step_ms(model, steps: int) -> tuple[float, float]:
    """(ms per one-token step with a KV cache after a 10-token prompt, share of time in aten::mm)."""
    with torch.inference_mode():
        past = model(input_ids=torch.arange(1, 11)[None], use_cache=True).past_key_values
        token = torch.tensor([[11]])
        started = time.perf_counter()
        for _ in range(steps):
            past = model(input_ids=token, past_key_values=past, use_cache=True).past_key_values
        ms = (time.perf_counter() - started) / steps * 1000
        with torch.profiler.profile() as prof:
            for _ in range(4):
                past = model(input_ids=token, past_key_values=past, use_cache=True).past_key_values
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm")
    return ms, mm / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("smollm2", "gemma3"):
        for pack in ("all", "none"):
            model = load_hf_model(parse_spec(name), "cpu", torch.float32, pack=pack)
            ms, mm = step_ms(model, args.steps)
            print(f"{name} pack={pack}: {ms:.1f} ms per step, aten::mm {mm:.0%} of it", flush=True)


if __name__ == "__main__":
    main()
