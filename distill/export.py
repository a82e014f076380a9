"""``coolfusion distill export``: a trained model as a directory a worker serves.

The result is a transformers ``save_pretrained`` directory with its tokenizer (and generation
config), so ``--models NAME=DIR`` loads it like any local model: generate with it, fuse it,
bench and eval it. It is written into a temporary sibling folder and renamed into place, so the
destination is the old export, the new one, or (only while ``--force`` swaps them) absent, never
half-written. An existing destination is refused unless ``force``.

``gguf``: also a GGUF file of the weights for the llama.cpp backend (``gguf_export.py``; Llama
architecture only), served as ``--models NAME=DIR/model-f32.gguf``.

The source is a run directory (its finished ``model/``, else its newest complete checkpoint), a
``checkpoint-N`` folder, or any model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .train import MODEL_DIR, RUN_FILE, complete_checkpoints
from .train_options import TrainError

EXPORT_FILE = "coolfusion-export.json"


class ExportError(TrainError):
    """A source with no model or a destination that exists: one line, exit 2 on the CLI."""


def model_dir(source: str | Path) -> Path:
    """The folder holding the weights to export, with the step they come from where known."""
    source = Path(source)
    if (source / "config.json").exists():
        return source
    if (source / MODEL_DIR / "config.json").exists():
        return source / MODEL_DIR
    checkpoints = complete_checkpoints(source) if source.is_dir() else []
    if checkpoints:
        return checkpoints[-1][1]
    raise ExportError(f"{source} holds no model: give a `coolfusion distill train` run directory or a model directory")


def _provenance(src: Path) -> dict:
    run = src / RUN_FILE if (src / RUN_FILE).exists() else src.parent / RUN_FILE
    facts: dict = {"source": str(src.resolve())}
    if run.exists():
        facts["run"] = json.loads(run.read_text())
    state = src / "trainer_state.json"
    if state.exists():
        facts["step"] = json.loads(state.read_text()).get("global_step")
    return facts


def _source_gguf(src: Path) -> Path:
    """The target's own GGUF file (its tokenizer and hyper-parameters), from the run's options."""
    from ..services.sources import UnknownModelError, parse_spec

    run = _provenance(src).get("run")
    if not run or not run.get("target"):
        raise ExportError(f"{src} is not from a `coolfusion distill train` run: no target GGUF to take metadata from")
    try:
        spec = parse_spec(run["target"])
    except UnknownModelError as exc:
        raise ExportError(str(exc)) from None
    if not spec.is_gguf:
        raise ExportError(f"--gguf needs a target loaded from a GGUF file; {run['target']} is not")
    return spec.gguf_path


def export(source: str | Path, dest: str | Path, force: bool = False, gguf: str | None = None) -> Path:
    """Write ``source``'s model and tokenizer to ``dest`` (and ``model-<gguf>.gguf`` in it, with
    ``gguf`` = f32 or f16, for the llama.cpp backend); returns ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dest = model_dir(source), Path(dest)
    if dest.exists() and not force:
        raise ExportError(f"{dest} exists: pass --force to replace it")
    source_gguf = _source_gguf(src) if gguf else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{src}: cannot load the model: {str(exc).splitlines()[0]}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp"))
    old = None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps(_provenance(src), indent=1) + "\n")
        if gguf:
            from .gguf_export import export_gguf

            export_gguf(tmp, source_gguf, tmp / f"model-{gguf}.gguf", gguf)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dest
