"""Does a rule fitted by maximum likelihood beat the grid-picked default? (docs/scoring-rules.md)

A conditional-logit model over a question's choices: each choice's score is a weighted sum of
per-model features (summed log-probability, per character, per token), the weights fitted on an
eval's ``results.jsonl`` (the tuning split's) with a small L2 penalty. Prints in-sample and
5-fold cross-validated accuracy, and the accuracy on a second split (ARC-Challenge) with the
weights fitted on the first. Reads only committed results; runs in seconds::

    .venv/bin/python bench/fit_rule.py bench/tune-arc-easy-validation/results.jsonl \\
        bench/tune-arc-challenge-validation/results.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.optimize import minimize

MODELS = ("smollm2", "gemma3")
FEATURES = [f"{m}:{kind}" for m in MODELS for kind in ("sum", "per-char", "per-token")]
SETS = {
    "gemma3 sum": ["gemma3:sum"],
    "both sums": ["smollm2:sum", "gemma3:sum"],
    "both sums + per-token": ["smollm2:sum", "gemma3:sum", "smollm2:per-token", "gemma3:per-token"],
    "all six": FEATURES,
}


def load(path: str) -> list[tuple[np.ndarray, int]]:
    """(choices x FEATURES matrix, answer index) per question."""
    questions = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            chars = np.array(row["chars"], float)
            columns = []
            for m in MODELS:
                lp = np.array([s[0] for s in row["scores"][m]])
                tokens = np.array([s[1] for s in row["scores"][m]], float)
                columns += [lp, lp / chars * 10, lp / tokens]  # x10: features of one scale
            questions.append((np.stack(columns, 1), row["answer"]))
    return questions


def fit(questions, cols, l2=0.01) -> np.ndarray:
    def loss(beta):
        total = 0.0
        for x, answer in questions:
            z = x[:, cols] @ beta
            z = z - z.max()
            total -= z[answer] - np.log(np.exp(z).sum())
        return total / len(questions) + l2 * beta @ beta

    return minimize(loss, np.full(len(cols), 0.3), method="L-BFGS-B").x


def accuracy(questions, cols, beta) -> float:
    return 100 * float(np.mean([np.argmax(x[:, cols] @ beta) == a for x, a in questions]))


def cross_validated(questions, cols, folds=5, seed=0) -> float:
    order = np.random.default_rng(seed).permutation(len(questions))
    hits = []
    for held in np.array_split(order, folds):
        held_set = set(held.tolist())
        beta = fit([questions[i] for i in order if i not in held_set], cols)
        hits += [np.argmax(questions[i][0][:, cols] @ beta) == questions[i][1] for i in held]
    return 100 * float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tune", help="results.jsonl of the split to fit on")
    parser.add_argument("check", nargs="?", help="results.jsonl of a second split, scored with the fitted weights")
    args = parser.parse_args()
    tune = load(args.tune)
    check = load(args.check) if args.check else None
    print("| features | weights | in-sample | 5-fold CV | second split |")
    print("|---|---|---|---|---|")
    for name, names in SETS.items():
        cols = [FEATURES.index(n) for n in names]
        beta = fit(tune, cols)
        second = f"{accuracy(check, cols, beta):.1f} %" if check else ""
        weights = ", ".join(f"{n} {b:.3f}" for n, b in zip(names, beta))
        print(
            f"| {name} | {weights} | {accuracy(tune, cols, beta):.1f} % | {cross_validated(tune, cols):.1f} % | {second} |"
        )


if __name__ == "__main__":
    main()
