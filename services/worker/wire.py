"""The ModelWorker protos to and from the worker's own types (``api.py``, ``results.py``), for
both sides: the worker's servicer (``server.py``) and the orchestrator's handles
(``orchestrator/workers.py``) and batch clients (``client.py``).

Plain Python without torch, as the orchestrator's image has none. A result type's fields carry the
proto fields' names, so most of a message is copied field by field; what differs is spelled out
where it is converted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields, is_dataclass

from coolfusion.protos import worker_pb2 as pb

from ..common.errors import InvalidArgument
from .api import NextTextOptions, Sampling
from .results import (
    CandidateScore,
    CandidateScores,
    CommitResult,
    FollowingSegment,
    NextTextResult,
    OpenResult,
    TextDistributions,
)


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)] if is_dataclass(cls) else list(cls._fields)


def _to_proto(message, value, **given):
    """``message`` with the fields of ``value`` of the same names (``given``: the rest)."""
    return message(**{n: getattr(value, n) for n in _names(type(value)) if n not in given}, **given)


def _from_proto(cls, msg, **given):
    """``cls`` from the fields of ``msg`` of the same names, repeated ones as lists (``given``: the rest)."""
    values = {}
    for name in _names(cls):
        if name in given:
            continue
        value = getattr(msg, name)
        values[name] = list(value) if msg.DESCRIPTOR.fields_by_name[name].is_repeated else value
    return cls(**values, **given)


# ---- Open -------------------------------------------------------------------------------------
def open_request(prompt: str | None, messages: list[dict] | None) -> pb.OpenRequest:
    """Chat ``messages`` when given, else the ``prompt`` text."""
    if messages is not None:
        chat = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        return pb.OpenRequest(messages=pb.ChatMessages(messages=chat))
    return pb.OpenRequest(prompt=(prompt or "").encode())


def open_from_request(request: pb.OpenRequest) -> tuple[str | None, list[dict] | None]:
    """(prompt, messages) of an ``OpenRequest``, one of them None."""
    if request.WhichOneof("context") == "messages":
        messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        if not messages:
            raise InvalidArgument("messages is empty")
        return None, messages
    try:
        return request.prompt.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"prompt is not valid UTF-8 (byte {exc.start})") from None


def open_to_proto(r: OpenResult) -> pb.OpenResponse:
    return _to_proto(pb.OpenResponse, r)


def open_from_proto(msg: pb.OpenResponse) -> OpenResult:
    return _from_proto(OpenResult, msg)


# ---- NextText ---------------------------------------------------------------------------------
def next_text_request(session_id: str, options: NextTextOptions) -> pb.NextTextRequest:
    values = {f.name: getattr(options, f.name) for f in fields(options)}
    # Greedy sends no sampling message: the request is the one it was before sampling existed.
    sampling = values.pop("sampling")
    if not sampling.greedy:
        values["sampling"] = pb.Sampling(**{f.name: getattr(sampling, f.name) for f in fields(sampling)})
    return pb.NextTextRequest(session_id=session_id, **values)


def options_from_request(request: pb.NextTextRequest) -> NextTextOptions:
    """The options a ``NextTextRequest`` carries (an unset ``reuse_lookahead``: None)."""
    values = {f.name: getattr(request, f.name) for f in fields(NextTextOptions)}
    values["reuse_lookahead"] = request.reuse_lookahead if request.HasField("reuse_lookahead") else None
    values["sampling"] = Sampling(**{f.name: getattr(request.sampling, f.name) for f in fields(Sampling)})
    return NextTextOptions(**values)


def next_text_to_proto(r: NextTextResult) -> pb.NextTextResponse:
    following = [_to_proto(pb.FollowingSegment, f) for f in r.following]
    return _to_proto(pb.NextTextResponse, r, following=following)


def next_text_from_proto(msg: pb.NextTextResponse) -> NextTextResult:
    following = [_from_proto(FollowingSegment, f) for f in msg.following]
    return _from_proto(NextTextResult, msg, following=following)


# ---- ScoreCandidates --------------------------------------------------------------------------
def score_request(
    session_id: str, candidates: Sequence[tuple[str, bool]], own_state_id: str = ""
) -> pb.ScoreCandidatesRequest:
    texts = [pb.CandidateText(text=t, eos=e) for t, e in candidates]
    return pb.ScoreCandidatesRequest(session_id=session_id, candidates=texts, own_state_id=own_state_id)


def scores_to_proto(rows: Sequence[CandidateScore], compute_s: float) -> pb.ScoreCandidatesResponse:
    # NaN travels as inf: a candidate with no finite perplexity ranks last either way.
    scores = [_to_proto(pb.CandidateScore, s, ppl=s.ppl if math.isfinite(s.ppl) else math.inf) for s in rows]
    return pb.ScoreCandidatesResponse(scores=scores, compute_s=compute_s)


def scores_from_proto(msg: pb.ScoreCandidatesResponse) -> CandidateScores:
    # No tokens (an empty candidate without EOS) has no perplexity: inf, as the worker's own rows say.
    rows = CandidateScores(_from_proto(CandidateScore, s, ppl=s.ppl if s.token_ids else math.inf) for s in msg.scores)
    rows.compute_s = msg.compute_s
    return rows


# ---- UpdateState ------------------------------------------------------------------------------
def commit_to_proto(r: CommitResult) -> pb.UpdateStateResponse:
    return _to_proto(pb.UpdateStateResponse, r)


def commit_from_proto(msg: pb.UpdateStateResponse) -> CommitResult:
    return _from_proto(CommitResult, msg)


# ---- Distributions ----------------------------------------------------------------------------
def distributions_to_proto(d: TextDistributions) -> pb.TextDistribution:
    """The top-k rows flattened, one row after the other (each ``top_k`` long)."""
    topk_ids = [i for row in d.topk_ids for i in row]
    topk_logprobs = [v for row in d.topk_logprobs for v in row]
    return _to_proto(pb.TextDistribution, d, topk_ids=topk_ids, topk_logprobs=topk_logprobs)


def distributions_from_proto(msg: pb.TextDistribution) -> TextDistributions:
    """The rows of a ``TextDistribution`` (its flat top-k cut back into one row per token)."""
    n = len(msg.token_ids)
    k = len(msg.topk_ids) // n if n else 0
    ids, lps = list(msg.topk_ids), list(msg.topk_logprobs)
    topk_ids = [ids[t * k : (t + 1) * k] for t in range(n)]
    topk_logprobs = [lps[t * k : (t + 1) * k] for t in range(n)]
    return _from_proto(TextDistributions, msg, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
