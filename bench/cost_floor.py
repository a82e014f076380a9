"""The bench's references: the machine it ran on, and each source model's own greedy time (floor).

The floor is ``generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)`` per prompt, with
the model loaded as the workers load it (``services.worker.loading.load_hf_model``) on all cores,
plus the per-session KV bytes of an in-process ``WorkerCore`` after N committed tokens.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from pathlib import Path

# Open-ended prompts, so neither side stops early at EOS.
PROMPTS = [
    "The history of the city is long and complicated. It began",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "In this essay I will explain, step by step, why the sky is blue. First,",
    "The following is a detailed description of how bread is made, from the field to the table.",
    "Dear diary, today was the strangest day of my life. When I woke up",
    "Chapter 1\n\nThe rain had not stopped for three days when the stranger arrived",
    "Here is a long list of ideas for a weekend trip, with a short explanation of each:\n1.",
    "The engineers gathered in the meeting room to discuss the new bridge design. The lead engineer said",
]


def machine() -> dict:
    import torch
    import transformers

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu,
        "memory": mem,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def floor(
    models: list[str], prompts: list[str], n: int, repeats: int, log, backend: str = "transformers"
) -> tuple[dict, dict]:
    """Each model's own greedy generate() time per prompt (median of ``repeats``), and per-session
    KV bytes measured on an in-process WorkerCore with the same weights. ``backend`` "llamacpp":
    llama.cpp's own greedy generation instead (``llamacpp_floor``)."""
    import torch

    if backend == "llamacpp":
        return llamacpp_floor(models, prompts, n, repeats, log)

    from coolfusion.services.sources import load_hf_tokenizer, parse_spec
    from coolfusion.services.worker.loading import load_hf_model

    torch.set_num_threads(os.cpu_count() or 1)
    results, memory = {}, {}
    for spec_text in models:
        spec = parse_spec(spec_text)
        t0 = time.perf_counter()
        model = load_hf_model(spec, "cpu", torch.float32)
        tok = load_hf_tokenizer(spec)
        load_s = time.perf_counter() - t0
        _warm_up(model, tok, prompts[0])
        rows = [_time_prompt(model, tok, p, n, repeats, spec.name, log) for p in prompts]
        results[spec.name] = {
            "load_s": load_s,
            "threads": torch.get_num_threads(),
            "prompts": rows,
            "median_s": median([r["s"] for r in rows]),
            "ms_per_token": 1000 * sum(r["s"] for r in rows) / sum(r["tokens"] for r in rows),
        }
        memory[spec.name] = _session_memory(spec, model, tok, prompts[0], n)
        del model
        gc.collect()
    return results, memory


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _warm_up(model, tok, prompt: str) -> None:
    import torch

    with torch.inference_mode():
        model.generate(**tok(prompt, return_tensors="pt"), do_sample=False, max_new_tokens=4, pad_token_id=_pad_id(tok))


def _time_prompt(model, tok, prompt: str, n: int, repeats: int, name: str, log) -> dict:
    """Median time of ``repeats`` greedy generations of exactly ``n`` tokens, with and without
    generate's own prompt lookup (a reference, not the floor: what a user running the model alone
    could turn on; the fused loop's lookup_draft does the same)."""
    import torch

    from coolfusion.orchestrator.options import LOOKUP_TOKENS

    ids = tok(prompt, return_tensors="pt")
    settings = dict(do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=_pad_id(tok))
    times, lookup_times = [], []
    for _ in range(repeats):
        for extra, into in (({}, times), ({"prompt_lookup_num_tokens": LOOKUP_TOKENS}, lookup_times)):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**ids, **settings, **extra)
            into.append(time.perf_counter() - t0)
    produced = out.shape[1] - ids["input_ids"].shape[1]
    log(f"floor {name}: {produced} tokens in {median(times):.2f} s (with prompt lookup {median(lookup_times):.2f} s)")
    return {
        "prompt_tokens": ids["input_ids"].shape[1],
        "tokens": produced,
        "s": median(times),
        "runs": times,
        "lookup_s": median(lookup_times),
    }


def _session_memory(spec, model, tok, prompt: str, n: int) -> dict:
    """KV bytes of a session on ``prompt`` after ``n`` committed tokens."""
    from coolfusion.services.worker.model import WorkerCore

    core = WorkerCore(spec.name, spec, device="cpu", model=model, hf_tokenizer=tok)
    note = "sliding-window layers (Gemma-3) hold at most window-1 (+ kept lookahead) tokens"
    return _core_session_memory(core, prompt, n, note)


def _core_session_memory(core, prompt: str, n: int, note: str) -> dict:
    from coolfusion.services.worker.api import NextTextOptions

    sid, ctx, _ = core.open(prompt)
    done = 0
    while done < n:
        r = core.next_text(sid, NextTextOptions((), n - done))
        done = core.update_state(sid, r.state_id).committed_tokens
        if r.eos or not r.token_ids:
            break
    b = core.session_bytes(sid)
    core.close(sid)
    return {
        "context_tokens": ctx,
        "output_tokens": done,
        "kv_bytes": b["kv_bytes"],
        "kv_bytes_per_token": b["kv_bytes"] / max(1, b["tokens"]),
        "logits_bytes": b["logits_bytes"],
        "note": note,
    }


def llamacpp_floor(models: list[str], prompts: list[str], n: int, repeats: int, log) -> tuple[dict, dict]:
    """Each GGUF model's own greedy generation in llama-cpp-python (``Llama.generate`` with
    top_k=1, all cores, the GGUF file as it is): what a user running the model alone on llama.cpp
    gets; and per-session KV bytes on an in-process llama.cpp WorkerCore."""
    from llama_cpp import Llama

    from coolfusion.services.sources import load_hf_tokenizer, parse_spec

    threads = os.cpu_count() or 1
    results, memory = {}, {}
    for spec_text in models:
        spec = parse_spec(spec_text)
        t0 = time.perf_counter()
        llm = Llama(str(spec.gguf_path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        tok = load_hf_tokenizer(spec)
        load_s = time.perf_counter() - t0
        rows = []
        for prompt in prompts:
            ids = tok(prompt)["input_ids"]
            times = []
            for _ in range(repeats + 1):  # the first run warms up
                llm.reset()
                t0 = time.perf_counter()
                produced = 0
                for _token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                    produced += 1
                    if produced == n:
                        break
                times.append(time.perf_counter() - t0)
            times = times[1:]
            log(f"floor {spec.name} (llama.cpp): {produced} tokens in {median(times):.2f} s")
            rows.append({"prompt_tokens": len(ids), "tokens": produced, "s": median(times), "runs": times})
        results[spec.name] = {
            "load_s": load_s,
            "threads": threads,
            "backend": "llamacpp",
            "prompts": rows,
            "median_s": median([r["s"] for r in rows]),
            "ms_per_token": 1000 * sum(r["s"] for r in rows) / sum(r["tokens"] for r in rows),
        }
        del llm
        gc.collect()
        memory[spec.name] = _llamacpp_session_memory(spec, prompts[0], n)
    return results, memory


def _llamacpp_session_memory(spec, prompt: str, n: int) -> dict:
    from coolfusion.services.worker.model import WorkerCore

    core = WorkerCore(spec.name, spec, device="cpu", backend="llamacpp")
    note = "llama.cpp keeps every state of sliding-window layers (swa_full), so rollbacks can cross the window"
    return _core_session_memory(core, prompt, n, note)
