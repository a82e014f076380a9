"""lm-evaluation-harness integration (clients/lm_eval_model.py) against real services.

lm-eval runs the bundled task YAMLs (clients/lm_eval_tasks/) on the small copies in
tests/data/lm_eval/, pointed there the way the README tells users to (a YAML that includes the
bundled one and sets dataset_kwargs). Its numbers are checked against the Score and Generate
RPCs called directly, question by question, with acc and acc_norm computed here as lm-eval
defines them. lm-eval runs in a thread (it is synchronous); the services run in the test's loop.
"""

from __future__ import annotations

import os

# Before datasets/lm-eval are imported: nothing may look at the Hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import json
import math
import re
import sys
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from coolfusion.clients import lm_eval_model
from coolfusion.clients.client import FusionClient
from coolfusion.clients.lm_eval_model import TASKS_DIR, CoolFusionArgError, CoolFusionCallError, CoolFusionLM
from coolfusion.orchestrator.rules import ScoreRule

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "lm_eval"
ARC_N = 4
PAIR = ["smollm2", "gemma3"]  # the test cluster also serves smollm2b, a copy of SmolLM2
GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]


def _rows(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line, _ in zip(fh, range(n))]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The bundled tasks on tests/data: a YAML of one's own that includes the bundled one and
    replaces dataset_kwargs (README, "lm-evaluation-harness")."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    cache = str(folder / "hf-datasets")
    files = {
        "coolfusion_arc_easy": {
            "train": DATA / "arc" / "ARC-Easy-train.jsonl",
            "validation": DATA / "arc" / "ARC-Easy-validation.jsonl",
        },
        "coolfusion_gsm8k": {"train": DATA / "gsm8k" / "train.jsonl", "test": DATA / "gsm8k" / "test.jsonl"},
    }
    for task, splits in files.items():
        own = {
            "include": str(TASKS_DIR / f"{task}.yaml"),
            "dataset_kwargs": {"data_files": {k: str(v) for k, v in splits.items()}, "cache_dir": cache},
        }
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(own), encoding="utf-8")
    return folder


def _evaluate(task_dir: Path, task: str, model_args: dict, limit: int, **options) -> dict:
    return lm_eval.simple_evaluate(
        model="coolfusion",  # by name: the registry entry this module's import made
        model_args=model_args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        **options,
    )


