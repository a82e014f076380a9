"""The llama.cpp worker without torch: what the CPU image ships (llama-cpp-python, transformers
for its tokenizer classes, tokenizers, numpy, grpc), and no torch or accelerate.

A subprocess in which torch and accelerate cannot be imported (``BLOCK``) runs a llama.cpp
``WorkerCore`` through open, greedy NextText, scoring, a commit, a seeded sampled NextText and
Distributions, and must give what the same calls give in this process, where torch is there.
Asked for the transformers backend, ``coolfusion worker`` in such a process exits with status 2
and one line naming torch. The backend-neutral logit arithmetic (``logits.py``) on numpy arrays
must agree with its torch branch, which is the transformers backend's unchanged arithmetic.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cluster import ORACLE_THREADS, gsm8k_prompt

from coolfusion.services.sources import load_hf_tokenizer, parse_spec
from coolfusion.services.worker import llamacpp
from coolfusion.services.worker import logits as ops
from coolfusion.services.worker.api import Sampling
from coolfusion.services.worker.sampling import choose

# Run first in a subprocess: torch and accelerate look uninstalled. ``None`` in ``sys.modules`` is
# what ``importlib.util.find_spec`` reports as not installed (transformers probes torch that way,
# and a finder that raised there would break transformers instead of hiding torch); the finder
# refuses any submodule all the same.
BLOCK = """
import sys

BLOCKED = ("torch", "accelerate")


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, NoTorch())
for blocked in BLOCKED:
    sys.modules[blocked] = None
