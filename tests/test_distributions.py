"""The worker's Distributions RPC (``services/worker/distributions.py``) against plain forwards.

Oracles: the top-k ids and log-probs equal a plain forward's log_softmax + topk computed here
(transformers; within the engine's noise on llama.cpp against llama-cpp-python's own
``Llama(logits_all=True)``), the gold log-prob is that forward's entry of the gold token (and the
top-k entry where gold is in the top-k), the byte spans spell the text, and a text split into
windows is each window's plain forward. Over a real gRPC worker on loopback: the same rows, bad
input statuses, and a cancel that stops the work between chunks while a live session's calls run
between them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading

import grpc
import pytest
import pytest_asyncio
import torch
from cluster import ORACLE_THREADS

from coolfusion.protos import worker_pb2, worker_pb2_grpc
from coolfusion.services.common.errors import InvalidArgument
from coolfusion.services.common.server import GrpcService
from coolfusion.services.sources import parse_spec
from coolfusion.services.worker import distributions as dist
from coolfusion.services.worker import llamacpp
from coolfusion.services.worker.client import distributions, distributions_blocking
from coolfusion.services.worker.model import WorkerCore
from coolfusion.services.worker.server import SERVICE_NAME, WorkerServicer

TEXT = "Hello  world,\nnaïve café 日本語 🙂!\n\n\tQuestion: 2+2 = 4? Yes."
K = 8
HANG_GUARD_S = 60
# llama.cpp's log-probs of the same tokens move with the cells a sequence occupies and the tokens a
# decode holds (test_llamacpp.py measured 0.04-0.05 nats a token on average, up to 0.95 on single
# tokens); a wrong position or a missing chunk costs several nats.
MEAN_GAP, MAX_GAP = 0.15, 1.5


@pytest.fixture(scope="module")
def cores(bundled_models):
    """A transformers core per bundled model over the session's loaded weights."""
    return {
        name: WorkerCore(name, b.spec, device="cpu", model=b.model, hf_tokenizer=b.hf_tokenizer)
        for name, b in bundled_models.items()
    }


