"""Every scoring rule against its formula written out here, not through ``ScoreRule``.

``FORMULAS`` holds one function per rule of ``orchestrator/rules.py``, keyed by the rule's name.
Each takes the candidates' per-model scores ``[{model: (sum of log-probs, tokens)}]`` (models in
request order) and the rule's parameters, and returns ``(keys, loglikelihoods)``: the winner is
the first candidate with the largest key, and the log-likelihoods are what the ``Score`` RPC
reports. A rule added to ``RULES`` without a formula here fails
``test_every_registered_rule_has_a_formula``: whoever adds a rule adds its formula to
``FORMULAS``, from its definition in the ``rules.py`` docstring, without calling ``rules.py``.

The fast tests compare ``ScoreRule`` with the formulas on hypothesis-drawn tables; the slow one
sends every rule, weighted ones and the shipped default (``orchestrator/default_rule.json``, read
here as plain JSON) to the real ``Score`` RPC and checks its per-model log-probs against a plain
forward of each model, then its choice and fused log-likelihoods against the formula applied to
those plain-forward numbers.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coolfusion.orchestrator.rules import RULES, ScoreRule

DEFAULT_RULE_JSON = Path(__file__).resolve().parents[1] / "orchestrator" / "default_rule.json"
INF = math.inf


# ---- the formulas ------------------------------------------------------------------------------
def _weights(models, weights) -> list[float]:
    raw = [float(weights.get(m, 1.0)) for m in models]
    return [x / sum(raw) for x in raw]


def _valid(c, models) -> bool:
    return all(c[m][1] > 0 and math.isfinite(c[m][0]) for m in models)


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    if top == -INF:
        return [1 / len(xs)] * len(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -INF


def _summed(table, m) -> list[float]:
    """lp_m of every candidate; -inf for one some model cannot score."""
    models = list(table[0])
    return [c[m][0] if _valid(c, models) else -INF for c in table]


def _per_token_scaled(table, m) -> list[float]:
    """t_m = lp_m * (mean tokens of m over the scorable candidates) / n_m."""
    models = list(table[0])
    counts = [c[m][1] for c in table if _valid(c, models)]
    mean = sum(counts) / len(counts)
    return [c[m][0] * mean / c[m][1] if _valid(c, models) else -INF for c in table]


def mean_ppl(table, weights, **_):
    models = list(table[0])
    w = _weights(models, weights)
    keys, ll = [], []
    for c in table:
        if not _valid(c, models):
            keys.append(-INF)
            ll.append(-INF)
            continue
        mix = sum(wv * math.exp(-c[m][0] / c[m][1]) for wv, m in zip(w, models))  # sum_v w_v PPL_v
        keys.append(-mix)  # paper eq. 3: the lowest weighted mean perplexity
        ll.append(-sum(c[m][1] for m in models) / len(models) * math.log(mix))
    return keys, ll


def mean_nll(table, weights, **_):
    models = list(table[0])
    w = _weights(models, weights)
    keys = [sum(wv * c[m][0] / c[m][1] for wv, m in zip(w, models)) if _valid(c, models) else -INF for c in table]
    n_bar = [sum(c[m][1] for m in models) / len(models) for c in table]
    return keys, [n * k if k > -INF else -INF for n, k in zip(n_bar, keys)]


def product(table, weights, **_):
    models = list(table[0])
    w = _weights(models, weights)
    ll = [sum(wv * c[m][0] for wv, m in zip(w, models)) if _valid(c, models) else -INF for c in table]
    return ll, ll


def _mixture(table, weights, posterior):
    models = list(table[0])
    if not any(_valid(c, models) for c in table):
        return [-INF] * len(table), [-INF] * len(table)
    w = _weights(models, weights)
    q = {m: posterior(table, m) for m in models}
    ll = [_log(sum(wv * q[m][i] for wv, m in zip(w, models))) for i in range(len(table))]
    return ll, ll


def calibrated(table, weights, **_):
    return _mixture(table, weights, lambda t, m: _softmax(_summed(t, m)))


def calibrated_token(table, weights, **_):
    return _mixture(table, weights, lambda t, m: _softmax(_per_token_scaled(t, m)))


def hedged(table, weights, **_):
    def q(t, m):
        return [(a + b) / 2 for a, b in zip(_softmax(_summed(t, m)), _softmax(_per_token_scaled(t, m)))]

    return _mixture(table, weights, q)


def gated(table, weights, primary="", threshold=0.5, **_):
    models = list(table[0])
    if not any(_valid(c, models) for c in table):
        return [-INF] * len(table), [-INF] * len(table)
    q = _softmax(_summed(table, primary or models[0]))  # "" trusts the first model
    if max(q) >= threshold:
        ll = [_log(p) for p in q]
        return ll, ll
    return product(table, weights)


FORMULAS = {
    "mean-ppl": mean_ppl,
    "mean-nll": mean_nll,
    "product": product,
    "calibrated": calibrated,
    "calibrated-token": calibrated_token,
    "hedged": hedged,
    "gated": gated,
}


def apply(params: dict, table) -> tuple[int, list[float], bool]:
    """(winner, log-likelihoods, decided) of a rule given as its JSON form on ``table``; decided:
    the winner's key leads every other by more than float noise in the scores could move it."""
    keys, ll = FORMULAS[params.get("rule", "mean-ppl")](
        table,
        params.get("weights") or {},
        primary=params.get("primary", ""),
        threshold=float(params.get("threshold", 0.5)),
    )
    best = max(range(len(keys)), key=lambda i: (keys[i], -i))
    rest = [k for i, k in enumerate(keys) if i != best]
    decided = not rest or keys[best] - max(rest) > 1e-3 * max(1.0, abs(keys[best]))
    return best, ll, decided