"""
PROMPT = gsm8k_prompt(0, shots=1)  # longer than the llama.cpp prefix cache's shortest entry
TEXT = "The quick brown fox jumps over the lazy dog. " * 3
SAMPLING = Sampling(0.9, top_p=0.95, top_k=40, seed=7)


def scenario(prompt: str, text: str, sampling: dict, threads: int) -> dict:
    """One llama.cpp core through the calls a fusion makes; what each returned, as plain data."""
    import sys

    from coolfusion.services.sources import parse_spec
    from coolfusion.services.worker.api import NextTextOptions, Sampling
    from coolfusion.services.worker.model import WorkerCore

    spec = parse_spec("smollm2")
    core = WorkerCore("smollm2", spec, device="cpu", backend="llamacpp", kv_cells=1024, threads=threads)
    sid, _, _ = core.open(prompt)
    greedy = core.next_text(sid, NextTextOptions([], 12))
    candidates = [(greedy.text, False), (" The answer is 42.", False), (" 18", True)]
    scores = core.score_candidates(sid, candidates, greedy.state_id)
    core.update_state(sid, scores[1].state_id)  # adopts the scored row's sequence
    after = core.next_text(sid, NextTextOptions([], 8))
    token = core.next_token(sid)
    core.close(sid)
    sid, _, _ = core.open(prompt)  # the prefix cache's kept logits: the first draw reads them
    sampled = core.next_text(sid, NextTextOptions([], 16, sampling=Sampling(**sampling)))
    core.close(sid)
    (dist,) = core.distributions([text], 4)
    loaded = sorted(m for m, v in sys.modules.items() if m.partition(".")[0] in ("torch", "accelerate") and v)
    return {
        "greedy": greedy.token_ids,
        "greedy_logprobs": greedy.logprobs,
        "scores": [(s.token_ids, s.logprobs, s.reused) for s in scores],
        "after": after.token_ids,
        "next_token": [token.token_id, token.logprob],
        "sampled": sampled.token_ids,
        "topk_ids": dist.topk_ids,
        "topk_logprobs": dist.topk_logprobs,
        "gold": dist.gold_logprobs,
        "info": {k: core.info()[k] for k in ("backend", "device", "dtype", "threads")},
        "torch_modules": loaded,
    }


def run_blocked(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code, *args], capture_output=True, text=True, timeout=timeout, env=os.environ
    )


needs_llamacpp = pytest.mark.skipif(
    not llamacpp.llamacpp_available() and not os.environ.get("CI"),
    reason="llama-cpp-python is not installed (COOLFUSION_LLAMACPP=1 bash scripts/install.sh)",
)


@pytest.mark.slow
@needs_llamacpp
def test_llamacpp_worker_runs_without_torch_as_with_it():
    # The tokenizer converted from the GGUF file is cached first: the blocked process loads it.
    load_hf_tokenizer(parse_spec("smollm2"))
    args = (PROMPT, TEXT, dataclasses.asdict(SAMPLING), ORACLE_THREADS)
    call = f"{inspect.getsource(scenario)}\nimport json\nprint(json.dumps(scenario(*{args!r})))\n"
    blocked = run_blocked(call)
    assert blocked.returncode == 0, blocked.stderr
    got = json.loads(blocked.stdout.strip().splitlines()[-1])
    want = json.loads(json.dumps(scenario(*args)))  # the same calls here, torch importable
    assert got["torch_modules"] == [], got["torch_modules"]
    assert got["info"] == want["info"] and got["info"]["backend"] == "llamacpp"
    for key in ("greedy", "after", "sampled", "topk_ids"):
        assert got[key] == want[key], key
    assert got["next_token"][0] == want["next_token"][0]
    assert got["sampled"] != got["greedy"]  # it did draw
    pairs = [(got["greedy_logprobs"], want["greedy_logprobs"]), ([got["next_token"][1]], [want["next_token"][1]])]
    pairs += [(got["gold"], want["gold"])] + list(zip(got["topk_logprobs"], want["topk_logprobs"]))
    for (ids, lps, reused), (want_ids, want_lps, want_reused) in zip(got["scores"], want["scores"]):
        assert (ids, reused) == (want_ids, want_reused)
        pairs.append((lps, want_lps))
    for mine, theirs in pairs:
        assert len(mine) == len(theirs) and all(abs(a - b) <= 1e-4 for a, b in zip(mine, theirs)), (mine, theirs)
    assert got["scores"][0][2] and got["scores"][0][1] == got["greedy_logprobs"]  # the own candidate's reused


@pytest.mark.parametrize("model,backend", [("smollm2", "transformers"), ("local=/no/such/transformers/model", "auto")])
def test_worker_asked_for_transformers_without_torch_is_one_line_and_status_2(model, backend):
    """``--backend transformers``, or ``auto`` on a model that is no GGUF file: refused before
    anything starts, as one line (``cli.main``), not a traceback."""
    done = run_blocked(
        "from coolfusion.clients.cli import main\nsys.exit(main(sys.argv[1:]))",
        *("worker", "--model", model, "--backend", backend, "--tokenizer-service", "127.0.0.1:9", "--port", "0"),
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "transformers backend needs torch" in lines[0] and "--backend llamacpp" in lines[0], lines[0]


# ---- the logit arithmetic on numpy arrays against its torch branch -------------------------------
@pytest.fixture
def rows() -> tuple[np.ndarray, torch.Tensor]:
    generator = np.random.default_rng(0)
    array = (generator.standard_normal((5, 300)) * 4).astype(np.float32)
    return array, torch.from_numpy(array.copy())


def test_greedy_log_softmax_gather_and_top_k_agree(rows):
    array, tensor = rows
    assert ops.argmax(array[2]) == ops.argmax(tensor[2])
    assert ops.argmax_rows(array) == ops.argmax_rows(tensor)
    logp, want = ops.log_softmax(array), ops.log_softmax(tensor)
    assert logp.dtype == np.float32 and np.allclose(logp, want.numpy(), atol=1e-5)
    ids = [3, 0, 299, 17, 150]
    assert np.allclose(ops.gather(logp, ids), ops.gather(want, ids), atol=1e-5)
    values, indices = ops.top_k(logp, 7)
    want_values, want_indices = ops.top_k(want, 7)
    assert indices == want_indices and np.allclose(values, want_values, atol=1e-5)
    half = array.astype(np.float16)
    assert ops.float32(half).dtype == np.float32 and ops.float32(array) is array
    assert ops.float32(array, copy=True) is not array and ops.clone(array[1]).base is None
    assert ops.nbytes(array) == ops.nbytes(tensor) == 5 * 300 * 4


@pytest.mark.parametrize(
    "sampling", [Sampling(1.0), Sampling(0.5), Sampling(2.0, top_k=3), Sampling(1.0, top_p=0.7), Sampling(1.5, 0.8, 40)]
)
def test_sampling_cdf_and_draws_agree(rows, sampling):
    array, tensor = rows
    cdf, want = ops.cumulative(array[0], *_cut(sampling)), ops.cumulative(tensor[0], *_cut(sampling))
    assert cdf.dtype == np.float64 and np.allclose(cdf, want.numpy(), rtol=1e-12, atol=1e-15)
    draws = [(i + 0.5) / 500 for i in range(500)]
    assert [choose(array[0], sampling, u) for u in draws] == [choose(tensor[0], sampling, u) for u in draws]
    assert ops.token_at(cdf, math.nextafter(1.0, 0.0)) == ops.token_at(want, math.nextafter(1.0, 0.0))


def _cut(sampling: Sampling) -> tuple[float, int, float]:
    return sampling.temperature, sampling.top_k, sampling.top_p
