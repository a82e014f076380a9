"""The step batcher's group commit: who a leader waits for (plain Python, no model).

No sleeps and no wall-clock bounds: a leader's waiting is observed on the batcher's condition
(``_Watched`` counts its timed waits and says when one begins), and "a while ago" is a clock the
test moves."""

import threading

import pytest
import torch

from coolfusion.services.worker import batching
from coolfusion.services.worker.batching import StepBatcher

HANG_GUARD_S = 60  # only against a hang: every wait below ends on an event long before


class _Recorder:
    """Stand-ins for the worker's forwards that record how steps were grouped."""

    def __init__(self):
        self.batches: list[list[list[int]]] = []

    def single(self, cache, tokens, logits_from):
        self.batches.append([list(tokens)])
        return torch.zeros(len(tokens) - logits_from, 4)

    def many(self, caches, rows, logits_from):
        self.batches.append([list(r) for r in rows])
        return [torch.zeros(len(r) - f, 4) for r, f in zip(rows, logits_from)]


class _Watched(threading.Condition):
    """The batcher's condition, counting the leader's timed waits (waits for other sessions).
    With a test clock, a timed wait runs out at once and moves the clock by its timeout."""

    def __init__(self, clock=None):
        super().__init__()
        self.clock = clock
        self.timed_waits = 0
        self.leader_waiting = threading.Event()

    def wait(self, timeout=None):
        if timeout is not None:
            self.timed_waits += 1
            self.leader_waiting.set()
            if self.clock is not None:
                self.clock.now += timeout
                return False
        return super().wait(timeout)


class _Clock:
    """``time`` as the batcher module sees it, with a monotonic clock the test moves."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(batching, "time", c)
    return c


def _batcher(gather_s: float, recent_s: float, clock=None) -> tuple[StepBatcher, _Recorder, _Watched]:
    rec = _Recorder()
    batcher = StepBatcher(rec.single, rec.many, max_batch=8, gather_s=gather_s, recent_s=recent_s)
    batcher._cv = watched = _Watched(clock)
    return batcher, rec, watched


def test_lone_session_never_waits():
    batcher, rec, watched = _batcher(gather_s=5.0, recent_s=5.0)
    for token in range(3):
        batcher.run(object(), [token], owner="a")
    assert watched.timed_waits == 0  # it never waited for a second session
    assert rec.batches == [[[0]], [[1]], [[2]]]


def test_leader_waits_for_a_session_that_stepped_recently():
    """Outside any generation loop (scoring, a commit, an RPC away), a session that stepped within
    ``recent_s`` is waited for: its next forward shares the leader's batch."""
    batcher, rec, watched = _batcher(gather_s=HANG_GUARD_S, recent_s=HANG_GUARD_S)
    batcher.run(object(), [1], owner="b")  # b has stepped recently
    rec.batches.clear()
    done = threading.Event()

    def leader():
        batcher.run(object(), [2], owner="a")
        done.set()

    thread = threading.Thread(target=leader)
    thread.start()
    assert watched.leader_waiting.wait(HANG_GUARD_S)  # a leads and waits ...
    assert not done.is_set() and rec.batches == []  # ... with no forward run yet: waiting for b
    batcher.run(object(), [3, 4], owner="b")
    thread.join(HANG_GUARD_S)
    assert done.is_set()
    assert rec.batches == [[[2], [3, 4]]]


def test_sessions_gone_quiet_are_not_waited_for(clock):
    batcher, rec, watched = _batcher(gather_s=5.0, recent_s=0.5, clock=clock)
    batcher.run(object(), [1], owner="b")
    clock.now += 0.6  # b has not stepped for longer than recent_s (closed, or waiting for a client)
    batcher.run(object(), [2], owner="a")
    assert watched.timed_waits == 0
    assert rec.batches[-1] == [[2]]


def test_a_session_within_recent_s_is_waited_for(clock):
    """The other side of the previous test, on the same clock: 0.4 s after b's step, a leader
    waits for b, for ``gather_s`` (here it runs out: b does not come)."""
    batcher, rec, watched = _batcher(gather_s=0.02, recent_s=0.5, clock=clock)
    batcher.run(object(), [1], owner="b")
    clock.now += 0.4
    batcher.run(object(), [2], owner="a")
    assert watched.timed_waits == 1 and clock.now == pytest.approx(1000.42)
    assert rec.batches[-1] == [[2]]


def test_every_waiting_session_gets_the_error_of_a_failed_forward():
    calls = []

    def many(caches, rows, logits_from):
        calls.append(len(rows))
        raise RuntimeError("forward failed")

    batcher = StepBatcher(_Recorder().single, many, max_batch=8, gather_s=HANG_GUARD_S, recent_s=HANG_GUARD_S)
    with batcher, batcher:  # two generation loops: the leader waits for the second step
        errors = []

        def step(owner):
            try:
                batcher.run(object(), [1], owner=owner)
            except RuntimeError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=step, args=(o,)) for o in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_GUARD_S)
    assert errors == ["forward failed", "forward failed"]
    assert calls == [2]  # one batched forward failed, and both of its sessions got its error


def test_a_forgotten_session_is_not_waited_for():
    """A closed session (``forget``) holds up no batch, however recently it stepped."""
    batcher, rec, watched = _batcher(gather_s=5.0, recent_s=HANG_GUARD_S)
    batcher.run(object(), [1], owner="b")
    batcher.forget("b")
    batcher.run(object(), [2], owner="a")
    assert watched.timed_waits == 0
    assert rec.batches[-1] == [[2]]
