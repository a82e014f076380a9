"""The fusion loop's control flow with scripted workers (``fakes.py``): no model, milliseconds.

What each test pins down is the loop's own logic (paper section 2 and its switches): who proposes
with which options, what is scored, which candidate wins, which state every model commits, when
the output ends, and how a worker that goes down is dropped. Real models check the numbers in
test_fusion.py and test_perf_switches.py.
"""

from __future__ import annotations

import pytest
from fakes import Piece, ScriptedWorker

from coolfusion.orchestrator.engine import FusionEngine
from coolfusion.orchestrator.options import DRAFT_TOKENS, FOLLOW_SEGMENTS, FusionOptions
from coolfusion.orchestrator.request import FusionRequest
from coolfusion.orchestrator.results import Final, Segment
from coolfusion.orchestrator.rules import ScoreRule
from coolfusion.services.common.errors import Unavailable


def engine_of(workers, options: FusionOptions | None = None, **kwargs) -> FusionEngine:
    """An engine choosing by the paper's rule (mean PPL, eq. 3), not the shipped fitted default."""
    return FusionEngine(workers, options, score_rule=ScoreRule("mean-ppl"), **kwargs)


async def generate(engine_or_workers, **request) -> tuple[Final, list[Segment]]:
    engine = engine_or_workers if isinstance(engine_or_workers, FusionEngine) else engine_of(engine_or_workers)
    segments, final = [], None
    async for item in engine.generate(FusionRequest(prompt="Q", **request)):
        if isinstance(item, Segment):
            segments.append(item)
        else:
            final = item
    assert isinstance(final, Final)
    assert [s.index for s in segments] == list(range(len(segments)))
    assert final.text == "".join(s.text for s in segments)
    return final, segments


def session_of(worker: ScriptedWorker) -> str:
    (session,) = worker.committed
    return session


def two_choices():
    """a proposes " cat", b " dog"; mean PPL over both scorers: " cat" (3+5)/2 = 4 beats " dog" (9+2)/2."""
    a = ScriptedWorker([" cat", "."], name="a", ppl={" cat": 3, " dog": 9})
    b = ScriptedWorker([" dog", "."], name="b", ppl={" cat": 5, " dog": 2})
    return a, b


# ---- modes and ends -------------------------------------------------------------------------------
async def test_single_model_writes_alone_and_is_never_scored():
    a, b = ScriptedWorker(["Hello", " world", "."], name="a"), ScriptedWorker(["x"], name="b")
    final, segments = await generate([a, b], mode="single:a")
    assert (final.text, final.finish_reason, list(final.usage)) == ("Hello world.", "eos", ["a"])
    assert {s.model for s in segments} == {"a"} and not b.calls
    assert not a.scored and final.timings.skipped_scores == final.timings.identical_segments == 3
    assert final.usage["a"].output_tokens == 3 and a.closed == [session_of(a)]


async def test_eos_candidate_ends_the_output():
    favour_eos = {(" two", True): 1.0}  # the EOS candidate (" two" + EOS) beats a's " two"
    a = ScriptedWorker(["One", " two", " three"], name="a", eos=False, ppl=favour_eos)
    b = ScriptedWorker(["One", Piece(" two", eos=True)], name="b", ppl=favour_eos)
    final, segments = await generate([a, b])
    assert (final.text, final.finish_reason) == ("One two", "eos")
    assert segments[-1].eos and segments[-1].model == "b"
    assert sorted(a.closed + b.closed) == ["a-session1", "b-session1"]


@pytest.mark.parametrize("max_segment_tokens, caps", [(16, [5, 3, 1]), (2, [2, 2, 1])])
async def test_max_new_tokens_caps_each_segment_and_ends_with_length(max_segment_tokens, caps):
    script = [Piece("ab", tokens=2), Piece("cd", tokens=2), Piece("ef", tokens=2), Piece("gh", tokens=2)]
    a = ScriptedWorker(script, name="a")
    final, _ = await generate([a], mode="single:a", max_new_tokens=5, max_segment_tokens=max_segment_tokens)
    assert [o.max_tokens for o in a.options] == caps
    assert (final.text, final.finish_reason, final.usage["a"].output_tokens) == ("abcdef", "length", 6)


async def test_no_complete_character_ends_with_length():
    final, segments = await generate([ScriptedWorker([""], name="a", eos=False)], mode="single:a")
    assert (final.text, final.finish_reason, segments) == ("", "length", [])


