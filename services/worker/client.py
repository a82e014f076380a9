"""Calling a model worker's batch RPCs from outside the fusion loop (the loop's handles are in
``orchestrator/workers.py``). Plain Python without torch.

``distributions(target, texts, top_k)``: the Distributions RPC (``distributions.py``) as an async
generator of ``TextDistributions``, one per text in request order; ``distributions_blocking``: the
same over a sync channel. ``target``: a worker address (``host:port``; TLS from
``COOLFUSION_TLS_*`` when set; ``token``: the internal token to send, None:
``$COOLFUSION_INTERNAL_TOKEN``'s) or a channel of the matching kind (carrying its own token). A bad request raises
``grpc.RpcError`` with INVALID_ARGUMENT before any text arrives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from coolfusion.protos import worker_pb2 as pb
from coolfusion.protos import worker_pb2_grpc as pb_grpc

from ..common.security import aio_channel, internal_token, sync_channel
from ..common.server import CHANNEL_OPTIONS
from . import wire
from .results import TextDistributions


async def distributions(
    target: str | grpc.aio.Channel,
    texts: Sequence[str],
    top_k: int,
    timeout: float | None = None,
    token: str | None = None,
) -> AsyncIterator[TextDistributions]:
    """Each text's distributions as the worker streams them; ``timeout``: seconds for the whole
    call (None: none). Leaving the loop early cancels the call (the worker stops within a chunk)."""
    channel = aio_channel(target, CHANNEL_OPTIONS, token=internal_token(token)) if isinstance(target, str) else target
    try:
        call = pb_grpc.ModelWorkerStub(channel).Distributions(
            pb.DistributionsRequest(texts=list(texts), top_k=top_k), timeout=timeout
        )
        try:
            async for msg in call:
                yield wire.distributions_from_proto(msg)
        finally:
            call.cancel()  # a no-op once the stream ended
    finally:
        if isinstance(target, str):
            await channel.close()


def distributions_blocking(
    target: str | grpc.Channel,
    texts: Sequence[str],
    top_k: int,
    timeout: float | None = None,
    token: str | None = None,
) -> Iterator[TextDistributions]:
    """``distributions`` over a sync channel (a plain iterator)."""
    channel = sync_channel(target, CHANNEL_OPTIONS, token=internal_token(token)) if isinstance(target, str) else target
    try:
        call = pb_grpc.ModelWorkerStub(channel).Distributions(
            pb.DistributionsRequest(texts=list(texts), top_k=top_k), timeout=timeout
        )
        try:
            for msg in call:
                yield wire.distributions_from_proto(msg)
        finally:
            call.cancel()
    finally:
        if isinstance(target, str):
            channel.close()
