"""Soak run: a mixed load against the real service tree (``LocalCluster``) for
``--minutes``, reporting requests done, errors by status, p50/p99 latency, and every process's RSS
and the workers' live sessions sampled every ``--sample-s`` seconds (flat is the target). The same
mix runs ``--warmup-minutes`` first. RSS is compared at rest (every worker back to 0 sessions:
live KV caches come and go with the load) at the end of the warm-up and after the soak.

The mix, per client in a loop: short and long prompts, unary and streaming calls, and a share of
streams cancelled after their first segment (``--cancel-share``, default 20 %). Not part of CI::

    flock /tmp/coolfusion-model.lock .venv/bin/python bench/soak.py --minutes 20 --out bench/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from collections import Counter

import grpc
import psutil

from coolfusion.clients.client import FusionClient, build_request
from coolfusion.clients.launcher import LocalCluster
from coolfusion.protos import worker_pb2, worker_pb2_grpc

MODELS = ["smollm2", "gemma3"]
REAPER_PASS_S = 12.0  # longer than two passes of a worker's session reaper (every 5 s at most)
SHORT = ["1, 2, 3, 4,", "The capital of France is", "Question: What is 7 * 6?\nAnswer:"]
LONG = "Question: A farmer has 17 sheep; all but 9 run away. How many are left?\nAnswer: 9.\n\n" * 12


async def client_loop(address: str, stop_at: float, rng: random.Random, stats: dict) -> None:
    async with FusionClient(address, timeout=300) as client:
        while time.monotonic() < stop_at:
            prompt = LONG + rng.choice(SHORT) if rng.random() < 0.3 else rng.choice(SHORT)
            kwargs = dict(mode=rng.choice(["cool", "cool", "single:smollm2"]), max_new_tokens=rng.choice([4, 8, 16]))
            t0 = time.perf_counter()
            try:
                if rng.random() < 0.5:
                    await client.generate(prompt, **kwargs)
                    outcome = "OK"
                else:
                    cancel = rng.random() < stats["cancel_share"]
                    outcome = "OK"
                    call = client.stub.GenerateStream(build_request(prompt, **kwargs), timeout=300)
                    async for item in call:
                        if cancel and item.HasField("segment"):
                            call.cancel()
                            outcome = "CANCELLED_BY_CLIENT"
                            break
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            stats["outcomes"][outcome] += 1
            if outcome == "OK":
                stats["latencies"].append(time.perf_counter() - t0)


def rss_mib(cluster: LocalCluster) -> dict:
    return {p.name: round(psutil.Process(p.proc.pid).memory_info().rss / 2**20, 1) for p in cluster.processes}


async def live_sessions(stubs) -> list[int]:
    return [(await s.Info(worker_pb2.InfoRequest(), timeout=30)).live_sessions for s in stubs]


async def sample(cluster: LocalCluster, stubs, stop_at: float, every: float, samples: list) -> None:
    t0 = time.monotonic()
    while True:
        samples.append(
            {
                "t_s": round(time.monotonic() - t0),
                "rss_mib": rss_mib(cluster),
                "live_sessions": await live_sessions(stubs),
            }
        )
        if time.monotonic() >= stop_at:
            return
        await asyncio.sleep(min(every, max(0.0, stop_at - time.monotonic())))


async def at_rest(cluster: LocalCluster, stubs) -> dict:
    """RSS once every worker holds no session (live KV caches are not what a leak check compares)
    and its reaper has run since: an idle worker hands its freed heap back then."""
    deadline = time.monotonic() + 60
    while any(await live_sessions(stubs)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(REAPER_PASS_S)
    return {"live_sessions": await live_sessions(stubs), "rss_mib": rss_mib(cluster)}


async def phase(address: str, minutes: float, rngs, stats: dict, cluster, stubs, every: float, samples: list) -> None:
    stop_at = time.monotonic() + minutes * 60
    sampler = asyncio.create_task(sample(cluster, stubs, stop_at, every, samples))
    await asyncio.gather(*(client_loop(address, stop_at, r, stats) for r in rngs))
    await sampler


async def main_async(args) -> dict:
    cluster = LocalCluster(MODELS)
    address = await asyncio.to_thread(cluster.start)
    try:
        workers = [p for p in cluster.processes if p.name.startswith("worker:")]
        channels = [grpc.aio.insecure_channel(w.address) for w in workers]
        stubs = [worker_pb2_grpc.ModelWorkerStub(c) for c in channels]
        rngs = [random.Random(args.seed + i) for i in range(args.clients)]
        warm_stats = {"outcomes": Counter(), "latencies": [], "cancel_share": args.cancel_share}
        stats = {"outcomes": Counter(), "latencies": [], "cancel_share": args.cancel_share}
        warm_samples: list = []
        samples: list = []
        await phase(address, args.warmup_minutes, rngs, warm_stats, cluster, stubs, args.sample_s, warm_samples)
        after_warmup = await at_rest(cluster, stubs)
        await phase(address, args.minutes, rngs, stats, cluster, stubs, args.sample_s, samples)
        after_soak = await at_rest(cluster, stubs)
        live_after = after_soak["live_sessions"]
        for c in channels:
            await c.close()
        lat = sorted(stats["latencies"])
        first, last = after_warmup["rss_mib"], after_soak["rss_mib"]
        expected = {"OK", "CANCELLED_BY_CLIENT"}
        return {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{round(psutil.virtual_memory().total / 2**30)} GiB RAM, {platform.system()}",
            "models": MODELS,
            "minutes": args.minutes,
            "warmup_minutes": args.warmup_minutes,
            "clients": args.clients,
            "cancel_share": args.cancel_share,
            "requests": sum(stats["outcomes"].values()),
            "warmup_outcomes": dict(warm_stats["outcomes"]),
            "outcomes": dict(stats["outcomes"]),
            "unexpected_statuses": sum(
                n for k, n in (stats["outcomes"] + warm_stats["outcomes"]).items() if k not in expected
            ),
            "latency_s": {
                "p50": round(statistics.median(lat), 3) if lat else None,
                "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
            },
            "rss_at_rest_after_warmup_mib": first,
            "rss_at_rest_after_soak_mib": last,
            "rss_change_pct": {n: round(100 * (last[n] - first[n]) / first[n], 1) for n in first},
            "live_sessions_after": live_after,
            "warmup_samples": warm_samples,
            "samples": samples,
        }
    finally:
        await asyncio.to_thread(cluster.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="minutes measured after the warm-up")
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cancel-share", type=float, default=0.2, help="share of streams cancelled mid-way")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between RSS/session samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/soak.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
