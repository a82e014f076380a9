"""Request bodies of the OpenAI-compatible routes, as pydantic models.

Fields the OpenAI API defines and this server does not implement (log-probs, echo, tools, ...)
are refused with 400 when set to anything but their neutral value, rather than silently ignored;
fields it does not know at all are ignored, as OpenAI's clients send new ones over time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CHOICES = 16  # n: each choice is one gRPC generation


class ScoreRuleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    weights: dict[str, float] = {}
    primary: str = ""
    threshold: float = 0.0


class FusionExtension(BaseModel):
    """The ``coolfusion`` extension object of a request."""

    model_config = ConfigDict(extra="forbid")
    mode: str | None = None  # overrides the mode the model id names
    models: list[str] = []  # subset of the configured models; empty = all
    score_rule: str | ScoreRuleBody | None = None  # a rule name or a whole rule
    max_segment_tokens: int = Field(default=0, ge=0)
    top_k: int = Field(default=0, ge=0)
    allow_degraded: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationBody(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    coolfusion: FusionExtension = Field(default_factory=FusionExtension)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def new_tokens(self) -> int:
        return self.max_tokens or 0

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(GenerationBody):
    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_or_more_strings(cls, value):
        # Checked here so that the error names `prompt`, not one branch of the union.
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
            raise ValueError("prompt takes a string or a non-empty list of strings (token ids are not accepted)")
        return value


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_text_parts(cls, value):
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            raise ValueError('content takes a string or a list of {"type": "text", "text": ...} parts')
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 0


# field -> the values that mean "not used"; anything else is a feature this server lacks.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "response_format": (None, {"type": "text"}),
}


def unsupported_field(body: GenerationBody) -> str | None:
    """The first field set to a value whose feature this server does not implement."""
    for name, value in (body.model_extra or {}).items():
        if name in NEUTRAL and value not in NEUTRAL[name]:
            return name
    return None
