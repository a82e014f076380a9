"""Sampling (temperature, top_k, top_p, seed) at the worker: the sampler, its draws, and NextText.

* the sampler (``sampling.choose``) is the inverse CDF of the tempered, cut distribution: on an
  evenly spread set of uniforms each token is drawn in proportion to its probability, and never a
  token outside the top-k / nucleus;
* a draw is a function of the seed and the tokens before it only (``PrefixKeys``);
* on a real model's logits the first token drawn over a fixed list of seeds follows the model's
  softmax (chi-square), and top_k / top_p cut the tail;
* sampled NextText/UpdateState segments are a plain reference sampling loop's tokens (a full
  forward per token, the same draws), with a perfect draft verified several tokens per forward,
  with looked-up tokens, and with the kept lookahead off.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from coolfusion.protos import fusion_pb2 as fusion_pb
from coolfusion.protos import worker_pb2 as worker_pb
from coolfusion.services.common.errors import InvalidArgument
from coolfusion.services.sources import parse_specs
from coolfusion.services.worker import wire
from coolfusion.services.worker.api import GREEDY, NextTextOptions, Sampling
from coolfusion.services.worker.model import WorkerCore
from coolfusion.services.worker.sampling import PrefixKeys, choose, cumulative, token_at, uniform

UNCERTAIN_PROMPT = "My favourite animal is the"
SEEDS = range(2000)  # fixed: the chi-square tests are deterministic
ALPHA = 1e-3  # a fixed seed list either passes or fails for good; this only guards the choice of list


def _spread(n: int) -> list[float]:
    """``n`` uniforms evenly spread over [0, 1): each token gets its share of them up to one."""
    return [(i + 0.5) / n for i in range(n)]


def _cut_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution the sampler draws from, computed the textbook way (transformers' warpers:
    temperature, top-k by masking, top-p on the ascending cumulative sum)."""
    scaled = logits.double() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if 0 < sampling.top_p < 1:
        ascending, order = torch.sort(scaled)
        cumulative = torch.softmax(ascending, -1).cumsum(-1)
        remove = cumulative <= 1 - sampling.top_p
        remove[-1] = False
        scaled = scaled.masked_fill(remove.scatter(0, order, remove), -math.inf)
    return torch.softmax(scaled, -1)


# ---- the sampler, no model -----------------------------------------------------------------
@pytest.mark.parametrize(
    "sampling",
    [Sampling(1.0), Sampling(0.5), Sampling(2.0, top_k=3), Sampling(1.0, top_p=0.7), Sampling(1.5, 0.8, 4)],
    ids=str,
)
def test_choose_is_the_inverse_cdf(sampling):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -math.inf, 1.2])  # no ties: a cut is one set
    probs = _cut_probs(logits, sampling)
    n = 4000
    counts = torch.bincount(torch.tensor([choose(logits, sampling, u) for u in _spread(n)]), minlength=len(logits))
    assert torch.all((counts - n * probs).abs() <= 1.0 + 1e-6), (counts, n * probs)
    assert counts[probs == 0].sum() == 0  # nothing outside the cut, never the masked token


def test_top_p_keeps_the_smallest_set_reaching_it():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    drawn = {p: {choose(logits, Sampling(1.0, top_p=p), u) for u in _spread(500)} for p in (0.4, 0.5, 0.81, 0.99)}
    assert drawn == {0.4: {0}, 0.5: {0}, 0.81: {0, 1, 2}, 0.99: {0, 1, 2, 3}}


def test_draws_depend_on_seed_and_prefix_only():
    running = PrefixKeys()
    assert running.key([1, 2], [3]) == PrefixKeys().key([1, 2, 3], []) == running.key([1, 2, 3], [])
    assert running.key([1, 2, 3, 4], [5]) == PrefixKeys().key([1], [2, 3, 4, 5])
    keys = {PrefixKeys().key([1, 2], []), PrefixKeys().key([1, 2], [0]), PrefixKeys().key([2, 1], [])}
    assert len(keys) == 3
    key = PrefixKeys().key([5, 6], [])
    draws = [uniform(seed, key) for seed in range(1000)]
    assert all(0 <= u < 1 for u in draws) and len(set(draws)) == 1000
    assert uniform(7, key) == uniform(7, PrefixKeys().key([5], [6]))
    assert abs(sum(draws) / len(draws) - 0.5) < 0.05


