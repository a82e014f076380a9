"""GSM8K and MGSM: the paper's Table 3 protocol (accuracy and average perplexity per mode).

Prompting follows lm-eval's gsm8k task: fixed few-shot exemplars from the train split
(``Question: ...\\nAnswer: <worked solution> #### N``), greedy decoding, stop at EOS or at the
next ``Question:``. Scoring follows lm-eval: strict match on ``#### N`` and flexible match on the
last number of the output. Average perplexity (Table 3): every source model's PPL of each
generated text given the prompt, averaged over models.

A mode is ``single:<model>``, ``cool``, ``cool-noalign``, ``rerank``, ``cool-rerank``, and a
fused mode may name its scoring rule: ``cool@mean-ppl`` (else the server's default rule).
``rerank`` and ``cool-rerank`` are computed from the same run's answers: among the single models'
full answers (plus the cool answer for Cool+Rerank), the one the rule picks (``Score``'s
``chosen``) - exactly what the service's rerank modes do, without generating the same answers twice.

Perplexity also rewards copying the question back and repeating lines, so every mode reports
the share of answers that copy a sentence of the question or repeat a line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coolfusion.protos.fusion_wire import FUSED_MODES, RERANK_MODES, SINGLE_PREFIX

from ...services.sources import DEFAULT_MODELS
from .runner import EvalDataError
from .stats import mcnemar, wilson

STOP = ["Question:"]
DEFAULT_MODES = ",".join([*(f"{SINGLE_PREFIX}{m}" for m in DEFAULT_MODELS), *FUSED_MODES])
DERIVED = RERANK_MODES

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
    """GSM8K's answer ends with '#### N'; plain numeric answers (MGSM) are accepted too."""
    if "####" in answer_field:
        return normalize_number(answer_field.split("####")[-1])
    return normalize_number(answer_field)


def copies_question(output: str, question: str) -> bool:
    """The output holds a whole sentence (4+ words) of the question."""
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", question)]
    return any(len(s.split()) >= 4 and s in output for s in sentences)


