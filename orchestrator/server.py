"""Public Fusion service: validates requests, runs the FusionEngine, streams segments."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass

from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos import fusion_pb2_grpc as pb_grpc
from coolfusion.protos.fusion_wire import FUSED_MODES, SINGLE_PREFIX, names_a_rule

from ..services.common.errors import InvalidArgument, ResourceExhausted
from ..services.common.metrics import SEGMENTS, TOKENS
from ..services.common.server import GrpcService
from ..services.worker.api import GREEDY, Sampling
from .admission import ContextAdmission, ContextLimits
from .config import ORCHESTRATOR
from .engine import FusionEngine
from .request import FusionRequest
from .results import CandidateReport, Final, Segment, apply_rule, scored_report
from .rules import DEFAULT_THRESHOLD, RuleError, ScoreRule
from .workers import call_deadline, make_worker

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Fusion"].full_name


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


def _metadata_safe(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID and all(" " <= c <= "~" for c in value)


def rule_from_proto(r: pb.ScoreRule) -> ScoreRule | None:
    """None when the request names no rule (the engine's default applies)."""
    if not names_a_rule(r):
        return None
    try:
        return ScoreRule(
            name=r.name or "mean-ppl",
            weights=dict(r.weights),
            primary=r.primary,
            threshold=r.threshold or DEFAULT_THRESHOLD,
        )
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


class Admission:
    """At most ``max_concurrent`` generations run and ``max_queue`` wait; beyond that a request
    is refused at once with RESOURCE_EXHAUSTED instead of waiting without bound."""

    def __init__(self, max_concurrent: int = ORCHESTRATOR.max_concurrent, max_queue: int = ORCHESTRATOR.max_queue):
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.slots = asyncio.Semaphore(max_concurrent)
        self.waiting = 0
        self.running = 0

    @property
    def capacity(self) -> int:
        """Generations held at once at most (running + queued): a larger batch never fits whole."""
        return self.max_concurrent + self.max_queue

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.running >= self.max_concurrent and self.waiting >= self.max_queue:
            raise ResourceExhausted(
                f"server busy: {self.running} generations running and {self.waiting} queued (limits "
                f"{self.max_concurrent}/{self.max_queue}); retry later"
            )
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self.slots.release()


class FusionServicer(pb_grpc.FusionServicer):
    def __init__(
        self,
        engine: FusionEngine,
        limits: Limits | None = None,
        max_concurrent: int = ORCHESTRATOR.max_concurrent,
        max_queue: int = ORCHESTRATOR.max_queue,
        tokenizer_address: str | None = None,
        internal_token: str | None = None,
    ):
        self.engine = engine
        self.limits = limits or Limits()
        self.admission = Admission(max_concurrent, max_queue)
        # Sizes checked before any worker does work (admission.py).
        self.context_check = ContextAdmission(
            engine.workers,
            tokenizer_address,
            ContextLimits(self.limits.max_messages, self.limits.max_rendered_chars),
            token=internal_token,
        )

    async def _run(self, request: pb.GenerateRequest, context):
        # A request id from the caller (field or x-request-id metadata) or a fresh one: it tags every
        # log line of this request and goes back to the caller as x-request-id.
        metadata = dict(context.invocation_metadata() or ())
        request_id = request.request_id or metadata.get("x-request-id") or uuid.uuid4().hex[:16]
        if not _metadata_safe(request_id):  # it goes back as metadata: printable ASCII only
            raise InvalidArgument(
                f"request_id must be 1-{MAX_REQUEST_ID} printable ASCII characters, got {request_id[:40]!r}"
            )
        context.set_trailing_metadata((("x-request-id", request_id),))
        tags = {"request_id": request_id}
        started = time.perf_counter()
        try:
            fusion_request = request_from_proto(request, self.limits)
            mode, names = self.engine.resolve(fusion_request)  # unknown model/mode fail before any work
            tags.update(mode=mode, models=names, max_new_tokens=fusion_request.max_new_tokens)
            log.info("generation started", extra=tags)
            await self.context_check.check(fusion_request, names)
            async with self.admission.slot():
                async for item in self.engine.generate(fusion_request):
                    if isinstance(item, Segment):
                        SEGMENTS.labels(item.model).inc()
                    else:
                        for model, usage in item.usage.items():
                            TOKENS.labels(model).inc(usage.generated_tokens)
                        tags.update(finish_reason=item.finish_reason, segments=item.segments)
                    yield item
        except asyncio.CancelledError:
            log.info("generation cancelled", extra={**tags, "duration_s": round(time.perf_counter() - started, 3)})
            raise
        except Exception as exc:
            log.info(
                "generation failed: %s", exc, extra={**tags, "duration_s": round(time.perf_counter() - started, 3)}
            )
            raise
        log.info("generation finished", extra={**tags, "duration_s": round(time.perf_counter() - started, 3)})

    async def GenerateStream(self, request, context):
        call_deadline(context.time_remaining())  # every worker call gets the caller's remaining time
        async for item in self._run(request, context):
            if isinstance(item, Segment):
                yield pb.GenerateStreamResponse(segment=segment_to_proto(item))
            else:
                yield pb.GenerateStreamResponse(final=final_to_proto(item))

    async def Generate(self, request, context):
        call_deadline(context.time_remaining())
        segments, final = [], None
        async for item in self._run(request, context):
            if isinstance(item, Segment):
                segments.append(segment_to_proto(item))
            else:
                final = final_to_proto(item)
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

    async def Score(self, request, context):
        if not request.texts:
            raise InvalidArgument("texts is empty")
        if request.eos and len(request.eos) != len(request.texts):
            raise InvalidArgument(f"eos has {len(request.eos)} flags for {len(request.texts)} texts")
        proxy = pb.GenerateRequest(
            prompt=request.prompt, messages=request.messages, models=request.models, score_rule=request.score_rule
        )
        fusion_request = request_from_proto(proxy, self.limits)
        _, names = self.engine.resolve(fusion_request)
        rule = self.engine.rule_for(fusion_request, names)  # a bad rule fails before any work
        eos = list(request.eos) or [False] * len(request.texts)
        call_deadline(context.time_remaining())
        fusion_request.max_new_tokens = 0  # the texts are scored, not generated
        await self.context_check.check(fusion_request, names)
        async with self.admission.slot():
            rows = await self.engine.score_texts(fusion_request, names, list(zip(request.texts, eos)))
        reports = [scored_report("", text, flag, "", row) for text, flag, row in zip(request.texts, eos, rows)]
        chosen = apply_rule(rule, reports)
        return pb.ScoreResponse(
            scores=[
                pb.TextScores(
                    ppl=[
                        pb.ScorerPpl(scorer=m, ppl=_ppl(p), tokens=n, logprob=r.logprob[m])
                        for m, (p, n) in r.ppl.items()
                    ],
                    mean_ppl=_ppl(r.mean_ppl),
                    loglikelihood=r.score,
                    chosen=i == chosen,
                )
                for i, r in enumerate(reports)
            ],
            score_rule=rule.label(),
        )

    async def ListModels(self, request, context):
        infos = await asyncio.gather(*(w.info() for w in self.engine.workers.values()))
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=name,
                    model_id=i.model_id,
                    tokenizer_id=i.tokenizer_id,
                    device=i.device,
                    dtype=i.dtype,
                    address=i.address,
                    has_chat_template=i.has_chat_template,
                    backend=i.backend,
                )
                for name, i in zip(self.engine.workers, infos)
            ],
            modes=[*FUSED_MODES, *(f"{SINGLE_PREFIX}{n}" for n in self.engine.workers)],
            max_requests=self.admission.capacity,
        )


