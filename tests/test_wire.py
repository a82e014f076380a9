"""``services/worker/wire.py`` without a server or a model: every conversion between the ModelWorker
protos and the worker's own types (``results.py``, ``api.py``), milliseconds in all.

The worker's servicer and the orchestrator's handles both go through ``wire.py``, so a field it
drops or mixes up is lost on every gRPC call while in-process tests still pass. Most of a message
is copied by field name; the tests below find the names from the types themselves, so a field
added to a type is checked here without touching this file.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing

import pytest

from coolfusion.protos import worker_pb2 as pb
from coolfusion.services.common.errors import InvalidArgument
from coolfusion.services.worker import api, results, wire
from coolfusion.services.worker.api import GREEDY, NextTextOptions, Sampling
from coolfusion.services.worker.results import (
    CandidateScore,
    CandidateScores,
    CommitResult,
    FollowingSegment,
    NextTextResult,
    OpenResult,
    TextDistributions,
)


def names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(cls._fields)


class Distinct:
    """Values for a type's fields, drawn from their annotations: every int, float and str unlike any
    other drawn (so two fields swapped on the wire show) and unlike the proto's default (so a field
    left out shows). Lists hold two items, so top-k rows match ``token_ids``; floats are halves,
    exact in the wire's float32 fields."""

    def __init__(self) -> None:
        self.n = itertools.count(1)

    def __call__(self, tp, name: str):
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            return True
        if tp is int:
            return next(self.n)
        if tp is float:
            return next(self.n) + 0.5
        if tp is str:
            return f"{name}-{next(self.n)}"
        if origin is list:
            return [self(args[0], name) for _ in range(2)]
        if origin is tuple:
            return tuple(self(args[0], name) for _ in range(2))
        if origin in (typing.Union, types.UnionType):  # an optional field: set
            return self(next(a for a in args if a is not type(None)), name)
        if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or hasattr(tp, "_fields")):
            return self.record(tp)
        raise TypeError(f"no value for field {name} of type {tp!r}: teach Distinct this type")

    def record(self, cls):
        hints = typing.get_type_hints(cls)
        return cls(**{n: self(hints[n], n) for n in names(cls)})


def next_text_round_trip(r: NextTextResult) -> NextTextResult:
    return wire.next_text_from_proto(wire.next_text_to_proto(r))


def options_round_trip(o: NextTextOptions) -> NextTextOptions:
    return wire.options_from_request(wire.next_text_request("s1", o))


# Each type wire.py converts, and its trip there and back (a following segment inside a NextText
# reply, sampling inside NextText options, as they travel).
ROUND_TRIPS = {
    OpenResult: lambda v: wire.open_from_proto(wire.open_to_proto(v)),
    NextTextResult: next_text_round_trip,
    FollowingSegment: lambda v: next_text_round_trip(
        NextTextResult("s", "", [], [], False, "eos", 0, following=[v])
    ).following[0],
    CandidateScore: lambda v: wire.scores_from_proto(wire.scores_to_proto([v], 0.0))[0],
    CommitResult: lambda v: wire.commit_from_proto(wire.commit_to_proto(v)),
    TextDistributions: lambda v: wire.distributions_from_proto(wire.distributions_to_proto(v)),
    NextTextOptions: options_round_trip,
    Sampling: lambda v: options_round_trip(NextTextOptions(sampling=v)).sampling,
}

# The message each type's fields are copied to and from by name, and the message's fields the type
# does not hold (the request's session id is the call's, not an option).
MESSAGES = {
    OpenResult: (pb.OpenResponse, set()),
    NextTextResult: (pb.NextTextResponse, set()),
    FollowingSegment: (pb.FollowingSegment, set()),
    CandidateScore: (pb.CandidateScore, set()),
    CommitResult: (pb.UpdateStateResponse, set()),
    TextDistributions: (pb.TextDistribution, set()),
    NextTextOptions: (pb.NextTextRequest, {"session_id"}),
    Sampling: (pb.Sampling, set()),
}


def test_every_type_wire_converts_is_checked_here():
    # A result or option type that wire.py starts converting needs its entries above, or the
    # field tests below would pass without looking at it. CandidateScores is a list of
    # CandidateScore (its compute_s is checked with the scores).
    converted = {
        v for v in vars(wire).values() if isinstance(v, type) and v.__module__ in (results.__name__, api.__name__)
    }
    assert converted - {CandidateScores} == set(ROUND_TRIPS) == set(MESSAGES)


