"""The array operations the backend-neutral worker code does on logits, for both kinds of array
a backend hands over: torch tensors (transformers) and numpy float32 arrays (llama.cpp, whose CPU
image has no torch).

Each operation dispatches on the array's type and imports torch only when it is given a tensor,
so nothing on the llama.cpp path imports torch. The torch branches are the torch calls the worker
makes on the transformers backend, unchanged (same ops, same dtypes), because its greedy output
is checked bitwise against ``generate``. The numpy branches compute the same quantities: the
log-softmax in float32 as torch does, the sampling distribution in float64.

Only the operations the worker uses live here, each named for what the worker does with it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

# What a backend hands over: float32 logits, a row per token (or one row).
Logits = Union["torch.Tensor", np.ndarray]
NUCLEUS_FIRST_LOOK = 64  # most likely tokens looked at first for the nucleus's end


def _numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def argmax(row) -> int:
    """The greedy pick of one row of logits (the first of tied maxima, as both libraries give)."""
    if _numpy(row):
        return int(np.argmax(row))
    import torch

    return int(torch.argmax(row))


def argmax_rows(rows) -> list[int]:
    """The greedy pick of each row."""
    if _numpy(rows):
        return np.argmax(rows, -1).tolist()
    import torch

    return torch.argmax(rows, -1).tolist()


def log_softmax(x):
    """Log-probabilities over the last axis, in the input's type (float32 logits: float32)."""
    if _numpy(x):
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    import torch

    return torch.log_softmax(x, -1)


def gather(logp, ids: list[int]) -> list[float]:
    """``logp[i, ids[i]]`` for every row i."""
    if _numpy(logp):
        return logp[np.arange(len(ids)), ids].tolist()
    import torch

    return logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].tolist()


def top_k(logp, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Each row's ``k`` largest values, largest first, and their indices (ties: lower index first
    on numpy)."""
    if not _numpy(logp):
        values, indices = logp.topk(k, -1)
        return values.tolist(), indices.tolist()
    picked = np.sort(np.argpartition(-logp, k - 1, axis=-1)[:, :k], axis=-1)
    values = np.take_along_axis(logp, picked, -1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return np.take_along_axis(values, order, -1).tolist(), np.take_along_axis(picked, order, -1).tolist()


def float32(x, copy: bool = False):
    """``x`` as float32: itself when it is float32 already, unless ``copy``."""
    if _numpy(x):
        return x.astype(np.float32, copy=copy)
    if copy:
        import torch

        return x.to(copy=True, dtype=torch.float32)
    return x.float()


def clone(x):
    """A copy that owns its memory (a row kept past the forward's buffer)."""
    return x.copy() if _numpy(x) else x.clone()


def nbytes(x) -> int:
    return int(x.nbytes) if _numpy(x) else x.numel() * x.element_size()


# ---- sampling (``sampling.py`` says why it runs in id order) ------------------------------------
def cumulative(logits, temperature: float, top_k: int, top_p: float):
    """The float64 cumulative distribution, not normalised, over the token ids in id order:
    ``logits`` tempered, then cut to the ``top_k`` largest (ties with the last kept stay), then to
    the nucleus of mass ``top_p``."""
    if _numpy(logits):
        return _cumulative_numpy(logits, temperature, top_k, top_p)
    import torch

    scaled = logits.to(torch.float64) / temperature
    if 0 < top_k < scaled.numel():
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[-1], -math.inf)
    probs = torch.softmax(scaled, -1)
    if 0.0 < top_p < 1.0:
        probs = probs.masked_fill(probs < _nucleus_floor(probs, top_p), 0.0)
    return torch.cumsum(probs, -1)


def _cumulative_numpy(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    n = scaled.size
    if 0 < top_k < n:
        scaled = np.where(scaled < np.partition(scaled, n - top_k)[n - top_k], -math.inf, scaled)
    exp = np.exp(scaled - scaled.max())
    probs = exp / exp.sum()
    if 0.0 < top_p < 1.0:
        probs = np.where(probs < _nucleus_floor(probs, top_p), 0.0, probs)
    return np.cumsum(probs)


def _largest(probs, k: int):
    """The ``k`` largest probabilities, largest first."""
    if _numpy(probs):
        return np.sort(np.partition(probs, probs.size - k)[probs.size - k :])[::-1]
    import torch

    return torch.topk(probs, k).values


def _nucleus_floor(probs, top_p: float):
    """The smallest probability in the nucleus: the most likely tokens, most likely first, up to
    the first whose more likely ones reach ``top_p`` in mass. Found among the top few (a
    nucleus is short), widening until it ends inside them: no sort of the whole vocabulary."""
    size = probs.size if _numpy(probs) else probs.numel()
    k = NUCLEUS_FIRST_LOOK
    while True:
        k = min(k, size)
        ordered = _largest(probs, k)
        cumsum = np.cumsum(ordered) if _numpy(ordered) else ordered.cumsum(-1)
        inside = int((cumsum - ordered < top_p).sum())
        if inside < k or k == size:
            return ordered[max(1, inside) - 1]
        k *= 8


def token_at(cdf, u: float) -> int:
    """The token whose interval of ``cdf`` holds ``u`` (scaled to the total); a token of
    probability 0 has an empty interval and is never drawn."""
    if _numpy(cdf):
        at = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        if at >= cdf.size:  # u * total rounded up to the total: the last token that can be drawn
            at = int(np.flatnonzero(np.diff(cdf, prepend=0.0) > 0).max())
        return at
    import torch

    at = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    if at >= cdf.numel():
        at = int(torch.nonzero(torch.diff(cdf, prepend=cdf.new_zeros(1)) > 0).max())
    return at
