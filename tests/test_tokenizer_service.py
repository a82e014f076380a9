"""Tokenizer gRPC service, started for real on a loopback port: same answers as the
library, precise statuses for malformed requests, and it keeps serving after them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coolfusion.protos import tokenizer_pb2 as pb
from coolfusion.protos import tokenizer_pb2_grpc as pb_grpc
from coolfusion.services.tokenizer.client import TokenizerClient
from coolfusion.services.tokenizer.server import SERVICE_NAME, build_service

IDS = ["smollm2", "gemma3"]
TEXTS = [
    "Multi-tasking isn't 1850 héllo 你好世界\n\nOK",
    "<div>\n</div> </a> 🦩 x\ufffdy\t\tz",
    "Hello world",
]


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


async def test_health_serving(service):
    async with grpc.aio.insecure_channel(service) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ["", SERVICE_NAME]:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_list_tokenizers(stub, tokenizer_registry):
    reply = await stub.ListTokenizers(pb.ListTokenizersRequest())
    assert [t.id for t in reply.tokenizers] == IDS
    for info in reply.tokenizers:
        expected = tokenizer_registry.get(info.id).info()
        assert {k: getattr(info, k) for k in expected} == expected
    rules = {t.id: t.boundary_rule for t in reply.tokenizers}
    assert rules == {"smollm2": "pretokenizer", "gemma3": "metaspace"}


@pytest.mark.parametrize("continuation", [False, True])
async def test_encode_matches_library(stub, tokenizer_registry, continuation):
    for tid in IDS:
        tok = tokenizer_registry.get(tid)
        for text in TEXTS:
            request = pb.EncodeRequest(tokenizer_id=tid, text=text.encode(), continuation=continuation)
            reply = await stub.Encode(request)
            enc = tok.encode(text, continuation)
            assert list(reply.ids) == enc.ids and list(reply.tokens) == enc.tokens
            assert list(zip(reply.starts, reply.ends)) == enc.spans
    batch = await stub.EncodeBatch(
        pb.EncodeBatchRequest(requests=[pb.EncodeRequest(tokenizer_id=t, text=x.encode()) for t in IDS for x in TEXTS])
    )
    assert [list(r.ids) for r in batch.responses] == [
        tokenizer_registry.get(t).encode(x).ids for t in IDS for x in TEXTS
    ]


async def test_decode_matches_library(stub, tokenizer_registry):
    """The service answers as the library does; and against references outside this code: the
    source text (a text's head and the decode of the rest in its context concatenate to exactly
    it: no U+FFFD invented, no byte lost; TEXTS[1] holds a genuine one) and transformers' own
    decoder (a lone token: the same text, with an incomplete character held back where
    transformers writes one U+FFFD)."""
    requests, expected, references = [], [], []
    for tid in IDS:
        tok = tokenizer_registry.get(tid)
        for text in TEXTS:
            ids = tok.encode(text).ids
            for k in range(0, len(ids) + 1, 3):
                # Everything from token k, in the context of tokens [0, k); and a lone token k.
                head = tok.decode(ids[:k])[0]  # complete characters only: the rest's decode starts after them
                for prefix, rest, reference in [
                    (ids[:k], ids[k:], ("context", text[len(head) :])),
                    (
                        [],
                        ids[k : k + 1],
                        (
                            "lone",
                            tok.hf.decode(ids[k : k + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False),
                        ),
                    ),
                ]:
                    requests.append(pb.DecodeRequest(tokenizer_id=tid, ids=rest, prefix_ids=prefix))
                    expected.append(tok.decode(rest, prefix))
                    references.append(reference)
    replies = [await stub.Decode(request) for request in requests[:40]]
    assert [(r.text, r.pending_bytes) for r in replies] == expected[:40]
    batch = await stub.DecodeBatch(pb.DecodeBatchRequest(requests=requests))
    assert [(r.text, r.pending_bytes) for r in batch.responses] == expected
    for reply, (kind, want) in zip(batch.responses, references):
        if kind == "context":
            assert (reply.text, reply.pending_bytes) == (want, 0)
        else:
            assert reply.text + ("\ufffd" if reply.pending_bytes else "") == want
    assert any(r.pending_bytes for r in batch.responses)  # incomplete characters were met
    # A lone byte-fallback token: held back, no U+FFFD.
    gemma = tokenizer_registry.get("gemma3")
    first_byte = gemma.encode("🦩", continuation=True).ids[0]
    reply = await stub.Decode(pb.DecodeRequest(tokenizer_id="gemma3", ids=[first_byte]))
    assert (reply.text, reply.pending_bytes) == ("", 1)
    # Special tokens are dropped unless asked for.
    bos = gemma.bos_token_id
    assert (await stub.Decode(pb.DecodeRequest(tokenizer_id="gemma3", ids=[bos]))).text == ""
    kept = await stub.Decode(pb.DecodeRequest(tokenizer_id="gemma3", ids=[bos], keep_special_tokens=True))
    assert kept.text == gemma.bos_token


async def test_words_matches_library(stub, tokenizer_registry):
    for tid in IDS:
        for text in TEXTS:
            reply = await stub.Words(pb.WordsRequest(tokenizer_id=tid, text=text.encode()))
            assert list(reply.starts) == tokenizer_registry.get(tid).word_starts(text)
    batch = await stub.WordsBatch(
        pb.WordsBatchRequest(requests=[pb.WordsRequest(tokenizer_id=t, text=x.encode()) for t in IDS for x in TEXTS])
    )
    assert [list(r.starts) for r in batch.responses] == [
        tokenizer_registry.get(t).word_starts(x) for t in IDS for x in TEXTS
    ]


def _boundary_cases():
    text = TEXTS[0]
    cases = [("", text[:k]) for k in range(len(text) + 1)]
    cases += [(text[:k], text[k:]) for k in range(0, len(text), 4)]
    cases += [("x", "\ufffd\ufffd y"), ("", "Hello "), ("", "   "), ("", "")]
    return cases


async def test_common_boundary_matches_library(stub, tokenizer_registry, service):
    client = TokenizerClient(service)
    try:
        for ids in [IDS, ["smollm2"], ["gemma3"]]:
            requests, expected = [], []
            for context, generated in _boundary_cases():
                want = tokenizer_registry.common_boundary(context, generated, ids)
                request = pb.CommonBoundaryRequest(
                    context_tail=context.encode(), generated_text=generated.encode(), tokenizer_ids=ids
                )
                reply = await stub.CommonBoundary(request)
                assert (reply.found, reply.offset) == (want is not None, want or 0), (context, generated, ids)
                # The synchronous client (used by workers) blocks: keep it off the event loop.
                got = await asyncio.to_thread(client.common_boundary, context, generated, ids)
                assert got == want
                requests.append(request)
                expected.append(want)
            batch = await stub.CommonBoundaryBatch(pb.CommonBoundaryBatchRequest(requests=requests))
            assert [r.offset if r.found else None for r in batch.responses] == expected
        # allowed_offsets restricts the answer
        text = "Hello world again"
        assert await asyncio.to_thread(client.common_boundary, "", text, IDS, [11]) == 11
        assert await asyncio.to_thread(client.common_boundary, "", text, IDS, [3]) is None
        infos = await asyncio.to_thread(client.list_tokenizers)
        assert [i.id for i in infos] == IDS
    finally:
        client.close()


# ---- malformed requests: precise status, clear message, and the service keeps serving --------


def _bad_requests(vocab: dict[str, int]):
    bad_utf8 = b"ok \xff\xfe"
    yield (
        "Encode",
        pb.EncodeRequest(tokenizer_id="nope", text=b"x"),
        grpc.StatusCode.NOT_FOUND,
        "unknown tokenizer 'nope'",
    )
    yield (
        "Encode",
        pb.EncodeRequest(tokenizer_id="gemma3", text=bad_utf8),
        grpc.StatusCode.INVALID_ARGUMENT,
        "text is not valid UTF-8",
    )
    yield (
        "Words",
        pb.WordsRequest(tokenizer_id="smollm2", text=bad_utf8),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not valid UTF-8",
    )
    yield "Words", pb.WordsRequest(tokenizer_id="", text=b"x"), grpc.StatusCode.NOT_FOUND, "unknown tokenizer"
    yield (
        "Decode",
        pb.DecodeRequest(tokenizer_id="nope", ids=[1]),
        grpc.StatusCode.NOT_FOUND,
        "unknown tokenizer 'nope'",
    )
    yield (
        "Decode",
        pb.DecodeRequest(tokenizer_id="smollm2", ids=[vocab["smollm2"]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "out of range",
    )
    yield (
        "Decode",
        pb.DecodeRequest(tokenizer_id="gemma3", ids=[5, -3]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token id -3 out of range",
    )
    yield (
        "Decode",
        pb.DecodeRequest(tokenizer_id="gemma3", ids=[5], prefix_ids=[10**9]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "out of range",
    )
    yield (
        "CommonBoundary",
        pb.CommonBoundaryRequest(generated_text=b"a b c", tokenizer_ids=[]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least one",
    )
    yield (
        "CommonBoundary",
        pb.CommonBoundaryRequest(generated_text=b"a b c", tokenizer_ids=["smollm2", "nope"]),
        grpc.StatusCode.NOT_FOUND,
        "unknown tokenizer 'nope'",
    )
    yield (
        "CommonBoundary",
        pb.CommonBoundaryRequest(context_tail=bad_utf8, generated_text=b"a b", tokenizer_ids=["smollm2"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "context_tail is not valid UTF-8",
    )
    yield (
        "CommonBoundary",
        pb.CommonBoundaryRequest(generated_text="你".encode()[:2] + b" b", tokenizer_ids=["gemma3"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "generated_text is not valid UTF-8",
    )
    for name, request_type in [
        ("EncodeBatch", pb.EncodeBatchRequest), ("DecodeBatch", pb.DecodeBatchRequest),
        ("WordsBatch", pb.WordsBatchRequest), ("CommonBoundaryBatch", pb.CommonBoundaryBatchRequest),
    ]:  # fmt: skip
        yield name, request_type(), grpc.StatusCode.INVALID_ARGUMENT, "requests must not be empty"
    # One bad item fails the whole batch with that item's status.
    yield (
        "EncodeBatch",
        pb.EncodeBatchRequest(
            requests=[
                pb.EncodeRequest(tokenizer_id="gemma3", text=b"ok"),
                pb.EncodeRequest(tokenizer_id="x", text=b"ok"),
            ]
        ),
        grpc.StatusCode.NOT_FOUND,
        "unknown tokenizer 'x'",
    )
    yield (
        "DecodeBatch",
        pb.DecodeBatchRequest(requests=[pb.DecodeRequest(tokenizer_id="gemma3", ids=[vocab["gemma3"] + 7])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "out of range",
    )
    yield (
        "CommonBoundaryBatch",
        pb.CommonBoundaryBatchRequest(
            requests=[pb.CommonBoundaryRequest(generated_text=b"\xc3(", tokenizer_ids=["gemma3"])]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not valid UTF-8",
    )


async def test_malformed_requests_then_keeps_serving(stub, tokenizer_registry):
    vocab = {t.id: t.vocab_size for t in tokenizer_registry}
    good = pb.CommonBoundaryRequest(generated_text=b"Hello world", tokenizer_ids=IDS)
    n = 0
    for method, request, code, message in _bad_requests(vocab):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(stub, method)(request)
        assert info.value.code() == code, (method, info.value.details())
        assert message in info.value.details(), (method, info.value.details())
        assert "Traceback" not in info.value.details()
        # ... and a good call right after succeeds.
        reply = await stub.CommonBoundary(good)
        assert (reply.found, reply.offset) == (True, 5)
        n += 1
    assert n >= 19


async def test_sync_client_sees_status(service):
    client = TokenizerClient(service)
    try:
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(client.common_boundary, "", "a b c", ["nope"])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert await asyncio.to_thread(client.common_boundary, "", "a b c", IDS) == 1
    finally:
        client.close()


async def test_concurrent_calls(stub, tokenizer_registry):
    text = TEXTS[0]
    requests = [
        pb.CommonBoundaryRequest(context_tail=text[:k].encode(), generated_text=text[k:].encode(), tokenizer_ids=IDS)
        for k in range(len(text))
    ]
    replies = await asyncio.gather(*(stub.CommonBoundary(r) for r in requests))
    for k, reply in enumerate(replies):
        want = tokenizer_registry.common_boundary(text[:k], text[k:], IDS)
        assert (reply.offset if reply.found else None) == want
