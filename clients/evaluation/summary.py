"""``coolfusion eval summary RUN...``: each configuration's worst case over several eval runs.

A configuration's score on a multiple-choice run is the better of its acc and acc_norm, the same
as the best single model's; its difference to the best single (with the McNemar p of that
comparison) comes from the run's ``summary.json``. Over the runs given, each configuration gets
its difference per run, its worst difference and its mean difference: the default rule is the
one whose worst difference is highest (mean as the tie-break), so a user is never much worse off
fusing than running the best model alone. Generation runs (GSM8K, MGSM) are reported beside, by
average perplexity of the answers that neither copy the question nor repeat a line, against the
single model with the lowest; perplexity differences are not points, so they do not enter the
worst case.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .runner import EvalDataError


def load_summary(path: Path) -> dict:
    """A run folder or its summary.json; a missing or unreadable file is an EvalDataError."""
    file = path / "summary.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvalDataError(f"cannot read {file}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{file} does not parse: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or not ("configs" in data or "modes" in data):
        raise EvalDataError(f"{file} is not an eval summary (no configs or modes)")
    data.setdefault("task", file.parent.name)
    return data


def run_name(path: Path) -> str:
    return (path if path.is_dir() else path.parent).name


def worst_case(runs: Sequence[tuple[str, dict]]) -> dict:
    """``{"runs": [...], "configs": {label: {"per_run": {run: {...}}, "worst", "mean"}}, "generation": ...}``."""
    choice = [(name, s) for name, s in runs if "configs" in s]
    configs: dict[str, dict] = {}
    for name, s in choice:
        for label, entry in s["configs"].items():
            vs = entry.get("score_vs_best") or _older_vs_best(entry)
            if vs is None:
                continue  # a single model: the reference, not a candidate
            metric = entry.get("score_metric") or max(("acc", "acc_norm"), key=lambda m: entry[m])
            row = configs.setdefault(label, {"per_run": {}})
            row["per_run"][name] = {"score": entry[metric], "metric": metric, "diff": vs["diff"], "p": vs["p"]}
    for row in configs.values():
        diffs = [r["diff"] for r in row["per_run"].values()]
        row["worst"], row["mean"] = min(diffs), sum(diffs) / len(diffs)
        row["complete"] = len(diffs) == len(choice)
    ranked = sorted(configs.items(), key=lambda kv: (not kv[1]["complete"], -kv[1]["worst"], -kv[1]["mean"]))
    best = {name: s["best_single"] for name, s in choice}
    generation = {name: _generation(s) for name, s in runs if "modes" in s}
    return {
        "runs": [name for name, _ in choice],
        "best_single": best,
        "configs": dict(ranked),
        "generation": generation,
    }


def _older_vs_best(entry: dict) -> dict | None:
    """Summaries written before ``score_vs_best`` existed: the better metric's comparison."""
    if "acc_vs_best" not in entry:
        return None
    metric = "acc" if entry["acc"] >= entry["acc_norm"] else "acc_norm"
    return entry[f"{metric}_vs_best"]


def _generation(summary: dict) -> dict:
    modes = summary["modes"]
    singles = {m: s["avg_ppl_clean"] for m, s in modes.items() if m.startswith("single:") and s["avg_ppl_clean"]}
    best = min(singles, key=singles.get) if singles else None
    out = {}
    for mode, s in modes.items():
        ppl = s["avg_ppl_clean"]
        diff = ppl - singles[best] if best and ppl is not None else None
        out[mode] = {"n": s["n"], "avg_ppl_clean": ppl, "clean_n": s["avg_ppl_clean_n"], "diff": diff}
    return {"best_single": best, "modes": out}


def worst_case_table(result: dict) -> str:
    runs = result["runs"]
    lines = []
    if runs:
        best = ", ".join(
            f"{r}: {b['config'].removeprefix('single:')} {b['metric']} {b['acc']:.1%}"
            for r, b in result["best_single"].items()
        )
        lines += [
            f"Best single per run: {best}. Cells: score (better of acc / acc_norm), points vs best single, McNemar p.",
            "",
            "| configuration | " + " | ".join(runs) + " | worst | mean |",
            "| --- | " + " | ".join("---" for _ in runs) + " | ---: | ---: |",
        ]
        for label, row in result["configs"].items():
            cells = []
            for r in runs:
                c = row["per_run"].get(r)
                cells.append(f"{c['score']:.1%} {c['metric']}, {c['diff'] * 100:+.1f} (p={c['p']:.2g})" if c else "")
            worst = f"{row['worst'] * 100:+.1f}" + ("" if row["complete"] else " (some runs)")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {worst} | {row['mean'] * 100:+.1f} |")
    for name, g in result["generation"].items():
        lines += [
            "",
            f"{name}: average PPL of answers that neither copy the question nor repeat a line "
            f"(lower is better), against the lowest single ({g['best_single']})",
            "",
            "| mode | N | avg PPL without copies/repeats (answers) | vs best single |",
            "| --- | ---: | ---: | ---: |",
        ]
        for mode, m in g["modes"].items():
            ppl = f"{m['avg_ppl_clean']:.3f} ({m['clean_n']})" if m["avg_ppl_clean"] is not None else "n/a"
            diff = f"{m['diff']:+.3f}" if m["diff"] is not None else ""
            lines.append(f"| {mode} | {m['n']} | {ppl} | {diff} |")
    return "\n".join(lines) + "\n"


def cmd_summary(paths: Sequence[str], out: str | None = None) -> int:
    """Prints the table (and writes ``out`` as JSON when given); exit 2 on a bad summary."""
    import sys

    if not paths:
        print("error: eval summary needs one or more run folders (or summary.json files)", file=sys.stderr)
        return 2
    try:
        runs = [(run_name(Path(p)), load_summary(Path(p))) for p in paths]
    except EvalDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = worst_case(runs)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    print(worst_case_table(result), end="")
    return 0