# ---- score, choose, commit ------------------------------------------------------------------------
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "update-state"])
async def test_the_lowest_mean_ppl_wins_and_every_model_commits_it(fold):
    a, b = two_choices()
    final, segments = await generate(engine_of([a, b], FusionOptions(fold_commits=fold, follow_segments=fold)))
    assert (final.text, final.finish_reason) == (" cat.", "eos")
    first = segments[0]
    assert (first.model, [c.model for c in first.candidates]) == ("a", ["a", "b"])
    assert [c.mean_ppl for c in first.candidates] == [4.0, 5.5]
    # Each worker scored both candidates in one call; a's own row by its generation's state.
    own = f"a/{session_of(a)}/n1"  # a's first NextText
    assert a.scored[0] == ([(" cat", False), (" dog", False)], own)
    # a keeps its own state; b adopts the state it built while scoring " cat".
    b_scored_cat = next(s for s, (text, _, _) in b.states.items() if "/s" in s and text == " cat")
    assert a.commits[0] == own and b.commits[0] == b_scored_cat
    if fold:  # the commits rode on the next NextText; the last segment's is never sent
        assert a.options[1].commit_state_id == own and b.options[1].commit_state_id == b_scored_cat
        assert a.committed[session_of(a)][0] == b.committed[session_of(b)][0] == " cat"
        assert not a.calls.get("update_state") and final.timings.commit_s == 0
    else:
        assert all(not o.commit_state_id for o in a.options + b.options)
        assert a.committed[session_of(a)][0] == b.committed[session_of(b)][0] == " cat."
        assert a.calls["update_state"] == b.calls["update_state"] == 2
    assert final.usage["a"].output_tokens == final.usage["b"].output_tokens == 2


async def test_own_rows_are_sent_only_with_reuse_own_logprobs():
    a, b = two_choices()
    await generate(engine_of([a, b], FusionOptions(reuse_own_logprobs=False)))
    assert [own for _, own in a.scored + b.scored] == ["", ""]


@pytest.mark.parametrize("order, winner", [("ab", "a"), ("ba", "b")])
async def test_ties_go_to_the_first_model_in_config_order(order, winner):
    a = ScriptedWorker([" cat", "."], name="a", ppl={" cat": 2, " dog": 4})
    b = ScriptedWorker([" dog", "."], name="b", ppl={" cat": 4, " dog": 2})
    workers = {"a": a, "b": b}
    final, segments = await generate([workers[n] for n in order], models=["b", "a"])
    assert segments[0].model == winner and final.text == {"a": " cat.", "b": " dog."}[winner]


async def test_each_distinct_candidate_is_scored_once_and_identical_ones_not_at_all():
    workers = [ScriptedWorker([text, "."], name=n) for n, text in (("a", " x"), ("b", " x"), ("c", " y"))]
    final, _ = await generate(workers)
    for w in workers:
        assert [candidates for candidates, _ in w.scored] == [[(" x", False), (" y", False)]]
    assert final.timings.identical_segments == final.timings.skipped_scores == 1  # the "." round


async def test_the_request_rule_decides_and_the_request_is_left_as_given():
    a, b = two_choices()
    only_b = ScoreRule("mean-ppl", weights={"a": 0})  # b's PPL alone: " dog" (2) beats " cat" (5)
    final, segments = await generate([a, b], score_rule=only_b)
    assert segments[0].model == "b" and final.score_rule == "mean-ppl(a=0)"
    request = FusionRequest(prompt="Q")
    async for _ in engine_of(list(two_choices())).generate(request):
        pass
    assert request.score_rule is None  # the resolved rule travels with the generation, not in the request


# ---- speculation: drafts and following segments ----------------------------------------------------
def story(name: str, parameters: int, following: str = " cat") -> ScriptedWorker:
    first = Piece(" The", draft=" cat sat", following=(following,))
    return ScriptedWorker([first, " cat", " sat", "."], name=name, parameters=parameters)


async def test_following_segments_decided_alike_are_committed_in_the_same_round():
    a, b = story("a", parameters=1), story("b", parameters=2)  # a is smaller: a drafts
    final, segments = await generate([a, b])
    assert (final.text, [s.text for s in segments]) == (" The cat sat.", [" The", " cat", " sat", "."])
    assert final.timings.followed_segments == 1 and segments[1].model == "a"
    assert len(a.options) == len(b.options) == 3  # " cat" needed no NextText of its own
    assert (a.options[0].draft_tokens, b.options[0].draft_tokens) == (DRAFT_TOKENS, 0)
    assert a.options[0].follow_segments == b.options[0].follow_segments == FOLLOW_SEGMENTS
    # Both commit through the following segment's state; the draft goes on past it.
    assert a.options[1].commit_state_id.endswith("f0") and b.options[1].commit_state_id.endswith("f0")
    assert (a.options[1].draft_text, b.options[1].draft_text) == ("", " sat")
    assert final.usage["a"].output_tokens == final.usage["b"].output_tokens == 4  # " The" " cat" " sat" "."


async def test_following_segments_that_differ_are_proposed_again():
    a, b = story("a", parameters=1), story("b", parameters=2, following=" dog")
    final, segments = await generate([a, b])
    assert final.text == " The cat sat." and final.timings.followed_segments == 0
    assert len(a.options) == 4 and not a.options[1].commit_state_id.endswith("f0")
    assert b.options[1].draft_text == " cat sat"  # the drafter kept its own state: its draft stands


