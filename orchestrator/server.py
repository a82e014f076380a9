"""Public Fusion service: validates requests, runs the FusionEngine, streams segments.

The servicer and ``build_service``, which wires the workers, the engine and the admission
checks together; the protos are converted in ``wire.py``, the limits on what runs at once and
what fits are kept in ``admission.py``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos import fusion_pb2_grpc as pb_grpc
from coolfusion.protos.fusion_wire import FUSED_MODES, SINGLE_PREFIX

from ..services.common.errors import InvalidArgument
from ..services.common.metrics import SEGMENTS, TOKENS
from ..services.common.server import GrpcService
from .admission import Admission, ContextAdmission, ContextLimits
from .config import ORCHESTRATOR
from .engine import FusionEngine
from .replicas import make_worker
from .results import Segment, apply_rule, scored_report
from .rules import ScoreRule
from .wire import (
    MAX_REQUEST_ID,
    Limits,
    final_to_proto,
    generate_response,
    metadata_safe,
    model_info_to_proto,
    request_from_proto,
    score_response,
    segment_to_proto,
)
from .workers import call_deadline

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Fusion"].full_name


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
        if not metadata_safe(request_id):  # it goes back as metadata: printable ASCII only
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
        return generate_response(segments, final)

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
        return score_response(reports, chosen, rule.label())

    async def ListModels(self, request, context):
        infos = await asyncio.gather(*(w.info() for w in self.engine.workers.values()))
        return pb.ListModelsResponse(
            models=[model_info_to_proto(name, i) for name, i in zip(self.engine.workers, infos)],
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
    from a headless Service's DNS records); see ``replicas.make_worker``. With ``auth_tokens``
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