def repeats_line(output: str) -> bool:
    """Some line (8+ characters) occurs twice in the output."""
    lines = [line.strip() for line in output.splitlines() if len(line.strip()) >= 8]
    return len(lines) != len(set(lines))


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
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if path.suffix == ".tsv":
                question, tab, answer = line.rstrip("\n").partition("\t")
                if not tab:
                    raise EvalDataError(f"{path}:{line_no}: a TSV row is question<TAB>answer")
            else:
                try:
                    row = json.loads(line)
                    question, answer = row["question"], str(row["answer"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise EvalDataError(
                        f"{path}:{line_no}: not a question/answer row ({type(exc).__name__}: {exc})"
                    ) from None
            items.append(Item(len(items), question, answer, gold_answer(answer)))
    if not items:
        raise EvalDataError(f"{path}: no questions")
    return items


def few_shot_prefix(exemplars: Sequence[Item]) -> str:
    return "".join(f"Question: {e.question}\nAnswer: {e.answer}\n\n" for e in exemplars)


def build_prompt(prefix: str, question: str) -> str:
    return f"{prefix}Question: {question}\nAnswer:"


def split_mode(mode: str) -> tuple[str, str]:
    """``cool@product`` -> (``cool``, ``product``); no rule -> (mode, "")."""
    base, _, rule = mode.partition("@")
    return base, rule


def record(item: Item, output: str, finish: str, ppl: dict[str, float], **extra) -> dict:
    strict, flexible = extract_strict(output), extract_flexible(output)
    finite = [v for v in ppl.values() if math.isfinite(v)]
    return {
        "question": item.question,
        "gold": item.gold,
        "output": output,
        "finish": finish,
        "strict": strict,
        "flexible": flexible,
        "strict_correct": strict is not None and strict == item.gold,
        "flexible_correct": flexible is not None and flexible == item.gold,
        "ppl": {m: (v if math.isfinite(v) else None) for m, v in ppl.items()},
        "mean_ppl": sum(finite) / len(finite) if finite and len(finite) == len(ppl) else None,
        "copies_question": copies_question(output, item.question),
        "repeats_line": repeats_line(output),
        **extra,
    }


class GenerationTask:
    """``units``: the modes to generate (single models first, as rerank needs them), then the
    rerank modes derived from their answers."""

    def __init__(self, name: str, modes: Sequence[str], models: Sequence[str], prefix: str, max_new_tokens: int):
        self.name = name
        self.models = list(models)
        self.modes = list(modes)
        self.prefix = prefix
        self.max_new_tokens = max_new_tokens
        generated = [m for m in self.modes if split_mode(m)[0] not in DERIVED]
        for mode in self.modes:
            base, rule = split_mode(mode)
            if base in DERIVED:
                needed = [f"single:{m}" for m in self.models] + (
                    [_with_rule("cool", rule)] if base == "cool-rerank" else []
                )
                generated += [n for n in needed if n not in generated]
        self.units = list(dict.fromkeys(generated + self.modes))

    def pool(self, mode: str) -> list[str]:
        base, rule = split_mode(mode)
        return [f"single:{m}" for m in self.models] + ([_with_rule("cool", rule)] if base == "cool-rerank" else [])

    async def run(self, client, item: Item, unit: str, done: dict[str, dict]) -> dict:
        prompt = build_prompt(self.prefix, item.question)
        base, rule = split_mode(unit)
        if base in DERIVED:
            pool = self.pool(unit)
            candidates = [done[p] for p in pool]
            # Rerank ranks whole answers with each scorer's EOS appended when the answer ended at EOS.
            scored = await client.score(
                prompt,
                [c["output"] for c in candidates],
                models=self.models,
                eos=[c["finish"] == "eos" for c in candidates],
                score_rule=rule or None,
            )
            best = next(i for i, s in enumerate(scored.scores) if s.chosen)
            chosen = candidates[best]
            ppl = {m: (v if v is not None else math.inf) for m, v in chosen["ppl"].items()}
            return {"mode": unit, **record(item, chosen["output"], chosen["finish"], ppl, picked=pool[best])}
        reply = await client.generate(
            prompt,
            mode=base,
            models=self.models,
            max_new_tokens=self.max_new_tokens,
            stop=STOP,
            score_rule=rule or None,
        )
        output = reply.text
        scored = await client.score(prompt, [output], models=self.models) if output else None
        ppl = {p.scorer: p.ppl for p in scored.scores[0].ppl} if scored else {m: math.inf for m in self.models}
        used = max((u.output_tokens for u in reply.usage), default=0)
        return {
            "mode": unit,
            **record(
                item,
                output,
                reply.finish_reason,
                ppl,
                time_s=round(reply.timings.total_s, 3),
                tokens=used,
                score_rule=reply.score_rule,
            ),
        }

    def summarize(self, rows: list[dict]) -> dict:
        """Over the questions every mode has finished (an interrupted run compares like with like)."""
        modes_of: dict[int, set[str]] = {}
        for row in rows:
            modes_of.setdefault(row["index"], set()).add(row["mode"])
        complete = {i for i, done in modes_of.items() if set(self.modes) <= done}
        by_mode: dict[str, list[dict]] = {m: [] for m in self.modes}
        for row in sorted(rows, key=lambda r: r["index"]):
            if row["mode"] in by_mode and row["index"] in complete:
                by_mode[row["mode"]].append(row)
        summary: dict = {}
        for mode, items in by_mode.items():
            n = len(items)
            strict = sum(r["strict_correct"] for r in items)
            flexible = sum(r["flexible_correct"] for r in items)
            ppls = [r["mean_ppl"] for r in items if r["mean_ppl"] is not None]
            clean = [
                r["mean_ppl"]
                for r in items
                if r["mean_ppl"] is not None and not (r["copies_question"] or r["repeats_line"])
            ]
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
                "avg_ppl_clean": sum(clean) / len(clean) if clean else None,  # answers that neither copy nor repeat
                "avg_ppl_clean_n": len(clean),
                "avg_ppl_per_model": {m: sum(v) / len(v) for m, v in per_model.items()},
                "copies_question": sum(r["copies_question"] for r in items) / n if n else 0.0,
                "repeats_line": sum(r["repeats_line"] for r in items) / n if n else 0.0,
            }
        singles = [m for m in self.modes if m.startswith("single:") and by_mode[m]]
        if singles:
            best = max(singles, key=lambda m: summary[m]["flexible_correct"])
            for mode in self.modes:
                if mode not in singles and len(by_mode[mode]) == len(by_mode[best]):
                    test = mcnemar(
                        [r["flexible_correct"] for r in by_mode[mode]], [r["flexible_correct"] for r in by_mode[best]]
                    )
                    summary[mode]["flexible_vs_best"] = {"best": best, **test}
        return {"modes": summary}

    def table(self, summary: dict) -> str:
        lines = [
            "| mode | N | strict acc (95% CI) | flexible acc (95% CI) | flexible vs best single (McNemar p) | avg PPL | PPL per model | copies question | repeats a line | avg PPL without copies/repeats (N) |",
            "| --- | ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: |",
        ]
        for mode, s in summary["modes"].items():
            lo, hi = s["strict_ci95"]
            flo, fhi = s["flexible_ci95"]
            ppl = _num(s["avg_ppl"])
            per = ", ".join(f"{m} {v:.3f}" for m, v in s["avg_ppl_per_model"].items())
            vs = s.get("flexible_vs_best")
            test = f"{vs['a_only']} vs {vs['b_only']} (p={vs['p']:.3g})" if vs else ""
            lines.append(
                f"| {mode} | {s['n']} | {s['strict_acc']:.1%} ({lo:.1%}–{hi:.1%}) | "
                f"{s['flexible_acc']:.1%} ({flo:.1%}–{fhi:.1%}) | {test} | {ppl} | {per} | "
                f"{s['copies_question']:.0%} | {s['repeats_line']:.0%} | {_num(s['avg_ppl_clean'])} ({s['avg_ppl_clean_n']}) |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, summary: dict, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        modes = list(summary["modes"])
        s = summary["modes"]
        fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
        x = range(len(modes))
        ax_acc.bar([i - 0.2 for i in x], [s[m]["strict_acc"] * 100 for m in modes], 0.4, label="strict")
        ax_acc.bar([i + 0.2 for i in x], [s[m]["flexible_acc"] * 100 for m in modes], 0.4, label="flexible")
        top = max([s[m]["flexible_acc"] for m in modes] + [s[m]["strict_acc"] for m in modes] + [0.0]) * 100
        ax_acc.set_ylim(0, max(5.0, top * 1.2))  # all-zero accuracies still get a sane axis
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_title(f"{self.name} accuracy")
        ax_acc.legend()
        ax_ppl.bar(list(x), [s[m]["avg_ppl"] or 0 for m in modes], 0.6, color="tab:green")
        ax_ppl.set_ylabel("average perplexity")
        ax_ppl.set_title("Average PPL over source models")
        for ax in (ax_acc, ax_ppl):
            ax.set_xticks(list(x))
            ax.set_xticklabels(modes, rotation=30, ha="right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def progress_text(self, rows: list[dict]) -> str:
        first = self.modes[0] if self.modes else "cool"
        mine = [r for r in rows if r["mode"] == first]
        acc = sum(r["flexible_correct"] for r in mine) / max(1, len(mine))
        return f"{first} flexible acc {acc:.0%}"


def _with_rule(mode: str, rule: str) -> str:
    return f"{mode}@{rule}" if rule else mode


def _num(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"
