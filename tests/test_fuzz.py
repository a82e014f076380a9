"""Fuzzing over the real wire: hypothesis builds random GenerateRequest,
ScoreRequest and worker requests (every field; extreme, invalid and random unicode values;
invalid UTF-8 in bytes fields) and random byte strings sent as serialized messages of every
method. Against the real services (``cluster``): only documented status codes come back, every
service keeps serving, and afterwards no worker holds a session.

Model time is kept small: requests that would be valid ask for at most 3 new tokens. The
examples per test scale with ``COOLFUSION_FUZZ_EXAMPLES`` (the long run: ``bench/fuzz.py``).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import grpc
from cluster import HANG_GUARD_S, wait_no_sessions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coolfusion.protos import fusion_pb2 as fpb
from coolfusion.protos import fusion_pb2_grpc, worker_pb2_grpc
from coolfusion.protos import tokenizer_pb2 as tpb
from coolfusion.protos import worker_pb2 as wpb

# README "Statuses". INTERNAL, UNKNOWN or UNAVAILABLE would mean a crash, an unmapped error or a
# dead service. DEADLINE_EXCEEDED is documented only for a call whose case set a short deadline
# (or, among random bytes, one that decodes to a valid long generation): anywhere else it means a
# handler that never answered.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SCALE = int(os.environ.get("COOLFUSION_FUZZ_EXAMPLES", "0"))
CALL_TIMEOUT_S = 60.0  # a hang guard: a case that did not set a deadline must answer well within it
# A case's own deadline: none (the hang guard) or one short enough to end a call midway.
deadlines = st.one_of(st.just(None), st.just(None), st.floats(0.001, 0.2))
MODELS = ["smollm2", "gemma3", "smollm2b"]

text = st.text(max_size=48)  # any code points, surrogates excluded (protobuf strings are UTF-8)
big = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
# Valid token counts only where they cost little model time (0 means the server's default).
new_tokens = st.one_of(st.integers(-(2**31), -1), st.integers(1, 3), st.integers(4097, 2**31 - 1))
utf8_or_not = st.one_of(text.map(str.encode), st.binary(max_size=48))


def _rule():
    names = st.one_of(
        st.sampled_from(["", "mean-ppl", "mean-nll", "product", "calibrated", "calibrated-token", "hedged", "gated"]),
        text,
    )
    return st.builds(
        fpb.ScoreRule,
        name=names,
        weights=st.dictionaries(st.one_of(st.sampled_from(MODELS), text), st.floats(width=64), max_size=3),
        primary=st.one_of(st.sampled_from(MODELS), text),
        threshold=st.floats(width=64),
    )


def _messages():
    role = st.one_of(st.sampled_from(["system", "user", "assistant"]), text)
    return st.lists(st.builds(fpb.Message, role=role, content=text), max_size=4)


def generate_requests():
    modes = st.one_of(st.sampled_from(["", "cool", "cool-noalign", "rerank", "cool-rerank", "single:gemma3"]), text)
    return st.builds(
        fpb.GenerateRequest,
        prompt=text,
        messages=_messages(),
        models=st.lists(st.one_of(st.sampled_from(MODELS), text), max_size=3),
        mode=modes,
        max_new_tokens=new_tokens,
        stop=st.lists(text, max_size=3),
        max_segment_tokens=big,
        request_id=text,
        allow_degraded=st.booleans(),
        score_rule=st.one_of(st.none(), _rule()),
        temperature=floats,
        top_p=floats,
        top_k=big,
        seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    )


def score_requests():
    return st.builds(
        fpb.ScoreRequest,
        prompt=text,
        messages=_messages(),
        texts=st.lists(text, max_size=3),
        models=st.lists(st.one_of(st.sampled_from(MODELS), text), max_size=3),
        eos=st.lists(st.booleans(), max_size=4),
        score_rule=st.one_of(st.none(), _rule()),
    )


def worker_calls():
    """(method, request, use a live session): every worker method with random fields."""
    sid = st.one_of(text, st.just(""))
    ids = st.lists(st.one_of(st.integers(-5, 60_000), big), max_size=6)
    chat = st.builds(
        wpb.ChatMessages, messages=st.lists(st.builds(wpb.ChatMessage, role=text, content=text), max_size=3)
    )
    open_ = st.one_of(st.builds(wpb.OpenRequest, prompt=utf8_or_not), st.builds(wpb.OpenRequest, messages=chat))
    next_text = st.builds(
        wpb.NextTextRequest,
        boundary_tokenizer_ids=st.lists(st.one_of(st.sampled_from(MODELS), text), max_size=3),
        max_tokens=st.one_of(st.integers(-(2**31), -1), st.integers(1, 3)),
        reuse_lookahead=st.one_of(st.none(), st.booleans()),
        draft_text=text,
        draft_tokens=st.one_of(st.integers(0, 3), big),
        commit_state_id=text,
        follow_segments=st.one_of(st.integers(0, 2), big),
        lookup_tokens=st.one_of(st.integers(0, 2), big),
    )
    score = st.builds(
        wpb.ScoreCandidatesRequest,
        candidates=st.lists(st.builds(wpb.CandidateText, text=text, eos=st.booleans()), max_size=3),
        own_state_id=text,
    )
    calls = [
        ("Info", st.just(wpb.InfoRequest())),
        ("Open", open_),
        ("NextToken", st.builds(wpb.NextTokenRequest, session_id=sid)),
        ("FeedTokens", st.builds(wpb.FeedTokensRequest, session_id=sid, token_ids=ids)),
        ("UpdateState", st.builds(wpb.UpdateStateRequest, session_id=sid, state_id=text)),
        ("NextText", next_text),
        ("ScoreCandidates", score),
        ("Close", st.builds(wpb.CloseRequest, session_id=sid)),
    ]
    return st.one_of(*(st.tuples(st.just(m), r, st.booleans()) for m, r in calls))


def raw_calls():
    """(full method name, random bytes) for every unary method of the three services."""
    methods = []
    for module, service in ((fpb, "Fusion"), (wpb, "ModelWorker"), (tpb, "TokenizerService")):
        desc = module.DESCRIPTOR.services_by_name[service]
        methods += [(f"/{desc.full_name}/{m.name}", m.server_streaming) for m in desc.methods]
    return st.tuples(st.sampled_from(methods), st.binary(max_size=256))


def _fuzz(examples: int):
    return settings(
        max_examples=SCALE or examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _code(call, deadline_set: bool = False) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as exc:
        allowed = DOCUMENTED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if deadline_set else set())
        assert exc.code() in allowed, (exc.code(), exc.details(), f"deadline set: {deadline_set}")
        return exc.code(), None


def _asks_long_generation(method: str, data: bytes) -> bool:
    """Random bytes that decode to a Generate request with a real token budget (0: the server's
    default): such a case set itself a long job, and may meet the hang guard on a slow machine."""
    if not method.startswith("/coolfusion.v1.Fusion/Generate"):
        return False
    try:
        request = fpb.GenerateRequest.FromString(data)
    except Exception:
        return False
    return request.max_new_tokens == 0 or request.max_new_tokens > 3


def fuzz_fusion(address: str, examples: int) -> Counter:
    seen: Counter = Counter()
    with grpc.insecure_channel(address) as channel:
        stub = fusion_pb2_grpc.FusionStub(channel)

        @_fuzz(examples)
        @given(
            st.one_of(generate_requests().map(lambda r: ("Generate", r)), score_requests().map(lambda r: ("Score", r))),
            deadlines,
        )
        def check(item, deadline):
            method, request = item
            timeout = deadline or CALL_TIMEOUT_S
            code, _ = _code(lambda: getattr(stub, method)(request, timeout=timeout), deadline is not None)
            seen[code.name] += 1

        check()
    return seen


def fuzz_worker(address: str, examples: int) -> Counter:
    seen: Counter = Counter()
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)

        @_fuzz(examples)
        @given(worker_calls())
        def check(item):
            method, request, live = item
            sid = ""
            if live and hasattr(request, "session_id"):
                sid = stub.Open(wpb.OpenRequest(prompt=b"1, 2, 3,"), timeout=CALL_TIMEOUT_S).session_id
                request.session_id = sid
            try:
                code, reply = _code(lambda: getattr(stub, method)(request, timeout=CALL_TIMEOUT_S))
                if method == "Open" and reply is not None:
                    stub.Close(wpb.CloseRequest(session_id=reply.session_id), timeout=CALL_TIMEOUT_S)
                seen[code.name] += 1
            finally:
                if sid:
                    stub.Close(wpb.CloseRequest(session_id=sid), timeout=CALL_TIMEOUT_S)

        check()
    return seen


def fuzz_bytes(addresses: dict[str, str], examples: int) -> Counter:
    """Random bytes as the serialized request of every method (identity serializers)."""
    seen: Counter = Counter()
    channels = {name: grpc.insecure_channel(a) for name, a in addresses.items()}
    try:

        @_fuzz(examples)
        @given(raw_calls())
        def check(item):
            (method, streaming), data = item
            service = method.split("/")[1].rsplit(".", 1)[1]
            channel = channels[service]
            long_job = _asks_long_generation(method, data)
            if streaming:
                call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
                code, _ = _code(lambda: list(call(data, timeout=CALL_TIMEOUT_S)), long_job)
            else:
                call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                code, reply = _code(lambda: call(data, timeout=CALL_TIMEOUT_S), long_job)
                if method.endswith("ModelWorker/Open") and reply is not None:  # a session nobody knows of
                    session_id = wpb.OpenResponse.FromString(reply).session_id
                    worker_pb2_grpc.ModelWorkerStub(channel).Close(wpb.CloseRequest(session_id=session_id))
            seen[code.name] += 1

        check()
    finally:
        for channel in channels.values():
            channel.close()
    return seen


async def _still_serving(cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        reply = await fusion_pb2_grpc.FusionStub(channel).Generate(
            fpb.GenerateRequest(prompt="1, 2, 3,", mode="single:smollm2", max_new_tokens=2), timeout=HANG_GUARD_S
        )
    assert reply.text


async def test_fuzz_fusion_requests(cluster):
    seen = await asyncio.to_thread(fuzz_fusion, cluster.address, 60)
    assert seen["INVALID_ARGUMENT"] and sum(seen.values()) >= 60, seen
    assert await wait_no_sessions(cluster) == dict.fromkeys(cluster.cores, 0)
    await _still_serving(cluster)


async def test_fuzz_worker_requests(cluster):
    seen = await asyncio.to_thread(fuzz_worker, cluster.worker_addresses["smollm2"], 60)
    assert seen["NOT_FOUND"] and seen["OK"], seen
    assert await wait_no_sessions(cluster) == dict.fromkeys(cluster.cores, 0)
    await _still_serving(cluster)


async def test_fuzz_random_bytes_on_every_method(cluster):
    addresses = {
        "Fusion": cluster.address,
        "ModelWorker": cluster.worker_addresses["smollm2"],
        "TokenizerService": cluster.tokenizer_address,
    }
    seen = await asyncio.to_thread(fuzz_bytes, addresses, 100)
    assert seen["INVALID_ARGUMENT"], seen
    assert await wait_no_sessions(cluster) == dict.fromkeys(cluster.cores, 0)
    await _still_serving(cluster)
