"""End to end: orchestrator + workers + tokenizer service on loopback, real bundled models."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import pytest_asyncio
import torch
from cluster import GEMMA_WINDOW, HANG_GUARD_S, gate_worker, gsm8k_prompt, winner_text

from coolfusion.clients.client import FusionClient
from coolfusion.orchestrator.rules import ScoreRule
from coolfusion.orchestrator.server import build_service as build_orchestrator
from coolfusion.orchestrator.workers import RemoteWorker
from coolfusion.services.worker.forward import PREFILL_CHUNK

LONG_PROMPT = gsm8k_prompt(0, shots=2)  # crosses the in-process Gemma-3 sliding window (cluster.py)
FEW_SHOT_PROMPT = gsm8k_prompt(0, shots=1)
SHORT_PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"


@pytest_asyncio.fixture(loop_scope="session")
async def client(cluster):
    async with FusionClient(cluster.address) as c:
        yield c


def greedy(core, prompt: str, max_new_tokens: int) -> list[int]:
    """The oracle: transformers' own greedy generate on the worker's model."""
    hf = core.tokenizer.hf
    inputs = hf(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = core.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=hf.pad_token_id,
            prefill_chunk_size=PREFILL_CHUNK,  # the worker prefills in chunks, each forward as generate's
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def forward_logprobs(core, context_ids: list[int], ids: list[int]) -> list[float]:
    """Log-probs of ``ids`` after ``context_ids``: one plain forward of the model, no cache (the
    output layer only on the positions that predict ``ids``)."""
    with torch.inference_mode():
        logits = core.model(input_ids=torch.tensor([context_ids + ids]), logits_to_keep=len(ids) + 1).logits[0].float()
    lps = torch.log_softmax(logits[:-1], -1)
    return [float(lps[i, t]) for i, t in enumerate(ids)]


def text_ids(core, text: str, eos: bool = False) -> list[int]:
    """The tokens of ``text`` going on from a context: the model's tokenizer on the text alone
    (both bundled tokenizers split words before their first character), EOS appended for an
    answer that ended at EOS."""
    hf = core.tokenizer.hf
    return hf(text, add_special_tokens=False)["input_ids"] + ([hf.eos_token_id] if eos else [])


def reference_score(core, context_ids: list[int], text: str, eos: bool = False) -> tuple[float, int, float]:
    """(PPL, tokens, sum of log-probs) of ``text`` after ``context_ids`` by a plain forward."""
    ids = text_ids(core, text, eos)
    lps = forward_logprobs(core, context_ids, ids) if ids else []
    return (math.exp(-sum(lps) / len(lps)) if lps else math.inf), len(ids), sum(lps)


def first_lowest(values: list[float]) -> int:
    """Index of the lowest value, the first on ties (paper eq. 3 with config order)."""
    return min(range(len(values)), key=lambda i: (values[i], i))


def decided(values: list[float], rel: float = 1e-3) -> bool:
    """The lowest value is lower than every other by more than float noise could move it."""
    best = min(values)
    return all(v > best * (1 + rel) for v in values if v != best) and values.count(best) == 1


def check_finish(reply, stop: str | None, max_new_tokens: int) -> None:
    """The reply ends where its uncut output (the winners' texts) says it must: at the first stop
    sequence, else at the last segment's EOS, else at a model's token budget."""
    full = "".join(winner_text(s) for s in reply.segments)
    at = full.find(stop) if stop else -1
    if at >= 0:
        assert (reply.finish_reason, reply.text) == ("stop", full[:at])
    elif reply.segments[-1].eos:
        assert (reply.finish_reason, reply.text) == ("eos", full)
    else:
        assert (reply.finish_reason, reply.text) == ("length", full)
        assert max(u.output_tokens for u in reply.usage) >= max_new_tokens


async def check_segments_by_reference(cluster, prompt: str, reply, names: list[str]) -> int:
    """Every candidate's PPL under every scorer against a plain forward of that scorer's context
    (the prompt and the segments before, each as that model committed it: the winner's own tokens,
    else the segment's text in its tokens) and the candidate; each segment's winner must be the
    lowest mean reference PPL (eq. 3). Returns how many segments the reference decided clearly."""
    contexts = {n: cluster.cores[n].tokenizer.hf(prompt)["input_ids"] for n in names}
    clear = 0
    for s in reply.segments:
        means = []
        for c in s.candidates:
            got = {p.scorer: p for p in c.ppl}
            assert list(got) == names
            refs = []
            for v in names:
                ppl, tokens, _ = await asyncio.to_thread(reference_score, cluster.cores[v], contexts[v], c.text, c.eos)
                assert got[v].tokens == tokens, (s.index, c.model, v)
                assert got[v].ppl == pytest.approx(ppl, rel=1e-3), (s.index, c.model, v)
                refs.append(ppl)
            means.append(sum(refs) / len(refs))
        texts = [(c.text, c.eos) for c in s.candidates]
        best = first_lowest(means)
        if decided(means):
            clear += 1
            assert texts[best] == (winner_text(s), s.eos), (s.index, means)
        else:  # a near tie (or identical candidates): the winner is one of the lowest
            assert (winner_text(s), s.eos) in [t for t, m in zip(texts, means) if m <= min(means) * (1 + 1e-3)]
        for v in names:
            contexts[v] += list(s.token_ids) if s.model == v else text_ids(cluster.cores[v], winner_text(s))
    return clear


def test_long_prompt_exceeds_gemma_window(cluster):
    assert len(cluster.cores["gemma3"].tokenizer.encode(LONG_PROMPT).ids) > 2 * GEMMA_WINDOW


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
async def test_single_equals_greedy_generate(cluster, client, model):
    n = 40
    prompt = LONG_PROMPT if model == "gemma3" else FEW_SHOT_PROMPT
    reply = await client.generate(prompt, mode=f"single:{model}", max_new_tokens=n)
    expected = await asyncio.to_thread(greedy, cluster.cores[model], prompt, n)
    got = [t for s in reply.segments for t in s.token_ids]
    assert got == expected
    core = cluster.cores[model]
    assert reply.text == core.tokenizer.decode(expected)[0]
    assert "".join(s.text for s in reply.segments) == reply.text
    assert len(reply.segments) > 1


async def test_two_copies_of_one_model_equal_its_greedy_output(cluster, client):
    n = 32
    reply = await client.generate(FEW_SHOT_PROMPT, mode="cool", models=["smollm2", "smollm2b"], max_new_tokens=n)
    expected = await asyncio.to_thread(greedy, cluster.cores["smollm2"], FEW_SHOT_PROMPT, n)
    assert reply.text == cluster.cores["smollm2"].tokenizer.decode(expected)[0]
    assert {s.model for s in reply.segments} == {"smollm2"}  # ties go to the first model


def _assert_common_boundaries(cluster, context: str, segments, names):
    """Every segment that ended at a boundary ends where every tokenizer starts a word, in the
    text its model generated (the segment followed by that model's lookahead). The next segment
    may come from another model and continue differently: that is the method, not a bug."""
    checked = 0
    for s in segments:
        winner = next(c for c in s.candidates if c.model == s.model)
        if winner.finish == "boundary" and winner.text == s.text:  # not cut by a stop sequence
            assert winner.lookahead, s
            text = context + s.text + winner.lookahead
            end = len(context) + len(s.text)
            for n in names:
                assert end in cluster.registry.get(n).word_starts(text), (n, s.text, winner.lookahead)
            checked += 1
        context += s.text
    assert checked >= 3


async def test_cool_on_gsm8k_is_segmented_at_common_boundaries_and_deterministic(cluster, client):
    prompt = gsm8k_prompt(3, shots=3)
    kwargs = dict(
        mode="cool", models=["smollm2", "gemma3"], max_new_tokens=32, stop=["Question:"], score_rule="mean-ppl"
    )
    first = await client.generate(prompt, **kwargs)
    check_finish(first, "Question:", 32)
    assert "".join(s.text for s in first.segments) == first.text
    assert len(first.segments) >= 3
    _assert_common_boundaries(cluster, prompt, first.segments, ["smollm2", "gemma3"])
    for s in first.segments:
        assert s.model in ("smollm2", "gemma3")
        assert {c.model for c in s.candidates} == {"smollm2", "gemma3"}
        assert all(len(c.ppl) == 2 for c in s.candidates)
        winner = min(s.candidates, key=lambda c: c.mean_ppl)
        assert s.model == winner.model or winner.mean_ppl == [c for c in s.candidates if c.model == s.model][0].mean_ppl
    assert {u.model for u in first.usage} == {"smollm2", "gemma3"}
    second = await client.generate(prompt, **kwargs)
    assert second.text == first.text
    assert [s.model for s in second.segments] == [s.model for s in first.segments]


async def test_stream_arrives_segment_by_segment(cluster):
    """The first segment reaches the client while the generation cannot have finished: Gemma-3's
    second NextText is held until the client has it (a server that sent everything at the end
    would never deliver it: the wait would run into the hang guard)."""
    service, engine = build_orchestrator({n: cluster.worker_addresses[n] for n in ("smollm2", "gemma3")})
    gated = gate_worker(engine, "gemma3", at=2)
    port = await service.start()
    try:
        async with FusionClient(f"127.0.0.1:{port}") as client:
            stream = client.stream_raw(gsm8k_prompt(5), mode="cool", max_new_tokens=40, models=["smollm2", "gemma3"])
            first = await asyncio.wait_for(anext(stream), HANG_GUARD_S)
            assert first.HasField("segment") and not gated.gate.is_set()
            gated.gate.set()
            items = [first] + [item async for item in stream]
    finally:
        await service.stop(0)
        for worker in engine.workers.values():
            await worker.aclose()
    segments = [i.segment for i in items if i.HasField("segment")]
    final = items[-1].final
    assert items[-1].HasField("final") and final.segments == len(segments) >= 3
    assert gated.calls >= 2  # the held round and the rest came after the first segment was out
    assert final.text == "".join(s.text for s in segments)
    assert final.timings.first_segment_s < final.timings.total_s


async def test_noalign_picks_by_reference_ppl(cluster, client):
    """cool-noalign (each candidate ends at its own model's word boundary): every candidate's PPL
    and every segment's pick against plain forwards computed here."""
    names = ["smollm2", "gemma3"]
    reply = await client.generate(
        SHORT_PROMPT, mode="cool-noalign", max_new_tokens=16, models=names, score_rule="mean-ppl"
    )
    assert "".join(s.text for s in reply.segments) == reply.text
    check_finish(reply, None, 16)
    assert await check_segments_by_reference(cluster, SHORT_PROMPT, reply, names) >= 1


async def test_three_models_through_the_services(cluster, client):
    """k = 3 (two tokenizers and a copy of SmolLM2): three candidates, each scored by all three;
    the copy proposes and scores exactly as SmolLM2 does; picks against plain forwards."""
    names = ["smollm2", "gemma3", "smollm2b"]
    reply = await client.generate(SHORT_PROMPT, mode="cool", max_new_tokens=16, models=names, score_rule="mean-ppl")
    assert "".join(s.text for s in reply.segments) == reply.text
    check_finish(reply, None, 16)
    assert {u.model for u in reply.usage} == set(names)
    for s in reply.segments:
        by_model = {c.model: c for c in s.candidates}
        assert list(by_model) == names
        a, b = by_model["smollm2"], by_model["smollm2b"]
        assert (a.text, a.eos) == (b.text, b.eos)
        ppl = {c.model: {p.scorer: p.ppl for p in c.ppl} for c in s.candidates}
        for c in names:
            assert ppl[c]["smollm2"] == pytest.approx(ppl[c]["smollm2b"], rel=1e-3), (s.index, c)
    assert await check_segments_by_reference(cluster, SHORT_PROMPT, reply, names) >= 1


_ALONE: dict[str, tuple[str, bool]] = {}  # label -> (greedy answer to SHORT_PROMPT, ended at EOS)


@pytest.mark.parametrize(
    "mode, labels", [("rerank", ["smollm2", "gemma3"]), ("cool-rerank", ["cool", "smollm2", "gemma3"])]
)
async def test_rerank_modes_pick_the_lowest_reference_ppl(cluster, client, mode, labels):
    """Rerank: each model's own whole answer (and, for cool-rerank, the cool answer) generated
    alone here, scored by plain forwards from the prompt; the mode must return the answer with
    the lowest mean PPL (an answer that ended at EOS is scored with each scorer's EOS)."""
    names = ["smollm2", "gemma3"]
    kwargs = dict(max_new_tokens=24, models=names, score_rule="mean-ppl")
    answers = {}
    for label in labels:
        if label not in _ALONE:  # greedy answers are deterministic: both modes' cases share them
            alone = await client.generate(SHORT_PROMPT, mode="cool" if label == "cool" else f"single:{label}", **kwargs)
            _ALONE[label] = (alone.text, alone.finish_reason == "eos")
        answers[label] = _ALONE[label]
    contexts = {n: cluster.cores[n].tokenizer.hf(SHORT_PROMPT)["input_ids"] for n in names}
    refs = {
        label: [(await asyncio.to_thread(reference_score, cluster.cores[n], contexts[n], text, eos))[0] for n in names]
        for label, (text, eos) in answers.items()
    }
    means = [sum(refs[label]) / len(names) for label in labels]
    assert decided(means), means  # else float noise could pick either: choose another prompt
    best = labels[first_lowest(means)]

    reply = await client.generate(SHORT_PROMPT, mode=mode, **kwargs)
    (segment,) = reply.segments
    assert [c.model for c in segment.candidates] == labels
    for c in segment.candidates:
        assert (c.text, c.eos) == answers[c.model]
        got = {p.scorer: p.ppl for p in c.ppl}
        assert [got[n] for n in names] == pytest.approx(refs[c.model], rel=1e-3), c.model
    assert (segment.model, reply.text) == (best, answers[best][0])


async def test_chat_messages_use_each_models_own_template(cluster):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    for name in ("smollm2", "gemma3"):
        worker = RemoteWorker(name, cluster.worker_addresses[name])
        opened = await worker.open(None, messages)
        core = cluster.cores[name]
        # SmolLM2 ships a chat template: transformers renders it. Gemma-3 from GGUF has none: the
        # documented plain rendering, written out here.
        assert core.tokenizer.has_chat_template == (name == "smollm2")
        if name == "smollm2":
            expected = core.tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert "What is 2 + 3?" in expected and expected != "What is 2 + 3?"
        else:
            expected = "User: What is 2 + 3?\nAssistant:"
        assert opened.context_text == expected
        await worker.close(opened.session_id)
        await worker.aclose()


async def test_chat_generation_through_fusion(cluster, client):
    reply = await client.generate(
        messages=[{"role": "user", "content": "Name a color."}],
        mode="cool",
        max_new_tokens=12,
        models=["smollm2", "gemma3"],
    )
    assert reply.text == "".join(s.text for s in reply.segments)
    assert reply.usage[0].prompt_tokens > 0


async def test_fused_utf8_is_whole_in_every_segment(cluster, client):
    """CJK and emoji prompts: characters that take several tokens (SmolLM2 writes most CJK and
    emoji as byte pieces) never reach the text half-made. Every segment's text is exactly what its
    winner's tokens decode to (no U+FFFD, no byte lost or added), and the text is the segments."""
    prompts = ["用中文回答：中国的首都是哪里？答：", "Reply with emoji only: 🦩🐙🌊🦩🐙🌊"]
    split = 0
    for prompt in prompts:
        reply = await client.generate(
            prompt, mode="cool", max_new_tokens=24, models=["smollm2", "gemma3"], score_rule="mean-ppl"
        )
        assert "\ufffd" not in reply.text, reply.text
        assert reply.text == "".join(s.text for s in reply.segments)
        assert any(ord(ch) > 0x2E7F for ch in reply.text), reply.text  # it did write CJK or emoji
        for s in reply.segments:
            hf = cluster.cores[s.model].tokenizer.hf
            assert hf.decode(list(s.token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False) == s.text
            split += any("\ufffd" in hf.decode([t]) for t in s.token_ids)
    assert split, "no character was split over tokens: the case this test is about did not occur"


async def test_score_rpc_against_plain_forwards(cluster, client):
    """Fusion.Score: each model's PPL, token count and log-prob sum of each text after the prompt
    against a plain forward computed here; the mean, the mean-ppl log-likelihood and the choice."""
    names = ["smollm2", "gemma3"]
    prompt = "Question: What is 12 plus 30?\nAnswer:"
    texts, eos = [" 42", " The answer is 42.", " 你好 🦩", ""], [True, False, False, False]
    reply = await client.score(prompt, texts, models=names, eos=eos, score_rule="mean-ppl")
    assert reply.score_rule == "mean-ppl" and len(reply.scores) == len(texts)
    contexts = {n: cluster.cores[n].tokenizer.hf(prompt)["input_ids"] for n in names}
    means = []
    for text, flag, row in zip(texts, eos, reply.scores):
        got = {p.scorer: p for p in row.ppl}
        assert list(got) == names
        if not text and not flag:  # nothing to score: no tokens, never chosen
            assert all(got[n].tokens == 0 and math.isinf(got[n].ppl) for n in names)
            assert math.isinf(row.mean_ppl) and row.loglikelihood == -math.inf and not row.chosen
            means.append(math.inf)
            continue
        refs = [await asyncio.to_thread(reference_score, cluster.cores[n], contexts[n], text, flag) for n in names]
        for n, (ppl, tokens, logprob) in zip(names, refs):
            assert (got[n].tokens, got[n].ppl, got[n].logprob) == (
                tokens,
                pytest.approx(ppl, rel=1e-3),
                pytest.approx(logprob, rel=1e-3),
            ), (text, n)
        mean = sum(r[0] for r in refs) / len(refs)
        assert row.mean_ppl == pytest.approx(mean, rel=1e-3)
        # mean-ppl's log-likelihood: -(mean token count) * ln(mean PPL) (rules.py).
        assert row.loglikelihood == pytest.approx(-sum(r[1] for r in refs) / len(refs) * math.log(mean), rel=1e-3)
        means.append(mean)
    assert decided(means), means
    assert [row.chosen for row in reply.scores] == [i == first_lowest(means) for i in range(len(texts))]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(prompt="Q:", texts=[]), "texts is empty"),
        (dict(prompt="Q:", texts=[" a", " b"], eos=[True]), "eos has 1 flags for 2 texts"),
        (dict(prompt="   ", texts=[" a"]), "prompt is empty"),
        (dict(prompt="Q:", texts=[" a"], models=["nope"]), "unknown model(s) nope"),
        (
            dict(
                prompt="Q:", texts=[" a"], models=["smollm2"], score_rule=ScoreRule("product", weights={"gemma3": 2.0})
            ),
            "not in this request",
        ),
    ],
    ids=["no-texts", "eos-count", "empty-prompt", "unknown-model", "rule-names-another-model"],
)
async def test_score_rpc_bad_input(cluster, client, kwargs, fragment):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.score(**kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details() and "\n" not in info.value.details()
    ok = await client.score("Q:", [" a"], models=["smollm2"])  # ... and the service keeps serving
    assert ok.scores[0].ppl[0].tokens == 1


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(prompt="hi", models=["nope"]), "unknown model"),
        (dict(prompt="   "), "prompt is empty"),
        (dict(prompt="hi", max_new_tokens=-1), "max_new_tokens"),
        (dict(prompt="hi", max_new_tokens=10**7), "max_new_tokens"),
        (dict(prompt="hi", mode="bogus"), "unknown mode"),
        (dict(prompt="hi", mode="single:nope"), "unknown model"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "role"),
        (dict(messages=[{"role": "user", "content": " "}]), "content is empty"),
        (dict(prompt="x" * 200_001), "the limit is 200000"),
        (dict(prompt="hi", max_segment_tokens=-3), "max_segment_tokens"),
    ],
)
async def test_bad_requests_get_invalid_argument(cluster, client, kwargs, fragment):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.generate(**kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    # ... and the service keeps serving.
    ok = await client.generate("1, 2, 3,", mode="single:smollm2", max_new_tokens=3)
    assert ok.text


async def test_list_models(cluster, client):
    reply = await client.list_models()
    assert [m.name for m in reply.models] == ["smollm2", "gemma3", "smollm2b"]
    assert "single:gemma3" in reply.modes and "cool" in reply.modes


async def test_invalid_utf8_gets_invalid_argument(cluster, client):
    raw = bytes([0x0A, 0x02, 0xFF, 0xFE])  # GenerateRequest.prompt (field 1) = b"\xff\xfe"
    call = client.channel.unary_unary(
        "/coolfusion.v1.Fusion/Generate", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(raw, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in info.value.details() and "UTF-8" in info.value.details()
    ok = await client.generate("1, 2, 3,", mode="single:smollm2", max_new_tokens=3)
    assert ok.text
