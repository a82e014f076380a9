"""The tokenizer service's Align RPC on a real loopback server: the same answers as the core,
INVALID_ARGUMENT with one line for bad input, and it keeps serving after it."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from coolfusion.protos import tokenizer_pb2 as pb
from coolfusion.protos import tokenizer_pb2_grpc as pb_grpc
from coolfusion.services.tokenizer.alignment import align, text_tokens
from coolfusion.services.tokenizer.client import TokenizerClient
from coolfusion.services.tokenizer.server import build_service

TEXT = "Multi-tasking isn't 1850 héllo 你好世界\n\nOK 🦩 the end"


@pytest.fixture(scope="module")
async def service(tokenizer_registry):
    svc = build_service(tokenizer_registry, "127.0.0.1:0")
    port = await svc.start()
    yield f"127.0.0.1:{port}"
    await svc.stop(grace=None)


@pytest.fixture
async def stub(service):
    async with grpc.aio.insecure_channel(service) as channel:
        yield pb_grpc.TokenizerServiceStub(channel)


def source_rows(tok, ids, k=3):
    """Made-up top-k rows: the gold next token, its neighbour ids and the end of text."""
    rows = [[i, (i + 1) % tok.vocab_size, tok.eos_token_id][:k] for i in ids]
    logprobs = [[math.log(0.5), math.log(0.3), math.log(0.1)][:k] for _ in ids]
    return rows, logprobs


def request(tok, text, method="", k=3, with_spans=True, **override):
    ids, spans = text_tokens(tok, text)
    rows, logprobs = source_rows(tok, ids, k)
    fields = dict(
        source=tok.id,
        target="gemma3" if tok.id == "smollm2" else "smollm2",
        text=text.encode(),
        method=method,
        source_ids=ids,
        source_starts=[s for s, _ in spans] if with_spans else [],
        source_ends=[e for _, e in spans] if with_spans else [],
        top_k=k,
        topk_ids=[i for row in rows for i in row],
        topk_logprobs=[v for row in logprobs for v in row],
    )
    fields.update(override)
    return pb.AlignRequest(**fields)


@pytest.mark.parametrize("method", ["", "span", "dtw"])
@pytest.mark.parametrize("source", ["smollm2", "gemma3"])
async def test_align_matches_core(stub, tokenizer_registry, source, method):
    src = tokenizer_registry.get(source)
    tgt = tokenizer_registry.get("gemma3" if source == "smollm2" else "smollm2")
    ids, spans = text_tokens(src, TEXT)
    rows, logprobs = source_rows(src, ids)
    want = align(src, tgt, TEXT, ids, spans, rows, logprobs, method or "span")
    for with_spans in (True, False):  # spans computed by the service when not given
        reply = await stub.Align(request(src, TEXT, method, with_spans=with_spans))
        assert list(reply.target_ids) == want.target_ids == text_tokens(tgt, TEXT)[0]
        assert list(zip(reply.target_starts, reply.target_ends)) == want.target_spans
        assert list(reply.source_index) == want.source_index
        assert list(reply.mapped_ids) == [i for row in want.mapped_ids for i in row]
        got = list(reply.mapped_logprobs)
        assert got == pytest.approx([v for row in want.mapped_logprobs for v in row], abs=1e-6)
    # aligned rows keep their mass (float32 on the wire); unaligned rows are padding
    for j, i in enumerate(want.source_index):
        row = got[3 * j : 3 * j + 3]
        if i < 0:
            assert list(reply.mapped_ids[3 * j : 3 * j + 3]) == [-1] * 3 and row == [-math.inf] * 3
        else:
            assert want.target_spans[j][0] == spans[i][0] or method == "dtw"
            assert sum(math.exp(v) for v in row) <= 0.9 + 1e-6


async def test_align_hand_made_row(stub, tokenizer_registry):
    s, g = tokenizer_registry.get("smollm2"), tokenizer_registry.get("gemma3")
    sid, gid = s.backend.token_to_id, g.backend.token_to_id
    # "Hi the": Gemma-3's "▁the" starts where SmolLM2's "Ġthe" starts (byte 2)
    reply = await stub.Align(
        pb.AlignRequest(
            source="gemma3",
            target="smollm2",
            text=b"Hi the",
            source_ids=[gid("Hi"), gid("▁the")],
            top_k=3,
            topk_ids=[gid("▁the"), gid("<eos>"), gid("<end_of_turn>"), gid("<eos>"), gid("▁the"), -1],
            topk_logprobs=[math.log(0.6), math.log(0.2), math.log(0.1), math.log(0.7), math.log(0.2), -math.inf],
        )
    )
    assert list(reply.target_ids) == [sid("Hi"), sid("Ġthe")]
    assert list(reply.target_starts) == [0, 2] and list(reply.target_ends) == [2, 6]
    assert list(reply.source_index) == [0, 1]
    # <eos> and <end_of_turn> both end the text: one target id with their probabilities added
    assert list(reply.mapped_ids) == [sid("Ġthe"), sid("<|im_end|>"), -1, sid("<|im_end|>"), sid("Ġthe"), -1]
    assert [math.exp(v) for v in reply.mapped_logprobs] == pytest.approx([0.6, 0.3, 0, 0.7, 0.2, 0], abs=1e-6)


async def test_align_batch_and_sync_client(stub, service, tokenizer_registry):
    s = tokenizer_registry.get("smollm2")
    texts = ["", "a", TEXT]
    reply = await stub.AlignBatch(pb.AlignBatchRequest(requests=[request(s, t) for t in texts]))
    singles = [await stub.Align(request(s, t)) for t in texts]
    assert list(reply.responses) == singles
    assert list(singles[0].target_ids) == [] and list(singles[1].source_index) == [0]
    client = TokenizerClient(service)
    try:
        ids, spans = text_tokens(s, TEXT)
        rows, logprobs = source_rows(s, ids)
        result = await asyncio.to_thread(client.align, "smollm2", "gemma3", TEXT, ids, spans, rows, logprobs)
        want = align(s, tokenizer_registry.get("gemma3"), TEXT, ids, spans, rows, logprobs)
        assert (result.target_ids, result.target_spans, result.source_index) == (
            want.target_ids,
            want.target_spans,
            want.source_index,
        )
        assert result.mapped_ids == want.mapped_ids
    finally:
        client.close()


def _bad_requests(s):
    ok = request(s, "Hello world")  # two tokens, top-3 rows

    def change(**fields):
        r = pb.AlignRequest()
        r.CopyFrom(ok)
        for name, value in fields.items():
            if isinstance(value, list):
                r.ClearField(name)
                getattr(r, name).extend(value)
            else:
                setattr(r, name, value)
        return r

    return [
        (change(source="nope"), "unknown tokenizer 'nope'"),
        (change(target="nope"), "unknown tokenizer 'nope'"),
        (change(method="best"), "unknown alignment method 'best'"),
        (change(source_starts=[0]), "2 source tokens but 1 starts, 2 ends"),
        (change(source_ends=[5, 12]), "outside the text"),
        (change(source_starts=[5, 0], source_ends=[11, 5]), "before span 0"),
        (change(topk_ids=[1, 2, 3]), "needs 6 top-k ids"),
        (change(top_k=-1), "top_k -1"),
        (change(topk_ids=[0] * 5 + [10**7]), "out of range"),
        (change(source_ids=[1, 10**7]), "out of range"),
        (change(text=b"Hello \xffworld"), "not valid UTF-8"),
        (change(topk_logprobs=[0.0] * 5 + [float("nan")]), "NaN"),
        (change(source_starts=[], source_ends=[]), None),  # spans computed: fine
        (change(source_ids=ok.source_ids[:1], source_starts=[], source_ends=[], top_k=0, topk_ids=[], topk_logprobs=[]), "not 'smollm2'"),
    ]  # fmt: skip


async def test_bad_input_is_invalid_argument_then_keeps_serving(stub, tokenizer_registry):
    s = tokenizer_registry.get("smollm2")
    for bad, message in _bad_requests(s):
        if message is None:
            await stub.Align(bad)
            continue
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Align(bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in info.value.details() and "\n" not in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.AlignBatch(pb.AlignBatchRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = await stub.Align(request(s, "Hello world"))
    assert list(reply.source_index) == [0, 1]
