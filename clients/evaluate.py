"""``coolfusion eval gsm8k``: the paper's Table 3 protocol (accuracy and average perplexity per mode).

Prompting follows lm-eval's gsm8k task: fixed few-shot exemplars from the train split
(``Question: ...\\nAnswer: <worked solution> #### N``), greedy decoding, stop at EOS or at the
next ``Question:``. Scoring follows lm-eval: strict match on ``#### N`` and flexible match on the
last number of the output. Average perplexity (Table 3): every source model's PPL of each
generated text given the prompt, averaged over models.

``rerank`` and ``cool-rerank`` are computed from the same run's answers: the paper's Rerank picks,
among the single models' full answers (plus the cool answer for Cool+Rerank), the one with the
lowest average PPL - exactly what the service's rerank modes do, without generating the same
answers twice (a test checks they agree).

Every question's outputs go to ``results.jsonl`` as they finish, so an interrupted run resumes
where it stopped and the table can be recomputed from the file.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

STOP = ["Question:"]
DEFAULT_MODES = "single:smollm2,single:gemma3,cool,cool-noalign,rerank,cool-rerank"
DERIVED = ("rerank", "cool-rerank")

# lm-eval gsm8k filters: strict "#### N", flexible = last number.
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str | None) -> str | None:
    """'$1,234.50.' -> '1234.5'; None when no number is left."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(\.\d+)?|-?\.\d+", cleaned):
        return None
    value = float(cleaned)
    return str(int(value)) if value == int(value) else repr(value)


def extract_strict(output: str) -> str | None:
    match = STRICT_RE.search(output)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(output: str) -> str | None:
    matches = FLEXIBLE_RE.findall(output)
    for groups in reversed(matches):
        value = normalize_number(groups[0] or groups[1])
        if value is not None:
            return value
    return None


def gold_answer(answer_field: str) -> str | None:
    """GSM8K's answer ends with '#### N'; plain numeric answers are accepted too."""
    if "####" in answer_field:
        return normalize_number(answer_field.split("####")[-1])
    return normalize_number(answer_field)


@dataclass
class Item:
    index: int
    question: str
    answer: str  # full answer field (worked solution for GSM8K)
    gold: str | None


