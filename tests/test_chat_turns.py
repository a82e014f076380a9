"""A chat answer ends where a fused model's turn ends. Gemma-3-270M (a base GGUF) has no chat
template and reads the plain ``User:``/``Assistant:`` transcript, which it goes on writing; the
orchestrator adds the transcript's role-line starts as stop sequences to a chat request, so no
invented next turn reaches the text or the stream. A prompt request, and a chat request whose
models all have a template, are unchanged.

The stop construction and the loop with the scripted fake worker first (no model); then real fused
generations on the bundled models, over gRPC and over the gateway with the official ``openai``
client."""

from __future__ import annotations

import re

import grpc
import openai
import pytest
import pytest_asyncio
from cluster import HANG_GUARD_S
from fakes import ScriptedWorker

from coolfusion.clients.client import FusionClient
from coolfusion.orchestrator.engine import FusionEngine
from coolfusion.orchestrator.request import FusionRequest
from coolfusion.orchestrator.results import Final, Segment
from coolfusion.orchestrator.turns import chat_stops, with_stops
from coolfusion.orchestrator.workers import RemoteWorker
from coolfusion.services.common.errors import CoolFusionError
from coolfusion.services.gateway.serve import GatewayThread
from coolfusion.services.tokenizer.context import fallback_turn_stops, render_messages

PAIR = ["smollm2", "gemma3"]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ROLE_LINE = re.compile(r"^\s*(User|Assistant|System):", re.MULTILINE)
STANDARD = ["\nSystem:", "\nUser:", "\nAssistant:"]


class Untemplated:
    has_chat_template = False
    id = "plain"


class FailingTemplate:
    has_chat_template = True
    id = "templated"

    def __init__(self, error: Exception):
        self.hf = self
        self.error = error

    def apply_chat_template(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize(
    "error, code, words",
    [
        (
            ImportError("apply_chat_template requires jinja2"),
            grpc.StatusCode.INTERNAL,
            "cannot be rendered on this server",
        ),
        (ValueError("Conversation roles must alternate"), grpc.StatusCode.INVALID_ARGUMENT, "rejected the messages"),
    ],
)
def test_a_template_that_cannot_run_is_the_servers_error_not_the_callers(error, code, words):
    """A package missing on the server is INTERNAL; a template refusing the messages is the caller's 400."""
    with pytest.raises(CoolFusionError) as caught:
        render_messages(FailingTemplate(error), FRANCE, model="m")
    assert caught.value.code == code and words in str(caught.value) and str(error) in str(caught.value)


# ---- the stops (no model) -------------------------------------------------------------------------
def test_the_fallback_stops_are_the_line_starts_of_its_transcript():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "tool", "content": "42"},
    ]
    text = render_messages(Untemplated(), messages).text
    stops = fallback_turn_stops(m["role"] for m in messages)
    assert stops == [*STANDARD, "\nTool:"]
    # Every line of the transcript opens with a label whose line start is a stop; the text ends with
    # the reply's label, so the next turn the model writes starts with one too.
    starts = [f"\n{line.split(' ', 1)[0]}" for line in text.split("\n")]
    assert starts == [*STANDARD, "\nTool:", "\nAssistant:"] and set(starts) == set(stops)


def test_chat_stops_only_for_chat_with_a_model_without_template():
    assert chat_stops(None, [False, True]) == []  # a prompt request
    assert chat_stops(FRANCE, [True, True]) == []  # every model ends its turn with its EOS
    assert chat_stops(FRANCE, [True, False]) == STANDARD


def test_user_stops_come_first_and_none_twice():
    request = FusionRequest(messages=FRANCE, stop=["Paris", "\nUser:"])
    assert with_stops(request, STANDARD).stop == ["Paris", "\nUser:", "\nSystem:", "\nAssistant:"]
    assert request.stop == ["Paris", "\nUser:"]  # the caller's request is left as it was
    assert with_stops(request, ["\nUser:"]) is request


# ---- the loop with scripted workers (no model) -------------------------------------------------
class Templated(ScriptedWorker):
    async def info(self):
        info = await super().info()
        info.has_chat_template = True
        return info


async def _generate(worker, **request):
    engine, segments, final = FusionEngine([worker]), [], None
    async for item in engine.generate(FusionRequest(mode="single:fake", **request)):
        if isinstance(item, Segment):
            segments.append(item.text)
        else:
            final = item
    assert isinstance(final, Final) and final.text == "".join(segments)
    return final, segments