@pytest.mark.parametrize("cls", list(ROUND_TRIPS), ids=lambda c: c.__name__)
def test_every_field_crosses_the_wire(cls):
    value = Distinct().record(cls)
    back = ROUND_TRIPS[cls](value)
    assert type(back) is cls
    for name in names(cls):
        sent, got = getattr(value, name), getattr(back, name)
        assert sent not in (0, "", False, None, [], ()), f"{name}: a default value would not show a dropped field"
        assert got == sent, f"{cls.__name__}.{name} does not cross the wire"
        # A protobuf repeated field equals a list but is a view into the message: it must be copied.
        assert type(got) is type(sent), f"{cls.__name__}.{name} comes back as {type(got).__name__}"
        if isinstance(got, list):  # rows and nested segments too
            assert [type(g) for g in got] == [type(s) for s in sent], f"{cls.__name__}.{name} items"


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
def test_types_and_messages_have_the_same_fields(cls):
    # wire.py copies by name: a proto field renamed, or one added on either side only, fails here
    # rather than as an AttributeError (or a silently missing value) on a live call.
    message, not_held = MESSAGES[cls]
    by_name = message.DESCRIPTOR.fields_by_name
    own = names(cls)
    assert set(own) - set(by_name) == set(), f"{cls.__name__} fields missing from {message.__name__}"
    assert set(by_name) - set(own) == not_held, f"{message.__name__} fields {cls.__name__} does not carry"
    hints = typing.get_type_hints(cls)
    for name in own:
        field = by_name[name]
        repeated = typing.get_origin(hints[name]) in (list, tuple)
        assert field.is_repeated == repeated, f"{cls.__name__}.{name}: repeated on one side only"
        if field.message_type is not None:  # a nested message: the type that converts to it
            inner = typing.get_args(hints[name])[0] if repeated else hints[name]
            assert MESSAGES[inner][0].DESCRIPTOR is field.message_type, name


def test_score_candidates_response_carries_the_rows_and_the_time():
    assert set(pb.ScoreCandidatesResponse.DESCRIPTOR.fields_by_name) == {"scores", "compute_s"}


# ---- Open -------------------------------------------------------------------------------------
def test_open_round_trips():
    opened = OpenResult("sid", 5, "héllo")
    assert wire.open_from_proto(wire.open_to_proto(opened)) == opened
    assert wire.open_from_request(wire.open_request("hé ✓", None)) == ("hé ✓", None)
    assert wire.open_from_request(wire.open_request(None, None)) == ("", None)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}]
    # Messages win over a prompt given beside them, as the oneof holds one context.
    assert wire.open_from_request(wire.open_request("ignored", chat)) == (None, chat)


def test_open_rejects_an_empty_chat_and_a_prompt_that_is_not_utf8():
    # An empty message list still selects the chat branch of the oneof, so the worker refuses it
    # instead of opening an empty prompt.
    request = pb.OpenRequest.FromString(wire.open_request(None, []).SerializeToString())
    with pytest.raises(InvalidArgument, match="messages is empty"):
        wire.open_from_request(request)
    with pytest.raises(InvalidArgument, match="byte 1"):
        wire.open_from_request(pb.OpenRequest(prompt=b"a\xff"))


# ---- NextText ---------------------------------------------------------------------------------
def test_next_text_result_with_following_segments_round_trips():
    following = [
        FollowingSegment("s1f0", " b", [3], [-0.125], 2, " c"),
        FollowingSegment("s1f1", " c", [4, 5], [-0.25, -1.5], 3),  # lookahead left at its default
    ]
    r = NextTextResult(
        "s1", " a", [1, 2], [-0.5, -0.25], True, "boundary", 3, " b", 1, 0.5, 0.25, " b c", 2, 1, 1, 4, 2, following
    )
    back = next_text_round_trip(r)
    assert back == r
    assert [type(f) for f in back.following] == [FollowingSegment, FollowingSegment]
    plain = NextTextResult("s2", "", [], [], False, "eos", 0)
    assert next_text_round_trip(plain) == plain


