"""``coolfusion distill train``: continue training a target on the fused soft targets (FuseLLM).

The loop is transformers' ``Trainer`` (AdamW, cosine schedule with warm-up, seeded data order,
checkpoints, resume); ``DistillTrainer.compute_loss`` is λ·CLM + (1−λ)·sparse soft-target CE
(``soft_loss.py``). The target loads as a worker loads it (``services/worker/loading.py``: a
bundled GGUF dequantises into a cached HF directory), unpacked, in float32.

A run directory holds ``run.json`` (the options: a resume must use the same), Trainer's
``checkpoint-N`` folders, ``loss.jsonl`` (one line per optimizer step) and, when done, ``model/``
(weights + tokenizer, written whole or not at all). A killed run resumes from its newest complete
checkpoint and rewrites ``loss.jsonl`` past it, so the curve equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from .soft_loss import distill_loss
from .train_data import BlockDataset, Separators, check_k, fused_texts, load_prepared, pack_blocks
from .train_options import TrainError, TrainOptions

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CURVE_FILE = "loss.jsonl"
MODEL_DIR = "model"


class DistillTrainer(Trainer):
    """Trainer whose loss is ``soft_loss.distill_loss``; each step's parts go to ``last_parts``."""

    def __init__(self, *args, lam: float, chunk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam, self.chunk = lam, chunk
        self.loss_is_scaled_for_ga = False  # a per-batch mean
        self.last_parts: dict | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = distill_loss(
            model, inputs["input_ids"], inputs["labels"], inputs["soft_ids"], inputs["soft_probs"], self.lam, self.chunk
        )
        if model.training:
            self.last_parts = {
                "loss": float(parts.loss.detach()),
                "clm": float(parts.clm.detach()),
                "kd": float(parts.kd.detach()),
                "lr": float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else None,
                "tokens": int(inputs["input_ids"].numel()),
            }
        return (parts.loss, None) if return_outputs else parts.loss


class LossCurve(TrainerCallback):
    """Appends each optimizer step's loss parts to ``loss.jsonl`` (flushed: a kill keeps them).
    ``step_s`` is the step's forward, backward and optimizer update, without checkpoint saving."""

    def __init__(self, trainer: DistillTrainer, path: Path):
        self.trainer, self.path = trainer, path
        self.started = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        parts = self.trainer.last_parts or {}
        line = {"step": state.global_step, **parts, "step_s": round(time.perf_counter() - self.started, 4)}
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def curve_summary(out: str | Path) -> dict:
    """Steps, last loss and training throughput (tokens / summed step time) of a run's curve."""
    lines = [json.loads(ln) for ln in (Path(out) / CURVE_FILE).read_text().splitlines() if ln.strip()]
    tokens = sum(ln.get("tokens", 0) for ln in lines)
    seconds = sum(ln.get("step_s", 0.0) for ln in lines)
    return {
        "steps": len(lines),
        "loss": lines[-1]["loss"] if lines else None,
        "tokens": tokens,
        "train_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
    }


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints whose trainer_state.json (written last) parses, by step."""
    found = []
    for folder in out.glob("checkpoint-*"):
        try:
            step = int(folder.name.split("-", 1)[1])
            json.loads((folder / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        found.append((step, folder))
    return sorted(found)


def _prepare_resume(out: Path) -> str | None:
    """The checkpoint to resume from; half-written checkpoints go, the curve is cut back to it."""
    complete = complete_checkpoints(out)
    keep = {folder for _, folder in complete}
    for folder in out.glob("checkpoint-*"):
        if folder not in keep:
            log.warning("removing the incomplete checkpoint %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    step = complete[-1][0] if complete else 0
    curve = out / CURVE_FILE
    if curve.exists():
        lines = [ln for ln in curve.read_text().splitlines() if ln.strip()]
        kept = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= step:
                    kept.append(ln)
            except (ValueError, KeyError):
                break  # a line cut by the kill: nothing after it counts
        tmp = curve.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, curve)
    return str(complete[-1][1]) if complete else None


def _claim_run_dir(out: Path, options: TrainOptions) -> bool:
    """Record the options in a new run dir, or check an existing one's; True when it is finished."""
    record = {key: value for key, value in asdict(options).items() if key not in ("out",)}
    run_file = out / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        changed = sorted(key for key in record if previous.get(key) != record[key])
        if changed:
            raise TrainError(
                f"{out} holds a run with other options ({', '.join(changed)}): resume it unchanged or use another --out"
            )
        return (out / MODEL_DIR / "config.json").exists()
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"{out} exists and is not a distill run directory")
    out.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run_file)
    return False


def load_target(spec_text: str):
    """(model, tokenizer, spec): the target in float32 on the CPU, unpacked, as a worker loads it."""
    from ..services.sources import UnknownModelError, load_hf_tokenizer, parse_spec
    from ..services.worker.loading import load_hf_model

    try:
        spec = parse_spec(spec_text)
    except UnknownModelError as exc:
        raise TrainError(str(exc)) from exc
    try:
        tokenizer = load_hf_tokenizer(spec)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad source
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainError(f"target {spec.describe()}: tokenizer cannot load: {first}") from exc
    try:
        model = load_hf_model(spec, "cpu", torch.float32, pack="none")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainError(f"target {spec.describe()}: model cannot load: {first}") from exc
    return model, tokenizer, spec


def build_dataset(options: TrainOptions, prepared, tokenizer, vocab_rows: int) -> BlockDataset:
    if prepared.max_token_id() >= vocab_rows:
        raise TrainError(
            f"the prepared token ids reach {prepared.max_token_id()}, beyond the target's {vocab_rows} "
            f"embeddings: {options.prepared} was prepared for {prepared.target}"
        )
    texts = fused_texts(prepared, options.fusion, options.k)
    return BlockDataset(pack_blocks(texts, options.seq_len, options.k, Separators.of(tokenizer)))


def training_arguments(options: TrainOptions) -> TrainingArguments:
    return TrainingArguments(
        output_dir=options.out,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=options.lr,
        warmup_steps=options.warmup,
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        weight_decay=options.weight_decay,
        seed=options.seed,
        data_seed=options.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def train(options: TrainOptions, callbacks: tuple = ()) -> Path:
    """Run (or resume) a training run; returns the finished model's directory."""
    options = options.checked()
    prepared = load_prepared(options.prepared)
    options = TrainOptions(
        **{**asdict(options), "k": check_k(options.k, prepared), "target": options.target or prepared.target}
    )
    out = Path(options.out)
    model, tokenizer, _ = load_target(options.target)
    dataset = build_dataset(options, prepared, tokenizer, model.get_input_embeddings().weight.shape[0])
    if _claim_run_dir(out, options):
        log.info("%s is finished already", out)
        return out / MODEL_DIR
    resume = _prepare_resume(out)
    trainer = DistillTrainer(
        model=model,
        args=training_arguments(options),
        train_dataset=dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        lam=float(options.lam),
        chunk=options.chunk,
    )
    trainer.add_callback(LossCurve(trainer, out / CURVE_FILE))
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return save_final(trainer, out / MODEL_DIR)


def save_final(trainer: Trainer, target: Path) -> Path:
    from ..services.sources import atomic_save

    def save(tmp: Path) -> None:
        trainer.model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)

    atomic_save(target, save)
    return target
