"""``coolfusion distill export``: a trained model as a directory a worker serves.

The result is a transformers ``save_pretrained`` directory with its tokenizer (and generation
config), so ``--models NAME=DIR`` loads it like any local model: generate with it, fuse it,
bench and eval it. It is written into a temporary sibling folder and renamed into place, so the
destination is the old export, the new one, or (only while ``--force`` swaps them) absent, never
half-written. An existing destination is refused unless ``force``.

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


def export(source: str | Path, dest: str | Path, force: bool = False) -> Path:
    """Write ``source``'s model and tokenizer to ``dest``; returns ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dest = model_dir(source), Path(dest)
    if dest.exists() and not force:
        raise ExportError(f"{dest} exists: pass --force to replace it")
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
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dest
