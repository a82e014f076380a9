"""The llama.cpp worker backend (``services/worker/llamacpp.py``) on the bundled GGUF models.

Oracles from llama.cpp itself: ``single:<m>`` equals llama-cpp-python's own greedy generation,
two fused copies of a model equal it too, and a scored candidate's log-probs equal those of one
plain decode of prompt + candidate in a fresh sequence. Mixed backends (SmolLM2 on llama.cpp,
Gemma-3 on transformers) fuse to well-formed, reproducible output.

Without llama-cpp-python these tests fail (a build that ``scripts/install.sh`` could not finish
must not pass unnoticed), unless ``COOLFUSION_LLAMACPP=0`` says the build was skipped on purpose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os

import grpc
import pytest
import pytest_asyncio
from cluster import ORACLE_THREADS, gsm8k_prompt, start_cluster, stop_cluster

from coolfusion.clients.client import FusionClient
from coolfusion.services.common.errors import FailedPrecondition, InvalidArgument
from coolfusion.services.sources import parse_spec
from coolfusion.services.worker import llamacpp
from coolfusion.services.worker.api import NextTextOptions
from coolfusion.services.worker.model import WorkerCore

if not llamacpp.llamacpp_available():
    if os.environ.get("COOLFUSION_LLAMACPP") == "0" and not os.environ.get("CI"):
        pytest.skip("COOLFUSION_LLAMACPP=0: the llama.cpp backend is not built", allow_module_level=True)
    raise RuntimeError(
        "llama-cpp-python is not importable although the llama.cpp build is enabled: rebuild it "
        "(bash scripts/install.sh) or run the tests with COOLFUSION_LLAMACPP=0"
    )

pytestmark = pytest.mark.slow
LONG_PROMPT = gsm8k_prompt(0, shots=4)  # > 512 Gemma tokens: crosses the sliding window
SHORT_PROMPT = gsm8k_prompt(0, shots=1)  # where no sliding window is at stake (SmolLM2 has none)
# llama.cpp's log-probs of the same tokens move with where a sequence's KV cells lie and how many
# tokens a decode holds (float rounding that the next layer's 8-bit activation quantisation
# amplifies). Two plain decodes of one 800-token text at different cell offsets differed by
# 0.04-0.05 nats per token on average and up to 0.95 on single tokens, on both models; a wrong
# position or a stale cell costs several nats on ordinary tokens (as the lookup-crop bug did).
MEAN_GAP, MAX_GAP = 0.15, 1.5


def llamacpp_logprobs(name: str, context: list[int], continuations: list[list[int]]) -> list[list[float]]:
    """The oracle for scores: llama-cpp-python's own ``Llama`` evaluates ``context`` once, then
    each continuation from that saved state, one token per eval, reading the log-softmax of the
    logits each eval leaves for the next token. (``logits_all`` would keep a row of Gemma-3's
    262k-entry vocabulary for every context token, about a GiB for the long prompt.)"""
    import numpy as np
    from llama_cpp import Llama

    longest = len(context) + max(map(len, continuations))
    llm = Llama(
        str(parse_spec(name).gguf_path), n_ctx=longest + 16, n_threads=ORACLE_THREADS, flash_attn=False, verbose=False
    )
    try:
        # The state before the context's last token: a loaded state brings back the cells, not
        # the logits, so each continuation evaluates that token itself.
        llm.eval(context[:-1])
        saved = llm.save_state()
        out = []
        for ids in continuations:
            llm.load_state(saved)
            llm.eval(context[-1:])
            lps = []
            for token in ids:
                logits = _next_logits(llm)
                top = logits.max()
                lps.append(float(logits[token] - top - np.log(np.exp(logits - top).sum())))
                llm.eval([token])
            out.append(lps)
        return out
    finally:
        llm.close()


def _next_logits(llm):
    """The logits llama.cpp left for the token after the last one ``llm`` evaluated
    (``llama_get_logits_ith``: ``Llama.scores`` holds rows only with ``logits_all``)."""
    import llama_cpp
    import numpy as np

    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float64)


def llamacpp_greedy(name: str, prompt_ids: list[int], n: int, eos: set[int]) -> list[int]:
    """The oracle: llama-cpp-python's own greedy generation (its ``Llama`` class, top_k=1) of up to
    ``n`` tokens, stopping after an end-of-generation token."""
    from llama_cpp import Llama

    llm = Llama(str(parse_spec(name).gguf_path), n_ctx=4096, n_threads=ORACLE_THREADS, flash_attn=False, verbose=False)
    try:
        out = []
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0):
            out.append(int(token))
            if len(out) == n or token in eos:
                break
        return out
    finally:
        llm.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llama_cluster():
    """Tokenizer service, orchestrator and workers of smollm2, gemma3 and smollm2b all on llama.cpp."""
    c = await start_cluster(llamacpp=("smollm2", "gemma3", "smollm2b"))
    yield c
    await stop_cluster(c)


@pytest_asyncio.fixture(loop_scope="session")
async def client(llama_cluster):
    async with FusionClient(llama_cluster.address) as c:
        yield c


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
async def test_single_equals_llamacpp_greedy(llama_cluster, client, model):
    core = llama_cluster.cores[model]
    prompt = LONG_PROMPT if model == "gemma3" else SHORT_PROMPT
    ids = core.tokenizer.hf(prompt)["input_ids"]
    if model == "gemma3":
        assert len(ids) > 512  # rolls back across the sliding window
    n = 40
    reply = await client.generate(prompt, mode=f"single:{model}", max_new_tokens=n)
    expected = await asyncio.to_thread(llamacpp_greedy, model, ids, n, set(core.eos_token_ids))
    got = [t for s in reply.segments for t in s.token_ids]
    assert got == expected
    assert reply.text == core.tokenizer.decode([t for t in expected if t not in core.eos_token_ids])[0]
    assert len(reply.segments) > 1


async def test_two_copies_fuse_to_llamacpp_greedy(llama_cluster, client):
    core = llama_cluster.cores["smollm2"]
    n = 32
    reply = await client.generate(SHORT_PROMPT, mode="cool", models=["smollm2", "smollm2b"], max_new_tokens=n)
    ids = core.tokenizer.hf(SHORT_PROMPT)["input_ids"]
    expected = await asyncio.to_thread(llamacpp_greedy, "smollm2", ids, n, set(core.eos_token_ids))
    assert reply.text == core.tokenizer.decode(expected)[0]
    assert {s.model for s in reply.segments} == {"smollm2"}  # ties go to the first model


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
async def test_scores_equal_a_plain_decode_of_prompt_and_candidate(llama_cluster, model):
    # Gemma-3's context crosses its sliding window.
    await asyncio.to_thread(
        _check_scores, llama_cluster.cores[model], LONG_PROMPT if model == "gemma3" else SHORT_PROMPT
    )


def _check_scores(core, prompt: str) -> None:
    """ScoreCandidates (forked sequences sharing the session's cells, the own candidate's
    log-probs reused) against one decode of prompt + candidate in a fresh sequence."""
    sid, n_context, _ = core.open(prompt)
    try:
        own = core.next_text(sid, NextTextOptions([], 12))
        candidates = [(own.text, False), (" The answer is 42.", False), (" 18", True), (" x", False)]
        scores = core.score_candidates(sid, candidates, own.state_id)
        assert scores[0].reused and not scores[1].reused
        context = core.tokenizer.hf(prompt)["input_ids"]
        assert len(context) == n_context
        gaps: list[float] = []
        references = llamacpp_logprobs(core.name, context, [score.token_ids for score in scores])
        for (_text, eos), score, lps in zip(candidates, scores, references):
            ids = score.token_ids
            if eos:
                assert ids[-1] == core.eos_token_id
            assert len(lps) == len(ids) == len(score.logprobs)
            gaps += [abs(a - b) for a, b in zip(score.logprobs, lps)]
            assert score.ppl == pytest.approx(math.exp(-sum(score.logprobs) / len(ids)), rel=1e-6)
        assert len(gaps) >= 8
        assert max(gaps) <= MAX_GAP and sum(gaps) / len(gaps) <= MEAN_GAP, gaps
        # Committing a scored row adopts its sequence; generation goes on from it.
        core.update_state(sid, scores[1].state_id)
        assert core.next_text(sid, NextTextOptions([], 4)).token_ids
    finally:
        core.close(sid)


async def test_concurrent_sessions_batch_into_one_decode_with_the_same_output(llama_cluster):
    await asyncio.to_thread(_check_batching, llama_cluster.cores["smollm2"])


def _check_batching(core) -> None:
    """Decode steps of concurrent sessions share one llama_decode (a sequence per session). Every
    token each session gets, alone and beside the others, is llama-cpp-python's own greedy pick
    after that session's own text so far, up to a near tie that layout noise can flip; a row of
    another session's sequence would be far from it."""
    import threading

    prompts = [
        "Once upon a time, in a small village by the sea,",
        "The history of the Roman Empire began",
        "def fibonacci(n):\n",
    ]

    def run(prompt: str) -> list[int]:
        sid, _, _ = core.open(prompt)
        tokens: list[int] = []
        try:
            while len(tokens) < 24:
                r = core.next_text(sid, NextTextOptions([], 24 - len(tokens)))
                core.update_state(sid, r.state_id)
                tokens += r.token_ids
                if r.eos:
                    break
        finally:
            core.close(sid)
        return tokens

    alone = [run(p) for p in prompts]
    before = dict(core.batcher.stats.sizes)
    together: list = [None] * len(prompts)
    threads = [
        threading.Thread(target=lambda i=i: together.__setitem__(i, run(prompts[i]))) for i in range(len(prompts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batched = {k: v - before.get(k, 0) for k, v in core.batcher.stats.sizes.items() if k > 1}
    assert sum(batched.values()) > 0  # some steps did share a decode
    assert len({tuple(t) for t in alone}) == len(prompts)  # the sessions' outputs are their own
    for prompt, mine, lone in zip(prompts, together, alone):
        assert len(mine) >= 8 and len(lone) >= 8, (mine, lone)
        for output in (mine, lone):
            _assert_greedy_throughout(core, prompt, output)


def _assert_greedy_throughout(core, prompt: str, output: list[int]) -> None:
    """Each token of ``output`` is within MAX_GAP of the top log-prob of llama-cpp-python's own
    ``Llama`` after the prompt and the tokens before it."""
    from llama_cpp import Llama

    context = core.tokenizer.hf(prompt)["input_ids"]
    llm = Llama(
        str(parse_spec(core.name).gguf_path), n_ctx=256, n_threads=ORACLE_THREADS, flash_attn=False, verbose=False
    )
    try:
        llm.eval(context)
        for i, token in enumerate(output):
            logits = _next_logits(llm)
            assert logits.max() - logits[token] <= MAX_GAP, (i, token, int(logits.argmax()), output)
            llm.eval([token])
    finally:
        llm.close()


async def test_sampling_with_a_seed_is_reproducible_and_not_greedy(llama_cluster, client):
    """Sampling draws from llama.cpp's logits with the seed's stream (``sampling.py``): the same
    seed gives the same fused text and winners, and sampled text is not the greedy one."""
    prompt, options = "Write one sentence about the sea.", dict(max_new_tokens=24, temperature=1.2, top_k=40)
    greedy = await client.generate(prompt, mode="cool", max_new_tokens=24)
    runs = [await client.generate(prompt, mode="cool", seed=seed, **options) for seed in (7, 7, 8)]
    assert runs[0].text == runs[1].text and runs[0].seed == 7
    assert runs[0].text != runs[2].text  # another seed, another draw
    assert [s.model for s in runs[0].segments] == [s.model for s in runs[1].segments]
    assert {runs[0].text, runs[2].text} != {greedy.text}


async def test_info_and_list_models_report_the_backend(llama_cluster, client):
    assert llama_cluster.cores["gemma3"].info()["backend"] == "llamacpp"
    models = await client.list_models()
    assert {m.name: m.backend for m in models.models} == {
        "smollm2": "llamacpp",
        "gemma3": "llamacpp",
        "smollm2b": "llamacpp",
    }


# ---- mixed backends ------------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mixed_cluster(bundled_models):
    """SmolLM2 on llama.cpp, Gemma-3 on transformers."""
    c = await start_cluster(bundled_models, llamacpp=("smollm2",))
    yield c
    await stop_cluster(c)


async def test_mixed_backends_fuse_to_well_formed_reproducible_output(mixed_cluster):
    assert (mixed_cluster.cores["smollm2"].backend, mixed_cluster.cores["gemma3"].backend) == (
        "llamacpp",
        "transformers",
    )
    prompt = gsm8k_prompt(2)
    kwargs = dict(mode="cool", models=["smollm2", "gemma3"], max_new_tokens=40, stop=["Question:"])
    async with FusionClient(mixed_cluster.address) as c:
        first = await c.generate(prompt, **kwargs)
        second = await c.generate(prompt, **kwargs)
    assert first.text == second.text and first.text.strip()
    assert [s.model for s in first.segments] == [s.model for s in second.segments]
    assert "".join(s.text for s in first.segments) == first.text
    assert {s.model for s in first.segments} == {"smollm2", "gemma3"}  # both models won segments
    for s in first.segments:
        assert [c.model for c in s.candidates] == ["smollm2", "gemma3"]
        assert all(p.ppl > 0 for c in s.candidates for p in c.ppl)
    assert "Question:" not in first.text
    assert first.finish_reason in ("stop", "length") and (first.finish_reason == "stop") == (
        "Question:" in "".join(next(c.text for c in s.candidates if c.model == s.model) for s in first.segments)
    )


# ---- bad input -----------------------------------------------------------------------------------
def test_resolve_backend_picks_llamacpp_for_gguf_on_cpu_only(monkeypatch):
    gguf = parse_spec("smollm2")
    hub = dataclasses.replace(gguf, source="HuggingFaceTB/SmolLM2-135M-Instruct", gguf_file=None)
    assert llamacpp.resolve_backend(None, gguf, "cpu") == "llamacpp"
    assert llamacpp.resolve_backend("auto", gguf, "cuda") == "transformers"
    assert llamacpp.resolve_backend("auto", hub, "cpu") == "transformers"
    assert llamacpp.resolve_backend("transformers", gguf, "cpu") == "transformers"
    with pytest.raises(FailedPrecondition, match="loads .gguf files"):
        llamacpp.resolve_backend("llamacpp", hub, "cpu")
    monkeypatch.setattr(llamacpp, "llamacpp_available", lambda: False)
    assert llamacpp.resolve_backend("auto", gguf, "cpu") == "transformers"
    with pytest.raises(FailedPrecondition, match=r"'smollm2'.*llama-cpp-python.*--backend transformers"):
        llamacpp.resolve_backend("llamacpp", gguf, "cpu")


def test_a_file_llamacpp_cannot_load_is_one_line_naming_the_model(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    spec = parse_spec(f"broken={bad}")
    with pytest.raises(FailedPrecondition) as info:
        WorkerCore(spec.name, spec, device="cpu", backend="llamacpp")
    message = str(info.value)
    assert "'broken'" in message and str(bad) in message and "--backend transformers" in message
    assert "\n" not in message
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_context_longer_than_the_cells_is_invalid_argument(llama_cluster):
    core = WorkerCore("smollm2", parse_spec("smollm2"), device="cpu", backend="llamacpp", kv_cells=256)
    with pytest.raises(InvalidArgument, match=r"supports fewer than 256 \(raise --kv-cells\)"):
        core.open("word " * 300)
    sid, _, _ = core.open("A short prompt")  # the worker still serves
    assert core.next_text(sid, NextTextOptions([], 4)).token_ids


def test_sessions_past_the_cap_evict_the_least_recently_used_and_scoring_still_has_sequences():
    from coolfusion.services.worker.errors import SessionNotFound

    core = WorkerCore("smollm2", parse_spec("smollm2"), device="cpu", backend="llamacpp", kv_cells=4096)
    assert core.max_sessions == llamacpp.MAX_SESSIONS < llamacpp.MAX_SEQUENCES
    ids = [core.open(f"Session {i} says")[0] for i in range(llamacpp.MAX_SESSIONS + 1)]
    with pytest.raises(SessionNotFound, match="evicted"):
        core.next_text(ids[0], NextTextOptions([], 2))
    assert core.info()["live_sessions"] == llamacpp.MAX_SESSIONS
    scores = core.score_candidates(ids[-1], [(f" word{i}", False) for i in range(8)])
    assert len(scores) == 8 and all(s.logprobs for s in scores)


def test_the_kv_budget_evicts_the_least_recently_used_session():
    """``--kv-budget-mb`` counts a llama.cpp session's cells (``SequenceKV.nbytes``): beyond the
    budget the least recently used idle session goes, and the rest go on generating."""
    from coolfusion.services.worker.errors import SessionNotFound

    probe = WorkerCore("smollm2", parse_spec("smollm2"), device="cpu", backend="llamacpp", kv_cells=4096)
    per_token = probe.model.kv_bytes_per_token
    del probe
    prompt = "Tell me about the river. " * 16  # about 100 tokens
    core = WorkerCore(
        "smollm2", parse_spec("smollm2"), device="cpu", backend="llamacpp", kv_cells=4096,
        kv_budget_bytes=330 * per_token, prefix_cache_bytes=0,
    )  # fmt: skip
    ids = [core.open(prompt + str(i))[0] for i in range(4)]
    assert core.info()["live_sessions"] == 3
    assert sum(s.kv_bytes() for s in core._table.live()) <= 330 * per_token
    with pytest.raises(SessionNotFound, match="evicted"):
        core.next_text(ids[0], NextTextOptions([], 2))
    assert all(core.next_text(sid, NextTextOptions([], 2)).token_ids for sid in ids[1:])


def test_kept_contexts_give_their_cells_back_when_a_session_needs_them():
    """The prefix cache's entries hold cells of the worker's context; an Open that needs them
    gets them (oldest entries dropped), where without that hook it would find the cells full."""
    from coolfusion.services.common.errors import ResourceExhausted

    core = WorkerCore("smollm2", parse_spec("smollm2"), device="cpu", backend="llamacpp", kv_cells=512)
    kept, large = "word " * 100, "text " * 440  # 100 cells kept; 440 more do not fit beside them
    sid, _, _ = core.open(kept)
    core.close(sid)
    assert len(core.prefix_cache._entries) == 1
    sid, _, _ = core.open(large)
    assert core.next_text(sid, NextTextOptions([], 4)).token_ids and not core.prefix_cache._entries
    core.close(sid)
    make_room, core.model.make_room = core.model.make_room, None  # the same without the hook
    sid, _, _ = core.open(kept)
    core.close(sid)
    with pytest.raises(ResourceExhausted, match="KV cells are full"):
        core.open(large)
    core.model.make_room = make_room


def test_prefix_cache_shares_the_kept_cells_and_restored_sessions_score_as_a_plain_decode():
    """An Open of a kept context prefills nothing and starts from its very logits; another
    question after the same few shots prefills only its own tokens, on a sequence that shares the
    shots' cells, and scores as one plain decode of its text does. Entries stay capped, and every
    sequence goes back to the context when they are dropped."""
    import gc

    core = WorkerCore("smollm2", parse_spec("smollm2"), device="cpu", backend="llamacpp", kv_cells=4096)
    first, again, other = gsm8k_prompt(0, shots=2), gsm8k_prompt(0, shots=2), gsm8k_prompt(1, shots=2)
    sid, n_first, _ = core.open(first)
    lone = core.next_text(sid, NextTextOptions([], 8))
    core.close(sid)
    assert core.info()["prefix_cache_hits"] == 0
    sid, _, _ = core.open(again)
    assert core.info()["prefix_cache_hits"] == 1 and core.info()["prefix_cache_reused_tokens"] == n_first
    kept = core.next_text(sid, NextTextOptions([], 8))
    assert kept.logprobs[0] == lone.logprobs[0]  # the kept logits, not a new prefill
    core.close(sid)
    ids = core.tokenizer.hf(other)["input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(ids, core.tokenizer.hf(first)["input_ids"])) if a != b)
    sid, n_other, _ = core.open(other)
    assert core.info()["prefix_cache_reused_tokens"] == n_first + shared > n_first + 200
    try:
        candidate = " The answer is 18 dollars."
        (score,) = core.score_candidates(sid, [(candidate, False)])
        assert len(ids) == n_other
        (lps,) = llamacpp_logprobs("smollm2", ids, [score.token_ids])
        gaps = [abs(a - b) for a, b in zip(score.logprobs, lps)]
        assert max(gaps) <= MAX_GAP and sum(gaps) / len(gaps) <= MEAN_GAP, gaps
    finally:
        core.close(sid)
    for i in range(llamacpp.PREFIX_ENTRIES + 3):
        sid, _, _ = core.open(f"Context number {i}: " + "a long enough line of words " * 12)
        core.close(sid)
    assert len(core.prefix_cache._entries) == llamacpp.PREFIX_ENTRIES
    core.prefix_cache.clear()
    gc.collect()
    with core.model.lock:
        core.model._drain()
    assert len(core.model._free_seqs) == llamacpp.MAX_SEQUENCES


def test_serve_with_backend_flag_runs_worker_processes_on_llamacpp():
    """``coolfusion serve --backend llamacpp``: the flag reaches the worker processes the command
    starts (ListModels says so, over the $COOLFUSION_BACKEND the tests set), and their
    single-model output is llama.cpp's own greedy text."""
    import re
    import signal
    import subprocess
    import sys

    from coolfusion.clients.client import SyncFusionClient

    prompt = "Question: What is 12 plus 30?\nAnswer:"
    serve = subprocess.Popen(
        [sys.executable, "-m", "coolfusion.clients.cli", "serve", "--models", "smollm2", "--port", "0"]
        + ["--backend", "llamacpp"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COOLFUSION_BACKEND": "transformers"},
    )
    try:
        address = None
        for line in serve.stderr:
            if found := re.search(r"coolfusion serving on (\S+)", line):
                address = found.group(1)
                break
        assert address, "serve exited before it served"
        client = SyncFusionClient(address)
        try:
            assert [(m.name, m.backend) for m in client.list_models().models] == [("smollm2", "llamacpp")]
            reply = client.generate(prompt, mode="single:smollm2", max_new_tokens=12)
        finally:
            client.close()
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=120)
    core = WorkerCore("smollm2", parse_spec("smollm2"), device="cpu", backend="llamacpp")
    ids = core.tokenizer.hf(prompt)["input_ids"]
    expected = llamacpp_greedy("smollm2", ids, 12, set(core.eos_token_ids))
    assert [t for s in reply.segments for t in s.token_ids] == expected
