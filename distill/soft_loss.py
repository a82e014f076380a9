"""The distillation loss: λ·CLM + (1−λ)·sparse soft-target cross-entropy, with the output layer
applied a chunk of positions at a time.

Gemma-3's output layer has 262k rows: one [batch, length, vocab] float32 tensor of a batch of 4
sequences of 256 tokens is 1 GiB, and autograd would keep it for the backward pass. Here the
decoder's hidden states go through the output layer ``chunk`` positions at a time inside
``torch.utils.checkpoint``: each chunk's logits are reduced to two sums (gold log-probabilities,
soft-target cross-entropy) and freed, and the backward pass recomputes one chunk's logits at a
time. The gradient is the dense loss's gradient (tests/test_distill_train.py checks it).

Soft targets are sparse: per position the fused distribution's ``k`` ids (``-1``: no entry) and
their probabilities, renormalised over the kept entries. The student's log-softmax is over the
whole vocabulary and gathered at those ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .train_options import DEFAULT_CHUNK


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor  # λ·clm + (1−λ)·kd, what the optimizer minimises
    clm: torch.Tensor  # mean next-token NLL over the labelled positions
    kd: torch.Tensor  # mean soft-target cross-entropy over the positions with soft targets
    clm_positions: int
    kd_positions: int


def decoder_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The last hidden states (after the final norm) of a causal LM: its decoder without the head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def softcap_of(model) -> float | None:
    """Gemma-2-style final logit soft-capping, where the model's config asks for it."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _chunk_sums(hidden, head, softcap, labels, soft_ids, soft_probs):
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax and its sums in float32
        logits = logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits, dim=-1)
    has_label = labels >= 0
    gold = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    clm = -torch.where(has_label, gold, torch.zeros_like(gold)).sum()
    kept = soft_ids >= 0
    student = logp.gather(-1, soft_ids.clamp(min=0).long())
    kd = -torch.where(kept, soft_probs * student, torch.zeros_like(student)).sum()
    return clm, kd


def distill_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    soft_ids: torch.Tensor,
    soft_probs: torch.Tensor,
    lam: float,
    chunk: int = DEFAULT_CHUNK,
    attention_mask: torch.Tensor | None = None,
) -> LossParts:
    """Position p predicts ``labels[:, p+1]`` (``-1``: no label) and is matched to the soft
    target row ``p+1`` (``soft_ids`` [B, L, k], ``-1``: no entry; ``soft_probs`` sum to 1 over
    a row's kept entries). ``lam`` = 1 is plain continued training."""
    hidden = decoder_hidden(model, input_ids, attention_mask)[:, :-1]
    labels, soft_ids, soft_probs = labels[:, 1:], soft_ids[:, 1:], soft_probs[:, 1:]
    head, cap = model.get_output_embeddings(), softcap_of(model)
    clm_sum = kd_sum = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[1], chunk):
        part = slice(start, start + chunk)
        args = (hidden[:, part], head, cap, labels[:, part], soft_ids[:, part], soft_probs[:, part])
        if torch.is_grad_enabled() and hidden.requires_grad:
            clm, kd = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            clm, kd = _chunk_sums(*args)
        clm_sum, kd_sum = clm_sum + clm, kd_sum + kd
    n_clm = int((labels >= 0).sum())
    n_kd = int((soft_ids >= 0).any(-1).sum())
    clm_mean = clm_sum / max(n_clm, 1)
    kd_mean = kd_sum / max(n_kd, 1)
    return LossParts(lam * clm_mean + (1.0 - lam) * kd_mean, clm_mean, kd_mean, n_clm, n_kd)
