"""WorkerCore (services/worker/model.py) against transformers oracles, with the bundled models.

* greedy NextText/UpdateState segments concatenate to exactly ``model.generate(do_sample=False)``
  (token ids, per-token log-probs bitwise, text), with own-tokenizer and two-tokenizer boundaries,
  on a prompt longer than Gemma-3's sliding window (``cluster.GEMMA_WINDOW``);
* ScoreCandidates == FeedTokens == a from-scratch full forward (PPL), lookahead in the cache;
* committing a scored / fed state and continuing == generate() from context + those tokens;
* errors: unknown session, stale / superseded states, bad ids, bad arguments, close twice.
"""

from __future__ import annotations

import math

import pytest
import torch
from cluster import GEMMA_WINDOW, gsm8k_prompt, gsm8k_rows

from coolfusion.services.common.errors import InvalidArgument, status_for
from coolfusion.services.worker import model as worker_model
from coolfusion.services.worker.api import NextTextOptions
from coolfusion.services.worker.errors import SessionNotFound, StateError
from coolfusion.services.worker.forward import PREFILL_CHUNK
from coolfusion.services.worker.model import WorkerCore, perplexity

MODELS = ("smollm2", "gemma3")
N = 40
SHORT_PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def registry(tokenizer_registry):
    return tokenizer_registry


@pytest.fixture(scope="module")
def workers(registry, bundled_models):
    """A core per bundled model over the session's loaded weights (its own sessions and batcher),
    with boundaries from the in-process registry."""
    return {
        name: WorkerCore(
            name, b.spec, device="cpu", boundary=registry.common_boundary, model=b.model, hf_tokenizer=b.hf_tokenizer
        )
        for name, b in bundled_models.items()
    }


@pytest.fixture(scope="module")
def long_prompt(workers):
    """A two-shot prompt: more than two prefill chunks, and twice past Gemma-3's sliding
    window."""
    prompt = gsm8k_prompt(0, shots=2)
    assert len(workers["gemma3"].tokenizer.hf(prompt)["input_ids"]) > 2 * GEMMA_WINDOW
    assert all(len(w.tokenizer.hf(prompt)["input_ids"]) > 2 * PREFILL_CHUNK for w in workers.values())
    return prompt


@pytest.fixture(scope="module")
def long_greedy(workers, registry, long_prompt):
    """A model's plain greedy segments of the long prompt with both tokenizers' boundaries
    (``greedy_segments``, N tokens), made once: the oracle of several tests below. Returns
    ``(Open's (tokens, text), greedy_segments' tuple)``."""
    made = {}

    def get(model: str):
        if model not in made:
            w = workers[model]
            sid, n_ctx, ctx_text = w.open(long_prompt)
            try:
                made[model] = ((n_ctx, ctx_text), greedy_segments(w, sid, registry.ids, N))
            finally:
                w.close(sid)
        return made[model]

    return get


def oracle_generate(worker: WorkerCore, input_ids: list[int], n: int):
    """generate(do_sample=False): (new token ids, float32 logits that chose each one)."""
    ids = torch.tensor([input_ids])
    out = worker.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        prefill_chunk_size=PREFILL_CHUNK,  # the worker prefills in chunks, each forward as generate's
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[0, len(input_ids) :].tolist()
    return new, [logits[0] for logits in out.logits]


def full_forward_logprobs(worker: WorkerCore, context: list[int], ids: list[int]) -> list[float]:
    """Log-probs of ``ids`` after ``context`` from one from-scratch forward (no cache; the output
    layer only on the positions that predict ``ids``)."""
    with torch.inference_mode():
        logits = worker.model(input_ids=torch.tensor([context + ids]), logits_to_keep=len(ids) + 1).logits[0].float()
    lps = torch.log_softmax(logits[:-1], -1)
    return [float(lps[i, t]) for i, t in enumerate(ids)]


def greedy_segments(worker: WorkerCore, session_id: str, tokenizer_ids: list[str], n: int, committed: int = 0):
    """NextText + UpdateState until EOS or n tokens: (ids, logprobs, texts, commit texts, results).

    ``committed``: output tokens the session had committed before.
    """
    ids, lps, texts, commits, results = [], [], [], [], []
    while len(ids) < n:
        r = worker.next_text(session_id, NextTextOptions(tokenizer_ids, n - len(ids)))
        results.append(r)
        c = worker.update_state(session_id, r.state_id)
        ids += r.token_ids
        lps += r.logprobs
        texts.append(r.text)
        commits.append(c.committed_text)
        assert c.committed_tokens == committed + len(ids)
        if r.eos or r.finish != "boundary":
            break
    return ids, lps, texts, commits, results


