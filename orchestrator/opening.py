"""Opening a request's sessions on every model at once, without waiting for work nobody needs.

When one model's Open fails for good, the others' Opens are cancelled instead of awaited: the
cancellation reaches their workers, whose prefill stops at its next chunk and frees the session.
When the caller leaves (cancel, deadline) every Open still running is cancelled the same way, and a
session that was opened all the same is handed back to be closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


async def open_all(
    opens: Sequence[Awaitable],
    fatal: Callable[[BaseException], bool],
    close_orphans: Callable[[dict[int, Any]], object],
) -> list:
    """Each Open's result or exception, in order (a cancelled one: ``asyncio.CancelledError()``).

    ``fatal(exc)``: this failure ends the request, so the Opens still running are cancelled.
    ``close_orphans({index: result})``: the sessions opened when the caller was cancelled."""
    tasks = [asyncio.ensure_future(o) for o in opens]
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(_failure(t) is not None and fatal(_failure(t)) for t in done):  # type: ignore[arg-type]
                for t in pending:
                    t.cancel()
                if pending:  # a cancelled gRPC call ends at once: this waits for the cancellations, not the work
                    await asyncio.wait(pending)
                break
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        opened = {i: t.result() for i, t in enumerate(tasks) if t.done() and _failure(t) is None}
        if opened:
            close_orphans(opened)
        raise
    return [_failure(t) if _failure(t) is not None else t.result() for t in tasks]


def _failure(task: asyncio.Future) -> BaseException | None:
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()
