"""Why ``calibrated`` loses on hard questions, and how robust each candidate default is
(docs/scoring-rules.md). Reads only committed ``results.jsonl`` files (every model's summed
log-probability and token count of every choice) and computes each rule's picks with the code the
service runs (``orchestrator/rules.py`` through ``ChoiceTask``); runs in seconds::

    .venv/bin/python bench/rule_choice.py causes bench/tune-arc-easy-validation \\
        bench/tune-arc-challenge-validation
    .venv/bin/python bench/rule_choice.py bootstrap bench/tune-arc-easy-validation \\
        bench/tune-arc-challenge-validation --rules 'calibrated(gemma3=1.5),hedged(gemma3=2)'

``causes``: per split, how often the gold choice is the longest / shortest, how often each
configuration's acc pick is the shortest choice and its acc_norm pick the longest, how often its
acc and acc_norm picks differ, and each model's accuracy by how peaked its posterior over the
choices is, and the accuracy of deferring to the more confident model. ``bootstrap``: the expected worst-case difference to the best single model over the
splits when the questions are resampled (the best single re-picked in every resample, as a user
would), a less noisy ranking than the one observed worst case.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's parent: import coolfusion

from coolfusion.clients.evaluation.choice import ChoiceTask  # noqa: E402
from coolfusion.clients.evaluation.command import split_specs  # noqa: E402
from coolfusion.clients.evaluation.runner import load_rows  # noqa: E402
from coolfusion.orchestrator.rules import ScoreRule  # noqa: E402

DEFAULT_RULES = "calibrated(gemma3=1.5),calibrated-token(gemma3=2),hedged(gemma3=2)"


def picks(rows: list[dict], what, models: list[str]) -> list[tuple[int, int]]:
    """(acc pick, acc_norm pick) per question of a model (a name) or a rule."""
    if isinstance(what, str):
        return [ChoiceTask.single_predictions(r, what) for r in rows]
    return [ChoiceTask.rule_predictions(r, what, models) for r in rows]


def _pct(values) -> str:
    values = list(values)
    return f"{100 * sum(values) / max(1, len(values)):.0f} %"


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _posterior_max(lps: list[float]) -> float:
    top = max(lps)
    exps = [math.exp(v - top) for v in lps]
    return max(exps) / sum(exps)


def causes(run: Path, rules: list[ScoreRule]) -> None:
    rows = sorted(load_rows(run), key=lambda r: r["index"])
    models = list(rows[0]["scores"])
    longest = [_argmax(r["chars"]) for r in rows]
    shortest = [_argmax([-c for c in r["chars"]]) for r in rows]
    print(f"\n### {run.name} ({len(rows)} questions)\n")
    print(
        f"gold is the longest choice in {_pct(g == r['answer'] for g, r in zip(longest, rows))}, "
        f"the shortest in {_pct(s == r['answer'] for s, r in zip(shortest, rows))}\n"
    )
    print("| configuration | acc picks the shortest | acc_norm picks the longest | acc and acc_norm picks differ |")
    print("|---|---:|---:|---:|")
    for label, what in [(m, m) for m in models] + [(r.label(), r) for r in rules]:
        p = picks(rows, what, models)
        print(
            f"| {label} | {_pct(a == s for (a, _), s in zip(p, shortest))} | "
            f"{_pct(b == g for (_, b), g in zip(p, longest))} | {_pct(a != b for a, b in p)} |"
        )
    print("\n| model | mean max posterior | acc when max < 0.5 | 0.5-0.8 | >= 0.8 |")
    print("|---|---:|---:|---:|---:|")
    for m in models:
        conf = [_posterior_max([lp for lp, _ in r["scores"][m]]) for r in rows]
        hits = [a == r["answer"] for (a, _), r in zip(picks(rows, m, models), rows)]
        cells = []
        for lo, hi in ((0, 0.5), (0.5, 0.8), (0.8, 1.01)):
            sel = [h for c, h in zip(conf, hits) if lo <= c < hi]
            cells.append(f"{_pct(sel)} ({len(sel)} q)")
        print(f"| {m} | {sum(conf) / len(conf):.2f} | " + " | ".join(cells) + " |")
    defer = []  # the acc pick of whichever model's posterior is the most peaked
    for r in rows:
        top = max(models, key=lambda m: _posterior_max([lp for lp, _ in r["scores"][m]]))
        defer.append(ChoiceTask.single_predictions(r, top)[0] == r["answer"])
    print(f"\ndeferring to the more confident model (largest posterior): acc {_pct(defer)}")
    agree = [
        ChoiceTask.single_predictions(r, models[0])[0] == ChoiceTask.single_predictions(r, models[1])[0] for r in rows
    ]
    right = [ChoiceTask.single_predictions(r, models[-1])[0] == r["answer"] for r in rows]
    print(
        f"\nthe models' acc picks agree on {_pct(agree)} of questions; {models[-1]} is right on "
        f"{_pct(h for h, a in zip(right, agree) if a)} of those and {_pct(h for h, a in zip(right, agree) if not a)} "
        "of the others"
    )


def bootstrap(runs: list[Path], rules: list[ScoreRule], resamples: int, seed: int) -> None:
    hits_of = []  # per run: (singles' hit lists, {label: (acc hits, acc_norm hits)})
    for run in runs:
        rows = sorted(load_rows(run), key=lambda r: r["index"])
        models = list(rows[0]["scores"])
        singles = []
        for m in models:
            p = picks(rows, m, models)
            singles += [
                [a == r["answer"] for (a, _), r in zip(p, rows)],
                [b == r["answer"] for (_, b), r in zip(p, rows)],
            ]
        per_rule = {}
        for rule in rules:
            p = picks(rows, rule, models)
            per_rule[rule.label()] = (
                [a == r["answer"] for (a, _), r in zip(p, rows)],
                [b == r["answer"] for (_, b), r in zip(p, rows)],
            )
        hits_of.append((singles, per_rule))
    rng = random.Random(seed)
    worst = {r.label(): [] for r in rules}
    for _ in range(resamples):
        diffs = {label: [] for label in worst}
        for singles, per_rule in hits_of:
            n = len(singles[0])
            idx = [rng.randrange(n) for _ in range(n)]
            best = max(sum(h[i] for i in idx) for h in singles)
            for label, (acc, norm) in per_rule.items():
                score = max(sum(acc[i] for i in idx), sum(norm[i] for i in idx))
                diffs[label].append(100 * (score - best) / n)
        for label, d in diffs.items():
            worst[label].append(min(d))
    print(f"\n{resamples} resamples of {', '.join(r.name for r in runs)}\n")
    print("| rule | expected worst difference (points) | P(worst < -3 points) |")
    print("|---|---:|---:|")
    for label, w in sorted(worst.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {label} | {sum(w) / len(w):+.2f} | {sum(x < -3 for x in w) / len(w):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("causes", "bootstrap"))
    parser.add_argument("runs", nargs="+", type=Path, help="eval run folders holding results.jsonl")
    parser.add_argument("--rules", default=DEFAULT_RULES, help="rule labels or names, comma-separated")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rules = [ScoreRule.parse(spec) for spec in split_specs(args.rules)]
    if args.what == "causes":
        for run in args.runs:
            causes(run, rules)
    else:
        bootstrap(args.runs, rules, args.resamples, args.seed)


if __name__ == "__main__":
    main()