def build_service(
    workers: dict[str, str],
    address: str = "127.0.0.1:0",
    limits: Limits | None = None,
    max_concurrent: int = ORCHESTRATOR.max_concurrent,
    max_queue: int = ORCHESTRATOR.max_queue,
    auth_tokens: list[str] | None = None,
    score_rule: ScoreRule | None = None,
    tokenizer_address: str | None = None,
    internal_token: str | None = None,
) -> tuple[GrpcService, FusionEngine]:
    """Fusion service over remote workers given as {model name: address}, in config order.

    An address is ``HOST:PORT``, ``ADDR1|ADDR2|...`` (replicas) or ``dns:///HOST:PORT`` (replicas
    from a headless Service's DNS records); see ``workers.make_worker``. With ``auth_tokens``
    callers must send one as ``authorization: Bearer <token>``. With ``tokenizer_address`` (the
    tokenizer service) every request's context is measured against each model's limits before
    any worker opens a session. ``internal_token``: what calls to the workers and the tokenizer
    service carry (None: $COOLFUSION_INTERNAL_TOKEN's; docs/security.md)."""
    engine = FusionEngine(
        [make_worker(name, addr, internal_token) for name, addr in workers.items()], score_rule=score_rule
    )
    servicer = FusionServicer(engine, limits, max_concurrent, max_queue, tokenizer_address, internal_token)
    service = GrpcService(
        lambda server: pb_grpc.add_FusionServicer_to_server(servicer, server),
        [SERVICE_NAME],
        address,
        auth_tokens=auth_tokens,
    )
    service.on_stop.append(servicer.context_check.aclose)
    return service, engine
