"""A model's context from a request: the prompt, or chat messages rendered with the model's own
chat template, and its token ids. Workers encode what they prefill with it, and the tokenizer
service counts with it (``CountContext``), so the orchestrator's admission check sees exactly the
tokens a worker would prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import InvalidArgument


@dataclass(frozen=True)
class Context:
    text: str  # the rendered context
    templated: bool  # the chat template put its special tokens in: encode without adding them


def render_messages(tokenizer, messages: list[dict], model: str = "") -> Context:
    """Context text for chat messages (``tokenizer``: a ``core.TokenizerCore``).

    With a chat template: ``apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)`` (encoded without adding special tokens again, as
    ``apply_chat_template(tokenize=True)`` does). Without one, a plain rendering: one line
    ``"{Role}: {content}\\n"`` per message (role capitalised: ``System``, ``User``,
    ``Assistant``) followed by ``"Assistant:"``; it is encoded like a prompt (BOS added when
    the tokenizer adds one).
    """
    if not messages:
        raise InvalidArgument("messages is empty")
    clean = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise InvalidArgument(f"message {i} needs a non-empty string 'role' and a string 'content'")
        clean.append({"role": role, "content": content})
    if tokenizer.has_chat_template:
        try:
            text = tokenizer.hf.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise on e.g. unsupported roles
            raise InvalidArgument(f"chat template of {model or tokenizer.id!r} rejected the messages: {exc}") from None
        return Context(text, True)
    lines = "".join(f"{m['role'][:1].upper()}{m['role'][1:]}: {m['content']}\n" for m in clean)
    return Context(lines + "Assistant:", False)


def render(tokenizer, prompt: str | None, messages: list[dict] | None, model: str = "") -> Context:
    """The context of a prompt or of chat messages (exactly one of them)."""
    if (prompt is None) == (messages is None):
        raise InvalidArgument("give exactly one of prompt and messages")
    if messages is not None:
        return render_messages(tokenizer, messages, model)
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt must be a string")
    if not prompt:
        raise InvalidArgument("prompt is empty")
    return Context(prompt, False)


def context_ids(tokenizer, context: Context) -> list[int]:
    """The tokenizer's own call, exactly what the ``generate()`` oracle sees."""
    return list(tokenizer.hf(context.text, add_special_tokens=not context.templated)["input_ids"])