def _argmax(values) -> int:
    """np.argmax: the first of equal maxima."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


async def _arc_by_hand(
    address: str, rows: list[dict], mode: str, rule: ScoreRule | str | None
) -> tuple[list[list[float]], float, float]:
    """The Score RPC per question; acc = argmax loglikelihood, acc_norm = argmax loglikelihood /
    len(choice) (lm-eval's completion_len: the choice text, without the target delimiter)."""
    single = mode.removeprefix("single:") if mode.startswith("single:") else ""
    lls, acc, acc_norm = [], 0, 0
    async with FusionClient(address) as client:
        for row in rows:
            choices = row["choices"]["text"]
            reply = await client.score(
                f"Question: {row['question']}\nAnswer:",
                [" " + c for c in choices],
                models=[single] if single else PAIR,
                score_rule=rule,
            )
            if single:
                values = [next(p.logprob for p in s.ppl if p.scorer == single) for s in reply.scores]
            else:
                values = [s.loglikelihood for s in reply.scores]
                if rule == "product":  # the rule's table: sum_v w_v lp_v, weights normalised
                    for s, v in zip(reply.scores, values):
                        assert v == pytest.approx(sum(0.5 * p.logprob for p in s.ppl), rel=1e-12, abs=1e-12)
                        assert sorted(p.scorer for p in s.ppl) == sorted(PAIR)
                if rule == CALIBRATED:  # ln of a mixture of the models' posteriors over the choices
                    assert sum(math.exp(v) for v in values) == pytest.approx(1.0, rel=1e-9)
            gold = row["choices"]["label"].index(row["answerKey"])
            acc += _argmax(values) == gold
            acc_norm += _argmax([v / len(c) for v, c in zip(values, choices)]) == gold
            lls.append(values)
    return lls, acc / len(rows), acc_norm / len(rows)


def test_bundled_tasks_are_lm_eval_own_prompts():
    """Prompt, choices, target, metrics, stop sequences and filters as lm-eval's arc_easy and gsm8k."""
    from lm_eval.tasks._yaml_loader import load_yaml

    builtin = Path(lm_eval.__file__).parent / "tasks"
    ours = load_yaml(TASKS_DIR / "coolfusion_arc_easy.yaml", resolve_func=False)
    theirs = load_yaml(builtin / "arc" / "arc_easy.yaml", resolve_func=False)
    for key in (
        "output_type",
        "doc_to_text",
        "doc_to_target",
        "doc_to_choice",
        "metric_list",
        "training_split",
        "validation_split",
    ):
        assert ours[key] == theirs[key], key
    assert ours["dataset_path"] == "json" and set(ours["dataset_kwargs"]["data_files"]) == {"train", "validation"}

    ours = load_yaml(TASKS_DIR / "coolfusion_gsm8k.yaml", resolve_func=False)
    theirs = load_yaml(builtin / "gsm8k" / "gsm8k.yaml", resolve_func=False)
    for key in (
        "output_type",
        "doc_to_text",
        "doc_to_target",
        "metric_list",
        "generation_kwargs",
        "filter_list",
        "test_split",
        "fewshot_split",
    ):
        assert ours[key] == theirs[key], key
    assert ours["generation_kwargs"]["until"] == GSM8K_UNTIL
    assert (ours["num_fewshot"], ours["fewshot_config"]) == (3, {"sampler": "first_n"})  # coolfusion eval's exemplars


CALIBRATED = ScoreRule("calibrated", {"gemma3": 2.0, "smollm2": 1.0})


@pytest.mark.parametrize(
    "mode, rule_args, rule",
    [
        ("single:gemma3", {}, None),
        ("cool", {"score_rule": "product"}, "product"),
        # set-relative: each value depends on the question's other choices (one Score per question)
        ("cool", {"score_rule": "calibrated", "rule_weights": "gemma3=2+smollm2=1"}, CALIBRATED),
    ],
    ids=["single-gemma3", "cool-product", "cool-calibrated-weighted"],
)
async def test_arc_easy_equals_score_rpc(cluster, task_dir, mode, rule_args, rule, tmp_path):
    model_args = {"address": cluster.address, "mode": mode, **rule_args}
    if rule:
        model_args["models"] = "+".join(PAIR)
    results = await asyncio.to_thread(_evaluate, task_dir, "coolfusion_arc_easy", model_args, ARC_N)
    rows = _rows(DATA / "arc" / "ARC-Easy-validation.jsonl", ARC_N)
    lls, acc, acc_norm = await _arc_by_hand(cluster.address, rows, mode, rule)

    metrics = results["results"]["coolfusion_arc_easy"]
    assert metrics["acc,none"] == acc
    assert metrics["acc_norm,none"] == acc_norm
    samples = sorted(results["samples"]["coolfusion_arc_easy"], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [r["id"] for r in rows]
    for sample, row, expected in zip(samples, rows, lls):
        assert [a[0] for a in sample["arguments"]] == [f"Question: {row['question']}\nAnswer:"] * len(expected)
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in row["choices"]["text"]]
        assert [r[0][0] for r in sample["resps"]] == expected  # the same floats, not merely close
        assert not any(r[0][1] for r in sample["resps"])  # is_greedy: never claimed
    assert results["config"]["coolfusion_mode"] == mode
    if rule:
        assert results["config"]["coolfusion_score_rule"] == (rule if isinstance(rule, str) else rule.label())

    # `coolfusion eval arc-easy` on the same questions reports the same acc and acc_norm.
    from coolfusion.clients.evaluation.choice import ChoiceTask, load_choice_items
    from coolfusion.clients.evaluation.runner import run_task

    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rules = [ScoreRule(rule) if isinstance(rule, str) else rule] if rule else []
    summary = await run_task(
        ChoiceTask("arc-easy", PAIR, rules), cluster.address, load_choice_items(data), tmp_path / "eval", {}
    )
    label = rules[0].label() if rules else mode
    assert (summary["configs"][label]["acc"], summary["configs"][label]["acc_norm"]) == (acc, acc_norm)


async def test_gsm8k_generate_until_equals_generate(cluster, task_dir):
    model_args = {
        "address": cluster.address,
        "mode": "cool",
        "score_rule": "product",
        "models": "+".join(PAIR),
        "max_segment_tokens": 8,
    }
    results = await asyncio.to_thread(
        _evaluate, task_dir, "coolfusion_gsm8k", model_args, 1, gen_kwargs={"max_gen_toks": 32}
    )
    samples = {s["filter"]: s for s in results["samples"]["coolfusion_gsm8k"]}  # one per filter
    assert set(samples) == {"strict-match", "flexible-extract"}
    sample = samples["strict-match"]
    ((context, gen_kwargs),) = sample["arguments"]
    shots = _rows(DATA / "gsm8k" / "train.jsonl", 3)
    doc = _rows(DATA / "gsm8k" / "test.jsonl", 1)[0]
    expected_prompt = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in shots)
    assert context == expected_prompt + f"Question: {doc['question']}\nAnswer:"  # coolfusion eval's 3-shot prompt
    assert gen_kwargs["until"] == GSM8K_UNTIL and gen_kwargs["max_gen_toks"] == 32

    async with FusionClient(cluster.address) as client:
        reply = await client.generate(
            context,
            mode="cool",
            models=PAIR,
            max_new_tokens=32,
            stop=GSM8K_UNTIL,
            score_rule="product",
            max_segment_tokens=8,
        )
    assert reply.text and reply.score_rule == "product"
    for name, pattern, pick in [
        ("strict-match", r"#### (\-?[0-9\.\,]+)", 0),
        ("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1),
    ]:
        assert samples[name]["resps"] == [[reply.text]]
        found = re.findall(pattern, reply.text)
        extracted = "[invalid]"
        if found:
            match = found[pick]
            extracted = (next((m for m in match if m), "[invalid]") if isinstance(match, tuple) else match).strip()
        assert samples[name]["filtered_resps"] == [extracted]
        normalised = [_gsm8k_normalise(x) for x in (extracted, doc["answer"])]
        assert results["results"]["coolfusion_gsm8k"][f"exact_match,{name}"] == float(normalised[0] == normalised[1])


def _gsm8k_normalise(text: str) -> str:
    """The task's exact_match: regexes_to_ignore, then ignore_case."""
    for pattern in (",", "\\$", "(?s).*#### ", "\\.$"):
        text = re.sub(pattern, "", text)
    return text.lower()


async def test_cli_runs_the_coolfusion_model(cluster, task_dir, tmp_path):
    """`coolfusion-lm-eval --model coolfusion ...` (lm-eval's own CLI) end to end."""
    out = tmp_path / "out"
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("coolfusion-lm-eval")),
        "--model",
        "coolfusion",
        "--model_args",
        f"address={cluster.address},mode=single:gemma3,timeout=120",
        "--tasks",
        "coolfusion_arc_easy",
        "--include_path",
        str(task_dir),
        "--limit",
        "2",
        "--output_path",
        str(out),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    (path,) = out.rglob("results_*.json")
    metrics = json.loads(path.read_text())["results"]["coolfusion_arc_easy"]
    rows = _rows(DATA / "arc" / "ARC-Easy-validation.jsonl", 2)
    _, acc, acc_norm = await _arc_by_hand(cluster.address, rows, "single:gemma3", None)
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == (acc, acc_norm)
    assert "coolfusion_arc_easy" in stdout.decode()  # lm-eval's results table


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize(
    "model_args, message",
    [
        (
            "address=127.0.0.1:1,score_rule=nope",
            "unknown score rule 'nope'; rules: mean-ppl, mean-nll, product, calibrated, calibrated-token, hedged, gated",
        ),
        ("mode=cool,score_rule=product", "coolfusion needs model_args address=HOST:PORT (a running orchestrator)"),
        ("address=nowhere", "model_args address must be HOST:PORT, got 'nowhere'"),
        (
            "address=127.0.0.1:1,mode=blend",
            "unknown mode 'blend'; modes: cool, cool-noalign, rerank, cool-rerank, single:<model>",
        ),
        (
            "address=127.0.0.1:1,rule_weights=gemma3=2",
            "model_args rule_weights needs a score_rule (a rule name or a rule JSON file)",
        ),
        (
            "address=127.0.0.1:1,temperature=0.7",
            "unknown coolfusion model_args: temperature; known: address, mode, models, score_rule, rule_weights, max_segment_tokens, timeout",
        ),
        (
            "address=127.0.0.1:1,mode=single:gemma3,score_rule=product",
            "score_rule applies to the fused modes; mode=single:gemma3 scores with gemma3's own log-likelihood",
        ),
    ],
    ids=[
        "unknown-rule",
        "no-address",
        "bad-address",
        "bad-mode",
        "weights-without-rule",
        "unknown-arg",
        "rule-with-single",
    ],
)
def test_bad_model_args_one_line(task_dir, model_args, message):
    with pytest.raises(CoolFusionArgError) as info:
        _evaluate(task_dir, "coolfusion_arc_easy", model_args, 1)
    assert _one_line(info.value) == message