# ---- 1. greedy segments == generate -------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", ["short-own", "long-both"])
def test_next_text_matches_generate(workers, registry, long_prompt, long_greedy, model, case):
    w = workers[model]
    prompt = SHORT_PROMPT if case == "short-own" else long_prompt
    tokenizer_ids = [] if case == "short-own" else registry.ids
    context = w.tokenizer.hf(prompt)["input_ids"]
    if case == "long-both":  # the run the tests below take as their oracle: checked here
        (n_ctx, ctx_text), (ids, lps, texts, commits, results) = long_greedy(model)
    else:
        sid, n_ctx, ctx_text = w.open(prompt)
        try:
            ids, lps, texts, commits, results = greedy_segments(w, sid, tokenizer_ids, N)
        finally:
            w.close(sid)
    assert n_ctx == len(context) and ctx_text == prompt
    expected, logits = oracle_generate(w, context, N)

    # Token ids: identical; a budget stop may drop a trailing token that ends mid-character.
    if results[-1].eos:
        assert ids == expected and expected[-1] in w.eos_token_ids
    else:
        assert ids == expected[: len(ids)] and len(ids) >= N - 3
    # Log-probs: bitwise those of generate's logits (same forward calls, same numbers).
    assert lps == [float(torch.log_softmax(logits[i], -1)[t]) for i, t in enumerate(ids)]
    # Text: segments concatenate to the decode of the tokens, and commits report the same text.
    text = "".join(texts)
    assert text == w.tokenizer.decode(ids)[0]
    assert text == w.tokenizer.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert commits == texts
    assert all(r.text for r in results[:-1])
    # Boundary segments really looked ahead (so the commit cropped the cache) ...
    assert any(r.generated_tokens > len(r.token_ids) for r in results if r.finish == "boundary")
    assert all(r.lookahead for r in results if r.finish == "boundary")
    # ... and every boundary is a word start for each tokenizer asked.
    for tid in tokenizer_ids or [model]:
        tok = registry.get(tid)
        starts = set(tok.word_starts(prompt[-64:] + text))
        offset = len(prompt[-64:])
        for r in results[:-1]:
            assert offset + len(r.text) in starts
            offset += len(r.text)
    for i, r in enumerate(results[:-1]):  # lookahead = the greedy text after the boundary, cropped
        rest = "".join(texts[i + 1 :])
        assert rest.startswith(r.lookahead) or r.lookahead.startswith(rest)


@pytest.mark.parametrize("model", MODELS)
def test_chunked_prefill_keeps_the_unchunked_greedy_tokens(workers, long_prompt, model):
    """A context longer than Gemma-3's sliding window, prefilled in chunks, continues
    with the tokens of one unchunked prefill (generate without prefill_chunk_size), log-probs equal
    up to float noise."""
    w = workers[model]
    context = w.tokenizer.hf(long_prompt)["input_ids"]
    assert len(context) > 2 * PREFILL_CHUNK and (
        model != "gemma3" or len(context) > GEMMA_WINDOW
    )  # chunks cross the window
    sid, _, _ = w.open(long_prompt)
    try:
        ids, lps, *_ = greedy_segments(w, sid, [], 12)
    finally:
        w.close(sid)
    out = w.model.generate(
        input_ids=torch.tensor([context]),
        attention_mask=torch.ones((1, len(context)), dtype=torch.long),
        do_sample=False,
        max_new_tokens=12,
        return_dict_in_generate=True,
        output_logits=True,
    )
    expected = out.sequences[0, len(context) :].tolist()
    assert ids == expected[: len(ids)] and len(ids) >= 9
    unchunked = [float(torch.log_softmax(out.logits[i][0].float(), -1)[t]) for i, t in enumerate(ids)]
    assert lps == pytest.approx(unchunked, abs=1e-3)


