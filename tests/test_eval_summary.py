"""`coolfusion eval arc-* --rescore` and `coolfusion eval summary`: reports recomputed from stored
per-model scores, and each configuration's worst case over runs; no model loaded."""

from __future__ import annotations

import json
import math
import random

import pytest

from coolfusion.clients.cli import main

MODELS = ("smollm2", "gemma3")


def _rows(seed: int, n: int = 40) -> list[dict]:
    """Questions with four choices scored by two models: (summed log-prob, tokens) per choice."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chars = [rng.randint(3, 40) for _ in range(4)]
        scores = {}
        for m in MODELS:
            tokens = [max(1, c // rng.randint(3, 5)) for c in chars]
            scores[m] = [[-rng.uniform(0.5, 3.0) * t, t] for t in tokens]
        rows.append(
            {"index": i, "unit": "scores", "id": str(i), "answer": rng.randrange(4), "chars": chars, "scores": scores}
        )
    return rows


def _write_run(folder, rows):
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _hedged_gemma3_2(row) -> list[float]:
    """hedged(gemma3=2), written out: per model the mean of the softmax of the summed log-probs and
    the softmax of the per-token log-probs scaled to the model's mean token count; weights 1/3, 2/3."""

    def softmax(xs):
        exps = [math.exp(x - max(xs)) for x in xs]
        return [e / sum(exps) for e in exps]

    mix = [0.0] * len(row["chars"])
    for m, w in (("smollm2", 1 / 3), ("gemma3", 2 / 3)):
        lps, tokens = [s[0] for s in row["scores"][m]], [s[1] for s in row["scores"][m]]
        mean = sum(tokens) / len(tokens)
        q = [(a + b) / 2 for a, b in zip(softmax(lps), softmax([lp * mean / t for lp, t in zip(lps, tokens)]))]
        mix = [x + w * y for x, y in zip(mix, q)]
    return [math.log(p) for p in mix]


def _first_argmax(values) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def test_rescore_recomputes_every_rule_from_the_stored_scores(tmp_path, capsys):
    rows = _rows(1)
    run = _write_run(tmp_path / "run", rows)
    assert main(["eval", "arc-easy", "--rescore", "--out", str(run), "--rules", "product,hedged(gemma3=2)"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    entry = summary["configs"]["hedged(gemma3=2)"]
    acc = sum(_first_argmax(_hedged_gemma3_2(r)) == r["answer"] for r in rows) / len(rows)
    norm = sum(
        _first_argmax([v / c for v, c in zip(_hedged_gemma3_2(r), r["chars"])]) == r["answer"] for r in rows
    ) / len(rows)
    assert (entry["acc"], entry["acc_norm"]) == (pytest.approx(acc), pytest.approx(norm))
    assert entry["score"] == max(acc, norm)
    singles = [summary["configs"][f"single:{m}"][k] for m in MODELS for k in ("acc", "acc_norm")]
    assert entry["score_vs_best"]["diff"] == pytest.approx(max(acc, norm) - max(singles))
    assert summary["settings"]["rules"][1] == {"rule": "hedged", "weights": {"gemma3": 2.0}}
    assert [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()] == rows  # untouched
    assert "| hedged(gemma3=2) |" in capsys.readouterr().out


def test_summary_reports_each_configurations_worst_case(tmp_path, capsys):
    runs = []
    for seed in (2, 3):
        run = _write_run(tmp_path / f"run{seed}", _rows(seed))
        assert main(["eval", "arc-challenge", "--rescore", "--out", str(run), "--rules", "product,hedged"]) == 0
        runs.append(run)
    capsys.readouterr()
    out = tmp_path / "worst.json"
    assert main(["eval", "summary", *map(str, runs), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    for label in ("product", "hedged"):
        diffs = [s["configs"][label]["score_vs_best"]["diff"] for s in summaries]
        row = result["configs"][label]
        assert (row["worst"], row["mean"]) == (pytest.approx(min(diffs)), pytest.approx(sum(diffs) / 2))
    worsts = [row["worst"] for row in result["configs"].values()]
    assert worsts == sorted(worsts, reverse=True)  # the highest worst case first
    assert "single:gemma3" not in result["configs"]  # the reference, not a candidate
    table = capsys.readouterr().out
    assert "| configuration | run2 | run3 | worst | mean |" in table


def test_summary_reports_generation_runs_by_clean_perplexity(tmp_path, capsys):
    def mode(ppl):
        return {"n": 4, "avg_ppl_clean": ppl, "avg_ppl_clean_n": 3}

    summary = {"task": "gsm8k", "modes": {"single:a": mode(2.0), "single:b": mode(1.5), "cool": mode(1.7)}}
    (tmp_path / "gsm").mkdir()
    (tmp_path / "gsm" / "summary.json").write_text(json.dumps(summary))
    assert main(["eval", "summary", str(tmp_path / "gsm")]) == 0
    assert "| cool | 4 | 1.700 (3) | +0.200 |" in capsys.readouterr().out


def test_offline_forms_bad_input_exit_2(tmp_path, capsys):
    assert main(["eval", "summary"]) == 2
    assert main(["eval", "summary", str(tmp_path / "missing")]) == 2
    (tmp_path / "junk.json").write_text("{}")
    assert main(["eval", "summary", str(tmp_path / "junk.json")]) == 2
    assert main(["eval", "arc-easy", "--rescore", "--out", str(tmp_path / "empty")]) == 2
    assert main(["eval", "gsm8k", "--rescore", "--out", str(tmp_path)]) == 2
    assert main(["eval", "arc-easy", str(tmp_path)]) == 2
    run = _write_run(tmp_path / "run", _rows(4, 3))
    assert main(["eval", "arc-easy", "--rescore", "--out", str(run), "--rules", "hedged(x)"]) == 2
    err = capsys.readouterr().err
    assert "no results" in err and "only eval summary takes run folders" in err and "Traceback" not in err
    assert not (run / "summary.json").exists()  # nothing written for a bad rule


def test_the_train_split_evaluated_itself_leaves_out_its_exemplars(tmp_path):
    from coolfusion.clients.cli import build_parser
    from coolfusion.clients.evaluation.command import build_task

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"#### {i}"}) + "\n" for i in range(6)))
    task, items, _ = build_task(build_parser().parse_args(["eval", "gsm8k", "--data", str(train), "--limit", "2"]))
    assert [(i.index, i.question) for i in items] == [(3, "q3?"), (4, "q4?")]
    assert "q0?" in task.prefix and "q3?" not in task.prefix  # 3 shots, none of them a question
    test = tmp_path / "test.jsonl"
    test.write_text(train.read_text())
    _, items, _ = build_task(build_parser().parse_args(["eval", "gsm8k", "--data", str(test), "--train", str(train)]))
    assert items[0].index == 0  # another split keeps every row
