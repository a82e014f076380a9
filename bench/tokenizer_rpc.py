"""Micro-benchmark of one CommonBoundary call, in-process and over loopback gRPC.

    .venv/bin/python bench/tokenizer_rpc.py [--calls 3000] [--models smollm2,gemma3]

For each tokenizer alone and for all of them together, prints the median and p90 latency of
``TokenizerRegistry.common_boundary`` on a 40-character text, called directly and through the
real gRPC service on 127.0.0.1 with the synchronous ``TokenizerClient`` that workers use.
Targets: well under 1 ms in-process, under 2 ms over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable

CONTEXT_TAIL = "Question: what is fusion?\nAnswer:"
TEXT = " Multi-tasking isn't 1850 héllo 你好世界 OK!"  # 40 characters
assert len(TEXT) == 40
# Literal U+FFFD is ordinary text: a search over 8003 characters of it scans each tokenizer once.
FFFD_TEXT = ("ab\ufffd " * 2000) + "end"


def _measure(call: Callable[[], object], calls: int, warmup: int = 200) -> tuple[float, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times) * 1e3, times[int(0.9 * (len(times) - 1))] * 1e3


class ServerThread:
    """The gRPC service on its own event loop in a background thread (loopback, port 0)."""

    def __init__(self, registry):
        from coolfusion.services.tokenizer.server import build_service

        async def start() -> int:  # grpc.aio binds the server to the loop it is created on
            self.service = build_service(registry, "127.0.0.1:0")
            return await self.service.start()

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.service.stop(None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def run(models: str = "smollm2,gemma3", calls: int = 3000) -> list[dict]:
    from coolfusion.services.tokenizer.client import TokenizerClient
    from coolfusion.services.tokenizer.loading import load_registry

    registry = load_registry(models)
    sets = [[t] for t in registry.ids] + ([registry.ids] if len(registry) > 1 else [])
    server = ServerThread(registry)
    client = TokenizerClient(f"127.0.0.1:{server.port}")
    client.wait_ready(30)
    rows = []
    try:
        for ids in sets:
            expected = registry.common_boundary(CONTEXT_TAIL, TEXT, ids)
            assert client.common_boundary(CONTEXT_TAIL, TEXT, ids) == expected
            local = _measure(lambda ids=ids: registry.common_boundary(CONTEXT_TAIL, TEXT, ids), calls)
            remote = _measure(lambda ids=ids: client.common_boundary(CONTEXT_TAIL, TEXT, ids), calls)
            rows.append({"tokenizers": "+".join(ids), "boundary": expected, "in_process": local, "grpc": remote})
        fffd = _measure(lambda: registry.common_boundary("", FFFD_TEXT, registry.ids), max(1, calls // 100), warmup=1)
        rows.append(
            {"tokenizers": "+".join(registry.ids) + " (U+FFFD)", "boundary": 3, "in_process": fffd, "grpc": None}
        )
    finally:
        client.close()
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3", help="tokenizer specs, comma separated")
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per measurement")
    args = parser.parse_args(argv)
    rows = run(args.models, args.calls)
    print(f"CommonBoundary on a {len(TEXT)}-character text, {args.calls} calls each (milliseconds)")
    print(f"{'tokenizers':<24}{'boundary':>9}{'in-process median':>19}{'p90':>8}{'gRPC median':>13}{'p90':>8}")
    for r in rows:
        (lm, lp), (gm, gp) = r["in_process"], r["grpc"] or (float("nan"), float("nan"))
        print(f"{r['tokenizers']:<24}{r['boundary']!s:>9}{lm:>19.3f}{lp:>8.3f}{gm:>13.3f}{gp:>8.3f}")
    print(
        f"(U+FFFD): a text of {len(FFFD_TEXT)} characters with 2000 literal U+FFFD, in-process only; target: well under 1 s"
    )


if __name__ == "__main__":
    main()