def test_greedy_options_send_no_sampling_and_unset_reuse_lookahead():
    # Greedy is the request as it was before sampling existed: no Sampling message, and an unset
    # reuse_lookahead stays unset (the worker's default), apart from an explicit False.
    options = NextTextOptions(("tok-a",), 4)
    request = wire.next_text_request("s1", options)
    assert request.session_id == "s1"
    assert not request.HasField("sampling") and not request.HasField("reuse_lookahead")
    assert wire.options_from_request(request) == options
    assert wire.options_from_request(pb.NextTextRequest()) == NextTextOptions()
    for reuse in (False, True):
        request = wire.next_text_request("s1", NextTextOptions(reuse_lookahead=reuse))
        assert request.HasField("reuse_lookahead")
        assert wire.options_from_request(request).reuse_lookahead is reuse


def test_sampled_options_round_trip():
    # 0.7 and 0.9 are not float32 numbers: Sampling rounds them as the wire does, so the worker
    # draws with the same values in process and over gRPC.
    sampled = NextTextOptions(("a", "b"), 4, True, "dt", 3, "cs", 2, 5, Sampling(0.7, 0.9, 3, 2**64 - 1))
    request = wire.next_text_request("s1", sampled)
    assert request.HasField("sampling") and request.sampling.seed == 2**64 - 1
    assert options_round_trip(sampled) == sampled
    # Temperature 0 is greedy whatever the other fields say: they are not sent.
    assert options_round_trip(NextTextOptions(sampling=Sampling(0.0, 0.9, 3, 7))).sampling == GREEDY


# ---- ScoreCandidates --------------------------------------------------------------------------
def test_score_request_carries_the_candidates_in_order():
    request = wire.score_request("s1", [("x", False), ("", True)], "own")
    assert (request.session_id, request.own_state_id) == ("s1", "own")
    assert [(c.text, c.eos) for c in request.candidates] == [("x", False), ("", True)]
    assert wire.score_request("s1", [("x", False)]).own_state_id == ""


def test_scores_round_trip_with_an_empty_row_and_a_nan_perplexity():
    rows = [
        CandidateScore("a", [1, 2], [-1.0, -0.5], math.exp(0.75)),
        CandidateScore("b", [], [], math.inf),  # no tokens: no perplexity
        CandidateScore("c", [3], [-1.0], math.nan, reused=True),
    ]
    back = wire.scores_from_proto(wire.scores_to_proto(rows, 0.5))
    assert isinstance(back, CandidateScores) and back.compute_s == 0.5
    assert back[:2] == rows[:2]
    # NaN travels as inf: it ranks last, as a row with no finite perplexity does anyway.
    assert back[2] == rows[2]._replace(ppl=math.inf)
    assert all(type(row) is CandidateScore and type(row.token_ids) is list for row in back)
    # A row without tokens reads inf whatever its ppl says (here the proto's default, 0).
    empty = pb.ScoreCandidatesResponse(scores=[pb.CandidateScore(state_id="d")])
    assert wire.scores_from_proto(empty)[0].ppl == math.inf


# ---- UpdateState ------------------------------------------------------------------------------
def test_commit_round_trips():
    for commit in (CommitResult(4, " a", 0.125), CommitResult(0, "")):
        assert wire.commit_from_proto(wire.commit_to_proto(commit)) == commit


# ---- Distributions ----------------------------------------------------------------------------
def test_distributions_round_trip_with_top_k_rows():
    # Log-probs are float32 on the wire; these are exact in float32.
    three = TextDistributions(
        0,
        [7, 8],
        [0, 1],
        [1, 3],
        [-0.5, -1.0],
        [[1, 2, 3], [4, 5, 6]],
        [[-0.125, -0.25, -2.0], [-0.375, -0.5, -4.0]],
        3,
        [0],
    )
    message = wire.distributions_to_proto(three)
    assert list(message.topk_ids) == [1, 2, 3, 4, 5, 6]  # row-major, as the proto says
    one = TextDistributions(2, [9], [0], [4], [-3.0], [[9]], [[-3.0]], 4, [0])
    empty = TextDistributions(1, [], [], [], [], [], [], 0, [])
    for d in (three, one, empty):
        back = wire.distributions_from_proto(wire.distributions_to_proto(d))
        assert back == d
        assert all(type(row) is list for row in back.topk_ids + back.topk_logprobs)