@pytest.mark.parametrize("model", MODELS)
def test_prefix_cache_opens_continue_as_whole_prefills(workers, long_prompt, long_greedy, model):
    """Opens served by the prefix cache (another question after the same few shots, restored at
    the last shared chunk boundary; the same context again) continue bitwise as generate() from
    scratch, across Gemma-3's sliding window; the kept cache stays unchanged by its sessions."""
    w = workers[model]
    prompt = long_prompt
    other = prompt.rsplit("Question:", 1)[0] + f"Question: {gsm8k_rows('test', 1, start=1)[0]['question']}\nAnswer:"
    ids, other_ids = (w.tokenizer.hf(p)["input_ids"] for p in (prompt, other))
    shared = next(i for i, (a, b) in enumerate(zip(ids, other_ids)) if a != b)
    assert shared > max(GEMMA_WINDOW, w.prefill_chunk)  # Gemma-3's restored cache crosses the window
    _, (greedy_ids, greedy_lps, *_) = long_greedy(model)  # checked against generate() above
    other_ids_expected, other_logits = oracle_generate(w, other_ids, 8)
    oracles = {
        prompt: (greedy_ids, greedy_lps),
        other: (
            other_ids_expected,
            [float(torch.log_softmax(other_logits[i], -1)[t]) for i, t in enumerate(other_ids_expected)],
        ),
    }
    w.prefix_cache.clear()
    sid, _, _ = w.open(prompt)  # prefilled whole and kept
    w.close(sid)
    hits, reused = w.prefix_cache.hits, w.prefix_cache.reused_tokens
    for prompt in (other, long_prompt):
        sid, _, _ = w.open(prompt)
        try:
            got, lps, *_ = greedy_segments(w, sid, [], 8)
        finally:
            w.close(sid)
        expected_ids, expected_lps = oracles[prompt]
        assert len(got) >= 6 and got == expected_ids[: len(got)] and lps == expected_lps[: len(got)], prompt[-40:]
    assert w.prefix_cache.hits - hits == 2
    assert w.prefix_cache.reused_tokens - reused == shared // w.prefill_chunk * w.prefill_chunk + len(ids)
    assert 0 < w.info()["prefix_cache_bytes"] <= w.prefix_cache.budget_bytes


def test_gemma_window_is_trimmed_after_commits(workers, long_prompt):
    """Past recording keeps rollback possible, and commits trim the sliding layers back."""
    w = workers["gemma3"]
    sid, n_ctx, _ = w.open(long_prompt)
    try:
        r = w.next_text(sid, NextTextOptions([], 8))
        w.update_state(sid, r.state_id)
        layers = w._sessions[sid].cache.layers
        sliding = [layer for layer in layers if layer.is_sliding]
        assert sliding and all(layer.keys.shape[-2] == layer.sliding_window - 1 for layer in sliding)
        assert all(layer.keys.shape[-2] == n_ctx + len(r.token_ids) for layer in layers if not layer.is_sliding)
    finally:
        w.close(sid)


# ---- 2. score == feed == full forward ----------------------------------------------------
CANDIDATES = [
    (" Natalia sold 48/2 = <<48/2=24>>24 clips in May.", False),
    (" She makes $18", False),
    (" 72", True),
]


@pytest.mark.parametrize("model", MODELS)
def test_score_matches_feed_and_full_forward(workers, registry, long_prompt, model):
    w = workers[model]
    sid, _, _ = w.open(long_prompt)
    context = w.tokenizer.hf(long_prompt)["input_ids"]
    try:
        w.next_text(
            sid, NextTextOptions(registry.ids, 12)
        )  # leaves lookahead in the session cache: scoring must ignore it
        scores = w.score_candidates(sid, CANDIDATES + [("", False)])
        lengths = [len(s.token_ids) for s in scores[:3]]
        assert len(set(lengths)) == 3
        for (text, eos), s in zip(CANDIDATES, scores):
            ids = w.tokenizer.encode_ids(text, continuation=True) + ([w.eos_token_id] if eos else [])
            assert s.token_ids == ids
            assert s.ppl == pytest.approx(perplexity(s.logprobs))
            fed = w.feed_tokens(sid, ids)
            assert fed.ppl == pytest.approx(s.ppl, rel=1e-4)
            assert fed.logprobs == pytest.approx(s.logprobs, rel=1e-4, abs=1e-4)
            full = full_forward_logprobs(w, context, ids)
            assert perplexity(full) == pytest.approx(s.ppl, rel=1e-3)
        empty = scores[3]
        assert empty.token_ids == [] and empty.logprobs == [] and math.isinf(empty.ppl)
    finally:
        w.close(sid)


# ---- 3. commit a scored / fed state, continue == generate ------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_commit_scored_then_continue(workers, registry, long_prompt, model):
    w = workers[model]
    prompt = long_prompt if model == "gemma3" else SHORT_PROMPT
    sid, _, _ = w.open(prompt)
    context = w.tokenizer.hf(prompt)["input_ids"]
    try:
        own = w.next_text(
            sid, NextTextOptions(registry.ids, 10)
        )  # lookahead in the cache, a state that commit must discard
        scores = w.score_candidates(sid, [(" red, blue and", False), (" Janet", False), (" x", True)])
        chosen = scores[0] if model == "smollm2" else scores[1]
        c = w.update_state(sid, chosen.state_id)
        assert c.committed_tokens == len(chosen.token_ids)
        with pytest.raises(StateError):
            w.update_state(sid, own.state_id)
        # The committed next-logits are the scoring row's: next_token agrees with a full forward.
        nt = w.next_token(sid)
        with torch.inference_mode():
            ref = w.model(input_ids=torch.tensor([context + chosen.token_ids]), logits_to_keep=1).logits[0, -1].float()
        assert nt.token_id == int(ref.argmax())
        assert nt.logprob == pytest.approx(float(torch.log_softmax(ref, -1)[nt.token_id]), abs=1e-3)
        ids, _, _, _, _ = greedy_segments(w, sid, registry.ids, 8, committed=c.committed_tokens)
        expected, _ = oracle_generate(w, context + chosen.token_ids, 8)
        assert ids == expected

        # A fed state commits the same way.
        more = w.tokenizer.encode_ids(" and then", continuation=True)
        fed = w.feed_tokens(sid, more)
        c2 = w.update_state(sid, fed.state_id)
        history = context + chosen.token_ids + ids + more
        assert c2.committed_tokens == len(history) - len(context)
        ids2, _, _, _, _ = greedy_segments(w, sid, [], 6, committed=c2.committed_tokens)
        expected2, _ = oracle_generate(w, history, 6)
        assert ids2 == expected2
    finally:
        w.close(sid)


