"""The FuseLLM experiment (docs/distillation.md, "The experiment"), as one resumable command.

    .venv/bin/python bench/distill_experiment.py --name NAME --budget-minutes 40

Steps, each skipped when its output is complete (rerun the same command to resume):

1. probe: a tiny ``distill prepare`` (2 texts of each corpus) and 2 training steps measure this
   machine's prepare and train tokens/s; ``plan.json`` sizes the corpus, the steps and the eval
   subset to the budget (kept on resume, so a resumed run does the same work);
2. ``coolfusion distill prepare`` on ARC-Easy + ARC-Challenge train Q+A and GSM8K train
   solutions, with a held-out slice;
3. ``coolfusion distill train``: CLM (λ=1), FuseLLM minCE and avgCE (λ=0.9), equal steps, data,
   seed and learning rate; the original arm is the untrained target;
4. ``coolfusion distill export`` of each arm (and of the original's dequantised weights) with a
   float32 GGUF, so every arm is served the same way;
5. metrics (``bench/distill_metrics.py``): held-out bits per byte and cross-entropy to Gemma-3 on
   its aligned held-out positions; ARC-Easy and ARC-Challenge validation through ``coolfusion
   eval`` with every arm served by ``--models NAME=FILE``; paired tests; minCE winners; greedy
   generation speed of the original and a distilled arm on the same backend.

Work files go to ``runs/distill-NAME/``; ``bench/distill-NAME/`` gets summary.json, table.md,
the plan, the probe, the loss curves and the eval summaries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from coolfusion.services.common.config import comma_list

ROOT = Path(__file__).resolve().parent.parent
CLI = [str(Path(sys.executable).parent / "coolfusion")]
CORPUS = ["arc-easy", "arc-challenge", "gsm8k"]
TARGET, SOURCES = "smollm2", "smollm2,gemma3"
ARMS = {  # name -> (λ, fusion); "original" is the untrained target
    "clm": (1.0, "minCE"),
    "fusellm-minCE": (0.9, "minCE"),
    "fusellm-avgCE": (0.9, "avgCE"),
}
EVAL_TASKS = ["arc-easy", "arc-challenge"]
SCORE_TOKENS_PER_QUESTION = 140  # four choices after an ARC prompt, SmolLM2 tokens (typical)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def cli(args: list[str], capture: bool = True) -> str:
    """Run a ``coolfusion`` command (nice'd by the caller), failing loudly; its stdout."""
    log("coolfusion " + " ".join(args))
    proc = subprocess.run(CLI + args, cwd=ROOT, stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"coolfusion {' '.join(args)} exited {proc.returncode}")
    return proc.stdout or ""


def last_json(text: str) -> dict:
    """The JSON object a command prints last on stdout."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON summary in: {text[-300:]!r}")


class Experiment:
    def __init__(self, args):
        self.args = args
        self.arms = {arm: ARMS[arm] for arm in args.arms}
        self.work = ROOT / "runs" / f"distill-{args.name}"
        self.bench = ROOT / "bench" / f"distill-{args.name}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.bench.mkdir(parents=True, exist_ok=True)

    # ---- 1. probe and plan ---------------------------------------------------------------------
    def prepare_args(self, out: Path, limit: int) -> list[str]:
        a = self.args
        return ["distill", "prepare", *CORPUS, "--out", str(out), "--limit", str(limit)] + [
            "--target", TARGET, "--sources", SOURCES, "--k", str(a.k), "--heldout", str(a.heldout),
            "--shard-texts", str(a.shard_texts), "--backend", a.backend, "--json",
        ]  # fmt: skip

    def train_args(
        self, prep: Path, out: Path, lam: float, fusion: str, steps: int, lr: float | None = None
    ) -> list[str]:
        a = self.args
        return ["distill", "train", str(prep), "--out", str(out), "--lambda", str(lam), "--fusion", fusion] + [
            "--lr", str(a.lr if lr is None else lr), "--warmup", str(steps // 10), "--seed", "0", "--max-steps", str(steps),
            "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--k", str(a.k),
            "--save-steps", str(max(1, steps // 2)), "--save-total-limit", "1",
        ]  # fmt: skip

    def probe(self) -> dict:
        path = self.bench / "probe.json"
        if (done := read_json(path)) is not None:
            return done
        prep = self.work / "probe" / "prep"
        started = time.perf_counter()
        prepared = last_json(cli(self.prepare_args(prep, 2)))
        prepare_wall = time.perf_counter() - started
        run = self.work / "probe" / "train"
        trained = last_json(cli(self.train_args(prep, run, 0.9, "minCE", 2)))
        result = {
            "prepare_tokens_per_s": prepared["tokens_per_s"],
            "prepare_wall_s": round(prepare_wall, 1),
            "tokens_per_text": prepared["tokens"] / max(1, prepared["texts"] + prepared["heldout_texts"]),
            "train_tokens_per_s": trained["train_tokens_per_s"],
            "prepare": prepared,
            "train": trained,
        }
        write_json(path, result)
        return result

    def plan(self, probe: dict) -> dict:
        path = self.bench / "plan.json"
        a = self.args
        if (done := read_json(path)) is not None:
            # Only the eval size may change on resume: it is measured after everything it reuses.
            if a.eval_limit is not None and a.eval_limit != done["eval_limit"]:
                done["eval_limit"] = a.eval_limit
                write_json(path, done)
            return done
        budget = a.budget_minutes * 60.0
        # The probe's wall time includes starting the services; every prepare pays it once more.
        prep_s = max(60.0, 0.30 * budget - probe["prepare_wall_s"])
        texts = prep_s * probe["prepare_tokens_per_s"] / probe["tokens_per_text"]
        limit = max(4, int(texts / len(CORPUS)))
        train_s = 0.30 * budget / len(self.arms)
        steps = max(4, int(train_s * probe["train_tokens_per_s"] / (a.batch_size * a.seq_len)))
        # Scoring is a forward pass: about three times a training step's tokens/s, four arms a question.
        eval_s = 0.30 * budget / len(EVAL_TASKS)
        questions = int(eval_s * 3 * probe["train_tokens_per_s"] / (4 * SCORE_TOKENS_PER_QUESTION))
        plan = {
            "budget_minutes": a.budget_minutes,
            "limit_per_corpus": a.limit or limit,
            "steps": a.steps or steps,
            "eval_limit": a.eval_limit if a.eval_limit is not None else min(200, max(20, questions)),
            "lr": a.lr,
            "batch_size": a.batch_size,
            "seq_len": a.seq_len,
            "k": a.k,
            "heldout": a.heldout,
            "backend": a.backend,
        }
        write_json(path, plan)
        return plan

    # ---- 2. prepare --------------------------------------------------------------------------------
    def prepare(self, plan: dict) -> dict:
        path = self.bench / "prepare.json"
        if (done := read_json(path)) is not None:
            return done
        result = last_json(cli(self.prepare_args(self.work / "prep", plan["limit_per_corpus"])))
        write_json(path, result)
        return result

    # ---- 3. the learning rate, picked on the CLM arm ---------------------------------------------------
    def sweep(self, plan: dict) -> dict | None:
        """With ``--lr-sweep``: the CLM arm trained at each rate (the plan's data, steps and seed) and
        its held-out bits per byte; the lowest sets the plan's ``lr`` for every arm. Each rate's
        result is kept as it completes, so a rerun resumes."""
        from distill_metrics import heldout_metrics

        if not self.args.lr_sweep:
            return None
        path = self.bench / "lr-sweep.json"
        done = read_json(path) or {}
        for lr in self.args.lr_sweep:
            key = f"{lr:g}"
            if key in done:
                continue
            out = self.work / "lr-sweep" / key
            trained = last_json(
                cli(self.train_args(self.work / "prep", out / "train", 1.0, "minCE", plan["steps"], lr))
            )
            cli(["distill", "export", str(out / "train"), str(out / "export"), "--force"])
            held = heldout_metrics(self.work / "prep", {"clm": out / "export"})["clm"]
            done[key] = {"lr": lr, "bits_per_byte": held["bits_per_byte"], "ce_to_gemma3": held["ce_to_gemma3"]}
            done[key]["train"] = trained
            write_json(path, done)
        picked = min(done.values(), key=lambda r: r["bits_per_byte"])["lr"]
        if plan["lr"] != picked:
            plan["lr"] = picked
            write_json(self.bench / "plan.json", plan)
        return {"by": "held-out bits per byte of the CLM arm", "picked": picked, "rates": done}

    # ---- 4. train ------------------------------------------------------------------------------------
    def train(self, plan: dict) -> dict:
        results = {}
        for arm, (lam, fusion) in self.arms.items():
            path = self.bench / f"train-{arm}.json"
            if (done := read_json(path)) is None:
                out = self.work / "train" / arm
                swept = self.work / "lr-sweep" / f"{plan['lr']:g}" / "train"
                if arm == "clm" and swept.is_dir():  # the sweep trained it with these very arguments
                    shutil.copytree(swept, out, copy_function=os.link, dirs_exist_ok=True)
                    done = {
                        **read_json(self.bench / "lr-sweep.json")[f"{plan['lr']:g}"]["train"],
                        "model": str(out / "model"),
                    }
                else:
                    args = self.train_args(self.work / "prep", out, lam, fusion, plan["steps"], plan["lr"])
                    done = last_json(cli(args))
                done = {"lambda": lam, "fusion": fusion, **done}
                shutil.copyfile(out / "loss.jsonl", self.bench / f"loss-{arm}.jsonl")
                write_json(path, done)
            results[arm] = done
        return results

    # ---- 5. export -----------------------------------------------------------------------------------
    def export(self) -> dict[str, Path]:
        """Each arm's export directory (HF weights + ``model-f32.gguf``)."""
        dirs = {"original": self.work / "export" / "original"}
        if not (dirs["original"] / "model-f32.gguf").exists():
            export_original(dirs["original"])
        for arm in self.arms:
            dest = self.work / "export" / arm
            if not (dest / "model-f32.gguf").exists():
                cli(["distill", "export", str(self.work / "train" / arm), str(dest), "--gguf", "f32", "--force"])
            dirs[arm] = dest
        return dirs

    # ---- 6. eval -------------------------------------------------------------------------------------
    def evaluate(self, plan: dict, dirs: dict[str, Path]) -> dict:
        models = ",".join(f"{arm}={self.served(d)}" for arm, d in dirs.items())
        results = {}
        for task in EVAL_TASKS:
            out = self.work / f"eval-{task}-{len(dirs)}arms"  # another arm set is another eval
            summary = out / "summary.json"
            if not summary.exists() or read_json(summary).get("n") != plan["eval_limit"]:
                cli(
                    ["eval", task, "--split", "validation", "--limit", str(plan["eval_limit"]), "--models", models]
                    + ["--out", str(out), "--backend", self.eval_backend(), "--rules", "mean-nll"],
                )
            for name in ("summary.json", "results.jsonl"):
                (self.bench / out.name).mkdir(exist_ok=True)
                shutil.copyfile(out / name, self.bench / out.name / name)
            results[task] = out / "results.jsonl"
        return results

    def eval_backend(self) -> str:
        return "transformers" if self.args.eval_backend == "transformers" else "llamacpp"

    def served(self, export_dir: Path) -> Path:
        return export_dir if self.eval_backend() == "transformers" else export_dir / "model-f32.gguf"

    @staticmethod
    def speed_files(dirs: dict[str, Path]) -> dict[str, Path]:
        """Every arm in the same float32 format (the original first: the baseline), and the bundled
        file for scale."""
        from coolfusion.services.sources import parse_spec

        files = {arm: dirs[arm] / "model-f32.gguf" for arm in ("original", *[a for a in dirs if a != "original"])}
        return {**files, "bundled-original": parse_spec(TARGET).gguf_path}

    def run(self) -> None:
        from distill_metrics import generation_speed, heldout_metrics, paired_eval, winners
        from distill_report import write_report

        probe = self.probe()
        plan = self.plan(probe)
        log(f"plan: {plan}")
        prepared = self.prepare(plan)
        swept = self.sweep(plan)
        trained = self.train(plan)
        dirs = self.export()
        heldout = cached(self.bench / "heldout.json", lambda: heldout_metrics(self.work / "prep", dirs))
        evals = self.evaluate(plan, dirs)
        paired = {task: paired_eval(path, list(dirs)) for task, path in evals.items()}
        speed = cached(self.bench / "speed.json", lambda: generation_speed(self.speed_files(dirs)))
        summary = {
            "name": self.args.name,
            "machine": machine(),
            "command": " ".join(sys.argv),
            "plan": plan,
            "probe": {k: v for k, v in probe.items() if k not in ("prepare", "train")},
            "prepare": prepared,
            "lr_sweep": swept,
            "train": trained,
            "min_ce_winners": winners(self.work / "prep"),
            "heldout": heldout,
            "eval": paired,
            "generation_speed": speed,
        }
        write_json(self.bench / "summary.json", summary)
        write_report(summary, self.bench / "table.md")
        log(f"wrote {self.bench / 'summary.json'} and table.md")


def cached(path: Path, compute):
    if (done := read_json(path)) is not None:
        return done
    result = compute()
    write_json(path, result)
    return result


def export_original(dest: Path) -> None:
    """The untrained target's dequantised weights, exported the way the trained arms are."""
    from coolfusion.distill.export import export
    from coolfusion.distill.gguf_export import export_gguf
    from coolfusion.services.sources import converted_dir, parse_spec

    spec = parse_spec(TARGET)
    source = converted_dir(spec, "model")  # written by the first training run's load
    if not (source / "config.json").exists():
        raise SystemExit(f"{source} is missing: the training step dequantises the target there")
    staged = dest.parent / ".original-source"  # weights and tokenizer side by side, as export reads them
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for folder in (source, converted_dir(spec, "tokenizer")):
        for name in os.listdir(folder):
            (staged / name).symlink_to(folder / name)
    export(staged, dest, force=True)
    shutil.rmtree(staged)
    export_gguf(dest, spec.gguf_path, dest / "model-f32.gguf", "f32")


def machine() -> dict:
    import platform

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_end": [round(x, 1) for x in os.getloadavg()]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", required=True, help="run name: runs/distill-NAME, bench/distill-NAME")
    p.add_argument("--budget-minutes", type=float, required=True, help="wall time the run is sized to")
    p.add_argument("--backend", default="auto", help="prepare's workers (auto: llama.cpp for the GGUFs on a CPU)")
    p.add_argument("--eval-backend", default="llamacpp", choices=["llamacpp", "transformers"])
    p.add_argument("--lr", type=float, default=3e-5, help="every arm's peak learning rate (without --lr-sweep)")
    p.add_argument(
        "--lr-sweep",
        type=lambda text: [float(x) for x in comma_list(text)],
        default=[],
        help="comma-separated rates: train the CLM arm at each first, and use the one with the lowest held-out bits/byte",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--heldout", type=float, default=0.1)
    p.add_argument("--shard-texts", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="texts per corpus (default: sized by the probe)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per arm (default: sized by the probe)")
    p.add_argument("--eval-limit", type=int, help="ARC validation questions per task (default: sized)")
    p.add_argument("--arms", default=",".join(ARMS), help="trained arms to run (default: all; rerun to add the rest)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or any(a not in ARMS for a in args.arms):
        p.error(f"--arms takes names among {', '.join(ARMS)}")
    if args.budget_minutes <= 0 or not math.isfinite(args.budget_minutes):
        p.error("--budget-minutes must be positive")
    return args


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    Experiment(parse_args()).run()
