"""Several worker replicas of one model as one ``WorkerHandle``: an address spec names them
(``parse_worker_target``: a static list or a headless Service's DNS records), ``make_worker``
gives a plain ``RemoteWorker`` for one address and a ``ReplicatedWorker`` for several, which
pins every session to the replica holding its KV cache.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import socket
import time
from collections.abc import Sequence

from ..services.common.errors import NotFound, Unavailable
from ..services.common.security import internal_token
from ..services.common.server import host_port
from ..services.worker.api import NextTextOptions
from ..services.worker.results import CandidateScore, CommitResult, NextTextResult, OpenResult
from .workers import RemoteWorker, WorkerInfo

log = logging.getLogger(__name__)

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