async def test_a_stop_inside_a_following_segment_cuts_there():
    final, segments = await generate([story("a", 1), story("b", 2)], stop=[" ca"])
    assert (final.text, final.finish_reason, [s.text for s in segments]) == (" The", "stop", [" The", ""])


@pytest.mark.parametrize("how", ["busy", "switched-off"])
async def test_no_drafts_while_busy_or_switched_off(how):
    a, b = story("a", 1), story("b", 2)
    if how == "busy":
        engine = engine_of([a, b], speculate_max_active=0)
    else:
        engine = engine_of([a, b], FusionOptions.without("speculate"))
    final, _ = await generate(engine)
    assert final.text == " The cat sat." and final.timings.followed_segments == 0
    assert all(o.draft_tokens == o.follow_segments == 0 and not o.draft_text for o in a.options + b.options)


async def test_a_losing_drafter_drops_its_draft():
    a = ScriptedWorker([Piece(" dog", draft=" barks"), "."], name="a", parameters=1, ppl={" dog": 9})
    b = ScriptedWorker([" cat", "."], name="b", parameters=2, ppl={" dog": 9, " cat": 1})
    final, _ = await generate([a, b])
    assert final.text == " cat." and b.options[1].draft_text == ""


# ---- degraded fusion ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["open", "next_text", "score", "update_state"])
async def test_a_worker_down_is_dropped_when_allowed(method):
    fail_at = {"open": 1, "next_text": 2, "score": 1, "update_state": 1}[method]
    a = ScriptedWorker([" cat", " sat", "."], name="a", ppl={" dog": 9})
    b = ScriptedWorker([" dog", " sat", "."], name="b", ppl={" dog": 9}, fail_at=(method, fail_at))
    engine = engine_of([a, b], FusionOptions.without("fold_commits") if method == "update_state" else None)
    final, segments = await generate(engine, allow_degraded=True)
    assert (final.text, final.finish_reason, final.degraded_models) == (" cat sat.", "eos", ["b"])
    assert b.down
    assert {c.model for c in segments[-1].candidates} == {"a"}  # b no longer proposes
    assert a.closed == [session_of(a)]


@pytest.mark.parametrize("method", ["open", "next_text", "score"])
async def test_a_worker_down_fails_the_request_unless_allowed(method):
    a = ScriptedWorker([" cat", " sat", "."], name="a")
    b = ScriptedWorker([" dog", " sat", "."], name="b", fail_at=(method, 1))
    with pytest.raises(Unavailable, match="worker b"):
        await generate([a, b])
    assert a.closed == [session_of(a)]  # the sessions opened are closed again


async def test_only_unavailable_is_survived_and_never_the_last_model():
    class Broken(ScriptedWorker):
        async def score(self, session_id, candidates, own_state_id=""):
            raise RuntimeError("scoring bug")

    a, b = two_choices()
    with pytest.raises(RuntimeError, match="scoring bug"):
        await generate([a, Broken([" dog", "."], name="b")], allow_degraded=True)
    a = ScriptedWorker([" cat", "."], name="a", fail_at=("next_text", 1))
    b = ScriptedWorker([" dog", "."], name="b", fail_at=("next_text", 1))
    with pytest.raises(Unavailable):
        await generate([a, b], allow_degraded=True)
    a, b = two_choices()
    b.fail_at = ("next_text", 1)
    with pytest.raises(Unavailable):  # the rerank modes never drop a model
        await generate([a, b], mode="rerank", allow_degraded=True)


# ---- rerank baselines -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, favourite, winner",
    [("rerank", "B two.", "b"), ("cool-rerank", "A one.", "cool"), ("rerank", None, "a")],
    ids=["rerank", "cool-rerank-tie-to-cool", "rerank-tie-to-first"],
)
async def test_rerank_picks_the_best_scored_whole_answer(mode, favourite, winner):
    ppl = {favourite: 1.0} if favourite else {}
    a = ScriptedWorker(["A", " one", "."], name="a", ppl=ppl)
    b = ScriptedWorker(["B", " two", "."], name="b", ppl=ppl)
    final, segments = await generate([a, b], mode=mode)
    (segment,) = segments
    labels = ["cool", "a", "b"] if mode == "cool-rerank" else ["a", "b"]
    assert [c.model for c in segment.candidates] == labels and segment.model == winner
    assert final.text == {"a": "A one.", "b": "B two.", "cool": "A one."}[winner] and final.finish_reason == "eos"
    # Every answer was scored by every model, each in a session of its own that was closed.
    assert [c for c, _ in a.scored[-1:]] == [[(s.text, s.eos) for s in segment.candidates]]
    assert sorted(a.closed) == sorted(a.committed) and sorted(b.closed) == sorted(b.committed)
