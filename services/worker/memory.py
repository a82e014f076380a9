"""Keeping a worker's heap from creeping: few malloc arenas, and freed pages handed back when idle.

glibc keeps memory that threads free in its per-thread arenas for reuse. A worker's KV caches,
logits and batched step tensors come and go in many sizes from several threads, so its resident
size creeps up under concurrent load with nothing alive to show for it: each of up to 8 arenas
per core fragments on its own. Two measures, both glibc only and no-ops elsewhere:

- ``limit_arenas``: the worker process caps the arenas (``mallopt(M_ARENA_MAX)``, what
  ``MALLOC_ARENA_MAX`` sets) before its threads start, so freed blocks are reused across threads;
- ``release_free_heap``: ``malloc_trim(0)`` hands the free pages back; the worker calls it from
  its reaper when no session is live and some were freed since the last call, off any request's
  path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def _open_libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:  # not a system with a C library ctypes can open
        return None


def _libc_function(libc, name: str, argtypes: list, restype):
    """A function of the C library, or None where it has none (glibc only: not musl, not macOS)."""
    function = getattr(libc, name, None) if libc is not None else None
    if function is not None:
        function.argtypes, function.restype = argtypes, restype
    return function


_LIBC = _open_libc()
_MALLOC_TRIM = _libc_function(_LIBC, "malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_MALLOPT = _libc_function(_LIBC, "mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
_M_ARENA_MAX = -8  # glibc's mallopt parameter number
# A worker's call threads mostly wait on one shared batch of forwards, so more arenas buy little
# allocation parallelism, and each one fragments on its own.
WORKER_ARENAS = 2


def limit_arenas(arenas: int = WORKER_ARENAS) -> bool:
    """Cap the number of malloc arenas of this process (arenas already created stay); False where
    the C library has no ``mallopt`` or refuses the setting, or where ``MALLOC_ARENA_MAX`` is set:
    glibc's own knob, which an operator's value wins over this default."""
    if os.environ.get("MALLOC_ARENA_MAX") or _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_ARENA_MAX, arenas))  # 0: refused (musl's mallopt refuses everything)


def release_free_heap() -> bool:
    """Return the C heap's free pages to the operating system; False where the C library has no
    ``malloc_trim``."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
