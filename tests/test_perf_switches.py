"""Performance switches: every FusionOptions combination gives the unoptimised loop's output.

An engine in the test process over the cluster fixture's worker servers (real gRPC, real models),
run with all switches off, each one alone, all on; texts and segment models must be identical,
for ``cool``, ``single:<m>`` and two copies of one model. Plus the worker-side pieces: own-row
reuse in ScoreCandidates and lookahead replay in NextText.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from coolfusion.orchestrator.engine import FusionEngine
from coolfusion.orchestrator.options import FusionOptions, OptionsError
from coolfusion.orchestrator.request import FusionRequest
from coolfusion.orchestrator.results import Segment
from coolfusion.orchestrator.rules import ScoreRule
from coolfusion.orchestrator.workers import RemoteWorker
from coolfusion.services.worker.api import NextTextOptions
from coolfusion.services.worker.errors import StateError

PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
]
N = 32

CONFIGS = {
    "none": FusionOptions.none(),
    **{f"only:{n}": FusionOptions.only(n) for n in FusionOptions.NAMES},  # with the switches it needs
    "all-but-follow_segments": FusionOptions.without("follow_segments"),
    "all-but-lookup_draft": FusionOptions.without("lookup_draft"),
    "all": FusionOptions(),
}
# The full matrix runs where every switch but follow_segments acts (two models with different
# tokenizers, first prompt: with every switch on nothing follows there, so all-but-follow_segments
# would repeat "all" and only:follow_segments is checked where segments follow);
# segments follow where the two models are copies of one. Elsewhere the unoptimised loop, all on,
# and the switches that matter most there.
PLAN = {
    ("cool", "gemma3", 0): [c for c in CONFIGS if c not in ("all-but-follow_segments", "only:follow_segments")],
    ("cool", "gemma3", 1): ["none", "all"],
    ("single:gemma3", "gemma3", 0): ["none", "only:lookup_draft", "all"],
    ("cool", "smollm2b", 0): ["none", "only:follow_segments", "all-but-follow_segments", "all"],
}


@pytest_asyncio.fixture(loop_scope="session")
async def engine(cluster):
    workers = [RemoteWorker(name, addr) for name, addr in cluster.worker_addresses.items()]
    # The plans above (which prompt makes each switch do work, where following segments occur)
    # are read off the segments this rule picks; the equality of outputs they check holds for any rule.
    yield FusionEngine(workers, score_rule=ScoreRule("calibrated", {"gemma3": 1.5}))
    for w in workers:
        await w.aclose()


# Finished sequential runs by request: a run is deterministic, so a test that needs a run another
# test already made takes its result (the unoptimised ones cost the most).
_RUNS: dict = {}


async def run(engine, prompt, mode, models, options):
    key = (prompt, mode, tuple(models), options, engine.speculate_max_active)
    if key not in _RUNS:
        _RUNS[key] = await _run(engine, prompt, mode, models, options)
    return _RUNS[key]


async def _run(engine, prompt, mode, models, options):
    segments, final = [], None
    async for item in engine.generate(
        FusionRequest(prompt=prompt, mode=mode, models=models, max_new_tokens=N, options=options)
    ):
        if isinstance(item, Segment):
            segments.append(item)
        else:
            final = item
    return final, segments


def test_options_parse():
    assert FusionOptions.parse("all") == FusionOptions()
    assert FusionOptions.parse("none") == FusionOptions.none()
    assert FusionOptions.parse("-lookup_draft") == FusionOptions(lookup_draft=False)
    only = FusionOptions.parse("speculate")
    assert only.speculate and not only.lookup_draft and not only.follow_segments
    with pytest.raises(ValueError, match="unknown optimisation 'bogus'"):
        FusionOptions.parse("bogus")
    # Switches that measured no effect alone are gone; their behaviour is always on.
    for name in ("skip_identical", "dedup_candidates", "reuse_lookahead"):
        with pytest.raises(OptionsError, match=f"{name} is no longer a switch"):
            FusionOptions.parse(f"-{name}")


def test_switch_dependencies_are_checked_when_options_are_built():
    """follow_segments works through speculation and folded commits: without them it is refused,
    not silently turned off."""
    for kwargs in (dict(speculate=False), dict(fold_commits=False)):
        with pytest.raises(OptionsError, match="follow_segments needs"):
            FusionOptions(**kwargs)
        assert not FusionOptions(follow_segments=False, **kwargs).follow_segments
    with pytest.raises(OptionsError, match="follow_segments needs speculate and fold_commits"):
        FusionOptions.parse("follow_segments")
    with pytest.raises(OptionsError, match="follow_segments needs speculate"):
        FusionOptions.parse("-speculate")
    assert FusionOptions.only("follow_segments") == FusionOptions(reuse_own_logprobs=False, lookup_draft=False)
    assert FusionOptions.without("fold_commits") == FusionOptions(fold_commits=False, follow_segments=False)
    assert FusionOptions.without("lookup_draft") == FusionOptions(lookup_draft=False)


@pytest.mark.parametrize(
    "mode, models",
    [("cool", ["smollm2", "gemma3"]), ("single:gemma3", ["gemma3"]), ("cool", ["smollm2", "smollm2b"])],
    ids=["cool", "single-gemma3", "two-copies"],
)
async def test_every_switch_gives_the_unoptimised_output(engine, mode, models):
    plans = [(i, labels) for (m, model, i), labels in PLAN.items() if m == mode and model == models[-1]]
    assert plans
    followed = {}  # (prompt index, label) -> following segments committed
    for i, labels in plans:
        prompt, results = PROMPTS[i], {}
        for label in labels:
            final, segments = await run(engine, prompt, mode, models, CONFIGS[label])
            output_tokens = {n: u.output_tokens for n, u in final.usage.items()}  # "none": the workers' counts
            followed[i, label] = final.timings.followed_segments
            results[label] = (
                final.text,
                final.finish_reason,
                [(s.text, s.model, s.eos) for s in segments],
                output_tokens,
            )
        ref = results["none"]
        assert ref[0] and len(ref[2]) >= 3
        for label, got in results.items():
            assert got == ref, (label, prompt)
    if (mode, models[-1]) == ("cool", "gemma3"):
        assert followed[0, "all"] == 0  # the plan's premise
    if models[-1] == "smollm2b":
        assert followed[0, "all"] > 0


async def test_switches_take_effect(engine):
    """Each switch on does its work, off does none of it. Always on, whatever the switches:
    identical segments skip scoring and the lookahead gets replayed (two copies: every segment
    is identical)."""
    on, _ = await run(engine, PROMPTS[0], "cool", ["smollm2", "smollm2b"], FusionOptions())
    assert on.timings.identical_segments == on.segments == on.timings.skipped_scores
    off, _ = await run(engine, PROMPTS[0], "cool", ["smollm2", "smollm2b"], FusionOptions.none())
    # Identical candidates are never scored and the lookahead is always replayed (no switch).
    assert off.timings.identical_segments == off.segments == off.timings.skipped_scores
    assert off.timings.reused_rows == off.timings.scored_rows == 0 and off.timings.reused_tokens > 0
    cool, _ = await run(engine, PROMPTS[1], "cool", ["smollm2", "gemma3"], FusionOptions.without("follow_segments"))
    assert cool.timings.reused_rows > 0
    # speculate: the smaller SmolLM2 drafts, Gemma-3 verifies some of it; off: neither.
    assert cool.timings.drafted_tokens > 0 and cool.timings.verified_tokens > 0 and cool.timings.verify_forwards > 0
    plain, _ = await run(engine, PROMPTS[1], "cool", ["smollm2", "gemma3"], FusionOptions.without("speculate"))
    assert plain.timings.drafted_tokens == plain.timings.verified_tokens == plain.timings.verify_forwards == 0
    # follow_segments: identical rounds commit the following segments decided alike; off: none.
    # (Two copies: the drafter's continuation is verified whole, so runs of segments follow.)
    unfollowed, _ = await run(engine, PROMPTS[0], "cool", ["smollm2", "smollm2b"], FusionOptions(follow_segments=False))
    assert on.timings.followed_segments > 0 and on.segments == unfollowed.segments
    assert off.timings.followed_segments == unfollowed.timings.followed_segments == cool.timings.followed_segments == 0
    # lookup_draft: the story's repeated words are looked up and some are greedy picks; off: none.
    unlooked, _ = await run(engine, PROMPTS[0], "cool", ["smollm2", "gemma3"], FusionOptions(lookup_draft=False))
    looked, _ = await run(engine, PROMPTS[0], "cool", ["smollm2", "gemma3"], FusionOptions())
    assert looked.timings.lookup_accepted > 0 and looked.timings.lookup_forwards > 0
    assert unlooked.timings.lookup_accepted == unlooked.timings.lookup_forwards == off.timings.lookup_forwards == 0
    # fold_commits: the commits ride on the next NextText, no UpdateState round trip is timed.
    assert cool.timings.commit_s == 0 and off.timings.commit_s > 0
    # Two distinct candidates: one row each per worker; identical ones: no scoring call.
    distinct = cool.segments - cool.timings.identical_segments
    assert cool.timings.skipped_scores == cool.timings.identical_segments > 0
    assert cool.timings.scored_rows + cool.timings.reused_rows == 2 * 2 * distinct


@pytest.mark.parametrize("cut", ["stop", "budget"])
async def test_following_segments_keep_stops_and_budgets(engine, cut):
    """A stop sequence inside a following segment, and token budgets that end inside a run of
    following segments, cut the output exactly where the unoptimised loop cuts it (two copies of
    one model: there segments follow)."""
    models = ["smollm2", "smollm2b"]
    ref, ref_segments = await run(engine, PROMPTS[0], "cool", models, FusionOptions.none())
    followed = 0
    words = ref.text.split()
    for k in (3, 7, 12):
        if cut == "stop":
            request = dict(stop=[" " + words[min(k, len(words) - 1)]], max_new_tokens=N)
        else:
            request = dict(max_new_tokens=k)
        results = {}
        for label in ("none", "-follow_segments", "all"):
            segments, final = [], None
            async for item in engine.generate(
                FusionRequest(
                    prompt=PROMPTS[0], mode="cool", models=models, options=FusionOptions.parse(label), **request
                )
            ):
                if isinstance(item, Segment):
                    segments.append((item.text, item.model))
                else:
                    final = item
            results[label] = (
                final.text,
                final.finish_reason,
                segments,
                {n: u.output_tokens for n, u in final.usage.items()},
            )
            followed += final.timings.followed_segments if label == "all" else 0
        assert results["all"] == results["none"] == results["-follow_segments"], (cut, k)
        assert results["none"][1] == ("stop" if cut == "stop" else "length")
    assert followed > 0


async def test_speculation_pauses_under_load(engine):
    """With two generations at once (above speculate_max_active=1) segments do not speculate;
    with speculate_max_active=0 none does (prompt lookup still runs). The text stays the same."""
    models = ["smollm2", "gemma3"]
    solo, _ = await run(engine, PROMPTS[1], "cool", models, FusionOptions())
    assert solo.timings.drafted_tokens > 0
    both = await asyncio.gather(*(_run(engine, PROMPTS[1], "cool", models, FusionOptions()) for _ in range(2)))
    assert [f.text for f, _ in both] == [solo.text, solo.text]
    assert sum(f.timings.drafted_tokens for f, _ in both) < solo.timings.drafted_tokens
    engine.speculate_max_active = 0
    try:
        never, _ = await run(engine, PROMPTS[1], "cool", models, FusionOptions())
    finally:
        engine.speculate_max_active = 1
    assert never.text == solo.text
    assert never.timings.drafted_tokens == never.timings.verified_tokens == never.timings.verify_forwards == 0
    # Prompt lookup does not pause: batched forwards take its checking rows too.
    assert never.timings.lookup_forwards > 0 and solo.timings.lookup_forwards > 0


async def test_core_own_row_and_lookahead_replay(cluster):
    # Off the event loop: the core's boundary checks call the tokenizer service served by this loop.
    await asyncio.to_thread(_core_own_row_and_lookahead_replay, cluster.cores["smollm2"])


def _core_own_row_and_lookahead_replay(core):
    sid, _, _ = core.open(PROMPTS[0])
    try:
        r = core.next_text(sid, NextTextOptions([], 8))
        scores = core.score_candidates(sid, [(r.text, r.eos), (" zebra crossings", False)], own_state_id=r.state_id)
        assert scores[0].reused and scores[0].state_id == r.state_id and scores[0].logprobs == r.logprobs
        assert not scores[1].reused
        plain = core.score_candidates(sid, [(r.text, r.eos)])
        assert plain[0].ppl == pytest.approx(scores[0].ppl, rel=1e-4)
        # Commit the own state; the next NextText replays the kept lookahead.
        core.update_state(sid, r.state_id)
        kept = len(core._sessions[sid].ahead_tokens)
        r2 = core.next_text(sid, NextTextOptions([], 8))
        assert r2.reused_tokens == kept
    finally:
        core.close(sid)
    # The same run without replay gives the same tokens.
    sid, _, _ = core.open(PROMPTS[0])
    try:
        a = core.next_text(sid, NextTextOptions([], 8, reuse_lookahead=False))
        core.update_state(sid, a.state_id)
        b = core.next_text(sid, NextTextOptions([], 8, reuse_lookahead=False))
        assert b.reused_tokens == 0
        assert (a.token_ids, b.token_ids, b.logprobs) == (r.token_ids, r2.token_ids, r2.logprobs)
    finally:
        core.close(sid)
    # The commit folded into the next NextText: the same tokens and replay; a bad id changes nothing.
    sid, _, _ = core.open(PROMPTS[0])
    try:
        c = core.next_text(sid, NextTextOptions([], 8))
        with pytest.raises(StateError, match="unknown state"):
            core.next_text(sid, NextTextOptions([], 8, commit_state_id="no-such-state"))
        d = core.next_text(sid, NextTextOptions([], 8, commit_state_id=c.state_id))
        assert (c.token_ids, d.token_ids, d.logprobs, d.reused_tokens) == (r.token_ids, r2.token_ids, r2.logprobs, kept)
        assert core._sessions[sid].text.endswith(c.text)
        with pytest.raises(StateError, match="stale"):
            core.next_text(sid, NextTextOptions([], 8, commit_state_id=c.state_id))
    finally:
        core.close(sid)