def test_next_token_and_feed_without_change(workers):
    w = workers["smollm2"]
    sid, _, _ = w.open(SHORT_PROMPT)
    try:
        a = w.next_token(sid)
        b = w.next_token(sid)
        assert a == b
        expected, logits = oracle_generate(w, w.tokenizer.hf(SHORT_PROMPT)["input_ids"], 1)
        assert a.token_id == expected[0] and a.logprob == float(torch.log_softmax(logits[0], -1)[a.token_id])
        fed = w.feed_tokens(sid, [a.token_id])
        assert fed.logprobs == [pytest.approx(a.logprob, abs=1e-6)]
        assert w.next_token(sid) == a  # feeding did not move the committed state
    finally:
        w.close(sid)


def test_closed_sessions_hold_up_no_batch(workers):
    """A session's forwards make batch leaders wait for it for a while; closing it ends that."""
    w = workers["smollm2"]
    sid, _, _ = w.open(SHORT_PROMPT)
    try:
        w.next_text(sid, NextTextOptions(max_tokens=2))
        assert sid in w.batcher._last_step
    finally:
        w.close(sid)
    assert sid not in w.batcher._last_step


def test_open_messages(workers):
    smol, gemma = workers["smollm2"], workers["gemma3"]
    messages = [{"role": "user", "content": "Say hi."}]
    sid, n, text = smol.open(messages=messages)
    assert text == smol.tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert n == len(
        smol.tokenizer.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    smol.close(sid)
    assert not gemma.tokenizer.has_chat_template
    sid, n, text = gemma.open(messages=[{"role": "system", "content": "Be brief."}] + messages)
    assert text == "System: Be brief.\nUser: Say hi.\nAssistant:"
    assert n == len(gemma.tokenizer.hf(text)["input_ids"])
    gemma.close(sid)


def test_next_text_budget_and_eos_commit(workers):
    w = workers["gemma3"]
    sid, _, _ = w.open(SHORT_PROMPT)
    try:
        r = w.next_text(sid, NextTextOptions([], 1))
        assert r.finish == "budget" and r.generated_tokens == 1 and len(r.token_ids) <= 1
        w.update_state(sid, r.state_id)
        # Score an EOS-only candidate and commit it: the session ends with EOS in its ids.
        (s,) = w.score_candidates(sid, [("", True)])
        assert s.token_ids == [w.eos_token_id] and math.isfinite(s.ppl)
        c = w.update_state(sid, s.state_id)
        assert c.committed_text == "" and c.committed_tokens == len(r.token_ids) + 1
    finally:
        w.close(sid)


# ---- 4. errors ---------------------------------------------------------------------------
def test_errors(workers):
    w = workers["smollm2"]
    with pytest.raises(SessionNotFound) as exc:
        w.next_token("no-such-session")
    assert "no-such-session" in str(exc.value) and status_for(exc.value).name == "NOT_FOUND"
    with pytest.raises(InvalidArgument):
        w.open("")
    with pytest.raises(InvalidArgument):
        w.open(messages=[])

    sid, _, _ = w.open(SHORT_PROMPT)
    first = w.next_text(sid, NextTextOptions([], 5))
    second = w.next_text(sid, NextTextOptions([], 5))  # supersedes the first NextText state
    with pytest.raises(StateError) as exc:
        w.update_state(sid, first.state_id)
    assert status_for(exc.value).name == "FAILED_PRECONDITION"
    scored = w.score_candidates(sid, [(" yes", False), (" no", False)])
    w.update_state(sid, scored[0].state_id)
    for stale in (second.state_id, scored[1].state_id, scored[0].state_id):
        with pytest.raises(StateError, match="stale"):
            w.update_state(sid, stale)
    with pytest.raises(StateError, match="unknown"):
        w.update_state(sid, "bogus")

    for bad in ([w.vocab_size], [-1], [1, 2**40]):
        with pytest.raises(InvalidArgument) as exc:
            w.feed_tokens(sid, bad)
        assert "out of range" in str(exc.value) and status_for(exc.value).name == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgument):
        w.next_text(sid, NextTextOptions([], -1))

    assert w.info()["live_sessions"] >= 1
    assert w.close(sid) is True
    assert w.close(sid) is False
    with pytest.raises(SessionNotFound):
        w.next_text(sid, NextTextOptions([], 3))
    with pytest.raises(SessionNotFound):
        w.update_state(sid, scored[0].state_id)


