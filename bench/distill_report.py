"""table.md of the distillation experiment (``bench/distill_experiment.py``) from its summary."""

from __future__ import annotations

from pathlib import Path

ARM_ORDER = ["original", "clm", "fusellm-minCE", "fusellm-avgCE"]


def arms_of(summary: dict) -> list[str]:
    return [arm for arm in ARM_ORDER if arm in summary["heldout"]]


def _pct(entry: dict, metric: str) -> str:
    lo, hi = entry[f"{metric}_ci95"]
    return f"{entry[metric]:.1%} ({lo:.1%}–{hi:.1%})"


def _vs(entry: dict, metric: str, base: str) -> str:
    test = entry.get(f"{metric}_vs_{base}")
    if not test:
        return "—"
    return f"{test['diff'] * 100:+.1f} (p={test['p']:.2g})"


def _held_vs(entry: dict, metric: str, base: str) -> str:
    test = entry.get("paired", {}).get(base, {}).get(metric)
    return f"{test['diff']:+.4f} (p={test['p']:.2g})" if test else "—"


def heldout_table(summary: dict) -> list[str]:
    held = summary["heldout"]
    lines = [
        "| arm | held-out bits/byte | vs original | vs CLM | held-out CE to Gemma-3 (nats) | vs original | vs CLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms_of(summary):
        h = held[arm]
        lines.append(
            f"| {arm} | {h['bits_per_byte']:.4f} | {_held_vs(h, 'bits_per_byte', 'original')} "
            f"| {_held_vs(h, 'bits_per_byte', 'clm')} | {h['ce_to_gemma3']:.4f} "
            f"| {_held_vs(h, 'ce_to_gemma3', 'original')} | {_held_vs(h, 'ce_to_gemma3', 'clm')} |"
        )
    return lines


def main_table(summary: dict) -> list[str]:
    evals = summary["eval"]
    lines = [
        "| arm | ARC-Easy acc_norm (95% CI) | vs original | vs CLM | ARC-Challenge acc_norm (95% CI) | vs original "
        "| vs CLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms_of(summary):
        e, c = evals["arc-easy"][arm], evals["arc-challenge"][arm]
        lines.append(
            f"| {arm} | {_pct(e, 'acc_norm')} | {_vs(e, 'acc_norm', 'original')} | {_vs(e, 'acc_norm', 'clm')} "
            f"| {_pct(c, 'acc_norm')} | {_vs(c, 'acc_norm', 'original')} | {_vs(c, 'acc_norm', 'clm')} |"
        )
    return lines


def acc_table(summary: dict) -> list[str]:
    lines = [
        "| arm | ARC-Easy acc (95% CI) | vs original | vs CLM | ARC-Challenge acc (95% CI) | vs original | vs CLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms_of(summary):
        e, c = summary["eval"]["arc-easy"][arm], summary["eval"]["arc-challenge"][arm]
        lines.append(
            f"| {arm} | {_pct(e, 'acc')} | {_vs(e, 'acc', 'original')} | {_vs(e, 'acc', 'clm')} "
            f"| {_pct(c, 'acc')} | {_vs(c, 'acc', 'original')} | {_vs(c, 'acc', 'clm')} |"
        )
    return lines


def facts(summary: dict) -> list[str]:
    plan, prep, held = summary["plan"], summary["prepare"], summary["heldout"]
    win = summary["min_ce_winners"]
    sources = [s for s in win if s != "texts"]
    speed = summary["generation_speed"]
    train = summary["train"]
    arms = [a for a in speed if isinstance(speed[a], dict) and "tokens_per_s" in speed[a]]
    sweep = summary.get("lr_sweep")
    lines = [
        f"- Corpus: {prep['texts']} training texts ({prep['tokens']} SmolLM2 tokens in all, held-out included), "
        f"{held['texts']} held-out texts ({held['original']['tokens']} tokens, "
        f"{held['original']['aligned_tokens']} aligned with a Gemma-3 token); "
        f"first {plan['limit_per_corpus']} texts of each of ARC-Easy, ARC-Challenge and GSM8K train.",
        f"- Training: {plan['steps']} AdamW steps per arm, batch {plan['batch_size']} × {plan['seq_len']} tokens, "
        f"peak lr {plan['lr']:g}, cosine with warm-up, seed 0, k = {plan['k']}; the same packed blocks in the "
        "same order for every arm.",
        *(
            [
                "- Learning rate: picked on the CLM arm by held-out bits/byte among "
                + ", ".join(f"{r['lr']:g} ({r['bits_per_byte']:.4f})" for r in sweep["rates"].values())
                + f": {sweep['picked']:g}."
            ]
            if sweep
            else []
        ),
        f"- Eval: the first {summary['eval']['arc-easy']['n']} ARC-Easy and {summary['eval']['arc-challenge']['n']} "
        "ARC-Challenge validation questions (`--limit`), every arm a float32 GGUF on llama.cpp; "
        "p: exact two-sided McNemar on the same questions; held-out p: exact paired permutation test over the "
        "held-out texts.",
        "- minCE winner per training text: "
        + ", ".join(f"{s} {win[s]['wins']} ({win[s]['fraction']:.0%})" for s in sources),
        f"- Throughput: prepare {prep['tokens_per_s']} target tokens/s (per source: "
        + ", ".join(f"{s} {v['tokens_per_s']}" for s, v in prep["sources"].items())
        + " own tokens/s inside Distributions); train "
        + ", ".join(f"{a} {t['train_tokens_per_s']}" for a, t in train.items())
        + " tokens/s.",
        f"- Greedy generation ({speed['backend']}, {speed['max_tokens']} tokens, median of interleaved rounds): "
        + ", ".join(f"{a} {speed[a]['tokens_per_s']:.1f} tokens/s" for a in arms)
        + "".join(f"; {a} vs {arms[0]}: {speed[a]['vs_' + arms[0]]:+.1%}" for a in arms[1:]),
    ]
    return lines


def write_report(summary: dict, path: Path) -> None:
    m = summary["machine"]
    lines = [
        f"# FuseLLM distillation experiment `{summary['name']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs (load average at the end "
        f"{m['load_average_at_end']}). Command: `{summary['command']}`",
        "",
        *heldout_table(summary),
        "",
        *main_table(summary),
        "",
        *acc_table(summary),
        "",
        *facts(summary),
    ]
    path.write_text("\n".join(lines) + "\n")
