"""The KV budget counts what a new session's prefill will hold from the start:
idle sessions are evicted to make room; when the rest are in calls the Open is refused with
RESOURCE_EXHAUSTED instead of running the worker past its budget. Plain ``SessionTable``, no model."""

from __future__ import annotations

import grpc
import pytest

from coolfusion.services.common.errors import ResourceExhausted
from coolfusion.services.worker.sessions import Session, SessionTable

MIB = 2**20


def _session(name: str, reserved_mib: float) -> Session:
    s = Session(name, [1] * 10, 10, "", cache=None, next_logits=None, fed=10)
    s.reserved_bytes = int(reserved_mib * MIB)
    return s


def test_a_new_session_evicts_idle_ones_then_is_refused_when_the_rest_are_busy():
    table = SessionTable("w", kv_budget_bytes=100 * MIB)
    idle, busy = _session("idle", 40), _session("busy", 40)
    table.add(idle)
    table.add(busy)
    with busy.lock:  # in a call: never evicted
        table.add(_session("fits", 50))  # the idle one makes room
        assert sorted(table.ids()) == ["busy", "fits"]
        with table.get("fits"), pytest.raises(ResourceExhausted) as caught:  # now both are in calls
            table.add(_session("too-much", 20))
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs 20.0 MiB" in str(caught.value) and "100 MiB budget" in str(caught.value)
    assert sorted(table.ids()) == ["busy", "fits"]  # the refused one was not left behind
    assert table.stats() == (2, 90 * MIB)