def load_items(path: Path) -> list[Item]:
    """GSM8K JSONL (question, answer), any JSONL with question + answer, or TSV question<TAB>answer."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            if path.suffix == ".tsv":
                question, _, answer = line.rstrip("\n").partition("\t")
            else:
                row = json.loads(line)
                question, answer = row["question"], str(row["answer"])
            items.append(Item(len(items), question, answer, gold_answer(answer)))
    return items


def fetch_gsm8k(target_dir: Path) -> tuple[Path, Path] | None:
    """With no --data: GSM8K (openai/gsm8k, config "main") through `datasets`, if it is installed
    and the hub can be reached; written as test.jsonl/train.jsonl. None otherwise."""
    try:
        import datasets  # optional; not a dependency of coolfusion
    except ImportError:
        return None
    target_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for split in ("test", "train"):
            path = target_dir / f"{split}.jsonl"
            if not path.exists():
                rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
                with open(path, "w", encoding="utf-8") as fh:
                    for row in rows:
                        fh.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
            paths.append(path)
    except Exception:  # offline, or the hub refused: the caller prints what to pass instead
        return None
    return paths[0], paths[1]


def few_shot_prefix(exemplars: Sequence[Item]) -> str:
    return "".join(f"Question: {e.question}\nAnswer: {e.answer}\n\n" for e in exemplars)


def build_prompt(prefix: str, question: str) -> str:
    return f"{prefix}Question: {question}\nAnswer:"


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def record(item: Item, mode: str, output: str, finish: str, ppl: dict[str, float], **extra) -> dict:
    strict, flexible = extract_strict(output), extract_flexible(output)
    finite = [v for v in ppl.values() if math.isfinite(v)]
    return {
        "index": item.index,
        "mode": mode,
        "question": item.question,
        "gold": item.gold,
        "output": output,
        "finish": finish,
        "strict": strict,
        "flexible": flexible,
        "strict_correct": strict is not None and strict == item.gold,
        "flexible_correct": flexible is not None and flexible == item.gold,
        "ppl": ppl,
        "mean_ppl": sum(finite) / len(finite) if finite and len(finite) == len(ppl) else None,
        **extra,
    }


def summarize(rows: Iterable[dict], modes: Sequence[str]) -> dict:
    """Per mode: counts, accuracies with 95 % CIs, average PPL (overall and per model)."""
    by_mode: dict[str, list[dict]] = {m: [] for m in modes}
    for row in rows:
        if row["mode"] in by_mode:
            by_mode[row["mode"]].append(row)
    summary = {}
    for mode, items in by_mode.items():
        n = len(items)
        strict = sum(r["strict_correct"] for r in items)
        flexible = sum(r["flexible_correct"] for r in items)
        ppls = [r["mean_ppl"] for r in items if r["mean_ppl"] is not None]
        per_model: dict[str, list[float]] = {}
        for r in items:
            for m, v in r["ppl"].items():
                if v is not None and math.isfinite(v):
                    per_model.setdefault(m, []).append(v)
        summary[mode] = {
            "n": n,
            "strict_correct": strict,
            "flexible_correct": flexible,
            "strict_acc": strict / n if n else 0.0,
            "strict_ci95": wilson(strict, n),
            "flexible_acc": flexible / n if n else 0.0,
            "flexible_ci95": wilson(flexible, n),
            "avg_ppl": sum(ppls) / len(ppls) if ppls else None,
            "avg_ppl_n": len(ppls),
            "avg_ppl_per_model": {m: sum(v) / len(v) for m, v in per_model.items()},
        }
    return summary


def markdown_table(summary: dict) -> str:
    lines = [
        "| mode | N | strict acc (95% CI) | flexible acc (95% CI) | avg PPL | PPL per model |",
        "| --- | ---: | --- | --- | ---: | --- |",
    ]
    for mode, s in summary.items():
        lo, hi = s["strict_ci95"]
        flo, fhi = s["flexible_ci95"]
        ppl = f"{s['avg_ppl']:.3f}" if s["avg_ppl"] is not None else "n/a"
        per = ", ".join(f"{m} {v:.3f}" for m, v in s["avg_ppl_per_model"].items())
        lines.append(
            f"| {mode} | {s['n']} | {s['strict_acc']:.1%} ({lo:.1%}–{hi:.1%}) | "
            f"{s['flexible_acc']:.1%} ({flo:.1%}–{fhi:.1%}) | {ppl} | {per} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary)
    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(modes))
    ax_acc.bar([i - 0.2 for i in x], [summary[m]["strict_acc"] * 100 for m in modes], 0.4, label="strict")
    ax_acc.bar([i + 0.2 for i in x], [summary[m]["flexible_acc"] * 100 for m in modes], 0.4, label="flexible")
    top = max([summary[m]["flexible_acc"] for m in modes] + [summary[m]["strict_acc"] for m in modes] + [0.0]) * 100
    ax_acc.set_ylim(0, max(5.0, top * 1.2))  # all-zero accuracies still get a sane axis
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("GSM8K accuracy")
    ax_acc.legend()
    ax_ppl.bar(list(x), [summary[m]["avg_ppl"] or 0 for m in modes], 0.6, color="tab:green")
    ax_ppl.set_ylabel("average perplexity")
    ax_ppl.set_title("Average PPL over source models")
    for ax in (ax_acc, ax_ppl):
        ax.set_xticks(list(x))
        ax.set_xticklabels(modes, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_done(path: Path) -> dict[tuple[int, str], dict]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that question runs again
                done[(row["index"], row["mode"])] = row
    return done


def write_reports(out: Path, rows: list[dict], modes: Sequence[str], settings: dict) -> dict:
    summary = summarize(rows, modes)
    (out / "summary.json").write_text(json.dumps({"settings": settings, "modes": summary}, indent=2))
    (out / "table.md").write_text(markdown_table(summary))
    plot(summary, out / "accuracy_ppl.png")
    return summary


async def run_eval(
    address: str,
    items: Sequence[Item],
    prefix: str,
    modes: Sequence[str],
    out: Path,
    max_new_tokens: int,
    settings: dict,
    progress=None,
    models: Sequence[str] = (),
) -> dict:
    from .client import FusionClient

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = load_done(results_path)
    generated_modes = [m for m in modes if m not in DERIVED]
    models = list(models) or await _models(address)
    if any(m in DERIVED for m in modes):
        for base in [f"single:{m}" for m in models] + (["cool"] if "cool-rerank" in modes else []):
            if base not in generated_modes:
                generated_modes.append(base)
    all_modes = list(dict.fromkeys([*generated_modes, *modes]))
    rows = [r for r in done.values() if r["mode"] in all_modes]
    tokens = 0
    started = time.perf_counter()
    async with FusionClient(address) as client:
        with open(results_path, "a", encoding="utf-8") as sink:
            for item in items:
                prompt = build_prompt(prefix, item.question)
                fresh: dict[str, dict] = {}
                for mode in all_modes:
                    if (item.index, mode) in done:
                        fresh[mode] = done[(item.index, mode)]
                        continue
                    if mode in DERIVED:
                        pool = [f"single:{m}" for m in models] + (["cool"] if mode == "cool-rerank" else [])
                        candidates = [fresh[p] for p in pool]
                        # Rerank ranks whole answers with each scorer's EOS appended when the answer ended at EOS.
                        scored = await client.score(
                            prompt,
                            [c["output"] for c in candidates],
                            models=models,
                            eos=[c["finish"] == "eos" for c in candidates],
                        )
                        best = min(range(len(candidates)), key=lambda i: scored.scores[i].mean_ppl)
                        chosen = candidates[best]
                        row = record(item, mode, chosen["output"], chosen["finish"], chosen["ppl"], picked=pool[best])
                    else:
                        t0 = time.perf_counter()
                        reply = await client.generate(
                            prompt, mode=mode, models=models, max_new_tokens=max_new_tokens, stop=STOP
                        )
                        elapsed = time.perf_counter() - t0
                        output = reply.text
                        scored = await client.score(prompt, [output], models=models) if output else None
                        ppl = {p.scorer: p.ppl for p in scored.scores[0].ppl} if scored else {m: float("inf") for m in models}
                        used = max((u.output_tokens for u in reply.usage), default=0)
                        tokens += used
                        row = record(item, mode, output, reply.finish_reason, ppl, time_s=round(elapsed, 3), tokens=used)
                    fresh[mode] = row
                    rows.append(row)
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                    sink.flush()
                if progress:
                    progress(item, rows, tokens / max(1e-9, time.perf_counter() - started))
    return write_reports(out, rows, modes, settings)


async def _models(address: str) -> list[str]:
    from .client import FusionClient

    async with FusionClient(address) as client:
        return [m.name for m in (await client.list_models()).models]