def test_unreachable_orchestrator_one_line():
    with pytest.raises(CoolFusionCallError) as info:
        CoolFusionLM(address="127.0.0.1:1", timeout=10)
    assert _one_line(info.value).startswith("cannot reach the coolfusion orchestrator at 127.0.0.1:1: UNAVAILABLE")


def test_cli_bad_input_is_one_line(task_dir, capsys):
    rc = lm_eval_model.main(
        [
            "--model",
            "coolfusion",
            "--model_args",
            "address=127.0.0.1:1,score_rule=nope",
            "--tasks",
            "coolfusion_arc_easy",
            "--include_path",
            str(task_dir),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.endswith(
        "coolfusion-lm-eval: error: unknown score rule 'nope'; rules: mean-ppl, mean-nll, product, calibrated, calibrated-token, hedged, gated\n"
    )
    assert "Traceback" not in err


async def test_bad_requests_one_line(cluster):
    lm = await asyncio.to_thread(CoolFusionLM, address=cluster.address, mode="cool", models="smollm2+gemma3")

    def request(kind, args):
        return Instance(kind, {}, args, 0, ("t", 0, 1))

    cases = [
        (
            {"until": ["\n"], "do_sample": True},
            "coolfusion generates greedily only; got do_sample=True, temperature=None",
        ),
        (
            {"until": ["\n"], "temperature": 0.7},
            "coolfusion generates greedily only; got do_sample=None, temperature=0.7",
        ),
        (
            {"until": ["\n"], "top_p": 0.9},
            "coolfusion does not take generation kwargs top_p; it takes until, max_gen_toks, do_sample, temperature",
        ),
        ({"max_gen_toks": 0}, "generation kwarg max_gen_toks must be an integer > 0, got 0"),
    ]
    for gen_kwargs, message in cases:
        with pytest.raises(CoolFusionArgError) as info:
            lm.generate_until([request("generate_until", ("Question: 1+1?\nAnswer:", gen_kwargs))])
        assert _one_line(info.value) == message
    with pytest.raises(CoolFusionArgError) as info:
        lm.loglikelihood([request("loglikelihood", ("", " yes"))])
    assert "context is empty" in _one_line(info.value)
    with pytest.raises(NotImplementedError) as info:
        lm.loglikelihood_rolling([request("loglikelihood_rolling", ("Some text.",))])
    assert _one_line(info.value).startswith("coolfusion does not support loglikelihood_rolling")
    for args, message in [
        (
            {"models": "smollm2+llama"},
            f"model_args models names llama, not served at {cluster.address} (smollm2, gemma3, smollm2b)",
        ),
        (
            {"mode": "single:llama", "models": "smollm2+gemma3"},
            "mode=single:llama names a model not in smollm2, gemma3",
        ),
        (
            {"models": "smollm2+gemma3", "score_rule": "product", "rule_weights": "smollm2b=2"},
            "score rule names model(s) smollm2b not in this request (smollm2, gemma3)",
        ),
    ]:
        with pytest.raises(CoolFusionArgError) as info:
            await asyncio.to_thread(CoolFusionLM, address=cluster.address, **args)
        assert _one_line(info.value) == message
    with pytest.raises(CoolFusionCallError) as info:  # the server's own check, passed on in one line
        await asyncio.to_thread(lm.loglikelihood, [request("loglikelihood", ("Q" * 200_001, " yes"))])
    assert _one_line(info.value).startswith("coolfusion Score failed: INVALID_ARGUMENT: prompt is 200001 characters")
