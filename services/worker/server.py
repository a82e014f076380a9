"""Thin grpc.aio servicer over WorkerCore (all model work is in model.py and the modules it uses).

Core calls run on a thread pool: calls on different sessions proceed concurrently, calls on one
session queue on its lock, and forwards take turns on the core's compute lock (torch already uses
every core it is given for one forward). Decode steps of sessions generating at the same time are
batched into one forward (``batching.py``).

A worker process serves health (NOT_SERVING) while its model loads; until then every call gets
UNAVAILABLE "loading" (``WorkerServicer(None)`` + ``set_core``). A reaper task frees idle
sessions past their TTL and enforces the session cap and KV budget, and keeps the
live-sessions / KV-bytes gauges current.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from coolfusion.protos import worker_pb2 as pb
from coolfusion.protos import worker_pb2_grpc as pb_grpc

from ..common.errors import InvalidArgument, Unavailable
from ..common.metrics import KV_BYTES, LIVE_SESSIONS, PREFIX_CACHE_BYTES, PREFIX_CACHE_TOKENS, STEP_BATCH
from ..common.security import internal_tokens
from ..common.server import GrpcService
from ..sources import parse_spec
from ..tokenizer.client import TokenizerClient
from . import wire
from .model import WorkerCore

CALL_THREADS = 32  # concurrent core calls (sessions generating at once can share a batch)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelWorker"].full_name
log = logging.getLogger(__name__)


class WorkerServicer(pb_grpc.ModelWorkerServicer):
    """``core=None``: the model is still loading (every call: UNAVAILABLE) until ``set_core``.

    ``reap_interval``: seconds between reaper passes (default: a quarter of the session TTL,
    between 0.2 and 5 s)."""

    def __init__(self, core: WorkerCore | None, name: str = "", reap_interval: float | None = None):
        self._core = None
        self._reused_counted = 0  # the core's prefix-cache reused tokens already in the counter
        self.name = name
        self.reap_interval = reap_interval
        self._reaper: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix=f"model-{name or 'worker'}")
        if core is not None:
            self.set_core(core)

    def set_core(self, core: WorkerCore) -> None:
        """The model is loaded: calls are served from now on."""
        self._core = core
        self.name = core.name
        core.batcher.on_batch = STEP_BATCH.labels(core.name).observe
        try:
            asyncio.get_running_loop()
            self.start_reaper()
        except RuntimeError:
            pass  # no loop yet: started by the first call

    @property
    def core(self) -> WorkerCore:
        if self._core is None:
            raise Unavailable(f"worker {self.name or '?'} is loading its model; retry when health reports SERVING")
        return self._core

    # ---- session reaper ------------------------------------------------------------------
    def start_reaper(self) -> None:
        if self._core is None or (self._reaper is not None and not self._reaper.done()):
            return
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop(), name=f"reaper-{self.name}")

    async def stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._reaper = None

    def _interval(self) -> float:
        if self.reap_interval:
            return self.reap_interval
        ttl = self._core.session_ttl if self._core is not None else None
        return min(5.0, max(0.2, ttl / 4)) if ttl else 5.0

    def update_gauges(self) -> tuple[int, int]:
        live, kv = self._core.stats()
        LIVE_SESSIONS.labels(self.name).set(live)
        KV_BYTES.labels(self.name).set(kv)
        prefixes = self._core.prefix_cache
        PREFIX_CACHE_BYTES.labels(self.name).set(prefixes.nbytes())
        reused = prefixes.reused_tokens
        PREFIX_CACHE_TOKENS.labels(self.name).inc(reused - self._reused_counted)
        self._reused_counted = reused
        return live, kv

    async def _reap_loop(self) -> None:
        while True:
            try:
                # Non-blocking (idle sessions only, try-locks): runs beside the compute thread.
                freed = await asyncio.to_thread(self._core.reap)
                if freed:
                    log.info("worker %s freed %d idle session(s)", self.name, len(freed))
                await asyncio.to_thread(self._core.trim_when_idle)
                self.update_gauges()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reaper must survive anything
                log.exception("session reaper of %s failed", self.name)
            await asyncio.sleep(self._interval())

    async def _run(self, fn, *args):
        self.start_reaper()
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args))

    async def _timed(self, fn, *args):
        """(result, seconds the call ran on the compute thread)."""
        self.start_reaper()

        def call():
            t0 = time.perf_counter()
            return fn(*args), time.perf_counter() - t0

        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def Info(self, request, context):
        info = self.core.info()
        return pb.InfoResponse(**{k: info[k] for k in pb.InfoResponse.DESCRIPTOR.fields_by_name if k in info})

    async def Open(self, request, context):
        prompt, messages = wire.open_from_request(request)
        opened = await self._open(messages, prompt)
        self.update_gauges()
        return wire.open_to_proto(opened)

    async def _open(self, messages, prompt=None):
        """core.open on the compute thread. When the caller is gone before it returns (cancel,
        deadline) the prefill stops at its next chunk and frees the session; a session that got
        opened all the same is closed again instead of leaking."""
        self.start_reaper()
        core = self.core
        left = threading.Event()
        job = self.executor.submit(core.open, prompt, messages, left.is_set)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            left.set()
            log.info("worker %s: an Open was cancelled; its prefill stops at the next chunk", self.name)

            def close_orphan(done):
                if not done.cancelled() and done.exception() is None:
                    core.close(done.result().session_id)
                    log.info("closed session %s: its Open was cancelled", done.result().session_id)

            job.add_done_callback(close_orphan)
            raise

    async def NextToken(self, request, context):
        token_id, logprob, eos = await self._run(self.core.next_token, request.session_id)
        return pb.NextTokenResponse(token_id=token_id, logprob=logprob, eos=eos)

    async def FeedTokens(self, request, context):
        state_id, logprobs, ppl = await self._run(self.core.feed_tokens, request.session_id, list(request.token_ids))
        return pb.FeedTokensResponse(state_id=state_id, logprobs=logprobs, ppl=ppl)

    async def UpdateState(self, request, context):
        committed, seconds = await self._timed(self.core.update_state, request.session_id, request.state_id)
        return wire.commit_to_proto(committed._replace(compute_s=seconds))

    async def NextText(self, request, context):
        if request.max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be >= 0, got {request.max_tokens}")
        r = await self._run(self.core.next_text, request.session_id, wire.options_from_request(request))
        return wire.next_text_to_proto(r)

    async def ScoreCandidates(self, request, context):
        if not request.candidates:
            raise InvalidArgument("candidates is empty")
        scored, seconds = await self._timed(
            self.core.score_candidates,
            request.session_id,
            [(c.text, c.eos) for c in request.candidates],
            request.own_state_id,
        )
        return wire.scores_to_proto(scored, seconds)

    async def Distributions(self, request, context):
        """A message per text, each computed on the compute thread as the stream is read. When
        the caller leaves (cancel, deadline) the text in work stops at its next chunk."""
        self.start_reaper()
        left = threading.Event()
        texts = await self._run(self.core.distributions, list(request.texts), request.top_k, left.is_set)
        loop = asyncio.get_running_loop()
        while True:
            job = self.executor.submit(next, texts, None)
            try:
                item = await asyncio.wrap_future(job, loop=loop)
            except asyncio.CancelledError:
                left.set()
                job.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen, not logged
                log.info("worker %s: a Distributions call was cancelled; it stops at the next chunk", self.name)
                raise
            if item is None:
                return
            yield wire.distributions_to_proto(item)

    async def Close(self, request, context):
        existed = await self._run(self.core.close, request.session_id)
        self.update_gauges()
        return pb.CloseResponse(existed=existed)


def build_service(
    model_spec: str,
    tokenizer_address: str,
    address: str = "127.0.0.1:0",
    device: str | None = None,
    **session_limits,
) -> GrpcService:
    """Load the model, connect to the tokenizer service for boundary checks, wrap in a server.

    ``session_limits``: ``session_ttl``, ``max_sessions``, ``kv_budget_bytes`` of ``WorkerCore``."""
    service, servicer = build_loading_service(model_spec, address)
    servicer.set_core(load_core(model_spec, tokenizer_address, device, **session_limits))
    return service


def build_loading_service(
    model_spec: str, address: str = "127.0.0.1:0", tokens: list[str] | None = None
) -> tuple[GrpcService, WorkerServicer]:
    """A worker server without its model yet: start it with ``start(serving=False)``, load the
    core (``load_core``, in a thread), then ``servicer.set_core(core)`` and ``service.set_serving()``.
    ``tokens``: the internal tokens callers must send (None: $COOLFUSION_INTERNAL_TOKEN's)."""
    servicer = WorkerServicer(None, name=parse_spec(model_spec).name)
    service = GrpcService(
        lambda server: pb_grpc.add_ModelWorkerServicer_to_server(servicer, server),
        [SERVICE_NAME],
        address,
        internal_tokens=internal_tokens() if tokens is None else tokens,
    )
    service.on_stop.append(servicer.stop_reaper)
    return service, servicer


def load_core(model_spec: str, tokenizer_address: str, device: str | None = None, **session_limits) -> WorkerCore:
    """The worker core of ``coolfusion worker``, its boundaries from the tokenizer service."""
    spec = parse_spec(model_spec)
    boundary = TokenizerClient(tokenizer_address)
    boundary.wait_ready()
    return WorkerCore(spec.name, spec, device=device, boundary=boundary.common_boundary, **session_limits)