# ---- fast: ScoreRule against the formulas --------------------------------------------------------
def test_every_registered_rule_has_a_formula():
    assert set(FORMULAS) == set(RULES), "add the new rule's formula to FORMULAS (see the module docstring)"


def _table(n_models: int, n_candidates: int, seed: int) -> list[dict]:
    """2 or 3 models, 2 to 6 candidates, about one in eight scores unscorable (no tokens). Drawn
    from a seeded generator: hypothesis' own small values would give most candidates the same
    token counts, where per-token and summed rules agree."""
    rng = random.Random(seed)
    models = rng.sample("abc", n_models)

    def score():
        return (0.0, 0) if rng.random() < 0.125 else (-rng.uniform(0.01, 40), rng.randint(1, 9))

    return [{m: score() for m in models} for _ in range(n_candidates)]


def _tables():
    return st.builds(_table, st.integers(2, 3), st.integers(2, 6), st.integers(0, 2**32))


@settings(max_examples=60, deadline=None, database=None)
@given(
    table=_tables(),
    weights=st.fixed_dictionaries({m: st.sampled_from([0.5, 1.0, 2.0, 3.0]) for m in "abc"}),
    primary=st.sampled_from(["", "a", "b", "c"]),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]),
)
def test_each_rule_equals_its_formula(table, weights, primary, threshold):
    """Every registered rule, plain and weighted, on the same drawn table."""
    models = list(table[0])
    weights = {m: w for m, w in weights.items() if m in models}
    primary = primary if primary in models else ""
    for name in RULES:
        for rule in (ScoreRule(name, {}, primary, threshold), ScoreRule(name, weights, primary, threshold)):
            params = {"rule": name, "weights": dict(rule.weights), "primary": primary, "threshold": threshold}
            best, ll, decided = apply(params, table)
            got = rule.loglikelihood(table)
            expected = [pytest.approx(x, rel=1e-9, abs=1e-12) if math.isfinite(x) else str(x) for x in ll]
            assert [x if math.isfinite(x) else str(x) for x in got] == expected, params
            if decided:
                assert rule.choose(table) == best, params


def test_the_shipped_default_is_a_registered_rule_with_a_formula():
    params = json.loads(DEFAULT_RULE_JSON.read_text())
    assert params["rule"] in FORMULAS
    from coolfusion.orchestrator.rules import default_rule

    assert default_rule() == ScoreRule.from_dict(params)


# ---- slow: the Score RPC against plain forwards ---------------------------------------------------
PROMPT = "Question: Which of these is a mammal?\nAnswer:"
TEXTS = [" A dolphin", " The shark that lives in the deep ocean", " trout", " A small green frog."]
MODELS = ["smollm2", "gemma3"]


def _configs() -> list[dict]:
    """Every rule plain, weighted on each side, gated trusting each model and falling back, and
    the shipped default (sent as no rule at all: the service's own)."""
    out = [{"rule": name} for name in RULES]
    out += [{"rule": name, "weights": {"gemma3": 3.0}} for name in RULES if name != "gated"]
    out += [{"rule": "mean-nll", "weights": {"smollm2": 2.5}}, {"rule": "calibrated", "weights": {"smollm2": 2.5}}]
    out += [
        {"rule": "gated", "primary": "gemma3", "threshold": 0.0},
        {"rule": "gated", "primary": "smollm2", "threshold": 1.0, "weights": {"gemma3": 3.0}},  # falls back
    ]
    return out + [{"default": True}]


def plain_table(cores) -> list[dict]:
    """Each text's (sum of log-probs, tokens) for each model from one plain forward of prompt + text."""
    from test_fusion import reference_score

    table: list[dict] = [{} for _ in TEXTS]
    for name in MODELS:
        context = cores[name].tokenizer.hf(PROMPT)["input_ids"]
        for row, text in zip(table, TEXTS):
            _, tokens, logprob = reference_score(cores[name], context, text)
            row[name] = (logprob, tokens)
    return table


async def test_score_rpc_every_rule_against_plain_forwards(cluster):
    from coolfusion.clients.client import FusionClient

    table = await asyncio.to_thread(plain_table, cluster.cores)
    shipped = json.loads(DEFAULT_RULE_JSON.read_text())
    winners = {}
    async with FusionClient(cluster.address) as client:
        for config in _configs():
            params = shipped if config.get("default") else config
            rule = None if config.get("default") else ScoreRule.from_dict(config)
            reply = await client.score(PROMPT, TEXTS, models=MODELS, score_rule=rule)
            got = [{p.scorer: (p.logprob, p.tokens) for p in s.ppl} for s in reply.scores]
            for row, ref in zip(got, table):
                for m in MODELS:
                    assert row[m][1] == ref[m][1] and row[m][0] == pytest.approx(ref[m][0], rel=1e-3), (m, row, ref)
            best, ll, decided = await asyncio.to_thread(apply, params, table)
            label = json.dumps(config)
            assert [s.loglikelihood for s in reply.scores] == pytest.approx(ll, rel=2e-3, abs=2e-3), label
            assert decided, (label, ll)  # the texts leave no near tie that float noise could flip
            assert [s.chosen for s in reply.scores] == [i == best for i in range(len(TEXTS))], label
            winners[label] = best
    # The texts split the rules: some pick another text than others.
    assert len(set(winners.values())) >= 2, winners
