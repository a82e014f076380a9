"""``coolfusion eval TASK``: argument parsing and the run, for every task.

coolfusion eval gsm8k --limit 200                      # the packaged GSM8K test split
coolfusion eval arc-easy --split validation            # the packaged ARC-Easy-validation.jsonl
coolfusion eval mgsm --data DIR --lang de               # DIR/mgsm_de.tsv
coolfusion eval arc-easy --out runs/eval-arc-easy --rescore --rules hedged   # tables from results.jsonl
coolfusion eval summary runs/eval-arc-easy runs/eval-arc-challenge   # each rule's worst case
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from ...data import data_dir
from ...orchestrator.rules import RULES, RuleError, ScoreRule, default_rule
from ...services.common.config import comma_list
from ..launcher import add_backend_arg
from .generation import DEFAULT_MODES
from .runner import EvalDataError, load_rows, run_task, write_reports

TASKS = ("gsm8k", "mgsm", "arc-easy", "arc-challenge")


def add_eval_parser(sub, default_models: str) -> None:
    e = sub.add_parser("eval", help="evaluate source models and fused configurations on a benchmark")
    e.add_argument("task", choices=(*TASKS, "summary"), help="a benchmark, or summary: worst cases over runs")
    e.add_argument("runs", nargs="*", help="summary: run folders (or their summary.json files)")
    e.add_argument(
        "--data", help="data file (gsm8k: JSONL/TSV; arc-*: ARC JSONL; mgsm: a TSV or a folder of mgsm_LANG.tsv)"
    )
    e.add_argument(
        "--split", default="", help="arc-*: train | validation (default validation), of the packaged ARC files"
    )
    e.add_argument("--lang", default="", help="mgsm: language of DIR/mgsm_LANG.tsv")
    e.add_argument("--train", help="gsm8k/mgsm few-shot exemplars (default: train.jsonl beside --data for gsm8k)")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--shots", type=int, default=None, help="few-shot exemplars (gsm8k 3, mgsm 0)")
    e.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help="gsm8k/mgsm: modes; a fused mode may name its rule: cool@mean-ppl",
    )
    e.add_argument(
        "--rules",
        default=",".join(RULES),
        help="arc-*: scoring rules to report (names, labels such as hedged(gemma3=2), or rule JSON files), "
        "besides each model alone and the default rule",
    )
    e.add_argument(
        "--rescore",
        action="store_true",
        help="arc-*: recompute the reports of --out from its results.jsonl with --rules, without any model",
    )
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--concurrency", type=int, default=1, help="questions in flight at once")
    e.add_argument("--out", help="output folder (default runs/eval-TASK); summary: also write the result as JSON here")
    e.add_argument("--connect", help="HOST:PORT of a running orchestrator")
    e.add_argument("--models", default=default_models)
    e.add_argument("--device")
    add_backend_arg(e)
    e.set_defaults(func=cmd_eval)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_task(args):
    """(task, items, settings) for the arguments; EvalDataError/RuleError/ValueError on bad input."""
    models = [m.split("=", 1)[0].strip() for m in comma_list(args.models)]
    if args.task.startswith("arc-"):
        return _choice_task(args, models)
    return _generation_task(args, models)


def _choice_task(args, models: list[str]):
    from . import choice

    split = args.split or "validation"
    if split not in ("train", "validation", "test"):
        raise ValueError(f"--split takes train, validation or test, got {split!r}")
    name = {"arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge"}[args.task]
    data = Path(args.data) if args.data else data_dir() / "arc" / f"{name}-{split}.jsonl"
    if not data.exists():
        raise EvalDataError(f"data file not found: {data} (pass --data PATH to an ARC JSONL)")
    items = choice.load_choice_items(data)[: args.limit or None]
    rules = _rules(args.rules)
    task = choice.ChoiceTask(args.task, models, rules)
    settings = {"data": str(data), "limit": args.limit, "models": models, "rules": [r.to_dict() for r in rules]}
    return task, items, settings


def _generation_data(args) -> tuple[Path, int, Path | None]:
    """The test file, the number of few-shot exemplars and the file they come from."""
    if args.task == "mgsm":
        if not args.data:
            raise EvalDataError(
                "mgsm needs --data: a TSV question<TAB>answer, or a folder of mgsm_LANG.tsv with --lang"
            )
        data = Path(args.data)
        if data.is_dir():
            if not args.lang:
                raise EvalDataError(f"{data} is a folder: name the language with --lang (reads mgsm_LANG.tsv)")
            data = data / f"mgsm_{args.lang}.tsv"
        return data, 0 if args.shots is None else args.shots, Path(args.train) if args.train else None
    data = Path(args.data) if args.data else data_dir() / "gsm8k" / "test.jsonl"
    train = Path(args.train) if args.train else data.with_name("train.jsonl")
    return data, 3 if args.shots is None else args.shots, train


def _generation_task(args, models: list[str]):
    from . import generation

    data, shots, train = _generation_data(args)
    if not data.exists():
        raise EvalDataError(f"data file not found: {data}")
    if shots and (train is None or not train.exists()):
        raise EvalDataError(f"few-shot exemplars need a train split: {train} not found (use --train or --shots 0)")
    items = generation.load_items(data)
    exemplars = generation.load_items(train)[:shots] if shots else []
    if exemplars and train is not None and data.resolve() == train.resolve():
        items = items[shots:]  # evaluating the train split itself: the exemplars are not questions
    items = items[: args.limit or None]
    modes = comma_list(args.modes)
    for mode in modes:
        _, rule = generation.split_mode(mode)
        if rule:
            ScoreRule.parse(rule)  # a bad rule fails here, before any model work
    task = generation.GenerationTask(
        args.task, modes, models, generation.few_shot_prefix(exemplars), args.max_new_tokens
    )
    settings = {
        "data": str(data),
        "train": str(train) if train else None,
        "limit": args.limit,
        "shots": shots,
        "modes": modes,
        "max_new_tokens": args.max_new_tokens,
        "stop": generation.STOP,
        "decoding": "greedy",
    }
    return task, items, settings


def cmd_eval(args) -> int:
    import grpc
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..launcher import StartError, start_cluster

    if args.task == "summary" or args.runs or args.rescore:
        return _offline(args)
    try:
        task, items, settings = build_task(args)
    except (EvalDataError, RuleError, ValueError, OSError) as exc:
        return _fail(str(exc))
    out = Path(args.out or f"runs/eval-{args.task}")

    async def run(address: str) -> dict:
        with Progress(
            TextColumn(f"[bold]{args.task}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            transient=False,
        ) as bar:
            job = bar.add_task("eval", total=len(items), stats="")

            def progress(finished: int, stats: str) -> None:
                bar.update(job, completed=finished, stats=stats)

            return await run_task(task, address, items, out, settings, progress, args.concurrency)

    cluster = None
    try:
        address = args.connect
        if not address:
            cluster = start_cluster(comma_list(args.models), args.device, backend=args.backend)
            address = cluster.address
        summary = asyncio.run(run(address))
    except KeyboardInterrupt:
        summary = write_reports(task, out, load_rows(out), settings)  # what finished is kept; rerun resumes
        print(task.table(summary))
        print(f"interrupted: {out}/results.jsonl keeps what finished; run again to resume", file=sys.stderr)
        return 130
    except StartError as exc:
        return _fail(str(exc)) - 1  # exit 1: the services did not start
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()} ({out}/results.jsonl keeps what finished)", file=sys.stderr)
        return 1
    finally:
        if cluster:
            cluster.stop()
    print(task.table(summary))
    print(f"wrote {out}/table.md, summary.json, results.jsonl, {task.name}.png", file=sys.stderr)
    return 0


def _offline(args) -> int:
    """The forms that start no model: ``eval summary RUN...`` and ``eval arc-* --rescore``."""
    if args.task == "summary":
        from .summary import cmd_summary

        return cmd_summary(args.runs, args.out)
    if args.runs:
        return _fail(f"unexpected argument(s) {' '.join(args.runs)}: only eval summary takes run folders")
    return _rescore(args)


def _rescore(args) -> int:
    """The reports of a multiple-choice run recomputed from its results.jsonl for ``--rules``: the
    rules are functions of the stored scores, so no model runs and the rows stay as they are."""
    import json

    from . import choice

    if not args.task.startswith("arc-"):
        return _fail("--rescore recomputes multiple-choice runs (arc-*); generation needs the models")
    out = Path(args.out or f"runs/eval-{args.task}")
    rows = load_rows(out)
    if not rows:
        return _fail(f"--rescore: no results in {out}/results.jsonl")
    try:
        rules = _rules(args.rules)
    except RuleError as exc:
        return _fail(str(exc))
    previous = out / "summary.json"
    settings = json.loads(previous.read_text(encoding="utf-8")).get("settings", {}) if previous.exists() else {}
    models = list(rows[0]["scores"])
    settings.update(models=models, rules=[r.to_dict() for r in rules])
    summary = write_reports(choice.ChoiceTask(args.task, models, rules), out, rows, settings)
    print(choice.ChoiceTask(args.task, models, rules).table(summary))
    return 0


def _rules(spec: str) -> list[ScoreRule]:
    """``--rules`` plus the shipped default when it is not among them."""
    rules = [ScoreRule.parse(part.strip()) for part in split_specs(spec)]
    shipped = default_rule()
    if shipped.label() not in [r.label() for r in rules]:
        rules.append(shipped)
    return rules


def split_specs(spec: str) -> list[str]:
    """``a,b(m=1,n=2),c`` -> ``[a, b(m=1,n=2), c]``: commas inside a label's parentheses stay."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*parts, current] if p.strip()]