def plain_forward(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward of ``ids``: row p is the distribution after ids[:p + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def check_rows(d, logp: torch.Tensor, atol: float) -> int:
    """``d``'s rows against the log-probs ``logp`` predicting its tokens (one row per token);
    returns how many gold tokens are in their top-k."""
    values, indices = logp.topk(K, -1)
    assert d.topk_ids == indices.tolist()
    torch.testing.assert_close(torch.tensor(d.topk_logprobs), values, atol=atol, rtol=0)
    gold = logp.gather(1, torch.tensor(d.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(d.gold_logprobs), gold, atol=atol, rtol=0)
    in_topk = 0
    for t, token in enumerate(d.token_ids):
        if token in d.topk_ids[t]:  # the same number, taken from the same row
            in_topk += 1
            assert d.gold_logprobs[t] == d.topk_logprobs[t][d.topk_ids[t].index(token)]
    return in_topk


def check_spans(d, text: str) -> None:
    data = text.encode()
    assert d.n_bytes == len(data)
    assert d.starts[0] == 0 and d.ends[-1] == len(data)
    assert all(e == s for e, s in zip(d.ends, d.starts[1:]))  # contiguous, in order
    assert b"".join(data[s:e] for s, e in zip(d.starts, d.ends)) == data


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_topk_equals_a_plain_forward(cores, name):
    core = cores[name]
    (d,) = core.distributions([TEXT], K)
    assert d.token_ids == core.tokenizer.backend.encode(TEXT, add_special_tokens=False).ids
    start = core._distributions.start
    assert start == ([core.tokenizer.bos_token_id] if name == "gemma3" else [0])  # <bos>, <|endoftext|>
    logp = plain_forward(core.model, start + d.token_ids)[len(start) - 1 : -1]
    # SmolLM2's rows are bitwise the plain forward's; Gemma-3's through its cache differ in float noise.
    assert check_rows(d, logp, atol=1e-4) > len(d.token_ids) // 3
    check_spans(d, TEXT)
    assert d.window_starts == [0]
    assert d.ce == pytest.approx(-sum(d.gold_logprobs) / len(d.token_ids))
    mass = torch.tensor(d.topk_logprobs).exp().sum(-1)
    assert bool(((mass > 0) & (mass <= 1 + 1e-5)).all())


def test_long_text_is_split_into_windows_never_cut(cores, monkeypatch):
    core = cores["smollm2"]
    monkeypatch.setattr(core, "distributions_window", 6)
    monkeypatch.setattr(core, "prefill_chunk", 4)  # several chunks per window too
    (d,) = core.distributions([TEXT], K)
    ids = core.tokenizer.backend.encode(TEXT, add_special_tokens=False).ids
    assert d.token_ids == ids and len(ids) > 12
    assert d.window_starts == list(range(0, len(ids), 6))
    check_spans(d, TEXT)
    start = core._distributions.start
    for s in d.window_starts:  # each window: a plain forward of the start token and its tokens
        window = ids[s : s + 6]
        logp = plain_forward(core.model, start + window)[:-1]
        sub = dist.TextDistributions(
            0, window, [], [], d.gold_logprobs[s : s + 6], d.topk_ids[s : s + 6], d.topk_logprobs[s : s + 6], 0, []
        )
        check_rows(sub, logp, atol=1e-4)


def test_bad_input_and_empty_texts(cores, monkeypatch):
    core = cores["smollm2"]
    for k in (0, -1, core.vocab_size + 1):
        with pytest.raises(InvalidArgument, match=r"top_k must be in 1\.\.49152"):
            core.distributions([TEXT], k)
    with pytest.raises(InvalidArgument, match="at most 1024"):
        core.distributions([""] * (dist.MAX_TEXTS + 1), 1)
    monkeypatch.setattr(dist, "MAX_REQUEST_BYTES", 10)
    with pytest.raises(InvalidArgument, match="bytes of text in one request; at most 10"):
        core.distributions(["x" * 6, "y" * 5], 1)
    monkeypatch.setattr(dist, "MAX_REQUEST_BYTES", 1000)
    monkeypatch.setattr(dist, "MAX_REPLY_BYTES", 1000)
    with pytest.raises(InvalidArgument, match="text 1: .* lower top_k or split the text"):
        core.distributions(["a", "b " * 50], 2)
    empty, one = core.distributions(["", "a"], 3)
    assert (empty.token_ids, empty.topk_ids, empty.window_starts, empty.n_bytes) == ([], [], [], 0)
    assert (one.text_index, len(one.topk_ids[0]), one.window_starts) == (1, 3, [0])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker(cores):
    """The SmolLM2 core behind a real gRPC worker server on loopback."""
    servicer = WorkerServicer(cores["smollm2"])
    service = GrpcService(
        lambda server: worker_pb2_grpc.add_ModelWorkerServicer_to_server(servicer, server), [SERVICE_NAME]
    )
    port = await service.start()
    yield f"127.0.0.1:{port}"
    await service.stop(0)
    await servicer.stop_reaper()


async def test_rpc_streams_the_cores_rows_and_refuses_bad_input(cores, worker):
    texts = [TEXT, "", "The three primary colors are"]
    local = list(cores["smollm2"].distributions(texts, K))
    remote = [d async for d in distributions(worker, texts, K)]
    assert remote == local  # float32 on the wire as in the core: the same numbers
    assert [d.text_index for d in remote] == [0, 1, 2]
    blocking = await asyncio.to_thread(lambda: list(distributions_blocking(worker, texts[2:], K)))
    assert blocking == [dataclasses.replace(local[2], text_index=0)]
    for k, texts_, needle in ((0, [TEXT], "top_k must be in 1..49152"), (3, [""] * 1025, "at most 1024")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [d async for d in distributions(worker, texts_, k)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details() and "\n" not in err.value.details()


async def test_cancel_stops_between_chunks_while_sessions_run(cores, worker, monkeypatch, caplog):
    """A Distributions call held before its third chunk: a live session opens and generates in
    the meantime (the compute lock is taken per chunk); the cancelled call does no chunk more."""
    caplog.set_level("INFO", logger="coolfusion.services.worker.server")
    core = cores["smollm2"]
    monkeypatch.setattr(core, "prefill_chunk", 4)
    forwards, inner = core._forwards, core._forwards.forward
    calls, reached, gate = [], threading.Event(), threading.Event()

    def gated(rows, cache, keep_last):
        if threading.current_thread().name.startswith("model-") and not keep_last:  # the distributions' chunks
            calls.append(len(rows[0]))
            if len(calls) == 3:
                reached.set()
                gate.wait(HANG_GUARD_S)
        return inner(rows, cache, keep_last)

    monkeypatch.setattr(forwards, "forward", gated)
    try:
        async with grpc.aio.insecure_channel(worker) as channel:
            stub = worker_pb2_grpc.ModelWorkerStub(channel)
            call = stub.Distributions(worker_pb2.DistributionsRequest(texts=[TEXT * 3], top_k=K))
            assert await asyncio.to_thread(reached.wait, HANG_GUARD_S)
            opened = await stub.Open(worker_pb2.OpenRequest(prompt=b"The three primary colors are"))
            segment = await stub.NextText(worker_pb2.NextTextRequest(session_id=opened.session_id, max_tokens=3))
            assert segment.token_ids  # served while the distributions wait between chunks
            await stub.Close(worker_pb2.CloseRequest(session_id=opened.session_id))
            call.cancel()
            for _ in range(HANG_GUARD_S * 20):
                if any("Distributions call was cancelled" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            gate.set()
            await asyncio.sleep(0.5)
        assert calls == [4, 4, 4]  # of many more chunks: none after the cancel
    finally:
        gate.set()


@pytest.mark.slow
@pytest.mark.skipif(
    not llamacpp.llamacpp_available() and not os.environ.get("CI"),
    reason="llama-cpp-python is not installed (COOLFUSION_LLAMACPP=1 bash scripts/install.sh)",
)
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_llamacpp_rows_are_llama_cpp_pythons_within_its_noise(tokenizer_registry, name):
    """On the llama.cpp backend (several chunks a window, a window split too) against
    llama-cpp-python's own ``Llama(logits_all=True)`` evaluating the start token and the text."""
    import numpy as np
    from llama_cpp import Llama

    spec = parse_spec(name)
    core = WorkerCore(name, spec, backend="llamacpp", hf_tokenizer=tokenizer_registry.get(name).hf, kv_cells=1024)
    core.prefill_chunk = 48
    text = TEXT * 6
    (d,) = core.distributions([text], K)
    check_spans(d, text)
    assert core._distributions.chunk < len(d.token_ids)  # more than one chunk
    start = core._distributions.start
    llm = Llama(
        str(spec.gguf_path), n_ctx=256, n_threads=ORACLE_THREADS, flash_attn=False, logits_all=True, verbose=False
    )
    try:
        context = start + d.token_ids
        llm.eval(context)
        logp = torch.log_softmax(torch.from_numpy(np.array(llm.scores[len(start) - 1 : len(context) - 1])), -1)
    finally:
        llm.close()
    ids, lps = torch.tensor(d.topk_ids), torch.tensor(d.topk_logprobs)
    gaps = torch.cat(
        [
            (lps - logp.gather(1, ids)).abs().flatten(),  # the RPC's top-k as the oracle scores them
            (lps - logp.topk(K, -1).values).abs().flatten(),  # and the oracle's own top-k values
            (torch.tensor(d.gold_logprobs) - logp.gather(1, torch.tensor(d.token_ids)[:, None])[:, 0]).abs(),
        ]
    )
    assert gaps.mean() < MEAN_GAP and gaps.max() < MAX_GAP, (gaps.mean(), gaps.max())
    assert (ids[:, 0] == logp.argmax(-1)).float().mean() > 0.9
    core.distributions_window = 40  # split: each window read after the start token alone
    (w,) = core.distributions([text], K)
    assert w.window_starts == list(range(0, len(d.token_ids), 40)) and w.token_ids == d.token_ids
    first = (torch.tensor(w.gold_logprobs[:40]) - torch.tensor(d.gold_logprobs[:40])).abs()
    assert first.mean() < MEAN_GAP  # the first window has the whole text's context
    assert sum(w.gold_logprobs[40:]) < sum(d.gold_logprobs[40:])  # less context, less likely text
