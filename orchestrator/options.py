"""Tunables and performance switches of the fusion loop (``fusion.py``).

Every switch gives the same output on or off (``tests/test_perf_switches.py``); each one kept here
changed a measured number (docs/performance.md). Three more that measured no effect on their
own are always on: no scoring call when every candidate is the same, one scoring row per distinct
candidate, and the lookahead kept for a model's next NextText after it commits its own state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..services.common.config import comma_list

DRAFT_TOKENS = 4  # most greedy tokens the drafter keeps ahead of its candidate (speculate)
# Speculation buys one generation's latency with extra compute (draft steps, verify forwards that
# are not batched across sessions); with more generations running, the workers' batched decode
# steps do more per forward, so segments only speculate while at most this many run.
SPECULATE_MAX_ACTIVE = 1
# Most following segments a NextText reports (follow_segments): the verifier's continuation rarely
# decides more than one, and each costs boundary checks.
FOLLOW_SEGMENTS = 2
# Looked-up tokens a model checks per forward (lookup_draft): each costs a row of the forward
# (Gemma-3's 262k-row output layer included).
LOOKUP_TOKENS = 2

# Switches removed because they measured no effect alone; their behaviour is always on.
ALWAYS_ON = ("skip_identical", "dedup_candidates", "reuse_lookahead")


class OptionsError(ValueError):
    """An unknown switch, or a combination of switches that cannot work."""


@dataclass(frozen=True)
class FusionOptions:
    """Performance switches of the loop, all on by default.

    1. ``reuse_own_logprobs``: a model scores its own candidate with the log-probs it computed
       while generating it (when its tokens equal the candidate's encoding): no forward for that row.
    2. ``speculate``: the smallest model keeps up to ``DRAFT_TOKENS`` of its greedy text ahead of
       its candidate; every other model checks that text, in its own tokens, several tokens per
       forward and keeps the tokens that are its own greedy picks. Only while at most
       ``speculate_max_active`` generations run in the engine.
    3. ``fold_commits``: each model's commit of s* (M4) travels with its next NextText instead of
       a separate UpdateState round trip.
    4. ``follow_segments`` (needs ``speculate`` and ``fold_commits``): each NextText also reports
       the segments past its candidate that its kept greedy continuation already decides; when the
       candidates are identical, the following segments every model decided alike are committed in
       the same round (each is what the next NextTexts would have proposed, identically).
    5. ``lookup_draft``: prompt-lookup decoding inside each model: ``LOOKUP_TOKENS`` tokens that
       followed the latest earlier occurrence of the last few ids ride along in a forward that is
       due anyway and are kept while they are its greedy picks.
    """

    reuse_own_logprobs: bool = True
    speculate: bool = True
    fold_commits: bool = True
    follow_segments: bool = True
    lookup_draft: bool = True

    NAMES = ("reuse_own_logprobs", "speculate", "fold_commits", "follow_segments", "lookup_draft")
    NEEDS = {"follow_segments": ("speculate", "fold_commits")}  # switch -> the switches it works through

    def __post_init__(self) -> None:
        for name, needs in self.NEEDS.items():
            missing = [n for n in needs if getattr(self, name) and not getattr(self, n)]
            if missing:
                raise OptionsError(
                    f"{name} needs {' and '.join(missing)}: turn {name} off too (-{name}), or turn those on"
                )

    @classmethod
    def none(cls) -> FusionOptions:
        """The unoptimised loop (the paper's prototype protocol, less the always-on switches)."""
        return cls(**{n: False for n in cls.NAMES})

    @classmethod
    def only(cls, name: str) -> FusionOptions:
        """``name`` on with the switches it needs, every other switch off."""
        on = {cls._known(name), *cls.NEEDS.get(name, ())}
        return cls(**{n: n in on for n in cls.NAMES})

    @classmethod
    def without(cls, name: str) -> FusionOptions:
        """Every switch on but ``name`` and the switches that need it."""
        off = {cls._known(name), *(n for n, needs in cls.NEEDS.items() if name in needs)}
        return cls(**{n: n not in off for n in cls.NAMES})

    @classmethod
    def parse(cls, text: str) -> FusionOptions:
        """``all`` | ``none`` | comma-separated names to turn on, or ``-name`` to turn off from all."""
        text = (text or "all").strip()
        if text in ("all", ""):
            return cls()
        if text == "none":
            return cls.none()
        items = comma_list(text)
        off = [cls._known(t[1:]) for t in items if t.startswith("-")]
        on = [cls._known(t) for t in items if not t.startswith("-")]
        if on and off:
            raise OptionsError("give names to turn on, or -names to turn off, not both")
        if on:
            return cls(**{n: n in on for n in cls.NAMES})
        return cls(**{n: n not in off for n in cls.NAMES})

    @classmethod
    def _known(cls, name: str) -> str:
        if name in ALWAYS_ON:
            raise OptionsError(f"{name} is no longer a switch: it is always on (it measured no effect alone)")
        if name not in cls.NAMES:
            raise OptionsError(f"unknown optimisation {name!r}; known: {', '.join(cls.NAMES)}")
        return name

    def as_dict(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