def test_info(workers):
    info = workers["gemma3"].info()
    assert info["name"] == info["tokenizer_id"] == "gemma3"
    assert info["eos_token_ids"] == [1] and info["vocab_size"] == 262144 and info["device"] == "cpu"
    assert info["dtype"] == "float32" and info["has_chat_template"] is False


def test_sessions_in_parallel_threads(workers):
    """Sessions are independent: concurrent greedy runs equal sequential ones."""
    from concurrent.futures import ThreadPoolExecutor

    w = workers["smollm2"]
    prompts = [SHORT_PROMPT, "def fibonacci(n):", "Once upon a time"]

    def run(prompt):
        sid, _, _ = w.open(prompt)
        try:
            return greedy_segments(w, sid, [], 10)[0]
        finally:
            w.close(sid)

    sequential = [run(p) for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(run, prompts))
    assert parallel == sequential


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_sessions_share_batched_steps(workers, long_prompt, model):
    """Decode steps of sessions generating at once run as one forward (batching.py); each
    session still gets its own greedy output (ids equal, log-probs within float noise), including
    Gemma-3 past its sliding window, next to short contexts."""
    from concurrent.futures import ThreadPoolExecutor

    w = workers[model]
    prompts = [long_prompt, SHORT_PROMPT, "def fibonacci(n):", "Once upon a time, in a small village,"]

    def run(prompt):
        sid, _, _ = w.open(prompt)
        try:
            ids, lps, *_ = greedy_segments(w, sid, [], 12)
            return ids, lps
        finally:
            w.close(sid)

    sequential = [run(p) for p in prompts]
    before = w.batcher.stats.steps - w.batcher.stats.sizes.get(1, 0)
    with ThreadPoolExecutor(len(prompts)) as pool:
        parallel = list(pool.map(run, prompts))
    batched_steps = w.batcher.stats.steps - w.batcher.stats.sizes.get(1, 0) - before
    assert batched_steps > 0, w.batcher.stats
    for (ids_p, lps_p), (ids_s, lps_s) in zip(parallel, sequential):
        assert ids_p == ids_s
        assert max(abs(a - b) for a, b in zip(lps_p, lps_s)) < 1e-3


@pytest.mark.parametrize("model", MODELS)
def test_batched_rows_are_the_lone_forwards(workers, model):
    """``forward_sessions``: rows of 1-4 tokens of sessions with different cache lengths (one past
    Gemma-3's sliding window) in one flattened forward give each row the logits of its
    own lone forward (float noise, same argmax), and leave each cache as its lone forward would."""
    import copy

    from transformers import DynamicCache

    from coolfusion.services.worker.transformers_backend import forward_sessions

    w = workers[model]
    lengths, rows, firsts = [12, 62, 150, 31], [[5], [7, 8, 9], [11, 12], [14, 15, 16, 17]], [0, 0, 1, 3]
    torch.manual_seed(0)
    with torch.inference_mode():
        caches = []
        for n in lengths:
            cache = DynamicCache(config=w.model.config)
            cache.activate_past_recording()
            w.model(input_ids=torch.randint(100, 1000, (1, n)), past_key_values=cache, use_cache=True)
            caches.append(cache)
        lone_caches = [copy.deepcopy(c) for c in caches]
        lone = [
            w.model(input_ids=torch.tensor([r]), past_key_values=c, use_cache=True).logits[0, f:].float()
            for c, r, f in zip(lone_caches, rows, firsts)
        ]
        batched = forward_sessions(w.model, caches, rows, firsts, "cpu")
        assert w.model.config._attn_implementation == "sdpa"  # switched back after the call
        for got, want in zip(batched, lone):
            assert got.shape == want.shape
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            assert (got - want).abs().max() < 1e-3
        for cache, lone_cache, n, r in zip(caches, lone_caches, lengths, rows):
            assert cache.get_seq_length() == lone_cache.get_seq_length() == n + len(r)
            step = torch.tensor([[42]])
            after = w.model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1]
            want = w.model(input_ids=step, past_key_values=lone_cache, use_cache=True).logits[0, -1]
            assert (after - want).abs().max() < 1e-3


