"""OpenAI request bodies -> GenerateRequests, and Fusion replies -> OpenAI response objects.

Usage: ``prompt_tokens`` and ``completion_tokens`` are counted in the tokenizer of the request's
first model (the first entry of the gRPC reply's per-model usage, config order): its
``prompt_tokens`` and its ``output_tokens`` (the fused text in that tokenizer). Prompts count
once, completions of every choice add up. The per-model numbers, generation steps included,
stay in the ``coolfusion`` extension of the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos.fusion_wire import score_rule_message, segment_json

from .schemas import ChatBody, CompletionBody, GenerationBody, ScoreRuleBody

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclass
class Choice:
    """One gRPC generation behind one OpenAI choice."""

    index: int
    prompt_index: int  # the prompt it continues (completions take a list of prompts)
    request: pb.GenerateRequest


def _rule(rule: str | ScoreRuleBody | None) -> pb.ScoreRule | None:
    if rule is None:
        return None
    if isinstance(rule, str):
        return score_rule_message(rule)
    return score_rule_message(rule.name, rule.weights, rule.primary, rule.threshold)


def base_request(body: GenerationBody, request_id: str) -> pb.GenerateRequest:
    ext = body.coolfusion
    request = pb.GenerateRequest(
        models=ext.models,
        mode=ext.mode or body.model,
        max_new_tokens=body.new_tokens(),
        stop=body.stop_list(),
        max_segment_tokens=ext.max_segment_tokens,
        request_id=request_id,
        allow_degraded=ext.allow_degraded,
        temperature=body.temperature or 0.0,
        top_p=body.top_p or 0.0,
        top_k=ext.top_k,
    )
    rule = _rule(ext.score_rule)
    if rule is not None:
        request.score_rule.CopyFrom(rule)
    return request


def _choices(body: GenerationBody, base: pb.GenerateRequest, prompts: list[str] | None) -> list[Choice]:
    """n choices per prompt; with a seed, choice i samples with seed + i."""
    choices: list[Choice] = []
    for p, prompt in enumerate(prompts if prompts is not None else [None]):
        for _ in range(body.n):
            index = len(choices)
            request = pb.GenerateRequest()
            request.CopyFrom(base)
            if prompt is not None:
                request.prompt = prompt
            if body.seed is not None:
                request.seed = body.seed + index
            request.request_id = f"{base.request_id}-{index}" if index else base.request_id
            choices.append(Choice(index, p, request))
    return choices


def completion_choices(body: CompletionBody, request_id: str) -> list[Choice]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    return _choices(body, base_request(body, request_id), prompts)


def chat_choices(body: ChatBody, request_id: str) -> list[Choice]:
    base = base_request(body, request_id)
    base.messages.extend(pb.Message(role=ROLES.get(m.role, m.role), content=m.text()) for m in body.messages)
    return _choices(body, base, None)


# ---- responses ----------------------------------------------------------------------------------
def model_usage(usage: Sequence[pb.ModelUsage]) -> dict:
    return {
        u.model: {
            "prompt_tokens": u.prompt_tokens,
            "output_tokens": u.output_tokens,
            "generated_tokens": u.generated_tokens,
            "scored_tokens": u.scored_tokens,
        }
        for u in usage
    }


def final_provenance(final: pb.FinalInfo | pb.GenerateResponse) -> dict:
    return {
        "mode": final.mode,
        "score_rule": final.score_rule,
        "degraded_models": list(final.degraded_models),
        "usage": model_usage(final.usage),
        "timings": {"total_s": final.timings.total_s, "first_segment_s": final.timings.first_segment_s},
    }


def counted_tokens(usage: Sequence[pb.ModelUsage]) -> tuple[int, int]:
    """(prompt tokens, completion tokens) in the first model's tokenizer (module docstring)."""
    if not usage:
        return 0, 0
    return usage[0].prompt_tokens, usage[0].output_tokens


def usage_object(choices: Sequence[Choice], usages: Sequence[Sequence[pb.ModelUsage]]) -> dict:
    prompt = completion = 0
    seen_prompts: set[int] = set()
    for choice, usage in zip(choices, usages):
        p, c = counted_tokens(usage)
        if choice.prompt_index not in seen_prompts:
            seen_prompts.add(choice.prompt_index)
            prompt += p
        completion += c
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, "stop")


def completion_object(
    ident: str, created: int, model: str, chat: bool, choices: Sequence[Choice], replies: Sequence[pb.GenerateResponse]
) -> dict:
    out = []
    for choice, reply in zip(choices, replies):
        item: dict = {"index": choice.index, "finish_reason": finish_reason(reply.finish_reason), "logprobs": None}
        if chat:
            item["message"] = {"role": "assistant", "content": reply.text}
        else:
            item["text"] = reply.text
        out.append(item)
    provenance = [
        {"index": c.index, "segments": [segment_json(s) for s in r.segments], **final_provenance(r)}
        for c, r in zip(choices, replies)
    ]
    return {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage_object(choices, [r.usage for r in replies]),
        "coolfusion": {"choices": provenance},
    }
