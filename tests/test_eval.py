"""`coolfusion eval`: answer extraction, multiple choice through Score, reports recomputed from the
JSONL, resume after a real SIGINT, rerank, MGSM and bad input."""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import sys
import threading
from pathlib import Path

import pytest
import pytest_asyncio
from cluster import HANG_GUARD_S

from coolfusion.clients.client import FusionClient
from coolfusion.clients.evaluation import choice, generation
from coolfusion.clients.evaluation.results import ResultsFile
from coolfusion.clients.evaluation.runner import EvalDataError, row_key, run_task
from coolfusion.clients.evaluation.stats import mcnemar, wilson
from coolfusion.orchestrator.rules import RULES, ScoreRule

DATA = Path(__file__).parent / "data"
ARC = DATA / "arc-easy-validation-14.jsonl"
MODELS = ["smollm2", "gemma3"]


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
    assert generation.extract_strict(output) == strict
    assert generation.extract_flexible(output) == flexible


def test_gold_answers_copy_and_repeat_flags():
    items = generation.load_items(DATA / "gsm8k-test-4.jsonl")
    assert [i.gold for i in items] == ["18", "3", "70000", "540"]
    q = "Tom has 3 apples. He buys 2 more apples at the shop. How many apples does he have?"
    assert generation.copies_question("He buys 2 more apples at the shop. So 5.", q)
    assert not generation.copies_question("He has 5 apples.", q)
    assert generation.repeats_line("3 + 2 = 5 apples\nso\n3 + 2 = 5 apples")
    assert not generation.repeats_line("3 + 2 = 5 apples\n#### 5")


def test_intervals_and_paired_test():
    lo, hi = wilson(10, 20)
    assert 0.29 < lo < 0.3 and 0.7 < hi < 0.71
    assert wilson(0, 0) == (0.0, 0.0)
    # 10 items only a right, 2 only b right: p = 2 * P(X <= 2), X ~ Bin(12, 1/2).
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    test = mcnemar(a, b)
    assert (test["a_only"], test["b_only"]) == (10, 2)
    assert test["p"] == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar([True], [True])["p"] == 1.0


def test_bad_data_is_one_line_error(tmp_path):
    rows = [json.loads(line) for line in ARC.read_text().splitlines()[:2]]
    rows[1]["answerKey"] = "Z"
    bad = tmp_path / "arc.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(EvalDataError, match=r"arc.jsonl:2: answerKey 'Z' is not among the labels A,B,C,D"):
        choice.load_choice_items(bad)
    empty = tmp_path / "mgsm_xx.tsv"
    empty.write_text("")
    with pytest.raises(EvalDataError, match="no questions"):
        generation.load_items(empty)
    items = generation.load_items(_mgsm_file(tmp_path))
    assert [i.gold for i in items] == ["4", "4.5"]


def _mgsm_file(tmp_path: Path) -> Path:
    path = tmp_path / "mgsm_de.tsv"
    path.write_text("Was ist 2+2?\t4\nDie Hälfte von 9?\t4.5\n", encoding="utf-8")
    return path


def test_results_file_drops_a_cut_line_before_appending(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"index": 0, "unit": "u"}\n{"index": 1, "un')
    with ResultsFile(path, row_key) as results:
        assert list(results.rows) == [(0, "u")]
        results.add({"index": 1, "unit": "u"})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"index": 0, "unit": "u"}, {"index": 1, "unit": "u"}]


# ---- multiple choice through the real services ------------------------------------------------
def _task(rules=None):
    """The task `coolfusion eval arc-easy` builds: every rule, plus the shipped default."""
    from coolfusion.orchestrator.rules import default_rule

    return choice.ChoiceTask("arc-easy", MODELS, rules or [*(ScoreRule(n) for n in RULES), default_rule()])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def arc_run(cluster, tmp_path_factory):
    """`coolfusion eval arc-easy`'s task over the 14 questions, run once: (summary, its folder)."""
    folder = tmp_path_factory.mktemp("arc-full")
    summary = await run_task(
        _task(), cluster.address, choice.load_choice_items(ARC), folder, {"test": True}, concurrency=2
    )
    return summary, folder