def test_sampling_values_and_wire():
    assert (
        Sampling(0.7).temperature
        == Sampling(**{"temperature": worker_pb.Sampling(temperature=0.7).temperature}).temperature
    )
    assert GREEDY.greedy and not Sampling(0.1).greedy and Sampling(0.0, 0.5, 3, 9).greedy
    for bad, message in (
        (Sampling(-0.5), "temperature"),
        (Sampling(math.nan), "temperature"),
        (Sampling(math.inf), "temperature"),
        (Sampling(1.0, top_p=1.5), "top_p"),
        (Sampling(1.0, top_k=-1), "top_k"),
        (Sampling(1.0, seed=-1), "seed"),
    ):
        assert message in bad.check()
    assert Sampling(1.0, 1.0, 50, 2**64 - 1).check() is None
    options = NextTextOptions(("a",), 4, sampling=Sampling(0.8, 0.9, 40, 2**64 - 1))
    assert wire.options_from_request(wire.next_text_request("s", options)) == options
    plain = wire.next_text_request("s", NextTextOptions(("a",), 4))
    assert not plain.HasField("sampling") and wire.options_from_request(plain).sampling == GREEDY


def test_generate_request_sampling_is_checked():
    from coolfusion.orchestrator.wire import Limits, request_from_proto

    def convert(**fields):
        return request_from_proto(fusion_pb.GenerateRequest(prompt="Hi", **fields), Limits()).sampling

    for fields, message in (
        (dict(temperature=-1), "temperature"),
        (dict(temperature=1, top_p=1.5), "top_p"),
        (dict(temperature=1, top_p=-0.1), "top_p"),
        (dict(temperature=1, top_k=-1), "top_k"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            convert(**fields)
    assert convert() == GREEDY and convert(temperature=0, top_k=5, seed=3) == GREEDY
    assert convert(temperature=0.5, top_p=0.9, top_k=7, seed=11) == Sampling(0.5, 0.9, 7, 11)
    drawn = {convert(temperature=1).seed for _ in range(8)}
    assert len(drawn) > 1 and all(0 <= s < 2**53 for s in drawn)


# ---- a real model's first token -------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(bundled_models, tokenizer_registry):
    b = bundled_models["smollm2"]
    return WorkerCore(
        "smollm2",
        b.spec,
        device="cpu",
        boundary=tokenizer_registry.common_boundary,
        model=b.model,
        hf_tokenizer=b.hf_tokenizer,
    )


def _first_logits(core: WorkerCore, prompt: str) -> tuple[list[int], torch.Tensor]:
    ids = list(core.tokenizer.hf(prompt)["input_ids"])
    with torch.inference_mode():
        return ids, core.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()


def _chi_square(drawn: list[int], probs: torch.Tensor) -> float:
    """p-value of the draws against ``probs``: a bin per token expected at least 5 times, the rest
    in one "other" bin."""
    n = len(drawn)
    top = [int(t) for t in torch.nonzero(probs * n >= 5).flatten()]
    expected = [float(probs[t]) * n for t in top]
    observed = [drawn.count(t) for t in top]
    other = (n - sum(observed), n - sum(expected))
    if other[1] >= 5:
        observed.append(other[0])
        expected.append(other[1])
    else:  # too rare for a bin of its own (top-k / top-p cut the rest): with the least likely bin
        observed[-1] += other[0]
        expected[-1] += other[1]
    return float(chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.8, top_p=0.6), Sampling(1.3, top_k=5)], ids=str)
def test_first_token_follows_the_softmax(smollm2, sampling):
    """Over a fixed list of seeds, the first token drawn after a prompt where the model hesitates
    follows its (tempered, cut) softmax, and never falls outside the top-k / nucleus."""
    ids, logits = _first_logits(smollm2, UNCERTAIN_PROMPT)
    softmax = torch.softmax(logits.double(), -1)
    assert softmax.max() < 0.5 and int((softmax > 0.01).sum()) >= 5  # the model does hesitate here
    probs = _cut_probs(logits, sampling)
    key = PrefixKeys().key(ids, [])
    cdf = cumulative(logits, sampling)  # what ``choose`` computes for every draw (the seed aside)
    drawn = [token_at(cdf, uniform(seed, key)) for seed in SEEDS]
    assert all(probs[t] > 0 for t in drawn)  # nothing outside the top-k / nucleus
    likely = {int(t) for t in torch.nonzero(probs * len(SEEDS) >= 20).flatten()}
    assert len(likely) >= 3 and likely <= set(drawn)
    assert _chi_square(drawn, probs) > ALPHA


def test_next_text_draws_the_sampler_token(smollm2):
    """A real NextText's first token is the sampler's draw for that seed and prompt."""
    ids, logits = _first_logits(smollm2, UNCERTAIN_PROMPT)
    key = PrefixKeys().key(ids, [])
    got, want = [], []
    for seed in range(6):
        sampling = Sampling(1.0, seed=seed)
        sid = smollm2.open(UNCERTAIN_PROMPT).session_id
        try:
            got.append(smollm2.next_text(sid, NextTextOptions(max_tokens=1, sampling=sampling)).token_ids[0])
        finally:
            smollm2.close(sid)
        want.append(choose(logits, sampling, uniform(seed, key)))
    assert got == want and len(set(got)) > 1


