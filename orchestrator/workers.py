"""Async handles on model workers, as the fusion loop sees them.

``RemoteWorker`` talks to a worker process over grpc.aio. The loop only needs the small
``WorkerHandle`` surface below, so tests can also drive it with in-process cores. Its calls
return the worker core's own result types (``services/worker/results.py``), which
``services/worker/wire.py`` converts from the protos for both sides.
``ReplicatedWorker`` spreads sessions over several replicas of one model (a headless Service's
DNS records or a static list) and pins every session to the replica holding its KV cache;
``make_worker`` picks one of the two from an address spec (see ``parse_worker_target``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import math
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from asyncio_throttle import Throttler

from coolfusion.protos import worker_pb2 as pb
from coolfusion.protos import worker_pb2_grpc as pb_grpc

from ..services.common.errors import NotFound, Unavailable
from ..services.common.security import aio_channel, internal_token
from ..services.common.server import CHANNEL_OPTIONS, host_port
from ..services.worker import wire
from ..services.worker.api import NextTextOptions
from ..services.worker.results import CandidateScore, CommitResult, NextTextResult, OpenResult

log = logging.getLogger(__name__)


@dataclass
class WorkerInfo:
    name: str
    model_id: str
    tokenizer_id: str
    dtype: str
    device: str
    eos_token_ids: list[int] = field(default_factory=list)
    has_chat_template: bool = False
    address: str = ""
    parameters: int = 0
    context_length: int = 0  # most tokens a session holds (0: unknown)
    backend: str = ""  # what runs the worker's forwards ("transformers", "llamacpp")


class WorkerHandle(Protocol):
    name: str

    async def info(self) -> WorkerInfo: ...
    async def open(self, prompt: str | None, messages: list[dict] | None) -> OpenResult: ...
    async def next_text(self, session_id: str, options: NextTextOptions) -> NextTextResult: ...
    # Optional keyword (a performance switch): score(..., own_state_id=""). A ``CandidateScores``
    # also carries the worker's time in the call; a plain list counts as none.
    async def score(self, session_id: str, candidates: Sequence[tuple[str, bool]]) -> list[CandidateScore]: ...
    async def update_state(self, session_id: str, state_id: str) -> CommitResult: ...
    async def close(self, session_id: str) -> None: ...


# Monotonic time by which the current request's caller gives up (set per request by the Fusion
# servicer from ``context.time_remaining()``; copied into the tasks the request fans out to).
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("coolfusion_deadline", default=None)


def call_deadline(seconds: float | None) -> None:
    """Give every worker call of the current request at most ``seconds`` from now (None: no deadline)."""
    _DEADLINE.set(None if seconds is None else time.monotonic() + max(0.0, seconds))


def call_timeout(default: float | None) -> float | None:
    """The timeout for a worker call now: the caller's remaining time, capped by ``default``."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return default
    remaining = max(0.001, deadline - time.monotonic())
    return remaining if default is None else min(default, remaining)


