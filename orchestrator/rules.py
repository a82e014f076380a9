"""Scoring rules: how the models' scores of a set of candidates pick one (paper 2.3, and others).

Every model v scores every candidate c with its own tokenizer: ``lp_v(c)``, the sum of its
log-probabilities (nats) over its ``n_v(c)`` tokens of c. A rule turns those into

- ``choose``: the index of the winning candidate (what the fusion loop commits), and
- ``loglikelihood``: one fused log-likelihood per candidate (nats, summed over the candidate like
  a model's own), which is what the ``Score`` RPC and the lm-eval model report, so that lm-eval's
  ``acc`` (argmax) and ``acc_norm`` (argmax per character) mean what they say.

Weights ``w_v`` (default 1 each) are normalised to sum to 1; ``n̄`` is the mean of ``n_v``.

| rule | choose | log-likelihood |
|---|---|---|
| ``mean-ppl`` | argmin sum_v w_v PPL_v (paper eq. 3, PPL_v = exp(-lp_v / n_v)) | -n̄ ln(sum_v w_v PPL_v) |
| ``mean-nll`` | argmax sum_v w_v lp_v / n_v (geometric mean of PPL) | n̄ sum_v w_v lp_v / n_v |
| ``product`` | argmax sum_v w_v lp_v (product of experts) | sum_v w_v lp_v |
| ``calibrated`` | argmax sum_v w_v q_v(c), q_v = softmax over the candidates of lp_v | ln sum_v w_v q_v(c) |
| ``calibrated-token`` | as ``calibrated`` with q_v = softmax of t_v = lp_v * m_v / n_v | ln sum_v w_v q_v(c) |
| ``hedged`` | as ``calibrated`` with q_v = (softmax(lp_v) + softmax(t_v)) / 2 | ln sum_v w_v q_v(c) |
| ``gated`` | the primary's argmax when max_c q_p(c) >= threshold, else ``product`` | ln q_p(c) when the gate holds, else ``product``'s |

``m_v`` is model v's mean token count over the (scorable) candidates: ``t_v`` is v's per-token
log-likelihood scaled back to a typical candidate's length, so its softmax is as sharp as
``calibrated``'s but does not favour the candidates with fewer tokens. ``hedged`` trusts each model's
summed and per-token preferences equally.

The set-relative rules (``calibrated``, ``calibrated-token``, ``hedged``, ``gated``) compare the
candidates with each other, so their values depend on the whole candidate set (a ``Score`` request's texts; a question's choices in lm-eval).
A candidate some model could not score (no tokens) never wins and has log-likelihood -inf.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..services.common.config import comma_list

RULES = ("mean-ppl", "mean-nll", "product", "calibrated", "calibrated-token", "hedged", "gated")
SET_RELATIVE = ("calibrated", "calibrated-token", "hedged", "gated")
DEFAULT_THRESHOLD = 0.5


class RuleError(ValueError):
    """A rule that cannot be built or applied (unknown name, weights, file); one line."""


# model -> (sum of log-probabilities, tokens) of one candidate
ModelScores = Mapping[str, tuple[float, int]]


@dataclass(frozen=True)
class ScoreRule:
    name: str = "mean-ppl"
    weights: Mapping[str, float] = field(default_factory=dict)  # model -> weight; missing: 1
    primary: str = ""  # gated: the model whose confident choice is taken ("" = the first model)
    threshold: float = DEFAULT_THRESHOLD  # gated: the primary's smallest posterior to be trusted

    def __post_init__(self):
        if self.name not in RULES:
            raise RuleError(f"unknown score rule {self.name!r}; rules: {', '.join(RULES)}")
        bad = {m: w for m, w in self.weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise RuleError(f"rule weights must be finite and >= 0, got {bad}")
        if not 0.0 <= self.threshold <= 1.0:
            raise RuleError(f"gated threshold must be in 0..1, got {self.threshold}")

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping) -> ScoreRule:
        """``{"rule": NAME, "weights": {model: w}, "primary": MODEL, "threshold": T}``."""
        if not isinstance(data, Mapping):
            raise RuleError("a rule file holds one JSON object")
        unknown = set(data) - {"rule", "weights", "primary", "threshold", "fitted"}
        if unknown:
            raise RuleError(f"unknown key(s) in rule: {', '.join(sorted(unknown))}")
        weights = data.get("weights") or {}
        if not isinstance(weights, Mapping) or not all(isinstance(v, (int, float)) for v in weights.values()):
            raise RuleError("rule weights must be an object of model -> number")
        try:
            threshold = float(data.get("threshold", DEFAULT_THRESHOLD))
        except (TypeError, ValueError):
            raise RuleError(f"gated threshold must be a number, got {data.get('threshold')!r}") from None
        return cls(
            name=str(data.get("rule", "mean-ppl")),
            weights={str(k): float(v) for k, v in weights.items()},
            primary=str(data.get("primary", "")),
            threshold=threshold,
        )

    @classmethod
    def load(cls, path: str | Path) -> ScoreRule:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise RuleError(f"cannot read rule file {path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise RuleError(f"rule file {path} does not parse: {exc.msg} at line {exc.lineno}") from None
        return cls.from_dict(data)

    @classmethod
    def parse(cls, name: str = "", weights: str = "", primary: str = "", threshold: float | None = None) -> ScoreRule:
        """CLI form: a rule name, a label (``hedged(gemma3=2)``, ``gated(gemma3@0.6)``) or a rule
        JSON file; weights as ``m1=2,m2=1`` or a JSON file."""
        if name.endswith(".json"):
            base = cls.load(name)
        elif name.endswith(")") and "(" in name:
            base = cls.from_label(name)
        else:
            base = cls(name=name or "mean-ppl")
        w = dict(base.weights)
        if weights:
            w = dict(cls.load(weights).weights) if weights.endswith(".json") else _parse_weights(weights)
        return cls(
            name=base.name,
            weights=w,
            primary=primary or base.primary,
            threshold=base.threshold if threshold is None else threshold,
        )

    @classmethod
    def from_label(cls, label: str) -> ScoreRule:
        """The inverse of ``label``: ``name(model=w,...)``, a gated rule's ``primary@threshold`` first."""
        name, _, inner = label[:-1].partition("(")
        primary, threshold, parts = "", None, comma_list(inner)
        if parts and "@" in parts[0]:
            primary, _, value = parts.pop(0).partition("@")
            try:
                threshold = float(value)
            except ValueError:
                raise RuleError(f"gated threshold must be a number, got {value!r}") from None
            primary = "" if primary == "first" else primary
        weights = _parse_weights(",".join(parts)) if parts else {}
        return cls(name.strip(), weights, primary, DEFAULT_THRESHOLD if threshold is None else threshold)

    def to_dict(self) -> dict:
        out: dict = {"rule": self.name}
        if self.weights:
            out["weights"] = dict(self.weights)
        if self.name == "gated":
            out["primary"], out["threshold"] = self.primary, self.threshold
        return out

    def label(self) -> str:
        """Short name for tables: ``product(gemma3=2)``, ``gated(gemma3@0.6)``."""
        parts = [f"{m}={_num(w)}" for m, w in self.weights.items() if w != 1]
        if self.name == "gated":
            parts.insert(0, f"{self.primary or 'first'}@{_num(self.threshold)}")
        return f"{self.name}({','.join(parts)})" if parts else self.name

    def check_models(self, models: Sequence[str]) -> None:
        """A request's own rule may only name models the request fuses."""
        stray = [m for m in self.weights if m not in models]
        if self.primary and self.primary not in models:
            stray.append(self.primary)
        if stray:
            raise RuleError(f"score rule names model(s) {', '.join(stray)} not in this request ({', '.join(models)})")

    def restricted(self, models: Sequence[str]) -> ScoreRule:
        """An engine-wide rule for a request over ``models``: weights and primary of other models
        are dropped (a default fitted for the bundled pair still applies to a subset)."""
        primary = self.primary if self.primary in models else ""
        return ScoreRule(self.name, {m: w for m, w in self.weights.items() if m in models}, primary, self.threshold)

    # ---- applying ---------------------------------------------------------------------------
    def _weights(self, models: Sequence[str]) -> list[float]:
        raw = [float(self.weights.get(m, 1.0)) for m in models]
        total = sum(raw)
        if total <= 0:
            raise RuleError("rule weights of the models in this request are all 0")
        return [w / total for w in raw]

    def loglikelihood(self, candidates: Sequence[ModelScores]) -> list[float]:
        """The fused log-likelihood of each candidate (see the module table)."""
        if not candidates:
            return []
        models = list(candidates[0])
        w = self._weights(models)
        valid = [all(c[m][1] > 0 and math.isfinite(c[m][0]) for m in models) for c in candidates]
        if self.name in SET_RELATIVE:
            return self._set_relative(candidates, models, w, valid)
        return [self._pointwise(c, models, w) if ok else -math.inf for c, ok in zip(candidates, valid)]

    def choose(self, candidates: Sequence[ModelScores]) -> int:
        """Index of the winning candidate; the first one wins ties (config order)."""
        if self.name == "mean-ppl":
            keys = [-fused_ppl(c, self) for c in candidates]  # exactly eq. 3, no n̄ scaling
        elif self.name == "mean-nll":
            models = list(candidates[0])
            w = self._weights(models)
            keys = [_per_token(c, models, w) for c in candidates]
        else:
            keys = self.loglikelihood(candidates)
        best = 0
        for i, key in enumerate(keys):
            if key > keys[best]:
                best = i
        return best

    def _pointwise(self, c: ModelScores, models: Sequence[str], w: Sequence[float]) -> float:
        mean_tokens = sum(c[m][1] for m in models) / len(models)
        if self.name == "mean-ppl":
            return -mean_tokens * math.log(fused_ppl(c, self))
        if self.name == "mean-nll":
            return mean_tokens * _per_token(c, models, w)
        return _product(c, models, w)

    def _set_relative(self, candidates, models, w, valid) -> list[float]:
        if not any(valid):
            return [-math.inf] * len(candidates)
        posteriors = {m: self._posterior(candidates, m, valid) for m in models}
        if self.name == "gated":
            primary = self.primary or models[0]
            if primary not in posteriors:
                raise RuleError(f"gated rule's primary model {primary!r} is not scoring ({', '.join(models)})")
            q = posteriors[primary]
            if max(q) >= self.threshold:
                return [math.log(p) if p > 0 else -math.inf for p in q]
            return [_product(c, models, w) if ok else -math.inf for c, ok in zip(candidates, valid)]
        mixed = [sum(wv * posteriors[m][i] for wv, m in zip(w, models)) for i in range(len(candidates))]
        return [math.log(p) if p > 0 else -math.inf for p in mixed]

    def _posterior(self, candidates, model: str, valid) -> list[float]:
        """Model ``model``'s distribution over the candidates (q_v of the module table)."""
        summed = [c[model][0] if ok else -math.inf for c, ok in zip(candidates, valid)]
        if self.name in ("calibrated", "gated"):
            return _softmax(summed)
        counts = [c[model][1] for c, ok in zip(candidates, valid) if ok]
        mean_tokens = sum(counts) / len(counts)
        per_token = [c[model][0] * mean_tokens / c[model][1] if ok else -math.inf for c, ok in zip(candidates, valid)]
        if self.name == "calibrated-token":
            return _softmax(per_token)
        return [(a + b) / 2 for a, b in zip(_softmax(summed), _softmax(per_token))]


