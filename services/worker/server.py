"""Thin grpc.aio servicer over WorkerCore (all model work is in model.py).

Model compute runs on one dedicated thread per worker: torch already uses every core it is
given for one forward, and a single compute thread keeps sessions from oversubscribing them.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

from coolfusion.protos import worker_pb2 as pb
from coolfusion.protos import worker_pb2_grpc as pb_grpc

from ..common.errors import InvalidArgument
from ..common.server import GrpcService
from ..sources import parse_spec
from ..tokenizer.client import TokenizerClient
from .model import WorkerCore

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelWorker"].full_name


def _field(obj, name):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


class WorkerServicer(pb_grpc.ModelWorkerServicer):
    def __init__(self, core: WorkerCore):
        self.core = core
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{core.name}")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args))

    async def _timed(self, fn, *args):
        """(result, seconds the call ran on the compute thread)."""

        def call():
            t0 = time.perf_counter()
            return fn(*args), time.perf_counter() - t0

        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def Info(self, request, context):
        info = self.core.info()
        return pb.InfoResponse(**{k: info[k] for k in pb.InfoResponse.DESCRIPTOR.fields_by_name if k in info})

    async def Open(self, request, context):
        which = request.WhichOneof("context")
        if which == "messages":
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            if not messages:
                raise InvalidArgument("messages is empty")
            session_id, n_tokens, text = await self._run(self.core.open, None, messages)
        else:
            try:
                prompt = request.prompt.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"prompt is not valid UTF-8 (byte {exc.start})") from None
            session_id, n_tokens, text = await self._run(self.core.open, prompt, None)
        return pb.OpenResponse(session_id=session_id, context_tokens=n_tokens, context_text=text)

    async def NextToken(self, request, context):
        token_id, logprob, eos = await self._run(self.core.next_token, request.session_id)
        return pb.NextTokenResponse(token_id=token_id, logprob=logprob, eos=eos)

    async def FeedTokens(self, request, context):
        state_id, logprobs, ppl = await self._run(self.core.feed_tokens, request.session_id, list(request.token_ids))
        return pb.FeedTokensResponse(state_id=state_id, logprobs=logprobs, ppl=ppl)

    async def UpdateState(self, request, context):
        (committed_tokens, committed_text), seconds = await self._timed(
            self.core.update_state, request.session_id, request.state_id
        )
        return pb.UpdateStateResponse(committed_tokens=committed_tokens, committed_text=committed_text, compute_s=seconds)

    async def NextText(self, request, context):
        if request.max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be >= 0, got {request.max_tokens}")
        reuse = request.reuse_lookahead if request.HasField("reuse_lookahead") else None
        r = await self._run(
            self.core.next_text, request.session_id, list(request.boundary_tokenizer_ids), request.max_tokens, reuse
        )
        return pb.NextTextResponse(**{k: _field(r, k) for k in pb.NextTextResponse.DESCRIPTOR.fields_by_name})

    async def ScoreCandidates(self, request, context):
        if not request.candidates:
            raise InvalidArgument("candidates is empty")
        scored, seconds = await self._timed(
            self.core.score_candidates,
            request.session_id,
            [(c.text, c.eos) for c in request.candidates],
            request.own_state_id,
        )
        return pb.ScoreCandidatesResponse(
            scores=[
                pb.CandidateScore(
                    state_id=s, token_ids=ids, logprobs=lps, ppl=ppl if math.isfinite(ppl) else float("inf"), reused=reused
                )
                for s, ids, lps, ppl, reused in scored
            ],
            compute_s=seconds,
        )

    async def Close(self, request, context):
        existed = await self._run(self.core.close, request.session_id)
        return pb.CloseResponse(existed=existed)


def build_service(model_spec: str, tokenizer_address: str, address: str = "127.0.0.1:0", device: str | None = None) -> GrpcService:
    """Load the model, connect to the tokenizer service for boundary checks, wrap in a server."""
    spec = parse_spec(model_spec)
    boundary = TokenizerClient(tokenizer_address)
    boundary.wait_ready()
    core = WorkerCore(spec.name, spec, device=device, boundary=boundary.common_boundary)
    servicer = WorkerServicer(core)
    return GrpcService(lambda server: pb_grpc.add_ModelWorkerServicer_to_server(servicer, server), [SERVICE_NAME], address)