RUNAWAY = [" Paris.", "\n", "User", ": And", " Spain?"]


async def test_a_runaway_turn_is_cut_and_nothing_of_it_is_streamed():
    final, segments = await _generate(ScriptedWorker(RUNAWAY), messages=FRANCE)
    assert (final.text, final.finish_reason) == (" Paris.", "stop")
    assert segments == [" Paris.", "", "", ""]


async def test_user_stops_work_beside_and_prompts_and_templates_are_unchanged():
    final, _ = await _generate(ScriptedWorker(RUNAWAY), messages=FRANCE, stop=["aris"])
    assert (final.text, final.finish_reason) == (" P", "stop")
    for request in (dict(prompt="Q"), dict(messages=FRANCE)):
        worker = ScriptedWorker(RUNAWAY) if "prompt" in request else Templated(RUNAWAY)
        final, _ = await _generate(worker, **request)
        assert (final.text, final.finish_reason) == ("".join(RUNAWAY), "eos")


# ---- the bundled models -------------------------------------------------------------------------
def _no_next_turn(text: str, finish: str) -> None:
    assert not ROLE_LINE.search(text), text
    assert finish in ("stop", "eos"), (finish, text)


@pytest_asyncio.fixture(loop_scope="session")
async def client(cluster):
    async with FusionClient(cluster.address) as c:
        yield c


async def test_gemma3_alone_stops_where_its_transcript_s_next_turn_begins(cluster, client):
    # The oracle: the same transcript as a prompt (a prompt gets no added stops) runs on into
    # "\nUser:"; the chat answer is that text cut there. The fallback encodes like a prompt.
    transcript = render_messages(cluster.cores["gemma3"].tokenizer, FRANCE).text
    plain = await client.generate(transcript, mode="single:gemma3", max_new_tokens=24)
    assert "\nUser:" in plain.text, plain.text  # the case this test is about occurred
    chat = await client.generate(None, FRANCE, mode="single:gemma3", max_new_tokens=24)
    assert (chat.text, chat.finish_reason) == (plain.text[: plain.text.index("\nUser:")], "stop")
    own = await client.generate(None, FRANCE, mode="single:gemma3", max_new_tokens=24, stop=["Paris"])
    assert (own.text, own.finish_reason) == (chat.text[: chat.text.index("Paris")], "stop")


@pytest.mark.parametrize("mode", ["cool", "rerank", "cool-rerank"])
async def test_fused_chat_modes_end_the_turn(client, mode):
    reply = await client.generate(None, FRANCE, mode=mode, models=PAIR, max_new_tokens=24)
    _no_next_turn(reply.text, reply.finish_reason)
    assert "Paris" in reply.text, reply.text


async def test_three_turns(client):
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    reply = await client.generate(None, messages, mode="cool", models=PAIR, max_new_tokens=24)
    _no_next_turn(reply.text, reply.finish_reason)
    assert reply.text.strip(), reply.text


async def test_two_templated_copies_get_no_stops(cluster, client):
    names = ["smollm2", "smollm2b"]
    workers = [RemoteWorker(n, cluster.worker_addresses[n]) for n in [*names, "gemma3"]]
    engine = FusionEngine(workers)
    request = FusionRequest(messages=FRANCE, models=names, stop=["zzz"])
    assert await engine.turns.request_for(request, names) is request  # nothing added: nothing changes
    assert (await engine.turns.request_for(request, ["smollm2", "gemma3"])).stop == ["zzz", *STANDARD]
    for w in workers:
        await w.aclose()
    fused = await client.generate(None, FRANCE, models=names, max_new_tokens=24)
    alone = await client.generate(None, FRANCE, mode="single:smollm2", max_new_tokens=24)
    assert (fused.text, fused.finish_reason) == (alone.text, alone.finish_reason)


async def test_openai_chat_streamed_and_not(cluster):
    with GatewayThread(cluster.address) as gw:
        api = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=HANG_GUARD_S)
        extra = {"coolfusion": {"models": PAIR}}
        reply = await api.chat.completions.create(model="cool", messages=FRANCE, max_tokens=24, extra_body=extra)
        stream = await api.chat.completions.create(
            model="cool", messages=FRANCE, max_tokens=24, stream=True, extra_body=extra
        )
        chunks = [c async for c in stream]
    text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert finish == "stop" and not ROLE_LINE.search(text), (finish, text)  # OpenAI's name for eos and stop
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text  # the cut text: no part of a stop was streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
