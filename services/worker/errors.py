"""Errors raised by the model worker core; each carries the gRPC status callers should see."""

from __future__ import annotations

from ..common import errors as common


class WorkerError(common.CoolFusionError):
    """Base class of the worker core's own errors."""


class SessionNotFound(WorkerError, common.NotFound):
    """No live session with that id (NOT_FOUND): never opened, or closed already."""


class StateError(WorkerError, common.FailedPrecondition):
    """A temp state id that is unknown or no longer valid (FAILED_PRECONDITION).

    Temp states are created by FeedTokens, ScoreCandidates and NextText; committing any of them
    (UpdateState) invalidates every other temp state of the session, and a new NextText
    invalidates the previous NextText state.
    """
