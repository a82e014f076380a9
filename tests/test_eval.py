"""`coolfusion eval`: answer extraction, the report recomputed from the JSONL, resume, rerank."""

from __future__ import annotations

import json

import pytest

from cluster import GSM8K
from coolfusion.clients import evaluate
from coolfusion.clients.client import FusionClient


@pytest.mark.parametrize(
    "output, strict, flexible",
    [
        ("She pays 2 * 3 = 6 dollars.\n#### 6", "6", "6"),
        ("#### 1,234", "1234", "1234"),
        ("The total is $1,000.", None, "1000"),
        ("The answer is 18.", None, "18"),
        ("#### -5\n", "-5", "-5"),
        ("He lost 3.50 dollars #### 3.50", "3.5", "3.5"),
        ("#### 7\nQuestion: ... #### 9", "7", "9"),
        ("no numbers here", None, None),
        ("x = 12, y = 0.25", None, "0.25"),
        ("#### $12.", None, "12"),  # lm-eval strict-match takes digits only after "#### "
        ("1. First step\n2. Second", None, "2"),
    ],
)
def test_answer_extraction(output, strict, flexible):
    assert evaluate.extract_strict(output) == strict
    assert evaluate.extract_flexible(output) == flexible


def test_gold_answers_from_gsm8k():
    items = evaluate.load_items(GSM8K / "test.jsonl")[:50]
    assert all(i.gold is not None for i in items)
    assert items[0].gold == "18"  # Janet's ducks


def test_wilson_interval():
    lo, hi = evaluate.wilson(10, 20)
    assert 0.29 < lo < 0.3 and 0.7 < hi < 0.71
    assert evaluate.wilson(0, 0) == (0.0, 0.0)


def test_tsv_data(tmp_path):
    path = tmp_path / "qa.tsv"
    path.write_text("What is 2+2?\t4\nHalf of 9?\t4.5\n")
    items = evaluate.load_items(path)
    assert [i.gold for i in items] == ["4", "4.5"]


MODES = ["single:smollm2", "single:gemma3", "cool", "rerank", "cool-rerank"]


async def _run(cluster, out, items):
    prefix = evaluate.few_shot_prefix(evaluate.load_items(GSM8K / "train.jsonl")[:3])
    return await evaluate.run_eval(
        cluster.address, items, prefix, MODES, out, 24, {"test": True}, models=["smollm2", "gemma3"]
    )


async def test_eval_reports_recompute_from_jsonl_and_resume(cluster, tmp_path):
    items = evaluate.load_items(GSM8K / "test.jsonl")[:2]
    full = await _run(cluster, tmp_path / "full", items)
    rows = [json.loads(l) for l in (tmp_path / "full" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(items) * len(MODES)
    # The table is a function of the JSONL alone.
    recomputed = json.loads(json.dumps(evaluate.summarize(rows, MODES)))  # tuples -> lists, as in the file
    assert recomputed == json.loads((tmp_path / "full" / "summary.json").read_text())["modes"]
    for name in ("table.md", "summary.json", "accuracy_ppl.png"):
        assert (tmp_path / "full" / name).stat().st_size > 0
    for row in rows:
        assert set(row["ppl"]) == {"smollm2", "gemma3"}

    # Interrupted run: keep the first question and a cut line, then resume.
    part = tmp_path / "part"
    part.mkdir()
    kept = [json.dumps(r) for r in rows[: len(MODES)]]
    (part / "results.jsonl").write_text("\n".join(kept) + "\n" + '{"index": 1, "mo')
    resumed = await _run(cluster, part, items)
    assert (part / "table.md").read_text() == (tmp_path / "full" / "table.md").read_text()
    assert resumed == full
    done = [l for l in (part / "results.jsonl").read_text().splitlines() if l.startswith("{") and l.endswith("}")]
    assert len(done) == len(items) * len(MODES)


async def test_derived_rerank_equals_the_service_rerank_mode(cluster, tmp_path):
    items = evaluate.load_items(GSM8K / "test.jsonl")[2:3]
    await _run(cluster, tmp_path, items)
    rows = {r["mode"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    prompt = evaluate.build_prompt(
        evaluate.few_shot_prefix(evaluate.load_items(GSM8K / "train.jsonl")[:3]), items[0].question
    )
    async with FusionClient(cluster.address) as client:
        for mode in ("rerank", "cool-rerank"):
            reply = await client.generate(prompt, mode=mode, max_new_tokens=24, stop=evaluate.STOP, models=["smollm2", "gemma3"])
            assert reply.text == rows[mode]["output"], mode