async def test_arc_accuracy_equals_an_independent_recomputation(arc_run):
    items = choice.load_choice_items(ARC)
    summary, folder = arc_run
    rows = sorted(map(json.loads, (folder / "results.jsonl").read_text().splitlines()), key=lambda r: r["index"])
    assert len(rows) == len(items) and {len(r["chars"]) for r in rows} == {3, 4, 5}
    # Independent: each model's choice is the argmax of its summed log-probs (acc) and per character (acc_norm).
    for m in MODELS:
        acc = sum(max(range(len(r["chars"])), key=lambda i: (r["scores"][m][i][0], -i)) == r["answer"] for r in rows)
        norm = sum(
            max(range(len(r["chars"])), key=lambda i: (r["scores"][m][i][0] / r["chars"][i], -i)) == r["answer"]
            for r in rows
        )
        assert summary["configs"][f"single:{m}"]["acc"] == acc / len(rows)
        assert summary["configs"][f"single:{m}"]["acc_norm"] == norm / len(rows)
    # product with equal weights: the mean of the two models' summed log-probs.
    prod = sum(
        max(range(len(r["chars"])), key=lambda i: (sum(r["scores"][m][i][0] for m in MODELS) / 2, -i)) == r["answer"]
        for r in rows
    )
    assert summary["configs"]["product"]["acc"] == prod / len(rows)
    # The shipped default, hedged with gemma3 weighted 2, from its formula (orchestrator/rules.py).
    assert _task().rules[-1].label() == "hedged(gemma3=2)"
    hedged = [_hedged({"smollm2": 1 / 3, "gemma3": 2 / 3}, r) for r in rows]
    for metric in ("acc", "acc_norm"):
        hits = []
        for ll, r in zip(hedged, rows):
            per = r["chars"] if metric == "acc_norm" else [1] * len(ll)
            hits.append(max(range(len(ll)), key=lambda i: (ll[i] / per[i], -i)) == r["answer"])
        assert summary["configs"]["hedged(gemma3=2)"][metric] == pytest.approx(sum(hits) / len(rows))
    assert json.loads((folder / "summary.json").read_text())["configs"] == json.loads(json.dumps(summary["configs"]))
    assert "| product |" in (folder / "table.md").read_text() and (folder / "arc-easy.png").stat().st_size > 0


def _hedged(weights: dict, row: dict) -> list[float]:
    """ln sum_v w_v (softmax(lp_v) + softmax(lp_v * mean(n_v) / n_v)) / 2 over a question's choices."""

    def softmax(xs):
        exps = [math.exp(x - max(xs)) for x in xs]
        return [e / sum(exps) for e in exps]

    mix = [0.0] * len(row["chars"])
    for m, w in weights.items():
        lps, tokens = [s[0] for s in row["scores"][m]], [s[1] for s in row["scores"][m]]
        mean = sum(tokens) / len(tokens)
        per_token = softmax([lp * mean / t for lp, t in zip(lps, tokens)])
        mix = [x + w * (a + b) / 2 for x, a, b in zip(mix, softmax(lps), per_token)]
    return [math.log(p) for p in mix]


async def test_score_rpc_fuses_by_the_requested_rule(cluster):
    item = choice.load_choice_items(ARC)[1]
    texts = [choice.continuation(c) for c in item.choices]
    async with FusionClient(cluster.address) as client:
        for name in RULES:
            reply = await client.score(choice.choice_prompt(item.question), texts, models=MODELS, score_rule=name)
            table = [{p.scorer: (p.logprob, p.tokens) for p in s.ppl} for s in reply.scores]
            for s in reply.scores:  # logprob and PPL describe the same tokens
                for p in s.ppl:
                    assert p.ppl == pytest.approx(math.exp(-p.logprob / p.tokens), rel=1e-9)
            rule = ScoreRule(name)
            assert [s.loglikelihood for s in reply.scores] == pytest.approx(rule.loglikelihood(table), rel=1e-9)
            assert [s.chosen for s in reply.scores].index(True) == rule.choose(table)
            assert reply.score_rule == rule.label()


