"""Opening and closing one session per model for a generation (paper M1)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

from ..services.worker.results import OpenResult
from .degraded import Dropping, worker_down
from .opening import open_all
from .request import FusionRequest
from .results import Timings, Usage
from .workers import WorkerHandle


async def open_sessions(
    workers: Mapping[str, WorkerHandle],
    names: Sequence[str],
    request: FusionRequest,
    usage: dict[str, Usage],
    timings: Timings,
    dropping: Dropping,
) -> dict[str, str]:
    """A session per model (model -> session id). On a failure the sessions opened are closed
    again, unless ``dropping`` allows dropping the models whose workers are down."""
    t0 = time.perf_counter()
    # A fatal failure cancels the other Opens (their workers stop prefilling), as does the caller leaving.
    opened = await open_all(
        [workers[n].open(request.prompt, request.messages) for n in names],
        fatal=lambda exc: not dropping.allowed or not worker_down(exc),
        close_orphans=lambda done: asyncio.ensure_future(
            close_sessions(workers, {names[i]: o.session_id for i, o in done.items()})
        ),
    )
    timings.open_s += time.perf_counter() - t0
    sessions = {n: o.session_id for n, o in zip(names, opened) if not isinstance(o, BaseException)}
    errors = [(n, o) for n, o in zip(names, opened) if isinstance(o, BaseException)]
    # the cause, not its victims (the Opens cancelled because of it)
    errors = [e for e in errors if not isinstance(e[1], asyncio.CancelledError)] or errors
    if errors:
        fatal = dropping.fatal([e for _, e in errors], any_left=bool(sessions))
        if fatal is not None:
            await close_sessions(workers, sessions)
            raise fatal
        for n, exc in errors:
            dropping.drop(n, exc)
    for n, o in zip(names, opened):
        if n in sessions and isinstance(o, OpenResult):
            usage[n].prompt_tokens += o.context_tokens
    return sessions


async def close_sessions(workers: Mapping[str, WorkerHandle], sessions: Mapping[str, str]) -> None:
    await asyncio.gather(*(workers[n].close(s) for n, s in sessions.items()), return_exceptions=True)
