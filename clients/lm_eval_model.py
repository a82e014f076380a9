"""lm-evaluation-harness model ``coolfusion``: lm-eval's tasks through a running orchestrator.

    coolfusion-lm-eval --model coolfusion \\
        --model_args address=127.0.0.1:50051,mode=cool,score_rule=product \\
        --tasks coolfusion_arc_easy --include_path "$(coolfusion-lm-eval --tasks-dir)"

lm-eval 0.4.x knows only the models in its registry and reads no plugin entry points, so
``coolfusion-lm-eval`` (or ``python -m coolfusion.clients.lm_eval_model``) imports this module,
which registers ``coolfusion``, and then runs lm-eval's own command line
(``lm_eval.__main__.cli_evaluate``) with the same arguments. From Python, importing this module is
enough: ``lm_eval.simple_evaluate(model="coolfusion", model_args={...}, ...)``.

``model_args`` (lm-eval splits them on commas, hence ``+`` inside a value):

- ``address`` (required): HOST:PORT of a running orchestrator (``coolfusion serve``);
- ``mode``: ``cool`` (default), ``cool-noalign``, ``rerank``, ``cool-rerank`` or ``single:<model>``;
- ``models``: the models to fuse, ``+``-separated (default: all the orchestrator has);
- ``score_rule``: a rule name (``mean-ppl``, ``mean-nll``, ``product``, ``calibrated``, ``gated``)
  or a rule JSON file (default: the orchestrator's rule);
- ``rule_weights``: ``m1=2+m2=1`` or a JSON file (needs ``score_rule``);
- ``max_segment_tokens``, ``timeout`` (seconds per RPC).

Requests:

- ``loglikelihood``: the requests of one question (same task, document and context: a
  multiple-choice question's choices) go to one ``Score`` RPC as one candidate set, since
  ``calibrated`` and ``gated`` compare the candidates with each other. The value is the
  ``TextScores.loglikelihood`` the rule gives (orchestrator/rules.py); with ``mode=single:<m>``
  it is ``<m>``'s own log-likelihood (its ``logprob``, scored with ``models=[m]``), whatever the
  rule. ``is_greedy`` is always False: whether the fused generation would produce the
  continuation is not something a score tells, and generating it to check would cost a whole
  generation per request. The fused modes score alike; ``mode`` only matters to generation.
- ``generate_until``: one ``Generate`` RPC per request, greedy only; ``until`` -> ``stop``,
  ``max_gen_toks`` (default 256) -> ``max_new_tokens`` (per model, in its own tokens).
- ``loglikelihood_rolling`` (perplexity tasks) is not supported (see the method).

lm-eval's ``batch_size``, ``max_batch_size`` and ``device`` are accepted and ignored: the
orchestrator's workers own the devices, and one evaluation sends one RPC at a time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from coolfusion.protos.fusion_wire import MODES, SINGLE_PREFIX, is_mode

from ..orchestrator.rules import RuleError, ScoreRule

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only when empty)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # the `eval` extra is not installed
    LM, model_registry, _IMPORT_ERROR = object, None, exc

MODEL_NAME = "coolfusion"
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
DEFAULT_MAX_GEN_TOKS = 256
KNOWN_ARGS = ("address", "mode", "models", "score_rule", "rule_weights", "max_segment_tokens", "timeout")
IGNORED_ARGS = ("batch_size", "max_batch_size", "device")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature")


class CoolFusionArgError(ValueError):
    """Bad model_args or request arguments; one line."""


class CoolFusionCallError(RuntimeError):
    """The orchestrator could not be reached or refused a request; one line."""


def _need_lm_eval() -> None:
    if _IMPORT_ERROR is not None:
        raise CoolFusionArgError(
            f"the coolfusion lm-eval model needs lm-eval 0.4.x ({_IMPORT_ERROR}); install it with pip install 'coolfusion[eval]'"
        )


def _plus_list(value: Any, name: str) -> list[str]:
    """``a+b`` (lm-eval splits model_args on commas), or a list from a JSON/Python model_args."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split("+")]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise CoolFusionArgError(f"model_args {name} takes names separated by '+', got {value!r}")
    if not all(items):
        raise CoolFusionArgError(f"model_args {name} has an empty name: {value!r}")
    return items


def _first_line(exc: grpc.RpcError) -> str:
    lines = (exc.details() or "").splitlines()
    return lines[0] if lines else ""


def _rpc_error(what: str, exc: grpc.RpcError) -> CoolFusionCallError:
    return CoolFusionCallError(f"coolfusion {what} failed: {exc.code().name}: {_first_line(exc)}")