async def test_a_real_sigint_then_resume_keeps_every_row(cluster, arc_run, tmp_path, monkeypatch):
    """`coolfusion eval` interrupted by SIGINT after 3 rows, its file then cut mid-line as a hard
    kill would leave it, then resumed: every finished row once, each line valid JSON."""
    full, _ = arc_run
    # Once the seed's rows are written, the worker holds the next scoring call until the signal
    # has landed: the rest of the run is otherwise a few cached scores, which could all finish
    # before a test process busy serving them sends the signal.
    core, hold, release = cluster.cores["gemma3"], [None], threading.Event()
    score_candidates = core.score_candidates

    def held_score(*args, **kwargs):
        rows, at_least = hold[0] or (None, 0)
        if rows is not None and rows.exists() and rows.read_text().count("\n") >= at_least:
            release.wait(HANG_GUARD_S)
        return score_candidates(*args, **kwargs)

    monkeypatch.setattr(core, "score_candidates", held_score)
    seed = 2  # where the interruption falls (rows before it) and where the file is cut
    out = tmp_path / f"cut{seed}"
    cmd = [
        sys.executable,
        "-c",
        # A shell's background job starts with SIGINT ignored, and a Python started so keeps it
        # ignored: the command is run with Python's own Ctrl-C handler, as in a terminal.
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'coolfusion'; runpy.run_module('coolfusion.clients.cli', run_name='__main__')",
        "eval",
        "arc-easy",
        "--data",
        str(ARC),
        "--connect",
        cluster.address,
        "--out",
        str(out),
        "--models",
        ",".join(MODELS),
    ]
    results = out / "results.jsonl"
    hold[0] = (results, 1 + seed)
    release.clear()
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    while not (results.exists() and results.read_text().count("\n") >= 1 + seed):
        assert proc.returncode is None, (await proc.stderr.read()).decode()
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), HANG_GUARD_S)
    release.set()
    hold[0] = None
    text = results.read_text()
    # The signal came mid-run: the command says so, and rows are missing for the resume to add.
    assert proc.returncode == 130, (proc.returncode, err.decode())
    assert text.count("\n") == 1 + seed, text.count("\n")
    cut = random.Random(seed).randrange(len(text) - 60, len(text) - 1)
    results.write_text(text[:cut])  # a hard kill mid-write leaves a cut last line
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = results.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line parses
    assert sorted(r["index"] for r in rows) == list(range(14))
    assert json.loads((out / "summary.json").read_text())["configs"] == json.loads(json.dumps(full["configs"]))


