"""The transformers backend's forwards: ``TransformersForwards`` (the call ``generate`` makes) and
the batched step of several sessions (``forward_sessions``).

Only a worker on this backend imports this module (``model.py`` picks it), so torch and the
transformers model classes stay out of a llama.cpp worker, whose CPU image has no torch.

``forward_sessions`` runs a batch of sessions' steps (``batching.StepBatcher``) without building a
batch-wide KV cache: the linear layers (nearly all of the cost) take the rows as one matrix, and
attention runs row by row, each row on its own session's cache, through the lone step's own cache
update and sdpa call. Stacking the caches into one left-padded tensor instead copied every
session's whole cache several times per step (46 % of a SmolLM2 step at 8 sessions). Rows of a
batch may differ from a lone forward in the last bits of float rounding (different matrix
shapes); greedy picks match.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .batching import StepBatcher
from .forward import PREFILL_CHUNK, Forwards, compute_lock


def batchable(cache) -> bool:
    """A cache made of per-layer states (``cache.layers``) can take part in a batched step."""
    return bool(getattr(cache, "layers", None))


# The attention implementation a batched step runs under (``forward_sessions``): each row attends
# over its own session's cache, so no batch-wide KV tensor is ever built.
ROWS_ATTENTION = "coolfusion_session_rows"


class _RowStates:
    """The key (or value) states of a batch's rows, one tensor per session (what the attention of
    that session's lone forward would get), with each row's span of the flattened tokens and its
    attention mask (None for one token: it sees every state it is given)."""

    __slots__ = ("tensors", "spans", "masks")

    def __init__(self, tensors: list[torch.Tensor], spans: list[tuple[int, int]], masks: list):
        self.tensors, self.spans, self.masks = tensors, spans, masks


def _rows_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of each row's tokens on its own session's states: the sdpa call of that
    session's lone forward, row by row, over the flattened tokens (query: [1, heads, T, dim])."""
    if not isinstance(key, _RowStates):  # not a batched forward: plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[:, :, start : start + count], k, v, mask, **kwargs)[0]
        for (start, count), k, v, mask in zip(key.spans, key.tensors, value.tensors, key.masks)
    ]
    return torch.cat(outputs, 1), None


AttentionInterface.register(ROWS_ATTENTION, _rows_attention)


def _row_mask(states: int, count: int, window: int | None, device) -> torch.Tensor | None:
    """Bool mask [1, 1, count, states] of ``count`` new tokens at the end of ``states`` states:
    causal, and within ``window`` positions on a sliding layer (what the model's own mask gives)."""
    if count == 1:
        return None
    q = torch.arange(states - count, states, device=device)[:, None]
    kv = torch.arange(states, device=device)[None, :]
    allowed = kv <= q
    if window:
        allowed &= kv > q - window
    return allowed[None, None]


class _SessionRows(Cache):
    """The cache of a batched forward: ``update`` hands each row's new states to its session's own
    cache layer (the update its lone forward would make) and returns every row's states."""

    def __init__(self, caches: list, spans: list[tuple[int, int]]):
        super().__init__(layers=caches[0].layers)  # layer facts (sliding or not) for the model
        self.caches, self.spans = caches, spans
        self._masks: dict = {}  # (states, tokens, window) -> mask: the same for every layer of a kind

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values, masks = [], [], []
        for cache, (start, count) in zip(self.caches, self.spans):
            layer = cache.layers[layer_idx]
            k, v = layer.update(key_states[:, :, start : start + count], value_states[:, :, start : start + count])
            keys.append(k)
            values.append(v)
            window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
            key = (k.shape[-2], count, window)
            if key not in self._masks:
                self._masks[key] = _row_mask(*key, k.device)
            masks.append(self._masks[key])
        return _RowStates(keys, self.spans, masks), _RowStates(values, self.spans, masks)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per token


def forward_sessions(model, caches: list, rows: list[list[int]], logits_from: list[int], device) -> list[torch.Tensor]:
    """One forward of ``rows[i]`` (one or more tokens) on ``caches[i]`` for every i, as one batch.

    The rows' tokens go in flattened (no padding); returns, per row, float32 logits after each of
    its tokens from index ``logits_from[i]`` on. Each cache has its row's tokens appended. The
    caller holds the model for itself (the attention implementation is switched for the call)."""
    ids, positions, keep, spans = [], [], [], []
    for cache, tokens, first in zip(caches, rows, logits_from):
        start, past = len(ids), cache.get_seq_length()
        ids += tokens
        positions += range(past, past + len(tokens))
        keep += range(start + first, start + len(tokens))
        spans.append((start, len(tokens)))
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = ROWS_ATTENTION
    try:
        out = model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            # A 4-D mask is taken as prepared: the model builds none (rows get theirs in attention).
            attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
            position_ids=torch.tensor([positions], dtype=torch.long, device=device),
            past_key_values=_SessionRows(caches, spans),
            use_cache=True,
            return_dict=True,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
        )
    finally:
        config._attn_implementation = saved
    logits = out.logits[0].to(dtype=torch.float32)
    return list(logits.split([len(r) - f for r, f in zip(rows, logits_from)]))


class TransformersForwards(Forwards):
    """The forwards of a transformers model: ``forward`` is the call ``generate`` makes."""

    backend = "transformers"

    def __init__(self, model, device: torch.device, max_batch: int, fill=None, prefill_chunk: int = PREFILL_CHUNK):
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.device = device
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._compute = compute_lock(model)  # one forward at a time: each uses every thread torch has
        if not batchable(DynamicCache(config=model.config)):
            max_batch = 1
        self.batcher = StepBatcher(self._single_step, self._batched_step, max_batch, fill=fill)

    def inference(self):
        """No autograd records for any forward or the arithmetic on its logits."""
        return torch.inference_mode()

    def new_cache(self):
        """An empty cache that records past states, so that sliding-window layers (Gemma-3) can
        roll back by cropping."""
        cache = DynamicCache(config=self.model.config)
        cache.activate_past_recording()
        return cache

    def forward(self, rows: list[list[int]], cache, keep_last: bool) -> torch.Tensor:
        """One forward of equally long rows on ``cache``, called the way ``generate`` calls it."""
        input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        past = cache.get_seq_length()
        kwargs = dict(
            input_ids=input_ids,
            past_key_values=cache,
            attention_mask=torch.ones(
                (input_ids.shape[0], past + input_ids.shape[1]), dtype=torch.long, device=self.device
            ),
            use_cache=True,
            return_dict=True,
        )
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1 if keep_last else 0
        with self._compute:
            return self.model(**kwargs).logits

    def _single_step(self, cache, tokens: list[int], logits_from: int) -> torch.Tensor:
        """One session's forward alone, called exactly as ``generate`` calls it: float32 logits
        after each token from index ``logits_from``."""
        keep_last = logits_from == len(tokens) - 1
        out = self.forward([tokens], cache, keep_last=keep_last)[0]
        return (out[-1:] if keep_last else out[logits_from:]).to(copy=True, dtype=torch.float32)

    def _batched_step(self, caches: list, rows: list[list[int]], logits_from: list[int]) -> list[torch.Tensor]:
        with self._compute:
            return forward_sessions(self.model, caches, rows, logits_from, self.device)