# ---- sampled segments == a reference sampling loop -------------------------------------------
N = 24
PROMPT = "Question: Anna has 4 red apples and 3 green apples. How many apples does she have?\nAnswer:"


def _reference(core: WorkerCore, prompt: str, sampling: Sampling, n: int) -> list[int]:
    """Sampling without any of the worker's machinery: a full forward per token, the same draws."""
    ids = list(core.tokenizer.hf(prompt)["input_ids"])
    keys, out = PrefixKeys(), []
    with torch.inference_mode():
        while len(out) < n and not (out and out[-1] in core.eos_token_ids):
            logits = core.model(input_ids=torch.tensor([ids + out]), logits_to_keep=1).logits[0, -1].float()
            out.append(choose(logits, sampling, uniform(sampling.seed, keys.key(ids, out))))
    return out


def _segments(
    core: WorkerCore, sampling: Sampling, n: int, drafts=None, **options
) -> tuple[list[int], list[str], list]:
    sid = core.open(PROMPT).session_id
    ids, texts, results = [], [], []
    try:
        while len(ids) < n:
            draft = drafts(len(texts)) if drafts else ""
            r = core.next_text(
                sid, NextTextOptions(max_tokens=n - len(ids), draft_text=draft, sampling=sampling, **options)
            )
            core.update_state(sid, r.state_id)
            ids += r.token_ids
            texts.append(r.text)
            results.append(r)
            if r.eos or r.finish != "boundary":
                break
    finally:
        core.close(sid)
    return ids, texts, results


def _check_sampled_segments(core: WorkerCore) -> None:
    sampling = Sampling(0.9, top_p=0.95, seed=20261202)
    plain, texts, _ = _segments(core, sampling, N)
    assert plain == _reference(core, PROMPT, sampling, len(plain))
    assert plain != _segments(core, Sampling(0.9, top_p=0.95, seed=1), N)[0]
    # Speculation, lookup and replay cannot move a draw: same tokens with each of them.
    ids, _, results = _segments(core, sampling, N, drafts=lambda k: "".join(texts[k:]))
    verified, forwards = sum(r.verified_tokens for r in results), sum(r.verify_forwards for r in results)
    assert ids == plain and verified > 0 and forwards > 0
    assert _segments(core, sampling, N, lookup_tokens=2)[0] == plain
    assert _segments(core, sampling, N, reuse_lookahead=False)[0] == plain
    # top_k 1 is the argmax: the greedy tokens.
    assert _segments(core, Sampling(1.0, top_k=1, seed=5), N)[0] == _segments(core, GREEDY, N)[0]


def test_sampled_segments_are_the_reference_samples(smollm2):
    _check_sampled_segments(smollm2)


@pytest.fixture(scope="module")
def tiny(tokenizer_registry):
    """A small random Llama over SmolLM2's tokenizer (no weights to load): its distributions are
    nearly flat over tens of thousands of tokens, the hardest case for reproducible draws."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = tokenizer_registry.get("smollm2").hf
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=hf.eos_token_id,
    )
    spec = next(s for s in parse_specs("smollm2"))
    model = LlamaForCausalLM(config).eval()
    return WorkerCore(
        "smollm2", spec, device="cpu", boundary=tokenizer_registry.common_boundary, model=model, hf_tokenizer=hf
    )


def test_tiny_model_sampled_segments_are_the_reference_samples(tiny):
    _check_sampled_segments(tiny)


def test_concurrent_sessions_draw_what_they_draw_alone(tiny):
    """Sessions generating at once share batched forwards; each draws the tokens it draws alone
    (same seed twice included), next to a greedy one."""
    from concurrent.futures import ThreadPoolExecutor

    samplings = [
        Sampling(1.0, seed=1),
        Sampling(1.0, seed=2),
        Sampling(1.0, seed=1),
        Sampling(0.7, top_k=50, seed=9),
        GREEDY,
    ]
    alone = [_segments(tiny, s, N, lookup_tokens=2)[0] for s in samplings]
    assert alone[0] == alone[2] and alone[0] != alone[1]
    before = tiny.batcher.stats.steps - tiny.batcher.stats.sizes.get(1, 0)
    with ThreadPoolExecutor(len(samplings)) as pool:
        together = list(pool.map(lambda s: _segments(tiny, s, N, lookup_tokens=2)[0], samplings))
    assert tiny.batcher.stats.steps - tiny.batcher.stats.sizes.get(1, 0) > before
    assert together == alone


def test_bad_sampling_is_invalid_argument(smollm2):
    sid = smollm2.open(PROMPT).session_id
    try:
        for bad in (Sampling(-1.0), Sampling(1.0, top_p=2.0), Sampling(1.0, top_k=-3)):
            with pytest.raises(InvalidArgument):
                smollm2.next_text(sid, NextTextOptions(sampling=bad))
    finally:
        smollm2.close(sid)
