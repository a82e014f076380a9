"""An idle worker gives the heap its sessions freed back to the operating system
(``services/worker/memory.py``): glibc keeps freed arena memory, so a worker's resident size
crept up under concurrent load with no session alive. Plain ``SessionTable``, no model."""

from __future__ import annotations

import ctypes
import os
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
    assert not table.heap_trimmed()  # freed, not trimmed yet
    assert table.trim_when_idle() and calls == [1]
    assert table.heap_trimmed()
    assert not table.trim_when_idle() and calls == [1]  # nothing freed since
    table.add(_session("c"))
    assert not table.heap_trimmed()  # "c" is live
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


_COUNT_ARENAS = """
import ctypes, os, sys, tempfile, threading
from coolfusion.services.worker import memory
if sys.argv[1] != "default":
    assert memory.limit_arenas(memory.WORKER_ARENAS) == (sys.argv[1] == "capped")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
go = threading.Barrier(8)
def alloc():
    go.wait()  # all eight allocate at once, so each needs an arena of its own unless capped
    for _ in range(200):
        libc.malloc(1024)
threads = [threading.Thread(target=alloc) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
path = tempfile.NamedTemporaryFile(suffix=".xml", delete=False).name
fh = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fh)
libc.fclose(fh)
with open(path) as report:
    print(report.read().count("<heap nr="))
os.unlink(path)
"""


@pytest.mark.skipif(memory._MALLOC_TRIM is None, reason="this C library has no mallopt (glibc only)")
def test_the_arena_cap_holds_under_concurrent_threads():
    """Eight threads allocating at once get arenas of their own, unless the worker's cap is set."""
    import subprocess
    import sys

    def arenas(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        if mode == "operator":
            env["MALLOC_ARENA_MAX"] = "8"  # glibc's knob set by an operator: the worker leaves it
        out = subprocess.run(
            [sys.executable, "-c", _COUNT_ARENAS, mode], capture_output=True, text=True, check=True, env=env
        )
        return int(out.stdout)

    assert arenas("default") > memory.WORKER_ARENAS
    assert arenas("capped") <= memory.WORKER_ARENAS
    assert memory.WORKER_ARENAS < arenas("operator") <= 8


async def test_the_workers_reaper_trims_once_idle(monkeypatch):
    """The worker servicer's reaper is what calls the trim: a pass after the last session is
    freed trims, and later passes with nothing freed do not."""
    import asyncio
    from types import SimpleNamespace

    from coolfusion.services.worker.server import WorkerServicer

    monkeypatch.setattr("coolfusion.services.worker.sessions.release_free_heap", lambda: True)
    table = SessionTable("w")
    trims = []
    core = SimpleNamespace(
        name="w",
        session_ttl=None,
        batcher=SimpleNamespace(on_batch=None),
        reap=lambda: [],
        trim_when_idle=lambda: table.trim_when_idle() and trims.append(1),
        stats=lambda: (len(table.ids()), 0),
    )
    table.add(_session("a"))
    table.close("a")
    servicer = WorkerServicer(core, reap_interval=0.01)  # a running loop: the reaper starts now
    try:
        for _ in range(500):
            if trims:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # several more passes: nothing was freed since
    finally:
        await servicer.stop_reaper()
    assert trims == [1] and table.heap_trimmed()
