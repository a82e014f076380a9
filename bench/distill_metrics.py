"""The distillation experiment's metrics (``bench/distill_experiment.py``).

- ``heldout_metrics``: per arm, on the prepared held-out texts, bits per byte of the gold text and
  the cross-entropy -Σ p_gemma3(i) log q(i) over Gemma-3's top-k row (renormalized over its k
  entries, as the fusion uses it) at every held-out target position Gemma-3 aligned with. Each
  text is read after the separator that training puts before a text (BOS where the target's
  tokenizer adds one, else EOS), in float32 transformers, with the loss of ``distill/soft_loss.py``.
  Each arm is compared with the original and the CLM arm by an exact paired permutation test
  over the texts (``heldout_paired``).
- ``paired_eval``: acc and acc_norm of every arm from a ``coolfusion eval`` results.jsonl, Wilson
  intervals and exact McNemar tests against the original and the CLM arm
  (``clients/evaluation/stats.py``).
- ``winners``: how often each source gives the minCE distribution, over the training texts.
- ``generation_speed``: greedy generation tokens/s of GGUF files on llama.cpp, interleaved.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

CE_SOURCE = "gemma3"


def _heldout_texts(prep: Path, k: int):
    """(target ids [n], gemma3 soft ids [n, k], probs [n, k]) per held-out text; unaligned rows empty."""
    from coolfusion.distill.fusion import row_probs, top_entries
    from coolfusion.distill.shards import load_shard, shard_paths

    for path in shard_paths(prep, "heldout"):
        shard = load_shard(path)
        offsets = shard["offsets"].tolist()
        for lo, hi in zip(offsets, offsets[1:]):
            ids, lps = top_entries(shard[f"topk_ids.{CE_SOURCE}"][lo:hi], shard[f"topk_logprobs.{CE_SOURCE}"][lo:hi], k)
            aligned = shard[f"aligned.{CE_SOURCE}"][lo:hi].bool()
            ids = torch.where(aligned[:, None], ids.int(), torch.full_like(ids.int(), -1))
            yield shard["input_ids"][lo:hi].long(), ids, row_probs(ids, lps).float()


def _score_model(model_dir: Path, texts: list) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coolfusion.distill.soft_loss import distill_loss
    from coolfusion.distill.train_data import Separators

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    first = Separators.of(tokenizer).start  # the token the sources' distributions were read after
    nll = ce = 0.0
    n_bytes = n_tokens = n_aligned = 0
    per_text = []  # each text's sums, for the paired tests between arms
    with torch.no_grad():
        for ids, soft_ids, soft_probs in texts:
            k = soft_ids.shape[1]
            inputs = torch.cat([torch.tensor([first]), ids])[None]
            labels = torch.cat([torch.tensor([-1]), ids])[None]
            s_ids = torch.cat([torch.full((1, k), -1, dtype=torch.int32), soft_ids])[None]
            s_probs = torch.cat([torch.zeros(1, k), soft_probs])[None]
            parts = distill_loss(model, inputs, labels, s_ids, s_probs, lam=1.0)
            text = {
                "nll": float(parts.clm) * parts.clm_positions,
                "ce": float(parts.kd) * parts.kd_positions,
                "bytes": len(tokenizer.decode(ids.tolist()).encode("utf-8")),
            }
            per_text.append(text)
            nll += text["nll"]
            ce += text["ce"]
            n_tokens += parts.clm_positions
            n_aligned += parts.kd_positions
            n_bytes += text["bytes"]
    return {
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "nll_per_token": nll / n_tokens,
        f"ce_to_{CE_SOURCE}": ce / n_aligned,
        "tokens": n_tokens,
        "aligned_tokens": n_aligned,
        "bytes": n_bytes,
        "per_text": per_text,
    }


def heldout_metrics(prep: Path, dirs: dict[str, Path]) -> dict:
    manifest = json.loads((prep / "manifest.json").read_text())
    texts = list(_heldout_texts(prep, int(manifest["k"])))
    result: dict = {"texts": len(texts)}
    for arm, model_dir in dirs.items():
        result[arm] = _score_model(model_dir, texts)
    for arm in dirs:
        result[arm]["paired"] = {
            base: heldout_paired(result[arm], result[base])
            for base in ("original", "clm")
            if base in dirs and base != arm
        }
    return result


def heldout_paired(a: dict, b: dict) -> dict:
    """Arm ``a`` against arm ``b`` on the same held-out texts, per metric: the difference of the
    pooled values (a - b) and the two-sided p of an exact paired permutation test over texts (each
    text's sums swapped between the arms or not, all 2^n ways), the text being the unit that is
    sampled. The statistic is the pooled difference itself (its denominator does not change)."""
    import numpy as np
    from scipy.stats import permutation_test

    out = {}
    for metric, key, scale in (
        ("bits_per_byte", "nll", a["bytes"] * math.log(2)),
        (f"ce_to_{CE_SOURCE}", "ce", a["aligned_tokens"]),
    ):
        x = np.array([t[key] for t in a["per_text"]]) / scale
        y = np.array([t[key] for t in b["per_text"]]) / scale
        test = permutation_test(
            (x, y), lambda u, v: np.sum(u - v), permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
        )
        out[metric] = {"diff": float(np.sum(x - y)), "p": float(test.pvalue)}
    return out


def paired_eval(results_jsonl: Path, arms: list[str]) -> dict:
    """acc / acc_norm per arm, Wilson 95 % intervals, McNemar vs the original and vs CLM."""
    from coolfusion.clients.evaluation.choice import ChoiceTask
    from coolfusion.clients.evaluation.stats import mcnemar, wilson

    rows = [json.loads(ln) for ln in results_jsonl.read_text().splitlines() if ln.strip()]
    rows = sorted((r for r in rows if r.get("unit") == "scores"), key=lambda r: r["index"])
    hits = {}
    for arm in arms:
        picks = [ChoiceTask.single_predictions(r, arm) for r in rows]
        hits[arm] = {
            "acc": [p[0] == r["answer"] for p, r in zip(picks, rows)],
            "acc_norm": [p[1] == r["answer"] for p, r in zip(picks, rows)],
        }
    n = len(rows)
    out: dict = {"n": n}
    for arm in arms:
        entry = {}
        for metric, h in hits[arm].items():
            entry[metric] = sum(h) / n
            entry[f"{metric}_ci95"] = wilson(sum(h), n)
            for base in ("original", "clm"):
                if base != arm and base in hits:
                    test = mcnemar(h, hits[base][metric])
                    entry[f"{metric}_vs_{base}"] = {"diff": (sum(h) - sum(hits[base][metric])) / n, **test}
        out[arm] = entry
    return out


def winners(prep: Path) -> dict:
    from coolfusion.distill.fusion import min_ce_winners
    from coolfusion.distill.shards import load_shard, read_manifest, shard_paths

    sources = list(read_manifest(prep)["sources"])
    counts = dict.fromkeys(sources, 0)
    for path in shard_paths(prep, "train"):
        for name in min_ce_winners(load_shard(path), sources):
            counts[name] += 1
    total = sum(counts.values())
    return {"texts": total, **{s: {"wins": c, "fraction": c / total if total else 0.0} for s, c in counts.items()}}


PROMPT = "Question: Which gas do plants take in from the air to make food?\nAnswer:"


def generation_speed(files: dict[str, Path], tokens: int = 64, rounds: int = 5) -> dict:
    """Greedy generation tokens/s of GGUF files on llama.cpp (1 thread, as the workers run on a
    shared machine: more threads spin against the other jobs), the files interleaved
    round by round so load changes on the machine hit them alike; the median round. The first
    file is the baseline the others are compared with. Every end-of-generation token is banned,
    so every model generates exactly ``tokens`` tokens after the same prompt: a model that stops
    early would otherwise spread its prompt's prefill over fewer tokens and look slower per token."""
    from llama_cpp import Llama, llama_model_get_vocab

    from coolfusion.services.worker.llamacpp import end_of_generation_ids

    arms = list(files)
    models = {arm: Llama(str(files[arm]), n_ctx=256, n_threads=1, verbose=False) for arm in arms}
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    banned = {
        arm: dict.fromkeys(end_of_generation_ids(llama_model_get_vocab(llm.model)), -math.inf)
        for arm, llm in models.items()
    }
    for _ in range(rounds):
        for arm, llm in models.items():
            llm.reset()
            started = time.perf_counter()
            out = llm.create_completion(
                PROMPT, max_tokens=tokens, temperature=0.0, top_k=1, stop=[], logit_bias=banned[arm]
            )
            assert out["usage"]["completion_tokens"] == tokens, out["usage"]
            elapsed = time.perf_counter() - started
            rates[arm].append(out["usage"]["completion_tokens"] / elapsed)
    for llm in models.values():
        llm.close()
    result = {
        "backend": "llama.cpp (llama-cpp-python), 1 thread",
        "max_tokens": tokens,
        "files": {a: Path(f).name for a, f in files.items()},
    }
    for arm in arms:
        result[arm] = {"tokens_per_s": statistics.median(rates[arm]), "rounds": [round(r, 1) for r in rates[arm]]}
    base = result[arms[0]]["tokens_per_s"]
    for arm in arms[1:]:
        result[arm]["vs_" + arms[0]] = result[arm]["tokens_per_s"] / base - 1.0
    return result