class RemoteWorker:
    """A worker process reached over gRPC; fan-out calls are rate-capped by asyncio-throttle."""

    def __init__(
        self,
        name: str,
        address: str,
        rate_limit: int = 2000,
        timeout: float | None = 600.0,
        token: str | None = None,
    ):
        """``token``: the internal token every call carries (None: $COOLFUSION_INTERNAL_TOKEN's)."""
        self.name = name
        self.address = address
        self.timeout = timeout
        # TLS/mTLS from COOLFUSION_TLS_* when set.
        self.channel = aio_channel(address, CHANNEL_OPTIONS, token=internal_token(token))
        self.stub = pb_grpc.ModelWorkerStub(self.channel)
        self.throttler = Throttler(rate_limit=rate_limit, period=1.0)

    async def _call(self, method, request, bounded: bool = True):
        """``bounded``: within the caller's deadline (``call_deadline``); Close is not, it must
        free the session even after the caller gave up."""
        async with self.throttler:
            try:
                return await method(
                    request, timeout=call_timeout(self.timeout) if bounded else min(self.timeout or 30.0, 30.0)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # Name the worker: "connection refused" alone does not say which model is down.
                    raise Unavailable(f"worker {self.name} at {self.address} is unavailable: {exc.details()}") from exc
                raise

    async def info(self) -> WorkerInfo:
        r = await self._call(self.stub.Info, pb.InfoRequest())
        return WorkerInfo(
            name=r.name,
            model_id=r.model_id,
            tokenizer_id=r.tokenizer_id,
            dtype=r.dtype,
            device=r.device,
            eos_token_ids=list(r.eos_token_ids),
            has_chat_template=r.has_chat_template,
            address=self.address,
            parameters=r.parameters,
            context_length=r.context_length,
            backend=r.backend,
        )

    async def open(self, prompt: str | None, messages: list[dict] | None) -> OpenResult:
        return wire.open_from_proto(await self._call(self.stub.Open, wire.open_request(prompt, messages)))

    async def next_text(self, session_id: str, options: NextTextOptions) -> NextTextResult:
        request = wire.next_text_request(session_id, options)
        return wire.next_text_from_proto(await self._call(self.stub.NextText, request))

    async def score(
        self, session_id: str, candidates: Sequence[tuple[str, bool]], own_state_id: str = ""
    ) -> list[CandidateScore]:
        request = wire.score_request(session_id, candidates, own_state_id)
        return wire.scores_from_proto(await self._call(self.stub.ScoreCandidates, request))

    async def update_state(self, session_id: str, state_id: str) -> CommitResult:
        request = pb.UpdateStateRequest(session_id=session_id, state_id=state_id)
        return wire.commit_from_proto(await self._call(self.stub.UpdateState, request))

    async def close(self, session_id: str) -> None:
        await self._call(self.stub.Close, pb.CloseRequest(session_id=session_id), bounded=False)

    async def aclose(self) -> None:
        await self.channel.close()


# ---- replicas ------------------------------------------------------------------------------
DNS_PREFIX = "dns:///"


def parse_worker_target(target: str) -> tuple[str | None, list[str]]:
    """``host:port`` -> (None, [it]); ``a:1|b:2`` -> (None, [a:1, b:2]);
    ``dns:///worker-x.ns.svc:50052`` -> ("worker-x.ns.svc:50052", []) (replicas from DNS)."""
    target = target.strip()
    if target.startswith(DNS_PREFIX):
        hostport = target[len(DNS_PREFIX) :]
        host, port = _split_hostport(hostport)
        if not host or not port.isdigit():
            raise ValueError(f"{target!r}: expected dns:///HOST:PORT")
        return hostport, []
    addresses = [a.strip() for a in target.split("|") if a.strip()]
    if not addresses:
        raise ValueError(f"empty worker address {target!r}")
    return None, addresses


def _split_hostport(hostport: str) -> tuple[str, str]:
    if hostport.startswith("["):  # [v6]:port
        host, _, rest = hostport[1:].partition("]")
        return host, rest.lstrip(":")
    host, _, port = hostport.rpartition(":")
    return host, port


def make_worker(name: str, target: str, token: str | None = None) -> RemoteWorker | ReplicatedWorker:
    """``RemoteWorker`` for one plain address, ``ReplicatedWorker`` for ``dns:///`` or ``a|b``;
    ``token``: the internal token (None: $COOLFUSION_INTERNAL_TOKEN's)."""
    dns, addresses = parse_worker_target(target)
    if dns is None and len(addresses) == 1:
        return RemoteWorker(name, addresses[0], token=token)
    return ReplicatedWorker(name, dns=dns, addresses=addresses, token=token)


class ReplicatedWorker:
    """One model served by several worker replicas; every session stays on the replica that opened it.

    A session's KV cache lives in one replica's memory, so per-call load balancing (gRPC's
    ``round_robin``) would break it. Instead: ``open`` picks the replica with the fewest live
    sessions of this orchestrator (round-robin among equals), remembers session id -> replica,
    and ``next_text``/``score``/``update_state``/``close`` go to that replica; ``close`` forgets
    the session. Replicas come from a static list or from a headless Service's A records,
    re-resolved at most every ``refresh_s`` seconds when a session opens. A replica that drops
    out of DNS (scale-down, rolling update) gets no new sessions but keeps serving the ones it
    holds; its channel is closed when the last one closes. ``open`` fails over to the next
    replica when one is UNAVAILABLE (no session exists there yet); a replica lost mid-session
    loses that session (its KV cache is gone) and the request fails.
    """

    def __init__(
        self,
        name: str,
        dns: str | None = None,
        addresses: Sequence[str] = (),
        refresh_s: float = 10.0,
        resolver=None,
        client_factory=None,
        token: str | None = None,
    ):
        """``token``: the internal token of the replicas' channels (None: $COOLFUSION_INTERNAL_TOKEN's)."""
        if (dns is None) == (not addresses):
            raise ValueError("give exactly one of dns (HOST:PORT) and addresses")
        self.name = name
        self.dns = dns
        self.address = f"{DNS_PREFIX}{dns}" if dns else "|".join(addresses)
        self.refresh_s = refresh_s
        self._resolver = resolver or self._resolve_dns
        # Resolved once: "" (none) must not fall back to the environment in each replica's client.
        self._client_factory = client_factory or functools.partial(RemoteWorker, token=internal_token(token) or "")
        self._clients: dict[str, RemoteWorker] = {}  # every replica we may still talk to
        self._active: list[str] = []  # replicas that take new sessions
        self._sessions: dict[str, str] = {}  # session id -> replica address
        self._rr = itertools.count()
        self._resolved_at = -math.inf
        self._lock = asyncio.Lock()
        if not dns:
            self._set_active(list(addresses))

    # ---- replica set ---------------------------------------------------------------------
    async def _resolve_dns(self, hostport: str) -> list[str]:
        host, port = _split_hostport(hostport)
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        return sorted({host_port(str(info[4][0]), port) for info in infos})

    def _set_active(self, addresses: list[str]) -> None:
        if addresses != self._active:
            log.info("worker %s replicas: %s", self.name, ", ".join(addresses) or "none")
        self._active = list(addresses)
        for address in addresses:
            if address not in self._clients:
                self._clients[address] = self._client_factory(self.name, address)
        for address in [a for a in self._clients if a not in addresses]:
            self._retire_if_idle(address)

    def _retire_if_idle(self, address: str) -> None:
        if address in self._active or address in self._sessions.values():
            return
        client = self._clients.pop(address, None)
        if client is not None and hasattr(client, "aclose"):
            asyncio.ensure_future(client.aclose())

    async def refresh(self, force: bool = False) -> list[str]:
        """Re-resolve the DNS name when due; returns the replicas that take new sessions."""
        if self.dns is None:
            return self._active
        async with self._lock:
            now = time.monotonic()
            if force or not self._active or now - self._resolved_at >= self.refresh_s:
                try:
                    addresses = await self._resolver(self.dns)
                except OSError as exc:
                    if not self._active:
                        raise Unavailable(f"worker {self.name}: cannot resolve {self.dns}: {exc}") from None
                    log.warning(
                        "worker %s: resolving %s failed (%s); keeping %s", self.name, self.dns, exc, self._active
                    )
                else:
                    self._resolved_at = now
                    self._set_active(addresses)
        if not self._active:
            raise Unavailable(f"worker {self.name}: {self.dns} has no ready replica")
        return self._active

    def replicas(self) -> list[str]:
        return list(self._active)

    def sessions_per_replica(self) -> dict[str, int]:
        counts = {a: 0 for a in self._clients}
        for address in self._sessions.values():
            counts[address] = counts.get(address, 0) + 1
        return counts

    def replica_of(self, session_id: str) -> str:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFound(f"no session {session_id!r} on worker {self.name!r} (closed or never opened)") from None

    def _order(self, active: list[str]) -> list[str]:
        """Replicas in the order to try: fewest sessions first, round-robin among equals."""
        load = self.sessions_per_replica()
        start = next(self._rr)
        rotated = [active[(start + i) % len(active)] for i in range(len(active))]
        return sorted(rotated, key=lambda a: load.get(a, 0))  # stable: keeps the rotation for ties

    # ---- WorkerHandle --------------------------------------------------------------------
    async def info(self) -> WorkerInfo:
        active = await self.refresh()
        info = await self._clients[active[0]].info()
        info.address = self.address
        return info

    async def open(self, prompt: str | None, messages: list[dict] | None) -> OpenResult:
        active = await self.refresh()
        error: Exception | None = None
        for address in self._order(active):
            try:
                opened = await self._clients[address].open(prompt, messages)
            except Unavailable as exc:
                log.warning("worker %s: replica %s unavailable (%s); trying another", self.name, address, exc)
                error = exc
                continue
            self._sessions[opened.session_id] = address
            return opened
        self._resolved_at = -math.inf  # look the replicas up again next time
        raise error  # type: ignore[misc]

    async def next_text(self, session_id: str, options: NextTextOptions) -> NextTextResult:
        return await self._clients[self.replica_of(session_id)].next_text(session_id, options)

    async def score(self, session_id: str, candidates: Sequence[tuple[str, bool]], **options) -> list[CandidateScore]:
        return await self._clients[self.replica_of(session_id)].score(session_id, candidates, **options)

    async def update_state(self, session_id: str, state_id: str) -> CommitResult:
        return await self._clients[self.replica_of(session_id)].update_state(session_id, state_id)

    async def close(self, session_id: str) -> None:
        address = self._sessions.get(session_id)
        if address is None:
            return
        try:
            await self._clients[address].close(session_id)
        finally:
            self._sessions.pop(session_id, None)
            self._retire_if_idle(address)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.aclose() for c in clients if hasattr(c, "aclose")), return_exceptions=True)
