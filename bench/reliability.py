"""Reliability benchmarks against the real service tree (``LocalCluster``: a tokenizer
service, one worker process per model, the orchestrator), written to a JSON file.

* ``admission``: how long an oversize request takes to be refused (a 200,000-character prompt,
  5,000 chat messages, a 9,000-token prompt); target < 0.5 s each, and no worker opened a session.
* ``interrupt``: an Open of an ~8,000-token prompt cancelled (client cancel, then a deadline)
  mid-prefill on each worker: seconds from the cancel until the worker holds no session; then a
  fused generation of that prompt cancelled mid-prefill, until every worker holds none.
  Target < 1 s.

Run under the shared model lock::

    flock /tmp/coolfusion-model.lock .venv/bin/python bench/reliability.py --out bench/reliability.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

import grpc

from coolfusion.clients.client import FusionClient, build_request
from coolfusion.clients.launcher import LocalCluster
from coolfusion.protos import worker_pb2 as wpb
from coolfusion.protos import worker_pb2_grpc

MODELS = ["smollm2", "gemma3"]
LONG_PROMPT = "The quick brown fox jumps over the lazy dog near the river bank. " * 570  # ~8,000 tokens
PREFILL_STARTED_S = 2.0  # the cancel comes this long after the session appeared (mid-prefill)


async def _live(stub) -> int:
    return (await stub.Info(wpb.InfoRequest(), timeout=10)).live_sessions


async def _until_live(stubs, want, timeout: float = 120.0) -> float:
    """Seconds until ``want(live sessions per worker)`` holds."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if want([await _live(s) for s in stubs]):
            return time.perf_counter() - t0
        await asyncio.sleep(0.02)
    raise TimeoutError("the workers' session counts did not get there")


async def bench_admission(address: str, stubs) -> dict:
    cases = {
        "prompt_200000_chars": dict(prompt=("The cat sat on the mat. " * 8334)[:200_000]),
        "messages_5000": dict(messages=[{"role": "user", "content": "hi"}] * 5000),
        "prompt_9000_tokens": dict(prompt="one two three four five six seven eight nine ten " * 900),
    }
    results = {}
    async with FusionClient(address) as client:
        await client.generate("1, 2,", max_new_tokens=1)  # warm channels and caches
        for name, request in cases.items():
            times, codes = [], set()
            for _ in range(5):
                t0 = time.perf_counter()
                try:
                    await client.generate(max_new_tokens=16, **request)
                    codes.add("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.add(exc.code().name)
                    detail = exc.details()
                times.append(time.perf_counter() - t0)
            results[name] = {
                "status": sorted(codes),
                "detail": detail,
                "seconds_max": round(max(times), 4),
                "seconds_median": round(sorted(times)[2], 4),
            }
    results["live_sessions_after"] = [await _live(s) for s in stubs]
    return results


async def _cancelled_open(stub, deadline: bool) -> float:
    """Open the long prompt, cancel it (or let its deadline pass) mid-prefill: seconds from then
    until the worker holds no session."""
    timeout = None
    if deadline:
        timeout = PREFILL_STARTED_S + 0.5  # about when the cancel would come
    call = stub.Open(wpb.OpenRequest(prompt=LONG_PROMPT.encode()), timeout=timeout)
    await _until_live([stub], lambda live: live[0] == 1)
    await asyncio.sleep(PREFILL_STARTED_S)
    if deadline:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    else:
        call.cancel()
    return await _until_live([stub], lambda live: live[0] == 0)


async def bench_interrupt(address: str, stubs) -> dict:
    results = {}
    for name, stub in zip(MODELS, stubs):
        results[name] = {
            "cancel_to_freed_s": [round(await _cancelled_open(stub, False), 3) for _ in range(3)],
            "deadline_to_freed_s": round(await _cancelled_open(stub, True), 3),
        }
    async with FusionClient(address) as client:
        call = client.stub.GenerateStream(build_request(LONG_PROMPT, max_new_tokens=8), metadata=client.metadata)
        await _until_live(stubs, lambda live: all(live))
        await asyncio.sleep(PREFILL_STARTED_S)
        call.cancel()
        results["fused_generation_cancel_to_all_freed_s"] = round(
            await _until_live(stubs, lambda live: not any(live)), 3
        )
    return results


async def main_async(args) -> dict:
    cluster = LocalCluster(MODELS)
    address = await asyncio.to_thread(cluster.start)
    try:
        workers = [p for p in cluster.processes if p.name.startswith("worker:")]
        channels = [grpc.aio.insecure_channel(w.address) for w in workers]
        stubs = [worker_pb2_grpc.ModelWorkerStub(c) for c in channels]
        out = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
            "models": MODELS,
        }
        if "admission" in args.what:
            out["admission"] = await bench_admission(address, stubs)
        if "interrupt" in args.what:
            out["interrupt"] = await bench_interrupt(address, stubs)
        for c in channels:
            await c.close()
        return out
    finally:
        await asyncio.to_thread(cluster.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="admission,interrupt", help="comma-separated: admission, interrupt")
    parser.add_argument("--out", default="bench/reliability.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