def test_batches_fill_idle_continuations(workers):
    """While a session waits between NextText and its commit, batches of other sessions' steps
    grow its greedy continuation (at most ``fill_ahead`` tokens past its candidate); its next
    NextText replays those tokens and the output is still its own greedy text."""
    from concurrent.futures import ThreadPoolExecutor

    w = workers["smollm2"]
    prompt = "The history of the city is long and complicated. It began"
    sid, _, _ = w.open(prompt)
    want_ids, want_lps, *_ = greedy_segments(w, sid, [], 10)
    w.close(sid)

    sid, _, _ = w.open(prompt)
    first = w.next_text(sid, NextTextOptions([], 10))
    session = w._sessions[sid]
    ahead_before = len(session.ahead_tokens)
    filled_before = w.batcher.stats.filled

    def busy(p):  # two sessions generating at once: batches of two real steps
        other, _, _ = w.open(p)
        try:
            greedy_segments(w, other, [], 12)
        finally:
            w.close(other)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(busy, ["def fibonacci(n):", "Once upon a time, in a small village,"]))
    grown = len(session.ahead_tokens) - ahead_before
    assert w.batcher.stats.filled > filled_before, w.batcher.stats
    assert grown >= 1 and len(session.ahead_tokens) <= len(first.token_ids) + w.fill_ahead

    ids, lps = list(first.token_ids), list(first.logprobs)
    second = w.next_text(sid, NextTextOptions([], 10 - len(ids), commit_state_id=first.state_id))
    assert second.reused_tokens >= min(grown, len(second.token_ids))  # replayed, not stepped
    ids += second.token_ids
    lps += second.logprobs
    w.update_state(sid, second.state_id)
    more, more_lps, *_ = greedy_segments(w, sid, [], 10 - len(ids), committed=len(ids))
    w.close(sid)
    ids, lps = ids + more, lps + more_lps
    assert ids == want_ids
    assert max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-3


def test_scores_under_load_are_the_forward_scores(workers):
    """Under load a one-row score goes through the step batcher (where it may share a forward
    with other sessions' rows): the same tokens, log-probs within float noise, and committing it
    continues exactly like committing the lone forward's state."""
    w = workers["smollm2"]
    prompt, candidate = "The three primary colors are", [(" red, yellow", False)]

    def score_commit_continue(load: bool):
        sid, _, _ = w.open(prompt)
        try:
            if load:
                with w.batcher, w.batcher:  # two generation loops announced: under load
                    assert w.batcher.under_load
                    (score,) = w.score_candidates(sid, candidate)
            else:
                assert not w.batcher.under_load
                (score,) = w.score_candidates(sid, candidate)
            w.update_state(sid, score.state_id)
            return score, w.next_text(sid, NextTextOptions([], 6))
        finally:
            w.close(sid)

    forward, forward_next = score_commit_continue(load=False)
    stepped, stepped_next = score_commit_continue(load=True)
    assert len(forward.token_ids) >= 2 and stepped.token_ids == forward.token_ids
    assert max(abs(a - b) for a, b in zip(stepped.logprobs, forward.logprobs)) < 1e-3
    assert stepped_next.token_ids == forward_next.token_ids
    assert stepped_next.text == forward_next.text


def test_batching_off_is_the_plain_step(workers):
    """max_batch=1: every step is the lone ``generate``-style forward."""
    w = workers["smollm2"]
    saved = w.batcher.max_batch
    w.batcher.max_batch = 1
    try:
        before = w.batcher.stats.batches
        sid, _, _ = w.open(SHORT_PROMPT)
        greedy_segments(w, sid, [], 6)
        w.close(sid)
        assert w.batcher.stats.batches == before  # bypassed entirely
    finally:
        w.batcher.max_batch = saved


# ---- speculative decoding: drafts verified in one forward, scores from the kept continuation ----
def _segments_with_drafts(w: WorkerCore, sid: str, tokenizer_ids, n: int, drafts):
    """greedy_segments, giving ``drafts(k, texts_so_far)`` as draft_text to the k-th NextText."""
    ids, lps, texts, results = [], [], [], []
    while len(ids) < n:
        r = w.next_text(sid, NextTextOptions(tokenizer_ids, n - len(ids), draft_text=drafts(len(results), texts)))
        w.update_state(sid, r.state_id)
        ids += r.token_ids
        lps += r.logprobs
        texts.append(r.text)
        results.append(r)
        if r.eos or r.finish != "boundary":
            break
    return ids, lps, texts, results


