"""An idle worker gives the heap its sessions freed back to the operating system
(``services/worker/memory.py``): glibc keeps freed arena memory, so a worker's resident size
crept up under concurrent load with no session alive. Plain ``SessionTable``, no model."""

from __future__ import annotations

import ctypes
import threading

import psutil
import pytest

from coolfusion.services.worker import memory
from coolfusion.services.worker.sessions import Session, SessionTable


def _session(name: str) -> Session:
    return Session(name, [1] * 10, 10, "", cache=None, next_logits=None, fed=10)


def test_trims_once_after_the_last_session_is_freed(monkeypatch):
    calls = []
    monkeypatch.setattr("coolfusion.services.worker.sessions.release_free_heap", lambda: calls.append(1) or True)
    table = SessionTable("w", session_ttl=1.0)
    assert not table.trim_when_idle()  # nothing was ever freed
    table.add(_session("a"))
    table.add(_session("b"))
    table.close("a")
    assert not table.trim_when_idle()  # "b" is live
    table.reap(now=table.live()[0].last_used + 5.0)  # "b" expires: freed by the reaper, not a close
    assert table.ids() == []
    assert table.trim_when_idle() and calls == [1]
    assert not table.trim_when_idle() and calls == [1]  # nothing freed since
    table.add(_session("c"))
    assert table.close("c") and not table.close("c")  # a second close frees nothing
    assert table.trim_when_idle() and calls == [1, 1]


@pytest.mark.skipif(memory._MALLOC_TRIM is None, reason="this C library has no malloc_trim (glibc only)")
def test_release_gives_freed_arena_memory_back():
    """Many small blocks freed by another thread stay in its arena until trimmed."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    process = psutil.Process()

    def churn():
        blocks = [libc.malloc(64 * 1024) for _ in range(4096)]  # 256 MiB below the mmap threshold
        for b in blocks:
            ctypes.memset(b, 1, 64 * 1024)
        for b in blocks[:-1]:  # the last one pins the top of the heap: free() alone cannot shrink it
            libc.free(b)
        return blocks[-1]

    holder = []
    thread = threading.Thread(target=lambda: holder.append(churn()))
    thread.start()
    thread.join()
    before = process.memory_info().rss
    assert memory.release_free_heap()
    after = process.memory_info().rss
    libc.free(holder[0])
    assert before - after > 128 * 2**20, (before, after)
