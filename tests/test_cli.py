"""The `coolfusion` command as a user runs it: real processes, real models, no servers by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from coolfusion.orchestrator.rules import ScoreRule


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The command with the user's environment: the workers it starts run the backend ``auto``
    picks (llama.cpp for the bundled GGUF on a CPU, where it is built), not the tests' own."""
    env = {k: v for k, v in os.environ.items() if k != "COOLFUSION_BACKEND"}
    return subprocess.run(
        [sys.executable, "-m", "coolfusion.clients.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow  # starts the services with both bundled models
def test_generate_json_with_embedded_services():
    result = run_cli("generate", "Question: What is 12 plus 30?\nAnswer:", "--json", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    reply = json.loads(result.stdout)
    # No stop sequence: the last segment's EOS, else a model's output reached its 16 tokens.
    output_tokens = [u["output_tokens"] for u in reply["usage"].values()]
    if reply["segments"][-1]["eos"]:
        assert reply["finish_reason"] == "eos"
    else:
        assert reply["finish_reason"] == "length" and max(output_tokens) >= 16, (reply["finish_reason"], output_tokens)
    assert reply["text"] and reply["text"] == "".join(s["text"] for s in reply["segments"])
    assert set(reply["usage"]) == {"smollm2", "gemma3"}
    for segment in reply["segments"]:
        assert segment["model"] in ("smollm2", "gemma3")
        assert {c["model"] for c in segment["candidates"]} == {"smollm2", "gemma3"}
        for c in segment["candidates"]:
            assert set(c["ppl"]) == {"smollm2", "gemma3"}
    assert reply["timings"]["total_s"] > 0


def test_cli_reports_bad_input_without_traceback():
    result = run_cli("generate", "hello", "--models", "nosuchmodel")
    assert result.returncode != 0
    assert "unknown model 'nosuchmodel'" in result.stderr
    assert "Traceback" not in result.stderr


def test_healthcheck_of_nothing_fails():
    result = run_cli("healthcheck", "127.0.0.1:9", "--timeout", "1")
    assert result.returncode == 1
    assert "unhealthy" in result.stderr


def test_mean_ppl_takes_lowest_mean_and_first_on_ties():
    def choose(ppls: list[float]) -> int:  # one scorer, one token: each candidate's PPL is its value
        return ScoreRule("mean-ppl").choose([{"a": (-math.log(p), 1)} for p in ppls])

    assert choose([3.0, 2.0, 2.0]) == 1
    assert choose([2.0, 2.0]) == 0
    assert choose([float("inf"), 5.0]) == 1


def test_orchestrator_limit_flags_default_to_the_servers_limits():
    """Unset limit flags leave the server's Limits; the defaults their help names are those."""
    from coolfusion.clients.cli import build_parser
    from coolfusion.orchestrator.wire import Limits

    parser = build_parser()
    args = parser.parse_args(["orchestrator", "--worker", "a=h:1"])
    assert (args.max_messages, args.max_prompt_chars, args.max_rendered_chars) == (None, None, None)
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["orchestrator"]
    helps = {a.dest: a.help for a in sub._actions}
    for field in ("max_messages", "max_prompt_chars", "max_rendered_chars"):
        assert f"(default {getattr(Limits(), field)})" in helps[field], field