@pytest.mark.parametrize("model", MODELS)
def test_verified_drafts_keep_the_greedy_tokens(workers, registry, long_prompt, long_greedy, model):
    """Oracle: the plain greedy segments. A perfect draft (the model's own future text) is mostly
    verified several tokens per forward; the other model's greedy text is checked and partly
    rejected. Either way the tokens are the greedy ones, log-probs equal to forward noise, also
    past Gemma-3's window (rejections crop the cache without trimming sliding layers)."""
    w = workers[model]
    plain_ids, plain_lps, plain_texts, _ = long_greedy(model)[1][:4]
    other_text = "".join(long_greedy("gemma3" if model == "smollm2" else "smollm2")[1][2])

    def perfect(k, texts):
        return "".join(plain_texts[k:])

    def from_other(k, texts):
        done = "".join(texts)
        return other_text[len(done) :] if other_text.startswith(done) else ""

    for drafts, verified_min in ((perfect, N // 2), (from_other, 0)):
        sid, _, _ = w.open(long_prompt)
        try:
            ids, lps, texts, results = _segments_with_drafts(w, sid, registry.ids, N, drafts)
        finally:
            w.close(sid)
        assert ids == plain_ids and texts == plain_texts
        assert lps == pytest.approx(plain_lps, abs=1e-4)
        verified = sum(r.verified_tokens for r in results)
        forwards = sum(r.verify_forwards for r in results)
        assert verified >= verified_min and forwards > 0
        if drafts is perfect:
            assert verified > forwards  # several draft tokens per verifying forward


@pytest.mark.parametrize("model", MODELS)
def test_looked_up_tokens_keep_the_greedy_tokens(workers, registry, long_prompt, long_greedy, model):
    """Oracle: the plain greedy segments. With lookup_tokens, tokens that followed earlier
    occurrences of the last ids (GSM8K answers repeat the question's names and numbers) are checked
    several per forward: in generation, in the forward that feeds a committed last token (no
    lookahead kept) and in the drafter's extension. The tokens stay the greedy ones, past Gemma-3's
    window too."""
    w = workers[model]
    plain_ids, plain_lps, plain_texts, _, _ = long_greedy(model)[1]
    for options in (dict(), dict(reuse_lookahead=False), dict(draft_tokens=4)):
        sid, _, _ = w.open(long_prompt)
        ids, lps, texts, accepted, forwards = [], [], [], 0, 0
        try:
            while len(ids) < N:
                r = w.next_text(sid, NextTextOptions(registry.ids, N - len(ids), lookup_tokens=2, **options))
                assert w.update_state(sid, r.state_id).committed_tokens == len(ids) + len(r.token_ids)
                ids += r.token_ids
                lps += r.logprobs
                texts.append(r.text)
                accepted += r.lookup_accepted
                forwards += r.lookup_forwards
                if r.eos or r.finish != "boundary":
                    break
        finally:
            w.close(sid)
        assert (ids, texts) == (plain_ids, plain_texts), options
        assert lps == pytest.approx(plain_lps, abs=1e-4)
        assert accepted > 0 and forwards > 0, options
    sid, _, _ = w.open(SHORT_PROMPT)
    try:
        for bad in (-1, worker_model.MAX_LOOKUP_TOKENS + 1):
            with pytest.raises(InvalidArgument):
                w.next_text(sid, NextTextOptions(registry.ids, 8, lookup_tokens=bad))
    finally:
        w.close(sid)


def test_lookup_finds_the_latest_longest_match(workers):
    w = workers["smollm2"]
    eos = sorted(w._eos_set)[0]

    def lookup(ids, count):  # ids written small, kept clear of special tokens
        return [t - 100 for t in w._generator.drafts.lookup([t + 100 for t in ids], count)]

    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], 2) == [7, 8]  # the latest "2 3"
    assert lookup([5, 6, 7, 1, 2, 8, 2, 4, 4, 1, 2], 3) == [8, 2, 4]  # "1 2" before the latest "2"
    assert lookup([4, 5, 6, 5, 6], 4) == [5, 6]  # stops at the end of the ids
    assert lookup([1, 2, 3], 2) == [] and w._generator.drafts.lookup([], 2) == []
    assert w._generator.drafts.lookup([104, 105, eos, 107, 104, 105], 3) == [eos]  # cut after an EOS


def test_drafter_returns_its_continuation(workers, registry):
    w = workers["smollm2"]
    sid, _, _ = w.open(SHORT_PROMPT)
    try:
        first = w.next_text(sid, NextTextOptions(registry.ids, 16, draft_tokens=6))
        assert 0 < first.drafted_tokens <= 2 and first.draft
        w.update_state(sid, first.state_id)
        later = "".join(greedy_segments(w, sid, registry.ids, 16, committed=len(first.token_ids))[2])
        assert later.startswith(first.draft)  # the draft is the text greedy decoding goes on with
        with pytest.raises(InvalidArgument):
            w.next_text(sid, NextTextOptions(registry.ids, 4, draft_tokens=-1))
    finally:
        w.close(sid)


