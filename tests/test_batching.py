"""The step batcher's group commit: who a leader waits for (plain Python, no model)."""

import threading
import time

import torch

from coolfusion.services.worker.batching import StepBatcher


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


def _batcher(gather_s: float, recent_s: float) -> tuple[StepBatcher, _Recorder]:
    rec = _Recorder()
    return StepBatcher(rec.single, rec.many, max_batch=8, gather_s=gather_s, recent_s=recent_s), rec


def test_lone_session_never_waits():
    batcher, rec = _batcher(gather_s=5.0, recent_s=5.0)
    started = time.monotonic()
    for token in range(3):
        batcher.run(object(), [token], owner="a")
    assert time.monotonic() - started < 2.0  # a wait for a second session would take 5 s per step
    assert rec.batches == [[[0]], [[1]], [[2]]]


def test_leader_waits_for_a_session_that_stepped_recently():
    """Outside any generation loop (scoring, a commit, an RPC away), a session that stepped within
    ``recent_s`` is waited for: its next forward shares the leader's batch."""
    batcher, rec = _batcher(gather_s=5.0, recent_s=30.0)
    batcher.run(object(), [1], owner="b")  # b has stepped recently
    rec.batches.clear()
    done = threading.Event()

    def leader():
        batcher.run(object(), [2], owner="a")
        done.set()

    thread = threading.Thread(target=leader)
    thread.start()
    time.sleep(0.2)
    assert not done.is_set()  # waiting for b
    batcher.run(object(), [3, 4], owner="b")
    thread.join(10)
    assert done.is_set()
    assert rec.batches == [[[2], [3, 4]]]


def test_sessions_gone_quiet_are_not_waited_for():
    batcher, rec = _batcher(gather_s=5.0, recent_s=0.05)
    batcher.run(object(), [1], owner="b")
    time.sleep(0.2)  # b has not stepped for longer than recent_s (closed, or waiting for a client)
    started = time.monotonic()
    batcher.run(object(), [2], owner="a")
    assert time.monotonic() - started < 2.0
    assert rec.batches[-1] == [[2]]


def test_every_waiting_session_gets_the_error_of_a_failed_forward():
    def many(caches, rows, logits_from):
        raise RuntimeError("forward failed")

    batcher = StepBatcher(_Recorder().single, many, max_batch=8, gather_s=5.0, recent_s=30.0)
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
            t.join(10)
    assert errors == ["forward failed", "forward failed"]


def test_a_forgotten_session_is_not_waited_for():
    """A closed session (``forget``) holds up no batch, however recently it stepped."""
    batcher, rec = _batcher(gather_s=5.0, recent_s=30.0)
    batcher.run(object(), [1], owner="b")
    batcher.forget("b")
    started = time.monotonic()
    batcher.run(object(), [2], owner="a")
    assert time.monotonic() - started < 2.0
    assert rec.batches[-1] == [[2]]
