"""ARC-Easy / ARC-Challenge: multiple choice by log-likelihood through the ``Score`` RPC.

Prompting as lm-evaluation-harness's ``arc_easy``: ``Question: {q}\\nAnswer:``, each choice scored
as the continuation `` {choice}``. One ``Score`` call per question gives every model's summed
log-probability and token count of every choice; each source model alone and every scoring
rule are then computed from those numbers (``orchestrator/rules.py``, the same code the service
runs), so one pass over the data reports every configuration.

- ``acc``: the choice with the highest log-likelihood; ``acc_norm``: the highest log-likelihood
  per character of the continuation (lm-eval's normalisation).
- Each fused configuration is compared with the best single model (the higher of ``acc`` and
  ``acc_norm`` over all models) by an exact McNemar test on the same questions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...orchestrator.rules import RULES, ScoreRule
from .runner import EvalDataError
from .stats import mcnemar, wilson


@dataclass
class ChoiceItem:
    index: int
    id: str
    question: str
    choices: list[str]
    answer: int  # index of the gold choice


def load_choice_items(path: Path) -> list[ChoiceItem]:
    """ARC JSONL rows ``{id, question, choices: {text, label}, answerKey}``; a row whose
    answerKey is not among its labels is an error naming the line."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
                question, key = row["question"], row["answerKey"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise EvalDataError(f"{path}:{line_no}: not an ARC row ({type(exc).__name__}: {exc})") from None
            if key not in labels:
                raise EvalDataError(f"{path}:{line_no}: answerKey {key!r} is not among the labels {','.join(labels)}")
            if len(labels) != len(texts) or len(texts) < 2:
                raise EvalDataError(f"{path}:{line_no}: {len(texts)} choice texts for {len(labels)} labels")
            items.append(ChoiceItem(len(items), str(row.get("id", len(items))), question, texts, labels.index(key)))
    if not items:
        raise EvalDataError(f"{path}: no questions")
    return items


def choice_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def continuation(choice: str) -> str:
    return f" {choice}"


def default_rules() -> list[ScoreRule]:
    return [ScoreRule(name) for name in RULES]


def _score_cell(entry: dict) -> str:
    """``60.4% acc, +3.0 pts (p=0.019)``: the better metric, and its difference to the best single."""
    vs = entry.get("score_vs_best")
    text = f"{entry['score']:.1%} {entry['score_metric']}"
    return f"{text}, {vs['diff'] * 100:+.1f} pts (p={vs['p']:.3g})" if vs else text


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


class ChoiceTask:
    """``units``: one Score of every choice by every model per question."""

    units = ("scores",)

    def __init__(self, name: str, models: Sequence[str], rules: Sequence[ScoreRule]):
        self.name = name
        self.models = list(models)
        self.rules = list(rules)
        self._hits: dict[int, bool] = {}  # progress: index -> the last configuration's acc hit

    async def run(self, client, item: ChoiceItem, unit: str, done: dict) -> dict:
        texts = [continuation(c) for c in item.choices]
        reply = await client.score(choice_prompt(item.question), texts, models=self.models)
        scores = {m: [] for m in self.models}
        for text_scores in reply.scores:
            for p in text_scores.ppl:
                scores[p.scorer].append([p.logprob, p.tokens])
        return {"id": item.id, "answer": item.answer, "chars": [len(t) for t in texts], "scores": scores}

    # ---- predictions ------------------------------------------------------------------------
    @staticmethod
    def single_predictions(row: dict, model: str) -> tuple[int, int]:
        """(acc choice, acc_norm choice) of one model alone."""
        lps = [lp for lp, _ in row["scores"][model]]
        return _argmax(lps), _argmax([lp / c for lp, c in zip(lps, row["chars"])])

    @staticmethod
    def rule_predictions(row: dict, rule: ScoreRule, models: Sequence[str]) -> tuple[int, int]:
        """(acc choice, acc_norm choice) of the fused log-likelihood under ``rule``."""
        table = [{m: tuple(row["scores"][m][i]) for m in models} for i in range(len(row["chars"]))]
        ll = rule.restricted(models).loglikelihood(table)
        return _argmax(ll), _argmax([v / c for v, c in zip(ll, row["chars"])])

    def configurations(self) -> list[tuple[str, object]]:
        return [(f"single:{m}", m) for m in self.models] + [(r.label(), r) for r in self.rules]

    def summarize(self, rows: list[dict]) -> dict:
        rows = sorted(rows, key=lambda r: r["index"])
        correct: dict[str, dict[str, list[bool]]] = {}
        for label, what in self.configurations():
            picks = [
                self.single_predictions(r, what)
                if isinstance(what, str)
                else self.rule_predictions(r, what, self.models)
                for r in rows
            ]
            correct[label] = {
                "acc": [p[0] == r["answer"] for p, r in zip(picks, rows)],
                "acc_norm": [p[1] == r["answer"] for p, r in zip(picks, rows)],
            }
        n = len(rows)
        singles = [f"single:{m}" for m in self.models]
        best_label, best_metric = max(
            ((s, metric) for s in singles for metric in ("acc", "acc_norm")), key=lambda sm: sum(correct[sm[0]][sm[1]])
        )
        best = correct[best_label][best_metric]
        either = [any(correct[s][metric][i] for s in singles for metric in ("acc", "acc_norm")) for i in range(n)]
        configs = {}
        for label, metrics in correct.items():
            entry: dict = {"n": n}
            for metric, hits in metrics.items():
                k = sum(hits)
                entry[metric] = k / n if n else 0.0
                entry[f"{metric}_ci95"] = wilson(k, n)
                if label not in singles:
                    test = mcnemar(hits, best)
                    entry[f"{metric}_vs_best"] = {"diff": (k - sum(best)) / n if n else 0.0, **test}
            # A configuration's score is the better of its acc and acc_norm, as the best single's is.
            metric = max(("acc", "acc_norm"), key=lambda m: sum(metrics[m]))
            entry["score"], entry["score_metric"] = entry[metric], metric
            if label not in singles:
                entry["score_vs_best"] = entry[f"{metric}_vs_best"]
            configs[label] = entry
        return {
            "n": n,
            "models": self.models,
            "best_single": {"config": best_label, "metric": best_metric, "acc": sum(best) / n if n else 0.0},
            "either_model_right": sum(either) / n if n else 0.0,
            "configs": configs,
        }

    def table(self, summary: dict) -> str:
        best = summary["best_single"]
        lines = [
            f"N = {summary['n']}; best single model: {best['config']} {best['metric']} {best['acc']:.1%}; "
            f"either model right (any selection rule's ceiling): {summary['either_model_right']:.1%}",
            "",
            "| configuration | acc (95% CI) | acc_norm (95% CI) | acc vs best single (McNemar p) "
            "| acc_norm vs best single (McNemar p) | score vs best single |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, s in summary["configs"].items():
            cells = [label]
            for metric in ("acc", "acc_norm"):
                lo, hi = s[f"{metric}_ci95"]
                cells.append(f"{s[metric]:.1%} ({lo:.1%}–{hi:.1%})")
            for metric in ("acc", "acc_norm"):
                vs = s.get(f"{metric}_vs_best")
                cells.append(f"{vs['diff'] * 100:+.1f} pts (p={vs['p']:.3g})" if vs else "")
            cells.append(_score_cell(s))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, summary: dict, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = list(summary["configs"])
        x = range(len(labels))
        fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(labels)), 4))
        for offset, metric in ((-0.2, "acc"), (0.2, "acc_norm")):
            values = [summary["configs"][k][metric] * 100 for k in labels]
            errs = [
                [v - summary["configs"][k][f"{metric}_ci95"][0] * 100 for v, k in zip(values, labels)],
                [summary["configs"][k][f"{metric}_ci95"][1] * 100 - v for v, k in zip(values, labels)],
            ]
            ax.bar([i + offset for i in x], values, 0.4, yerr=errs, capsize=2, label=metric)
        ax.axhline(summary["best_single"]["acc"] * 100, color="grey", ls="--", lw=1, label="best single")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{self.name} (N = {summary['n']})")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def progress_text(self, rows: list[dict]) -> str:
        """Running acc of the last configuration (each row's pick is computed once)."""
        label, rule = self.configurations()[-1]
        for r in rows:
            if r["index"] not in self._hits:
                self._hits[r["index"]] = self.rule_predictions(r, rule, self.models)[0] == r["answer"]
        return f"{label} acc {sum(self._hits.values()) / max(1, len(self._hits)):.1%}"