DEFAULT_RULE_FILE = Path(__file__).with_name("default_rule.json")


def default_rule() -> ScoreRule:
    """The rule every fused mode uses unless a request or the service says otherwise: fitted on
    the tuning splits for the bundled models (``default_rule.json``); ``mean-ppl`` without it."""
    return ScoreRule.load(DEFAULT_RULE_FILE) if DEFAULT_RULE_FILE.exists() else ScoreRule()


def fused_ppl(c: ModelScores, rule: ScoreRule | None = None) -> float:
    """Weighted arithmetic mean of the models' perplexities (paper eq. 3 with equal weights)."""
    models = list(c)
    w = (rule or ScoreRule())._weights(models)
    return sum(wv * ppl(*c[m]) for wv, m in zip(w, models))


def ppl(logprob: float, tokens: int) -> float:
    return math.exp(-logprob / tokens) if tokens > 0 else math.inf


def _product(c: ModelScores, models, w) -> float:
    return sum(wv * c[m][0] for wv, m in zip(w, models))


def _per_token(c: ModelScores, models, w) -> float:
    if any(c[m][1] <= 0 for m in models):
        return -math.inf
    return sum(wv * c[m][0] / c[m][1] for wv, m in zip(w, models))


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    if not math.isfinite(top):
        return [1.0 / len(values)] * len(values)
    exps = [math.exp(v - top) if math.isfinite(v) else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not name:
            raise RuleError(f"rule weights are model=number pairs separated by commas, got {part!r}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise RuleError(f"rule weight of {name.strip()!r} is not a number: {value!r}") from None
    return weights


def _num(x: float) -> str:
    return f"{x:g}"
