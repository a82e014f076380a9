"""Loading a worker's model: the weights (dequantised GGUF weights cached as safetensors), packed
for multi-row CPU products (``packing.py``), its tokenizer, and the facts the worker derives from
both (``LoadedModel``: EOS ids, vocabulary, positions).

This lives with the worker, not in ``services/sources.py``: the tokenizer service loads its
tokenizers through ``sources`` and must not import worker code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..sources import ModelSpec, atomic_save, converted_dir, load_hf_tokenizer
from ..tokenizer.core import TokenizerCore

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def load_hf_model(spec: ModelSpec, device: str, dtype, pack: str = "all"):
    """transformers causal LM for a spec; dequantised GGUF weights are cached as safetensors.

    ``pack``: on CPU/float32, which linear weights get a oneDNN-packed copy for multi-row
    products ("all", "head", "none"; ``packing.py``)."""
    from transformers import AutoModelForCausalLM

    from .packing import pack_linears

    if spec.is_gguf:
        cached = converted_dir(spec, "model")
        if not (cached / "config.json").exists():
            log.info("dequantising %s (cached afterwards in %s)", spec.gguf_path, cached)
            model = AutoModelForCausalLM.from_pretrained(spec.source, gguf_file=spec.gguf_file, dtype=dtype)
            # The weights are dequantised already; the GGUF "quantizer" only blocks saving them.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            atomic_save(cached, model.save_pretrained)
            del model
        source = str(cached)
    else:
        source = spec.source
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    pack_linears(model, pack)
    return model


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM on its device with its tokenizer, and what the worker needs to know of them."""

    name: str
    spec: ModelSpec
    model: object
    tokenizer: TokenizerCore
    device: torch.device | str  # llama.cpp: "cpu"
    dtype: torch.dtype | str  # llama.cpp: "float32", the logits' type (the weights stay as the GGUF has them)
    eos_token_ids: tuple[int, ...]  # tokens that end generation
    eos_set: frozenset  # the same, for membership tests
    eos_token_id: int | None  # the EOS appended to an eos=True candidate
    vocab_size: int  # token ids below this are valid input
    max_positions: int | None
    parameters: int


def load_model(
    name: str,
    spec: ModelSpec,
    device=None,
    dtype=None,
    model=None,
    hf_tokenizer=None,
    pack_weights: str = "all",
    backend: str = "transformers",
    kv_cells: int = 0,
    threads: int = 0,
) -> LoadedModel:
    """Load (or take the given ``model`` / ``hf_tokenizer``) on ``device`` (default: CUDA when
    available) in ``dtype`` (default: bfloat16 on CUDA, float32 on CPU). ``backend`` "llamacpp":
    the GGUF file in a llama.cpp context of ``kv_cells`` cells (``llamacpp.py``), on the CPU, on
    ``threads`` threads (0: ``default_threads()``). Only the transformers backend imports torch."""
    if backend == "llamacpp":
        return _load_llamacpp(name, spec, hf_tokenizer, kv_cells, threads or default_threads())
    return _load_transformers(name, spec, device, dtype, model, hf_tokenizer, pack_weights)


def default_threads() -> int:
    """Threads a llama.cpp worker computes on unless told (``--threads``), as torch counts its
    own by default, without torch: $OMP_NUM_THREADS, else one per physical core among the CPUs
    this process may run on (a core's second hardware thread adds no arithmetic units)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores: set = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no topology to read: count the CPU itself
            cores.add(cpu)
    return max(1, len(cores))


def _load_transformers(name: str, spec: ModelSpec, device, dtype, model, hf_tokenizer, pack_weights: str):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf_tokenizer = hf_tokenizer if hf_tokenizer is not None else load_hf_tokenizer(spec)
    tokenizer = TokenizerCore(name, hf_tokenizer, spec.describe())
    model = model if model is not None else load_hf_model(spec, str(device), dtype, pack_weights)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = () if eos is None else ((int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos))
    # The EOS appended to an eos=True candidate: the tokenizer's EOS when generation stops on it.
    tok_eos = tokenizer.eos_token_id
    eos_token_id = tok_eos if tok_eos in eos_ids or not eos_ids else eos_ids[0]
    embed_rows = model.get_input_embeddings().weight.shape[0]
    return LoadedModel(
        name=name,
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        eos_token_ids=eos_ids,
        eos_set=frozenset(eos_ids),
        eos_token_id=eos_token_id,
        vocab_size=int(min(embed_rows, tokenizer.vocab_size)),
        max_positions=getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None),
        parameters=sum(p.numel() for p in model.parameters()),
    )


def _load_llamacpp(name: str, spec: ModelSpec, hf_tokenizer, kv_cells: int, threads: int) -> LoadedModel:
    from .llamacpp import DEFAULT_KV_CELLS, LlamaCppModel

    # The model first: a file llama.cpp cannot load gets its one-line error before any conversion.
    model = LlamaCppModel(str(spec.gguf_path), name, threads, kv_cells or DEFAULT_KV_CELLS)
    hf_tokenizer = hf_tokenizer if hf_tokenizer is not None else load_hf_tokenizer(spec)
    tokenizer = TokenizerCore(name, hf_tokenizer, spec.describe())
    eos_ids = model.eog_ids  # llama.cpp's end-of-generation tokens (Gemma-3: <eos> and <end_of_turn>)
    tok_eos = tokenizer.eos_token_id
    eos_token_id = tok_eos if tok_eos in eos_ids or not eos_ids else model.eos_id
    return LoadedModel(
        name=name,
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        dtype="float32",
        eos_token_ids=eos_ids,
        eos_set=frozenset(eos_ids),
        eos_token_id=eos_token_id,
        vocab_size=int(min(model.vocab_size, tokenizer.vocab_size)),
        max_positions=min(model.n_ctx_train, model.kv_cells) if model.n_ctx_train else model.kv_cells,
        parameters=model.parameters,
    )
