"""The Fusion service's protos to and from the orchestrator's own types, for its servicer
(``server.py``): a ``GenerateRequest`` checked into a ``FusionRequest`` (with its sampling and
score rule) under the service's ``Limits``, and segments, final reports, scores and model facts
back into replies.

The wire vocabulary that clients share (modes, a ``ScoreRule`` message, a segment as JSON) lives
in ``protos/fusion_wire.py``; this module reads a ``ScoreRule`` message by that definition.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos.fusion_wire import names_a_rule

from ..services.common.errors import InvalidArgument
from ..services.worker.api import GREEDY, Sampling
from .admission import ContextLimits
from .request import FusionRequest
from .results import CandidateReport, Final, Segment
from .rules import RuleError, ScoreRule
from .workers import WorkerInfo


@dataclass
class Limits:
    default_max_new_tokens: int = 128
    max_new_tokens: int = 4096
    default_max_segment_tokens: int = 16
    max_segment_tokens: int = 256
    max_prompt_chars: int = 200_000
    max_stop_sequences: int = 16
    max_messages: int = ContextLimits.max_messages
    max_rendered_chars: int = ContextLimits.max_rendered_chars


MAX_REQUEST_ID = 128


def metadata_safe(value: str) -> bool:
    """A request id that can go back as gRPC metadata: 1..MAX_REQUEST_ID printable ASCII characters."""
    return 0 < len(value) <= MAX_REQUEST_ID and all(" " <= c <= "~" for c in value)


def rule_from_proto(r: pb.ScoreRule) -> ScoreRule | None:
    """None when the request names no rule (the engine's default applies); an empty field keeps
    ``ScoreRule``'s default, as ``fusion_wire.score_rule_message`` promises the callers."""
    if not names_a_rule(r):
        return None
    given: dict[str, Any] = {"name": r.name, "weights": dict(r.weights), "primary": r.primary, "threshold": r.threshold}
    try:
        return ScoreRule(**{field: value for field, value in given.items() if value})
    except RuleError as exc:
        raise InvalidArgument(str(exc)) from None


def sampling_from_proto(r: pb.GenerateRequest) -> Sampling:
    """The request's sampling; a sampled request without a seed gets a fresh one (reported back
    in the reply, so the text can be reproduced). Seeds drawn here stay below 2**53, which a
    JSON number (the HTTP gateway, JavaScript clients) holds exactly."""
    if r.temperature == 0 and not (r.top_p or r.top_k or r.HasField("seed")):
        return GREEDY
    sampling = Sampling(r.temperature, r.top_p, r.top_k, r.seed if r.HasField("seed") else secrets.randbits(53))
    problem = sampling.check()
    if problem:
        raise InvalidArgument(problem)
    return GREEDY if sampling.greedy else sampling


def request_from_proto(r: pb.GenerateRequest, limits: Limits) -> FusionRequest:
    """Check a GenerateRequest; every problem is an InvalidArgument with a precise message."""
    if r.prompt and r.messages:
        raise InvalidArgument("give either prompt or messages, not both")
    messages = None
    if r.messages:
        messages = []
        for i, m in enumerate(r.messages):
            if m.role not in ("system", "user", "assistant"):
                raise InvalidArgument(f"messages[{i}].role must be system, user or assistant, got {m.role!r}")
            if not m.content.strip():
                raise InvalidArgument(f"messages[{i}].content is empty")
            messages.append({"role": m.role, "content": m.content})
        size = sum(len(m["content"]) for m in messages)
    else:
        if not r.prompt.strip():
            raise InvalidArgument("prompt is empty (give a prompt or chat messages)")
        size = len(r.prompt)
    if size > limits.max_prompt_chars:
        raise InvalidArgument(f"prompt is {size} characters; the limit is {limits.max_prompt_chars}")
    max_new = r.max_new_tokens or limits.default_max_new_tokens
    if not 0 < max_new <= limits.max_new_tokens:
        raise InvalidArgument(f"max_new_tokens must be in 1..{limits.max_new_tokens}, got {r.max_new_tokens}")
    seg = r.max_segment_tokens or limits.default_max_segment_tokens
    if not 0 < seg <= limits.max_segment_tokens:
        raise InvalidArgument(
            f"max_segment_tokens must be in 1..{limits.max_segment_tokens}, got {r.max_segment_tokens}"
        )
    if len(r.stop) > limits.max_stop_sequences or any(not s for s in r.stop):
        raise InvalidArgument(f"stop takes at most {limits.max_stop_sequences} non-empty sequences")
    return FusionRequest(
        prompt=None if messages else r.prompt,
        messages=messages,
        models=list(r.models),
        mode=r.mode or "cool",
        max_new_tokens=max_new,
        stop=list(r.stop),
        max_segment_tokens=seg,
        allow_degraded=r.allow_degraded,
        score_rule=rule_from_proto(r.score_rule),
        sampling=sampling_from_proto(r),
    )


def _ppl(value: float) -> float:
    return value if math.isfinite(value) else float("inf")


def candidate_to_proto(c: CandidateReport) -> pb.Candidate:
    return pb.Candidate(
        model=c.model,
        text=c.text,
        eos=c.eos,
        finish=c.finish,
        lookahead=c.lookahead,
        ppl=[
            pb.ScorerPpl(scorer=s, ppl=_ppl(p), tokens=n, logprob=c.logprob.get(s, 0.0)) for s, (p, n) in c.ppl.items()
        ],
        mean_ppl=_ppl(c.mean_ppl),
        score=c.score,
    )


def segment_to_proto(s: Segment) -> pb.Segment:
    return pb.Segment(
        index=s.index,
        text=s.text,
        model=s.model,
        eos=s.eos,
        token_ids=s.token_ids,
        candidates=[candidate_to_proto(c) for c in s.candidates],
    )


def final_to_proto(f: Final) -> pb.FinalInfo:
    return pb.FinalInfo(
        text=f.text,
        finish_reason=f.finish_reason,
        usage=[
            pb.ModelUsage(
                model=m,
                prompt_tokens=u.prompt_tokens,
                generated_tokens=u.generated_tokens,
                output_tokens=u.output_tokens,
                scored_tokens=u.scored_tokens,
            )
            for m, u in f.usage.items()
        ],
        timings=pb.Timings(**vars(f.timings)),
        segments=f.segments,
        mode=f.mode,
        degraded_models=f.degraded_models,
        score_rule=f.score_rule,
        seed=f.seed,
    )


def generate_response(segments: Sequence[pb.Segment], final: pb.FinalInfo) -> pb.GenerateResponse:
    """The unary reply: the streamed segments and the final report in one message."""
    return pb.GenerateResponse(
        text=final.text,
        finish_reason=final.finish_reason,
        segments=segments,
        usage=final.usage,
        timings=final.timings,
        mode=final.mode,
        degraded_models=final.degraded_models,
        score_rule=final.score_rule,
        seed=final.seed if final.HasField("seed") else None,
    )


def score_response(reports: Sequence[CandidateReport], chosen: int, rule_label: str) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        scores=[
            pb.TextScores(
                ppl=[
                    pb.ScorerPpl(scorer=m, ppl=_ppl(p), tokens=n, logprob=r.logprob[m]) for m, (p, n) in r.ppl.items()
                ],
                mean_ppl=_ppl(r.mean_ppl),
                loglikelihood=r.score,
                chosen=i == chosen,
            )
            for i, r in enumerate(reports)
        ],
        score_rule=rule_label,
    )


def model_info_to_proto(name: str, i: WorkerInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=name,
        model_id=i.model_id,
        tokenizer_id=i.tokenizer_id,
        device=i.device,
        dtype=i.dtype,
        address=i.address,
        has_chat_template=i.has_chat_template,
        backend=i.backend,
    )
