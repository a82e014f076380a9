"""Degraded fusion: a worker that goes down mid-generation is dropped and the others go on.

Only UNAVAILABLE counts as down (process gone, unreachable); any other error fails the request.
The request must ask for it (``allow_degraded``), only the cool modes allow it, and at least one
model must remain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..services.common.errors import Unavailable

log = logging.getLogger(__name__)


def worker_down(exc: BaseException) -> bool:
    """A worker failure that degraded fusion may survive (UNAVAILABLE: process gone, unreachable)."""
    if isinstance(exc, Unavailable):
        return True
    return (
        isinstance(exc, grpc.RpcError)
        and callable(getattr(exc, "code", None))
        and exc.code() == grpc.StatusCode.UNAVAILABLE
    )


class Degraded(Exception):
    """Models were dropped in this phase; ``args[0]``: the results of the others (None for the
    dropped). The loop redoes the segment with the models left."""


@dataclass
class Dropping:
    """Whether models may be dropped in this generation, and which were (model -> why)."""

    allowed: bool
    dropped: dict[str, str] = field(default_factory=dict)

    def fatal(self, errors: Sequence[BaseException], any_left: bool) -> BaseException | None:
        """The error that fails the request, or None when every failed model may be dropped."""
        fatal = [e for e in errors if not worker_down(e)]
        if fatal or not self.allowed or not any_left:
            return (fatal or list(errors))[0]
        return None

    def drop(self, name: str, exc: BaseException) -> None:
        log.warning("degraded fusion: dropping model %s after a worker failure: %s", name, exc)
        self.dropped[name] = str(exc)


NEVER = Dropping(allowed=False)  # rerank answers and Score: every failure fails the request


async def gather_live(names: list[str], call: Callable[[int, str], Awaitable[Any]], dropping: Dropping) -> list:
    """``call(i, name)`` for every model at once. A worker that is down is dropped from ``names``
    (in place) when ``dropping`` allows it and another model remains; then ``Degraded`` is raised."""
    results = await asyncio.gather(*(call(i, n) for i, n in enumerate(names)), return_exceptions=True)
    errors = [(n, r) for n, r in zip(names, results) if isinstance(r, BaseException)]
    if not errors:
        return results
    for _, r in errors:
        if not isinstance(r, Exception):
            raise r  # cancellation
    fatal = dropping.fatal([r for _, r in errors], any_left=len(errors) < len(names))
    if fatal is not None:
        raise fatal
    for n, r in errors:
        dropping.drop(n, r)
        names.remove(n)
    raise Degraded([None if isinstance(r, BaseException) else r for r in results])