def test_eval_cli_bad_input_exits_2(tmp_path):
    from coolfusion.clients.cli import main

    assert main(["eval", "arc-easy", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["eval", "arc-easy", "--data", str(ARC), "--rules", "product,nope"]) == 2
    weights = tmp_path / "w.json"
    weights.write_text("{oops")
    assert main(["eval", "arc-easy", "--data", str(ARC), "--rules", str(weights)]) == 2
    (tmp_path / "mgsm_xx.tsv").write_text("")
    assert main(["eval", "mgsm", "--data", str(tmp_path), "--lang", "xx"]) == 2
    assert main(["eval", "mgsm", "--data", str(tmp_path)]) == 2  # a folder needs --lang
    assert not (tmp_path / "runs").exists()


async def test_generate_with_an_unknown_rule_or_stray_weights_is_invalid_argument(cluster):
    import grpc

    async with FusionClient(cluster.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            stray = ScoreRule("product", weights={"llama": 2.0})
            await client.generate("Hi", models=MODELS, max_new_tokens=4, score_rule=stray)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not in this request" in err.value.details()
        from coolfusion.protos import fusion_pb2 as pb

        request = pb.ScoreRequest(prompt="Hi", texts=[" a"], score_rule=pb.ScoreRule(name="nope"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.stub.Score(request)
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown score rule 'nope'" in err.value.details()
        )


# ---- generation tasks --------------------------------------------------------------------------
GEN_MODES = ["single:smollm2", "single:gemma3", "cool@mean-ppl", "rerank@mean-ppl", "cool-rerank@mean-ppl"]


GEN_TOKENS = 16


def _gen_task(modes=GEN_MODES, tokens=GEN_TOKENS):
    prefix = generation.few_shot_prefix(generation.load_items(DATA / "gsm8k-train-3.jsonl"))
    return generation.GenerationTask("gsm8k", modes, MODELS, prefix, tokens)


async def test_gsm8k_reports_recompute_from_jsonl_and_rerank_equals_the_service(cluster, tmp_path):
    items = generation.load_items(DATA / "gsm8k-test-4.jsonl")[:2]
    task = _gen_task()
    full = await run_task(task, cluster.address, items, tmp_path, {"test": True})
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(items) * len(task.units)
    # The table is a function of the JSONL alone; accuracy recomputed independently.
    assert json.loads(json.dumps(task.summarize(rows))) == json.loads(json.dumps(full))
    for mode in GEN_MODES:
        mine = [r for r in rows if r["mode"] == mode]
        flexible = sum(generation.extract_flexible(r["output"]) == r["gold"] for r in mine)
        assert full["modes"][mode]["flexible_acc"] == flexible / len(mine)
        assert all(set(r["ppl"]) == set(MODELS) for r in mine)
    prompt = generation.build_prompt(task.prefix, items[1].question)
    by_mode = {r["mode"]: r for r in rows if r["index"] == 1}
    async with FusionClient(cluster.address) as client:
        for mode in ("rerank", "cool-rerank"):
            reply = await client.generate(
                prompt, mode=mode, max_new_tokens=GEN_TOKENS, stop=generation.STOP, models=MODELS, score_rule="mean-ppl"
            )
            assert reply.text == by_mode[f"{mode}@mean-ppl"]["output"], mode


async def test_mgsm_from_a_tsv_folder(cluster, tmp_path):
    from coolfusion.clients.cli import main

    _mgsm_file(tmp_path)
    out = tmp_path / "out"
    code = await asyncio.to_thread(
        main,
        [
            "eval",
            "mgsm",
            "--data",
            str(tmp_path),
            "--lang",
            "de",
            "--modes",
            "single:gemma3",
            "--max-new-tokens",
            "6",
            "--connect",
            cluster.address,
            "--out",
            str(out),
            "--models",
            ",".join(MODELS),
        ],
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in sorted(rows, key=lambda r: r["index"])] == ["4", "4.5"]
    assert json.loads((out / "summary.json").read_text())["modes"]["single:gemma3"]["n"] == 2


async def test_default_rule_is_the_shipped_one_and_picks_every_segment(cluster):
    from coolfusion.orchestrator.rules import default_rule

    prompt = generation.build_prompt("", generation.load_items(DATA / "gsm8k-test-4.jsonl")[0].question)
    async with FusionClient(cluster.address) as client:
        reply = await client.generate(prompt, models=MODELS, max_new_tokens=16)
    assert reply.score_rule == default_rule().label() != "mean-ppl"
    rule = default_rule()
    for segment in reply.segments:
        table = [{p.scorer: (p.logprob, p.tokens) for p in c.ppl} for c in segment.candidates]
        assert [c.score for c in segment.candidates] == pytest.approx(rule.loglikelihood(table), rel=1e-9)
        winner = segment.candidates[rule.choose(table)]
        assert (segment.model, segment.text) == (winner.model, winner.text)