@pytest.mark.parametrize("model", MODELS)
def test_following_segments_are_the_next_candidates(workers, registry, model, monkeypatch):
    """NextText's following segments (decided by the kept continuation, no forward) are what the
    next NextTexts return after one commit each; committing one commits through it, and the
    session goes on as greedy decoding (generate) does."""
    monkeypatch.setattr(worker_model, "DRAFT_CALL_FORWARDS", 12)  # a long continuation to follow
    w = workers[model]
    context = w.tokenizer.hf(SHORT_PROMPT)["input_ids"]
    a, _, _ = w.open(SHORT_PROMPT)
    b, _, _ = w.open(SHORT_PROMPT)
    try:
        first = w.next_text(a, NextTextOptions(registry.ids, 16, draft_tokens=10, follow_segments=8))
        assert first.finish == "boundary" and len(first.following) >= 2
        sequential = []  # the oracle: NextText + UpdateState, one segment at a time
        for _ in range(1 + len(first.following)):
            r = w.next_text(b, NextTextOptions(registry.ids, 16))
            w.update_state(b, r.state_id)
            sequential.append(r)
        assert (sequential[0].text, sequential[0].token_ids) == (first.text, first.token_ids)
        for f, r in zip(first.following, sequential[1:]):
            assert (f.text, f.token_ids, f.lookahead, f.generated_tokens) == (
                r.text,
                r.token_ids,
                r.lookahead,
                r.generated_tokens,
            )
            assert f.logprobs == pytest.approx(r.logprobs, abs=1e-5)
        c = w.update_state(a, first.following[-1].state_id)
        ids = first.token_ids + [t for f in first.following for t in f.token_ids]
        assert c.committed_tokens == len(ids)
        assert c.committed_text == "".join(r.text for r in sequential)
        expected, _ = oracle_generate(w, context, len(ids) + 6)
        assert ids == expected[: len(ids)]
        # Going on from there: the same as the one-commit-at-a-time session, and generate.
        nxt = w.next_text(a, NextTextOptions(registry.ids, 16, follow_segments=8))
        ref = w.next_text(b, NextTextOptions(registry.ids, 16))
        assert (nxt.text, nxt.token_ids) == (ref.text, ref.token_ids)
        assert (ids + nxt.token_ids)[: len(expected)] == expected[: len(ids) + len(nxt.token_ids)]
        for bad in (-1, worker_model.MAX_FOLLOW_SEGMENTS + 1):
            with pytest.raises(InvalidArgument):
                w.next_text(a, NextTextOptions(registry.ids, 16, follow_segments=bad))
    finally:
        w.close(a)
        w.close(b)


@pytest.mark.parametrize("model", MODELS)
def test_scores_from_the_kept_continuation(workers, registry, model, monkeypatch):
    """A candidate whose tokens but the last follow the forwarded greedy continuation is scored
    from its kept logits (no forward) like a forward would score it; committing it and going on
    equals generate() from the context and its tokens."""
    monkeypatch.setattr(worker_model, "DRAFT_CALL_FORWARDS", 8)  # a continuation past the candidate
    w = workers[model]
    sid, _, _ = w.open(SHORT_PROMPT)
    context = w.tokenizer.hf(SHORT_PROMPT)["input_ids"]
    try:
        own = w.next_text(sid, NextTextOptions(registry.ids, 16, draft_tokens=4))  # continuation past the candidate
        s = w._sessions[sid]
        cont = s.ahead_tokens[: len(s.ahead_logits)]
        assert len(cont) > len(own.token_ids)
        longer = w.tokenizer.decode(cont[: len(own.token_ids) + 1], prefix_ids=context)[0]
        greedy_next = w.tokenizer.decode(cont[len(own.token_ids) : len(own.token_ids) + 1])[0]
        forked = own.text + (" the" if greedy_next != " the" else " a")  # leaves the continuation
        candidates = [(own.text, own.eos), (longer, False), (forked, False)]
        plain = w.score_candidates(sid, candidates)
        reused = w.score_candidates(sid, candidates, own_state_id=own.state_id)
        for p, r in zip(plain, reused):
            if r.token_ids[:-1] == cont[: len(r.token_ids) - 1]:
                assert r.reused and not p.reused
            assert r.token_ids == p.token_ids
            assert r.logprobs == pytest.approx(p.logprobs, abs=1e-4)
        chosen = reused[2]
        assert (
            chosen.reused
            and chosen.token_ids[:-1] == own.token_ids
            and chosen.token_ids[-1] != cont[len(own.token_ids)]
        )
        c = w.update_state(sid, chosen.state_id)
        assert c.committed_tokens == len(chosen.token_ids)
        ids, _, _, _, _ = greedy_segments(w, sid, registry.ids, 8, committed=c.committed_tokens)
        expected, _ = oracle_generate(w, context + chosen.token_ids, 8)
        assert ids == expected
    finally:
        w.close(sid)
