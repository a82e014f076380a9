"""A trained Llama-architecture model (SmolLM2) as a GGUF file for the llama.cpp backend.

The ``gguf`` package writes the file; what it cannot derive from a transformers directory (the
tokenizer's vocabulary, merges and special ids, the chat template, the hyper-parameters) is
copied from the target's own GGUF file, which the training never changes. The weights are the
trained ones in float32 (``f32``) or float16 (``f16``, 1-D norms stay float32), under llama.cpp's
tensor names, with the query and key projections permuted back to llama.cpp's rotary layout (the
inverse of what transformers does when it loads a Llama GGUF). Other architectures are refused:
Gemma's norms and soft-capping need conversions this module does not make.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FILE_TYPES = {"f32": 0, "f16": 1}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotary layout -> llama.cpp's (convert_hf_to_gguf's ``permute``)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _copy_metadata(reader, writer, file_type: int) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_uint32(key, file_type)
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def export_gguf(model_dir: str | Path, source_gguf: str | Path, dest: str | Path, dtype: str = "f32") -> Path:
    """Write ``dest`` (a .gguf file) from ``model_dir``'s weights and ``source_gguf``'s metadata."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .train_options import TrainError

    if dtype not in FILE_TYPES:
        raise TrainError(f"GGUF dtype must be one of {', '.join(FILE_TYPES)}, got {dtype!r}")
    reader = gguf.GGUFReader(str(source_gguf))
    arch = reader.fields["general.architecture"].contents()
    config = AutoConfig.from_pretrained(str(model_dir))
    if arch != "llama" or config.model_type != "llama":
        raise TrainError(f"GGUF export writes Llama-architecture models (SmolLM2), not {config.model_type}/{arch}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    wanted = {t.name for t in reader.tensors}
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _copy_metadata(reader, writer, FILE_TYPES[dtype])
        for hf_name, tensor in model.state_dict().items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None or name not in wanted:  # the tied output layer, rotary buffers
                continue
            data = tensor.detach().numpy()
            if hf_name.endswith("q_proj.weight"):
                data = _permute(data, config.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                data = _permute(data, config.num_key_value_heads)
            if dtype == "f16" and data.ndim > 1:
                data = data.astype(np.float16)
            writer.add_tensor(name, np.ascontiguousarray(data))
            wanted.discard(name)
        if wanted:
            raise TrainError(f"{model_dir} lacks tensors the GGUF needs: {', '.join(sorted(wanted)[:4])}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return dest