class CoolFusionLM(LM):
    """lm-eval's ``LM`` over the public Fusion service (module docstring)."""

    def __init__(
        self,
        address: str | None = None,
        mode: str = "cool",
        models: str | Sequence[str] = "",
        score_rule: str = "",
        rule_weights: str = "",
        max_segment_tokens: int = 0,
        timeout: float | None = None,
        **extra: Any,
    ) -> None:
        _need_lm_eval()
        super().__init__()
        unknown = sorted(set(extra) - set(IGNORED_ARGS))
        if unknown:
            raise CoolFusionArgError(
                f"unknown coolfusion model_args: {', '.join(unknown)}; known: {', '.join(KNOWN_ARGS)}"
            )
        if not address or not isinstance(address, str):
            raise CoolFusionArgError("coolfusion needs model_args address=HOST:PORT (a running orchestrator)")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise CoolFusionArgError(f"model_args address must be HOST:PORT, got {address!r}")
        mode = str(mode or "cool")
        self.single = mode.removeprefix(SINGLE_PREFIX) if mode.startswith(SINGLE_PREFIX) else ""
        if not is_mode(mode) or mode == SINGLE_PREFIX:
            raise CoolFusionArgError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        self.models = _plus_list(models, "models")
        if not isinstance(max_segment_tokens, int) or isinstance(max_segment_tokens, bool) or max_segment_tokens < 0:
            raise CoolFusionArgError(
                f"model_args max_segment_tokens must be an integer >= 0, got {max_segment_tokens!r}"
            )
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (timeout > 0 and math.isfinite(timeout))
        ):
            raise CoolFusionArgError(f"model_args timeout must be a number of seconds > 0, got {timeout!r}")
        self.rule = self._parse_rule(score_rule, rule_weights)
        if self.single and self.rule is not None:
            raise CoolFusionArgError(
                f"score_rule applies to the fused modes; mode={mode} scores with {self.single}'s own log-likelihood"
            )
        self.address, self.mode, self.max_segment_tokens, self.timeout = address, mode, max_segment_tokens, timeout

        from .client import SyncFusionClient

        self.client = SyncFusionClient(address, timeout=timeout)
        try:
            self._check_served()
        except Exception:
            self.client.close()
            raise
        self.rule_label = self.rule.label() if self.rule is not None else ""  # else the server's, from a reply

    def _check_served(self) -> None:
        """The models, the single model and the rule's models against what the orchestrator serves."""
        try:
            listed = self.client.list_models()
        except grpc.RpcError as exc:
            raise CoolFusionCallError(
                f"cannot reach the coolfusion orchestrator at {self.address}: {exc.code().name}: {_first_line(exc)}"
            ) from None
        served = [m.name for m in listed.models]
        stray = [m for m in self.models if m not in served]
        if stray:
            raise CoolFusionArgError(
                f"model_args models names {', '.join(stray)}, not served at {self.address} ({', '.join(served)})"
            )
        pool = self.models or served
        if self.single and self.single not in pool:
            raise CoolFusionArgError(f"mode={self.mode} names a model not in {', '.join(pool)}")
        self.score_models = [self.single] if self.single else self.models
        if self.rule is not None:
            try:
                self.rule.check_models(pool)
            except RuleError as exc:
                raise CoolFusionArgError(str(exc)) from None

    @staticmethod
    def _parse_rule(score_rule: Any, rule_weights: Any) -> ScoreRule | None:
        if score_rule in (None, "") and rule_weights in (None, ""):
            return None
        if score_rule in (None, ""):
            raise CoolFusionArgError("model_args rule_weights needs a score_rule (a rule name or a rule JSON file)")
        weights = str(rule_weights or "")
        if weights and not weights.endswith(".json"):
            weights = weights.replace("+", ",")  # lm-eval splits model_args on commas
        try:
            return ScoreRule.parse(str(score_rule), weights)
        except RuleError as exc:
            raise CoolFusionArgError(str(exc)) from None

    # ---- lm-eval interface --------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """One ``Score`` RPC per question (see the module docstring)."""
        groups: dict[tuple, list[int]] = {}
        pairs = []
        for i, request in enumerate(requests):
            context, continuation = request.args
            # As lm-eval's HF model does: trailing spaces of the context belong to the continuation.
            stripped = context.rstrip()
            context, continuation = stripped, context[len(stripped) :] + continuation
            if not context:
                raise CoolFusionArgError(
                    "coolfusion scores a continuation of a non-empty context; this request's context is empty"
                    " (unconditional scoring, e.g. acc_mutual_info, is not supported)"
                )
            if not continuation:
                raise CoolFusionArgError(f"coolfusion got an empty continuation to score after {context[-40:]!r}")
            pairs.append((context, continuation))
            key = (getattr(request, "task_name", None), getattr(request, "doc_id", None), context)
            groups.setdefault(key, []).append(i)

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for (_, _, context), indices in _progress(groups.items(), disable_tqdm, "coolfusion Score"):
            texts = list(dict.fromkeys(pairs[i][1] for i in indices))  # the question's distinct choices, in order
            reply = self._call(
                "Score", self.client.score, context, texts, models=self.score_models, score_rule=self.rule
            )
            if not self.rule_label and not self.single:
                self.rule_label = reply.score_rule
            values = dict(zip(texts, (self._value(s) for s in reply.scores)))
            for i in indices:
                results[i] = (values[pairs[i][1]], False)
                self.cache_hook.add_partial("loglikelihood", requests[i].args, results[i])
        return results  # type: ignore[return-value]

    def _value(self, scores) -> float:
        if not self.single:
            return float(scores.loglikelihood)
        for p in scores.ppl:
            if p.scorer == self.single:
                return float(p.logprob) if p.tokens > 0 else -math.inf
        raise CoolFusionCallError(f"coolfusion Score reply has no score of {self.single}")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "coolfusion does not support loglikelihood_rolling (perplexity tasks): the Score RPC scores a"
            " continuation of a non-empty prompt, and models with different tokenizers have no common first token"
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One greedy ``Generate`` RPC per request."""
        outputs = []
        for request in _progress(requests, disable_tqdm, "coolfusion Generate"):
            context, gen_kwargs = request.args
            stop, max_new = _generation_options(gen_kwargs)
            if not context:
                raise CoolFusionArgError(
                    "coolfusion generates after a non-empty context; this request's context is empty"
                )
            reply = self._call(
                "Generate",
                self.client.generate,
                context,
                models=self.models,
                mode=self.mode,
                max_new_tokens=max_new,
                stop=stop,
                max_segment_tokens=self.max_segment_tokens,
                score_rule=self.rule,
            )
            if not self.rule_label and not self.single:
                self.rule_label = reply.score_rule
            outputs.append(reply.text)
            self.cache_hook.add_partial("generate_until", request.args, reply.text)
        return outputs

    def get_model_info(self) -> dict:
        """Added to lm-eval's results["config"]."""
        return {
            "coolfusion_address": self.address,
            "coolfusion_mode": self.mode,
            "coolfusion_models": list(self.models),
            "coolfusion_score_rule": self.rule_label,
        }

    def _call(self, what: str, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise _rpc_error(what, exc) from None


def _generation_options(gen_kwargs: Any) -> tuple[list[str], int]:
    """lm-eval's generation kwargs as (stop, max_new_tokens); anything but greedy is refused."""
    kwargs = dict(gen_kwargs or {})
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
        raise CoolFusionArgError(
            f"coolfusion does not take generation kwargs {', '.join(unknown)}; it takes {', '.join(GEN_KWARGS)}"
        )
    temperature = kwargs.get("temperature") or 0.0
    if kwargs.get("do_sample") or temperature != 0:
        raise CoolFusionArgError(
            f"coolfusion generates greedily only; got do_sample={kwargs.get('do_sample')!r}, temperature={kwargs.get('temperature')!r}"
        )
    until = kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise CoolFusionArgError(f"generation kwarg until must be a string or a list of strings, got {until!r}")
    max_new = kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
        raise CoolFusionArgError(f"generation kwarg max_gen_toks must be an integer > 0, got {max_new!r}")
    return [s for s in until if s], max_new


def _progress(items, disable: bool, desc: str):
    from tqdm import tqdm

    items = list(items)
    return tqdm(items, desc=desc, disable=disable or len(items) < 2)


def register() -> None:
    """Registers ``coolfusion`` in lm-eval's model registry (idempotent: importing this module does it)."""
    _need_lm_eval()
    # A lazy "module:class" target: the same string from every import (also when this file runs as
    # __main__), which the registry turns into the class on first use.
    model_registry.register(MODEL_NAME, target="coolfusion.clients.lm_eval_model:CoolFusionLM")


def _check_model_args(args: Sequence[str]) -> None:
    """Build the ``coolfusion`` model from its ``--model_args`` once before lm-eval runs: lm-eval
    indexes its thousands of task files (seconds) before it builds the model, and a bad argument
    or an unreachable orchestrator should not wait for that."""
    import argparse

    from lm_eval.utils import simple_parse_args_string

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default="")
    parser.add_argument("--model_args", default="")
    known, _ = parser.parse_known_args(args)
    if known.model != MODEL_NAME:
        return
    CoolFusionLM(**simple_parse_args_string(known.model_args)).client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``coolfusion-lm-eval``: lm-eval's command line with ``--model coolfusion`` registered.
    ``coolfusion-lm-eval --tasks-dir`` prints the folder of the bundled task YAMLs."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--tasks-dir"]:
        print(TASKS_DIR)
        return 0
    saved = sys.argv
    try:
        _need_lm_eval()
        _check_model_args(args)
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["coolfusion-lm-eval", *args]  # lm-eval's parser reads sys.argv
        cli_evaluate()
    except (CoolFusionArgError, CoolFusionCallError, NotImplementedError) as exc:
        print(f"coolfusion-lm-eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if model_registry is not None:
    register()


if __name__ == "__main__":
    # Run the importable module's main, so that exactly one CoolFusionLM class exists.
    from coolfusion.clients.lm_eval_model import main as _main

    sys.exit(_main())
