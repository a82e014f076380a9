"""A GGUF file's tokenizer as a transformers tokenizer, without torch.

transformers builds a tokenizer from a GGUF file's metadata with its own converters
(``integrations/gguf/gguf_tokenizer_mapping.py``), but it reads that metadata with a module that
imports torch at its top for the tensor dtypes. The tokenizer service and the llama.cpp worker run
in images without torch, so the metadata is read here with the ``gguf`` package (ggml's own
reader) and handed to the same converters and the same tokenizer class ``AutoTokenizer`` picks.
``tests/test_gguf_tokenizer.py`` holds the result to ``AutoTokenizer.from_pretrained(gguf_file=)``
file for file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType


def gguf_metadata(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The file's metadata as Python values, and its tensor names (no tensor data is read)."""
    reader = GGUFReader(path)
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.ARRAY and not isinstance(value, list):
            value = list(value)
        metadata[key] = value
    return metadata, tuple(t.name for t in reader.tensors)


def tokenizer_dicts(metadata: dict[str, Any]) -> tuple[str, dict, dict]:
    """``(architecture, tokenizer_dict, tokenizer_config)`` as transformers'
    ``get_gguf_tokenizer`` makes them from the same metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING

    architecture = metadata["general.architecture"]
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    # transformers' own defaults for BOS where the file says nothing (llama) or what the reference
    # tokenizer does not do (gemma4): the same tokenizer either way it is read.
    kind = tokenizer.get("tokenizer_type")
    if kind == "llama":
        config.setdefault("add_bos_token", True)
    elif kind == "gemma4":
        config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return architecture, tokenizer, config


def tokenizer_class(architecture: str, metadata: dict[str, Any], tensor_names: tuple[str, ...]) -> type:
    """The class ``AutoTokenizer`` picks for the file: the one registered for its model type, or
    TokenizersBackend where none is. transformers names the model type after the GGUF architecture,
    except for the architectures its config mapping rebuilds."""
    from transformers import AutoConfig
    from transformers.integrations.gguf.gguf_config_mapping import GGUF_CONFIG_ARCHS, get_gguf_config
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    model_type = architecture
    if architecture in GGUF_CONFIG_ARCHS:
        model_type = AutoConfig.for_model(**get_gguf_config(metadata, tensor_names)).model_type
    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    return (tokenizer_class_from_name(name) if name else None) or TokenizersBackend


def load_gguf_tokenizer(path: Path):
    """The tokenizer ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` gives, read without torch."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    metadata, tensor_names = gguf_metadata(path)
    architecture, tokenizer_dict, tokenizer_config = tokenizer_dicts(metadata)
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    cls = tokenizer_class(architecture, metadata, tensor_names)
    return cls(tokenizer_object=backend, name_or_path=str(path.parent), **tokenizer_config, **extra)
