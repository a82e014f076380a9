"""Loading a worker's model: the weights (dequantised GGUF weights cached as safetensors), packed
for multi-row CPU products (``packing.py``).

This lives with the worker, not in ``services/sources.py``: the tokenizer service loads its
tokenizers through ``sources`` and must not import worker code.
"""

from __future__ import annotations

import logging

from ..sources import ModelSpec, atomic_save, converted_dir
from .packing import pack_linears

log = logging.getLogger(__name__)


def load_hf_model(spec: ModelSpec, device: str, dtype, pack: str = "all"):
    """transformers causal LM for a spec; dequantised GGUF weights are cached as safetensors.

    ``pack``: on CPU/float32, which linear weights get a oneDNN-packed copy for multi-row
    products ("all", "head", "none"; ``packing.py``)."""
    from transformers import AutoModelForCausalLM

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

