"""Fusing the sources' aligned top-k distributions into one soft target per target token.

FuseLLM fuses per sequence. Every candidate m (each source; the target, when it is also a source)
gets a reward r_m = exp(-CE_m) from its cross-entropy on the text:

- ``minCE``: the candidate with the lowest CE gives the whole distribution (ties: the first source
  in the manifest's order);
- ``avgCE``: the candidates' distributions averaged with weights softmax_m(r_m). This is the
  weighting of FuseLLM's public trainer (``normalized_weights = softmax(stack(rewards))`` with
  ``reward = 1 / exp(metric_ce)``): a softmax over the rewards, not over -CE, so the weights stay
  close to uniform and lean towards the better source.

CE here is the per-byte NLL of the text (``nll_per_byte.<s>`` in a shard): per-token CE rewards a
tokenizer with longer tokens, while per-byte NLL compares models with different tokenizers on the
same quantity.

Each source row is first renormalized over its kept entries (FuseLLM's softmax over the top-k
logits), the weighted rows are summed, probabilities of the same target id are added (two sources
proposing one id, or two source ids mapped to one target id), the ``k`` most probable ids are kept
and renormalized over. Padding entries have id -1 and probability 0.

A fallback row (a target token no source token starts at) is a one-hot on the gold target token at
that position; it takes part in the fusion like any other row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

METHODS = ("minCE", "avgCE")


class FusionError(ValueError):
    """An unknown fusion function or rows that do not fit together."""


def method_name(method: str) -> str:
    """The canonical spelling of a fusion function name (case-insensitive), else FusionError."""
    for name in METHODS:
        if method.lower() == name.lower():
            return name
    raise FusionError(f"unknown fusion function {method!r}: use {' or '.join(METHODS)}")


def source_weights(nll_per_source: Sequence[float], method: str) -> list[float]:
    """One weight per candidate: minCE a one-hot on the lowest NLL, avgCE softmax_m(exp(-NLL_m))."""
    method = method_name(method)
    nll = [float(x) for x in nll_per_source]
    if not nll:
        raise FusionError("no sources to fuse")
    if any(math.isnan(x) for x in nll):
        raise FusionError("a source's NLL is NaN")
    if method == "minCE":
        best = min(range(len(nll)), key=lambda i: nll[i])
        return [1.0 if i == best else 0.0 for i in range(len(nll))]
    rewards = torch.tensor([math.exp(-x) for x in nll], dtype=torch.float64)
    return torch.softmax(rewards, 0).tolist()


def row_probs(ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Probabilities of a [T, k] block renormalized per row over the entries with id >= 0."""
    probs = torch.where(ids >= 0, logprobs.double().exp(), torch.zeros((), dtype=torch.float64))
    total = probs.sum(-1, keepdim=True)
    return probs / torch.where(total > 0, total, torch.ones_like(total))


