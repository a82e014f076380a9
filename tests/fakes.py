"""A scripted ``WorkerHandle``: the fusion loop's control flow in milliseconds, no model.

Each session of a ``ScriptedWorker`` walks the worker's script from its start: after k pieces were
committed (any model's candidate counts as one piece, a following segment as one more), NextText
returns piece k, again and again until a commit moves on, as a real worker regenerates from its
committed state. Scores come from a table of PPLs by text; every call is recorded (NextText
options, scored candidates, commits), so a test checks what the loop asked and committed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from coolfusion.orchestrator.workers import WorkerInfo
from coolfusion.services.common.errors import Unavailable
from coolfusion.services.worker.api import NextTextOptions
from coolfusion.services.worker.results import (
    CandidateScore,
    CandidateScores,
    CommitResult,
    FollowingSegment,
    NextTextResult,
    OpenResult,
)


@dataclass(frozen=True)
class Piece:
    """One NextText answer: the candidate, and what the model knows past it."""

    text: str
    eos: bool = False
    tokens: int = 1  # tokens in the candidate
    logprob: float = -0.5  # of each token
    draft: str = ""  # greedy text past the candidate (returned when asked with draft_tokens)
    following: tuple[str, ...] = ()  # segments past the candidate (returned when asked with follow_segments)
    lookahead: str = "x"


class ScriptedWorker:
    """A ``WorkerHandle`` playing ``script`` (strings are one-token pieces; the last one carries
    EOS when ``eos``). ``ppl``: PPL by candidate text, or by (text, eos), for scoring (others: ``default_ppl``).
    ``fail_at=(method, n)``: the n-th call of that method (from 1) and every call after it raise
    UNAVAILABLE, as when the worker process is gone. Before each NextText the worker records
    ``seen`` (what the engine's caller had received by then, when a test fills it) in ``snapshots``."""

    def __init__(
        self,
        script: Sequence[str | Piece],
        eos: bool = True,
        name: str = "fake",
        ppl: dict | None = None,
        default_ppl: float = 4.0,
        parameters: int = 0,
        fail_at: tuple[str, int] | None = None,
    ):
        self.name, self.parameters = name, parameters
        last = len(script) - 1
        self.script = [
            p if isinstance(p, Piece) else Piece(p, eos=eos and i == last, lookahead="" if i == last else "x")
            for i, p in enumerate(script)
        ]
        self.ppl, self.default_ppl, self.fail_at = dict(ppl or {}), default_ppl, fail_at
        self.calls: dict[str, int] = {}  # method -> calls so far
        self.states: dict[str, tuple[str, int, int]] = {}  # state id -> (text, tokens, pieces) it commits
        self.committed: dict[str, tuple[str, int, int]] = {}  # session -> (text, tokens, pieces) committed
        self.options: list[NextTextOptions] = []  # every NextText's options, in order
        self.scored: list[tuple[list[tuple[str, bool]], str]] = []  # every score call: (candidates, own_state_id)
        self.commits: list[str] = []  # every state id committed (with a NextText or UpdateState)
        self.closed: list[str] = []
        self.down = False  # after fail_at: every call fails
        self.seen: list[str] = []
        self.snapshots: list[str] = []

    def _call(self, method: str) -> None:
        self.calls[method] = n = self.calls.get(method, 0) + 1
        if self.fail_at is not None and (self.down or (self.fail_at[0] == method and n >= self.fail_at[1])):
            self.down = True
            raise Unavailable(f"worker {self.name} is unavailable (scripted)")

    def _commit(self, session_id: str, state_id: str) -> None:
        text, tokens, pieces = self.committed[session_id]
        more_text, more_tokens, more_pieces = self.states[state_id]
        self.committed[session_id] = (text + more_text, tokens + more_tokens, pieces + more_pieces)
        self.commits.append(state_id)

    async def info(self) -> WorkerInfo:
        return WorkerInfo(self.name, "fake", self.name, "float32", "cpu", [0], parameters=self.parameters)

    async def open(self, prompt, messages) -> OpenResult:
        self._call("open")
        session_id = f"{self.name}-session{self.calls['open']}"
        self.committed[session_id] = ("", 0, 0)
        return OpenResult(session_id, 1, prompt or "")

    async def next_text(self, session_id: str, options: NextTextOptions) -> NextTextResult:
        self._call("next_text")
        self.snapshots.append("".join(self.seen))
        self.options.append(options)
        if options.commit_state_id:
            self._commit(session_id, options.commit_state_id)
        k = self.committed[session_id][2]
        piece = self.script[k]
        state_id = f"{self.name}/{session_id}/n{self.calls['next_text']}"
        self.states[state_id] = (piece.text, piece.tokens, 1)
        following = []
        for m, text in enumerate(piece.following[: options.follow_segments]):
            following.append(FollowingSegment(f"{state_id}f{m}", text, [m], [piece.logprob], 0, "x"))
            done_text = piece.text + "".join(piece.following[: m + 1])
            self.states[following[-1].state_id] = (done_text, piece.tokens + m + 1, m + 2)
        return NextTextResult(
            state_id=state_id,
            text=piece.text,
            token_ids=list(range(piece.tokens)),
            logprobs=[piece.logprob] * piece.tokens,
            eos=piece.eos,
            finish="eos" if piece.eos else "boundary",
            generated_tokens=piece.tokens,
            lookahead=piece.lookahead,
            draft=piece.draft if options.draft_tokens else "",
            drafted_tokens=1 if options.draft_tokens and piece.draft else 0,
            following=following,
        )

    async def score(self, session_id: str, candidates, own_state_id: str = "") -> list[CandidateScore]:
        self._call("score")
        self.scored.append((list(candidates), own_state_id))
        scores = CandidateScores()
        for i, (text, eos) in enumerate(candidates):
            own = self.states.get(own_state_id)
            ppl = self._ppl(text, eos)
            if own is not None and own[0] == text:
                scores.append(CandidateScore(own_state_id, [0], [-math.log(ppl)], ppl, reused=True))
                continue
            state_id = f"{self.name}/{session_id}/s{self.calls['score']}.{i}"
            tokens = 1 if (text or eos) else 0
            self.states[state_id] = (text, tokens, 1)
            ppl = ppl if tokens else math.inf
            scores.append(CandidateScore(state_id, [0] * tokens, [-math.log(ppl)] * tokens, ppl))
        return scores

    def _ppl(self, text: str, eos: bool) -> float:
        return self.ppl.get((text, eos), self.ppl.get(text, self.default_ppl))

    async def update_state(self, session_id: str, state_id: str) -> CommitResult:
        self._call("update_state")
        self._commit(session_id, state_id)
        text, tokens, _ = self.committed[session_id]
        return CommitResult(tokens, text)

    async def close(self, session_id: str) -> None:
        self.closed.append(session_id)
