"""A model's context from a request: the prompt, or chat messages rendered with the model's own
chat template, and its token ids. Workers encode what they prefill with it, and the tokenizer
service counts with it (``CountContext``), so the orchestrator's admission check sees exactly the
tokens a worker would prefill.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..common.errors import CoolFusionError, InvalidArgument

# The plain transcript a model without a chat template reads (the bundled Gemma-3-270M GGUF is a
# base model and has none): one ``"{Label} {content}\n"`` line per message, then the reply's
# label. Such a model goes on writing the transcript past its answer, so a chat answer ends where
# a new line opens with a role label (``fallback_turn_stops``; the orchestrator adds them as stop
# sequences). The labels are defined here only.
FALLBACK_ROLES = ("system", "user", "assistant")  # the roles a chat request carries
FALLBACK_REPLY_ROLE = "assistant"


def fallback_label(role: str) -> str:
    """A role's label in the plain transcript: ``user`` -> ``User:``."""
    return f"{role[:1].upper()}{role[1:]}:"


def fallback_turn_stops(roles: Iterable[str] = ()) -> list[str]:
    """Where the plain transcript's next turn begins: a new line opening with the label of a
    standard role or of any other of ``roles`` (the transcript writes every message's role)."""
    return [f"\n{fallback_label(r)}" for r in dict.fromkeys((*FALLBACK_ROLES, *roles))]


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
        name = model or tokenizer.id
        try:
            text = tokenizer.hf.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except ImportError as exc:  # the template engine is missing here: the server's fault, not the messages'
            raise CoolFusionError(f"chat template of {name!r} cannot be rendered on this server: {exc}") from None
        except Exception as exc:  # templates raise on e.g. unsupported roles
            raise InvalidArgument(f"chat template of {name!r} rejected the messages: {exc}") from None
        return Context(text, True)
    lines = "".join(f"{fallback_label(m['role'])} {m['content']}\n" for m in clean)
    return Context(lines + fallback_label(FALLBACK_REPLY_ROLE), False)


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


# A prefix of a long context is counted first when a caller only needs to know that it exceeds a
# limit: about this many characters per token of the limit (English text has 4-5).
PREFIX_CHARS_PER_TOKEN = 6
_CUT_SEARCH = 2000  # characters searched past the target for a cut no token can span
_ALNUM_SPACE = re.compile(r"[^\W_] ")


def cuts_cleanly(tokenizer) -> bool:
    """Whether no vocabulary token's text holds a letter or digit followed by a space: then no
    token spans a cut between ``<alnum>`` and ``" <letter>"``, the tokens before the cut are the
    prefix's own tokens, and the prefix's count is a lower bound of the whole's. Computed once
    per tokenizer (a pass over the vocabulary)."""
    cached = getattr(tokenizer, "_coolfusion_cuts_cleanly", None)
    if cached is None:
        cached = tokenizer.byte_exact and not any(
            _ALNUM_SPACE.search(tokenizer.token_bytes(i).decode("utf-8", "ignore")) for i in range(tokenizer.vocab_size)
        )
        tokenizer._coolfusion_cuts_cleanly = cached
    return cached


def _clean_cut(text: str, start: int) -> int | None:
    for i in range(max(1, start), min(len(text) - 1, start + _CUT_SEARCH)):
        if text[i] == " " and text[i - 1].isalnum() and text[i + 1].isalpha():
            return i
    return None


def count_tokens(tokenizer, context: Context, stop_above: int = 0) -> tuple[int, bool]:
    """(tokens, lower_bound). With ``stop_above`` > 0 a long context may be counted on a prefix
    only: when that already has more than ``stop_above`` tokens it is returned as a lower bound
    (refusing a 200,000-character prompt then costs a fraction of its full count)."""
    target = PREFIX_CHARS_PER_TOKEN * (stop_above + 1)
    if stop_above > 0 and len(context.text) > 2 * target and cuts_cleanly(tokenizer):
        cut = _clean_cut(context.text, target)
        if cut is not None:
            prefix = Context(context.text[:cut], context.templated)
            count = len(context_ids(tokenizer, prefix))
            if count > stop_above:
                return count, True
    return len(context_ids(tokenizer, context)), False