def merge_topk(ids: torch.Tensor, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the probabilities of equal ids per row, keep the ``k`` largest, renormalize over them.

    ``ids`` [T, M] (-1: padding), ``probs`` [T, M]; returns (int32 [T, k], float32 [T, k]) sorted by
    probability (ties: the lower id first), padded with id -1 / probability 0.
    """
    if ids.shape != probs.shape or ids.dim() != 2:
        raise FusionError(f"ids {tuple(ids.shape)} and probs {tuple(probs.shape)} must be the same [T, M]")
    n_rows, width = ids.shape
    ids = ids.long()
    probs = torch.where(ids >= 0, probs.double(), torch.zeros((), dtype=torch.float64))
    sorted_ids, order = ids.sort(dim=1, stable=True)
    sorted_probs = probs.gather(1, order)
    new_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_run[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = new_run.long().cumsum(1) - 1
    sums = torch.zeros(n_rows, width, dtype=torch.float64).scatter_add_(1, run, sorted_probs)
    run_ids = torch.full((n_rows, width), -1, dtype=torch.long).scatter_(1, run, sorted_ids)
    sums = torch.where(run_ids >= 0, sums, torch.zeros((), dtype=torch.float64))
    values, pos = sums.sort(dim=1, descending=True, stable=True)
    keep = min(k, width)
    values, kept_ids = values[:, :keep], run_ids.gather(1, pos[:, :keep])
    kept_ids = torch.where(values > 0, kept_ids, torch.full_like(kept_ids, -1))
    total = values.sum(-1, keepdim=True)
    values = values / torch.where(total > 0, total, torch.ones_like(total))
    if keep < k:
        kept_ids = torch.cat([kept_ids, torch.full((n_rows, k - keep), -1, dtype=torch.long)], 1)
        values = torch.cat([values, torch.zeros(n_rows, k - keep, dtype=torch.float64)], 1)
    return kept_ids.int(), values.float()


def top_entries(ids: torch.Tensor, logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A source row cut to its ``k`` most probable entries (a prepared k larger than the train k)."""
    if ids.shape[1] <= k:
        return ids, logprobs
    scores = torch.where(ids >= 0, logprobs.float(), torch.full((), -math.inf))
    pos = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return ids.gather(1, pos), logprobs.gather(1, pos)


def fuse(
    rows_per_source: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    nll_per_source: Mapping[str, float],
    method: str,
    k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One text's fused soft targets: (ids int32 [T, k], probs float32 [T, k]).

    ``rows_per_source``: name -> (ids [T, k_s], logprobs [T, k_s]) on the target's vocabulary (id -1:
    padding); ``nll_per_source``: name -> the text's per-byte NLL under that source. ``k``: the
    entries kept per source and in the result (default: the widest source row).
    """
    names = list(rows_per_source)
    if set(names) != set(nll_per_source):
        raise FusionError(f"rows for {sorted(names)} but NLLs for {sorted(nll_per_source)}")
    k = k or max(ids.shape[1] for ids, _ in rows_per_source.values())
    if k <= 0:
        raise FusionError(f"k must be positive, got {k}")
    lengths = {ids.shape[0] for ids, _ in rows_per_source.values()}
    if len(lengths) != 1:
        raise FusionError(f"sources disagree on the number of target tokens: {sorted(lengths)}")
    weights = source_weights([nll_per_source[n] for n in names], method)
    blocks_ids, blocks_probs = [], []
    for name, weight in zip(names, weights):
        if weight == 0.0:
            continue
        ids, logprobs = top_entries(*rows_per_source[name], k)
        blocks_ids.append(ids)
        blocks_probs.append(weight * row_probs(ids, logprobs))
    return merge_topk(torch.cat(blocks_ids, 1), torch.cat(blocks_probs, 1), k)


def fuse_shard(
    tensors: Mapping[str, torch.Tensor], sources: Sequence[str], method: str, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused soft targets for every token of a shard (``distill/shards.py``), text by text."""
    offsets = tensors["offsets"].tolist()
    out_ids, out_probs = [], []
    for i in range(len(offsets) - 1):
        lo, hi = offsets[i], offsets[i + 1]
        rows = {s: (tensors[f"topk_ids.{s}"][lo:hi], tensors[f"topk_logprobs.{s}"][lo:hi]) for s in sources}
        nll = {s: float(tensors[f"nll_per_byte.{s}"][i]) for s in sources}
        ids, probs = fuse(rows, nll, method, k)
        out_ids.append(ids)
        out_probs.append(probs)
    width = k or max(tensors[f"topk_ids.{s}"].shape[1] for s in sources)
    if not out_ids:
        return torch.zeros(0, width, dtype=torch.int32), torch.zeros(0, width)
    return torch.cat(out_ids), torch.cat(out_probs)


def min_ce_winners(tensors: Mapping[str, torch.Tensor], sources: Sequence[str]) -> list[str]:
    """Per text, the source minCE picks (how often each source wins is part of the report)."""
    n_texts = tensors["offsets"].shape[0] - 1
    winners = []
    for i in range(n_texts):
        weights = source_weights([float(tensors[f"nll_per_byte.{s}"][i]) for s in sources], "minCE")
        winners.append(sources[weights.index(1.0)])
    return winners
