"""Scoring rules (orchestrator/rules.py) against hand-computed values; no model loaded."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from coolfusion.orchestrator.rules import RULES, RuleError, ScoreRule

# Two candidates scored by two models: model -> (sum of log-probs, tokens).
CANDS = [{"a": (-2.0, 2), "b": (-6.0, 3)}, {"a": (-1.0, 1), "b": (-9.0, 3)}]


def test_mean_ppl_is_eq3_and_chooses_the_lowest_mean():
    rule = ScoreRule("mean-ppl")
    means = [(math.exp(1.0) + math.exp(2.0)) / 2, (math.exp(1.0) + math.exp(3.0)) / 2]
    assert rule.choose(CANDS) == min(range(len(means)), key=means.__getitem__) == 0
    ll = rule.loglikelihood(CANDS)
    assert ll[0] == pytest.approx(-2.5 * math.log(means[0]))
    assert ll[1] == pytest.approx(-2.0 * math.log(means[1]))


def test_mean_ppl_follows_the_lower_mean_even_against_the_summed_log_probs():
    # Candidate 1: short and likely for "a", so the summed log-prob prefers it; the mean PPL does not.
    cands = [{"a": (-3.0, 3), "b": (-3.0, 3)}, {"a": (-0.5, 1), "b": (-4.0, 1)}]
    assert ScoreRule("mean-ppl").choose(cands) == 0
    assert ScoreRule("product").choose(cands) == 1


def test_mean_nll_product_and_weights():
    assert ScoreRule("mean-nll").loglikelihood(CANDS) == pytest.approx([2.5 * (-1 - 2) / 2, 2.0 * (-1 - 3) / 2])
    assert ScoreRule("product").loglikelihood(CANDS) == pytest.approx([-4.0, -5.0])
    weighted = ScoreRule("product", weights={"b": 3.0})
    assert weighted.loglikelihood(CANDS) == pytest.approx([(-2 - 18) / 4, (-1 - 27) / 4])
    # Weight only on "a": its shorter candidate wins.
    assert ScoreRule("product", weights={"b": 0.0}).choose(CANDS) == 1


def test_calibrated_mixes_each_models_posterior_over_the_candidates():
    qa = [math.exp(-2) / (math.exp(-2) + math.exp(-1)), math.exp(-1) / (math.exp(-2) + math.exp(-1))]
    qb = [math.exp(-6) / (math.exp(-6) + math.exp(-9)), math.exp(-9) / (math.exp(-6) + math.exp(-9))]
    expected = [math.log((x + y) / 2) for x, y in zip(qa, qb)]
    assert ScoreRule("calibrated").loglikelihood(CANDS) == pytest.approx(expected)
    assert ScoreRule("calibrated").choose(CANDS) == 0


def test_gated_trusts_a_confident_primary_and_falls_back_to_product():
    # "a" prefers candidate 1 with posterior 0.73: trusted at threshold 0.7, not at 0.8.
    assert ScoreRule("gated", primary="a", threshold=0.7).choose(CANDS) == 1
    assert ScoreRule("gated", primary="a", threshold=0.8).choose(CANDS) == 0  # product's choice
    assert ScoreRule("gated", primary="b", threshold=0.9).choose(CANDS) == 0


def test_a_candidate_without_tokens_never_wins():
    cands = [{"a": (0.0, 0), "b": (-1.0, 1)}, {"a": (-5.0, 2), "b": (-5.0, 2)}]
    for name in RULES:
        rule = ScoreRule(name)
        assert rule.choose(cands) == 1, name
        assert rule.loglikelihood(cands)[0] == -math.inf, name


def test_one_model_reduces_to_its_own_log_likelihood():
    cands = [{"a": (-2.0, 2)}, {"a": (-1.5, 1)}]
    for name in ("mean-ppl", "mean-nll", "product"):
        assert ScoreRule(name).loglikelihood(cands) == pytest.approx([-2.0, -1.5]), name


def test_parse_files_and_bad_input(tmp_path):
    assert ScoreRule.parse("product", "a=2,b=1").weights == {"a": 2.0, "b": 1.0}
    path = tmp_path / "rule.json"
    path.write_text(json.dumps({"rule": "gated", "primary": "a", "threshold": 0.6, "weights": {"b": 2}}))
    rule = ScoreRule.parse(str(path))
    assert (rule.name, rule.primary, rule.threshold, dict(rule.weights)) == ("gated", "a", 0.6, {"b": 2.0})
    assert rule.label() == "gated(a@0.6,b=2)"
    assert ScoreRule.from_dict(rule.to_dict()) == rule
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RuleError, match="does not parse"):
        ScoreRule.parse(str(tmp_path / "bad.json"))
    with pytest.raises(RuleError, match="unknown score rule 'nope'"):
        ScoreRule.parse("nope")
    with pytest.raises(RuleError, match="model=number"):
        ScoreRule.parse("product", "a2")
    with pytest.raises(RuleError, match="finite and >= 0"):
        ScoreRule("product", weights={"a": -1.0})
    with pytest.raises(RuleError, match="not in this request"):
        ScoreRule("product", weights={"c": 2.0}).check_models(["a", "b"])
    assert ScoreRule("product", weights={"c": 2.0, "a": 3.0}).restricted(["a", "b"]).weights == {"a": 3.0}


def _softmax(xs):
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


# Three candidates of different lengths: "a" prefers the short one by its summed log-prob but the
# long one per token; "b" mildly prefers the middle one.
LENGTHS = [{"a": (-2.0, 1), "b": (-4.0, 2)}, {"a": (-3.0, 2), "b": (-3.5, 2)}, {"a": (-3.6, 4), "b": (-5.0, 3)}]


def _per_token_posterior(model):
    mean_tokens = sum(c[model][1] for c in LENGTHS) / len(LENGTHS)
    return _softmax([c[model][0] * mean_tokens / c[model][1] for c in LENGTHS])


def test_calibrated_token_mixes_per_token_posteriors():
    # t_v = lp_v * m_v / n_v with m_v the model's mean token count over the candidates.
    qa, qb = _per_token_posterior("a"), _per_token_posterior("b")
    expected = [math.log((2 * x + y) / 3) for x, y in zip(qa, qb)]
    rule = ScoreRule("calibrated-token", weights={"a": 2.0})
    assert rule.loglikelihood(LENGTHS) == pytest.approx(expected)
    assert rule.choose(LENGTHS) == max(range(3), key=lambda i: expected[i]) == 2
    assert ScoreRule("calibrated", weights={"a": 2.0}).choose(LENGTHS) == 0  # the summed log-probs: the short one


def test_hedged_averages_the_summed_and_per_token_posteriors():
    q = {m: [(s + t) / 2 for s, t in zip(_softmax([c[m][0] for c in LENGTHS]), _per_token_posterior(m))] for m in "ab"}
    expected = [math.log((x + 3 * y) / 4) for x, y in zip(q["a"], q["b"])]
    rule = ScoreRule("hedged", weights={"b": 3.0})
    assert rule.loglikelihood(LENGTHS) == pytest.approx(expected)
    assert rule.choose(LENGTHS) == max(range(3), key=lambda i: expected[i])
    # Each mixture is a distribution over the candidates.
    assert sum(math.exp(v) for v in rule.loglikelihood(LENGTHS)) == pytest.approx(1.0)


def test_per_token_posteriors_skip_unscorable_candidates_in_the_mean_length():
    cands = [*LENGTHS, {"a": (0.0, 0), "b": (-1.0, 1)}]
    for name in ("calibrated-token", "hedged"):
        ll = ScoreRule(name).loglikelihood(cands)
        assert ll[:3] == pytest.approx(ScoreRule(name).loglikelihood(LENGTHS)) and ll[3] == -math.inf, name


@pytest.mark.parametrize(
    "rule",
    [
        ScoreRule("hedged", {"gemma3": 2.0}),
        ScoreRule("calibrated-token", {"gemma3": 1.5, "smollm2": 0.5}),
        ScoreRule("gated", {"b": 2.0}, primary="a", threshold=0.6),
        ScoreRule("gated"),
        ScoreRule("mean-ppl"),
    ],
    ids=lambda r: r.label(),
)
def test_a_label_parses_back_to_its_rule(rule):
    assert ScoreRule.parse(rule.label()) == rule


def test_bad_labels():
    with pytest.raises(RuleError, match="unknown score rule 'nope'"):
        ScoreRule.parse("nope(a=1)")
    with pytest.raises(RuleError, match="model=number"):
        ScoreRule.parse("hedged(a)")
    with pytest.raises(RuleError, match="threshold must be a number"):
        ScoreRule.parse("gated(a@x)")


# ---- every rule's choice apart from every other's --------------------------------------------------
# Tables where the rules pick differently: a rule swapped for another, or ignoring its weights, picks
# another candidate here. Each choice is the argmax of the formula in tests/test_rule_oracles.py.
APART = [
    {"a": (-2.0, 3), "b": (-26.0, 5)},
    {"a": (-3.0, 8), "b": (-28.0, 8)},
    {"a": (-14.0, 7), "b": (-26.0, 8)},
    {"a": (-19.0, 3), "b": (-5.0, 7)},
    {"a": (-3.0, 5), "b": (-18.0, 4)},
    {"a": (-17.0, 2), "b": (-4.0, 2)},
]
WEIGHTED = [
    {"a": (-13.0, 3), "b": (-27.0, 8)},
    {"a": (-27.0, 3), "b": (-24.0, 7)},
    {"a": (-30.0, 7), "b": (-12.0, 3)},
    {"a": (-25.0, 8), "b": (-24.0, 6)},
]
# rule -> (choice on APART, on WEIGHTED, on WEIGHTED with b weighted 3)
PICKS = {
    "mean-ppl": (2, 3, 0),
    "mean-nll": (1, 3, 0),
    "product": (4, 0, 2),
    "calibrated": (5, 0, 2),
    "calibrated-token": (3, 3, 0),
    "hedged": (3, 0, 2),
    "gated": (0, 0, 0),  # "a" (the first model) is confident on both tables
}


@pytest.mark.parametrize("name", RULES)
def test_each_rule_picks_its_own_candidate(name):
    assert PICKS[name] == (
        ScoreRule(name).choose(APART),
        ScoreRule(name).choose(WEIGHTED),
        ScoreRule(name, weights={"b": 3.0}).choose(WEIGHTED),
    )


def test_the_tables_tell_every_pair_of_rules_apart():
    assert set(PICKS) == set(RULES)
    for one, other in itertools.combinations(RULES, 2):
        if one == "gated" or other == "gated":  # gated's weights only reach its fallback
            assert PICKS[one][:2] != PICKS[other][:2], (one, other)
        else:
            assert PICKS[one] != PICKS[other], (one, other)
    # Weights move every rule but gated (its gate holds here) to another candidate on WEIGHTED.
    assert all(PICKS[n][1] != PICKS[n][2] for n in RULES if n != "gated")


def test_mean_nll_chooses_per_token_not_by_its_length_scaled_log_likelihood():
    ll = ScoreRule("mean-nll").loglikelihood(APART)
    assert max(range(len(ll)), key=ll.__getitem__) == 5 != ScoreRule("mean-nll").choose(APART) == 1


def test_gated_values_and_default_primary():
    # The gate holds: ln q_a(c), q_a = softmax of a's summed log-probs, not q - 1.
    qa = [math.exp(-2) / (math.exp(-2) + math.exp(-1)), math.exp(-1) / (math.exp(-2) + math.exp(-1))]
    assert ScoreRule("gated", primary="a", threshold=0.7).loglikelihood(CANDS) == pytest.approx(
        [math.log(qa[0]), math.log(qa[1])]
    )
    assert ScoreRule("gated", primary="a").loglikelihood(CANDS) == pytest.approx([-1.3132617, -0.3132617])
    # The gate fails (threshold 0.8 > 0.73): product's values, weights included.
    weighted = ScoreRule("gated", weights={"b": 3.0}, primary="a", threshold=0.8)
    assert weighted.loglikelihood(CANDS) == pytest.approx([(-2 - 18) / 4, (-1 - 27) / 4])
    # No primary: the first model's confident choice (candidate 0 on APART), not the last's (5).
    default = ScoreRule("gated")
    assert (default.primary, default.threshold) == ("", 0.5)
    assert default.choose(APART) == ScoreRule("gated", primary="a").choose(APART) == 0
    assert ScoreRule("gated", primary="b").choose(APART) == 5
    assert default.loglikelihood(APART) == pytest.approx(ScoreRule("gated", primary="a").loglikelihood(APART))
    top = -2 - math.log(sum(math.exp(x) for x in (-2, -3, -14, -19, -3, -17)))
    assert default.loglikelihood(APART)[0] == pytest.approx(top)


def test_weights_move_the_weighted_rules_values():
    for name in ("mean-nll", "calibrated", "calibrated-token", "hedged", "mean-ppl", "product"):
        plain, weighted = ScoreRule(name).loglikelihood(WEIGHTED), ScoreRule(name, {"b": 3.0}).loglikelihood(WEIGHTED)
        assert max(abs(p - w) for p, w in zip(plain, weighted)) > 0.1, name
