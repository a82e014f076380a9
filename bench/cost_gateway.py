"""``bench/cost.py --gateway``: what the OpenAI-compatible HTTP gateway adds to a streamed
fused generation, against the gRPC client on the same services (the goals: overhead <= 3 % of
wall time on a 64-token generation, time to first token within 20 ms).

One ``LocalCluster`` with the gateway process (``http_port=0``). Per prompt and repeat, the same
greedy ``cool`` request is streamed once over gRPC (``FusionClient.stream_raw``) and once over
HTTP (httpx reading the server-sent events; the gateway as deployed, a process of its own), in
alternating order. Reported per path: wall time, time to the first segment, and wall time minus
the orchestrator's own ``timings.total_s`` for that run (what the transport and the client side
add; it cancels most of the generation's run-to-run noise). Time to first token is treated the
same way: the client-side part is the time to the first segment minus the orchestrator's own
``timings.first_segment_s``, and the gateway's share of it is the median over runs of the HTTP
minus the gRPC client side. Both paths must give the same text.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path


async def _grpc_run(address: str, prompt: str, options: dict) -> dict:
    from coolfusion.clients.client import FusionClient

    started = time.perf_counter()
    first = None
    async with FusionClient(address) as client:
        await client.wait_ready()
        started = time.perf_counter()
        async for item in client.stream_raw(prompt, **options):
            if first is None and item.HasField("segment"):
                first = time.perf_counter() - started
            if item.HasField("final"):
                final = item.final
    wall = time.perf_counter() - started
    timings = final.timings
    return {
        "wall_s": wall,
        "ttft_s": first,
        "server_s": timings.total_s,
        "server_ttft_s": timings.first_segment_s,
        "text": final.text,
    }


async def _http_run(url: str, prompt: str, options: dict) -> dict:
    import httpx2

    body = {
        "model": options["mode"],
        "prompt": prompt,
        "max_tokens": options["max_new_tokens"],
        "temperature": 0,
        "stream": True,
        "coolfusion": {"models": options["models"]},
    }
    texts, first, server_s, server_ttft = [], None, None, None
    async with httpx2.AsyncClient(timeout=None) as http:
        await http.get(f"{url}/health/live")  # connection set up outside the timed part, as gRPC's
        started = time.perf_counter()
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                choice = chunk["choices"][0]
                if choice["finish_reason"] is None:
                    first = first if first is not None else time.perf_counter() - started
                    texts.append(choice["text"])
                else:
                    server_s = chunk["coolfusion"]["timings"]["total_s"]
                    server_ttft = chunk["coolfusion"]["timings"]["first_segment_s"]
        wall = time.perf_counter() - started
    return {"wall_s": wall, "ttft_s": first, "server_s": server_s, "server_ttft_s": server_ttft, "text": "".join(texts)}


def _client_ttft(row: dict, path: str) -> float:
    return row[path]["ttft_s"] - row[path]["server_ttft_s"]


def _summary(rows: list[dict]) -> dict:
    def med(key: str, path: str) -> float:
        return statistics.median(r[path][key] for r in rows)

    out = {}
    for path in ("grpc", "http"):
        out[path] = {
            "wall_s": med("wall_s", path),
            "ttft_s": med("ttft_s", path),
            "client_side_s": statistics.median(r[path]["wall_s"] - r[path]["server_s"] for r in rows),
            "client_side_ttft_s": statistics.median(r[path]["ttft_s"] - r[path]["server_ttft_s"] for r in rows),
        }
    added = out["http"]["client_side_s"] - out["grpc"]["client_side_s"]
    out["gateway_added_s"] = added
    out["gateway_overhead_pct"] = 100 * added / out["grpc"]["wall_s"]
    out["wall_overhead_pct"] = 100 * (out["http"]["wall_s"] - out["grpc"]["wall_s"]) / out["grpc"]["wall_s"]
    out["ttft_diff_ms"] = 1000 * (out["http"]["ttft_s"] - out["grpc"]["ttft_s"])
    # What the gateway adds to the time to first token, the server's own first-segment time taken out
    # of each run (its run-to-run spread is larger than the difference measured).
    added_ttft = sorted(_client_ttft(r, "http") - _client_ttft(r, "grpc") for r in rows)
    out["gateway_added_ttft_ms"] = 1000 * statistics.median(added_ttft)
    out["gateway_added_ttft_ms_p90"] = 1000 * added_ttft[min(len(added_ttft) - 1, int(0.9 * len(added_ttft)))]
    out["same_text"] = all(r["grpc"]["text"] == r["http"]["text"] for r in rows)
    return out


async def _runs(address: str, url: str, prompts: list[str], repeats: int, options: dict, log) -> list[dict]:
    rows = []
    warm_up = {**options, "max_new_tokens": 4}  # channels, caches, the gateway's list of model ids
    await _grpc_run(address, prompts[0], warm_up)
    await _http_run(url, prompts[0], warm_up)
    for k in range(repeats):
        for i, prompt in enumerate(prompts):
            order = ("grpc", "http") if (k + i) % 2 == 0 else ("http", "grpc")  # alternate who goes first
            row = {"prompt": i, "repeat": k}
            for path in order:
                if path == "grpc":
                    row[path] = await _grpc_run(address, prompt, options)
                else:
                    row[path] = await _http_run(url, prompt, options)
            log(f"prompt {i} repeat {k}: grpc {row['grpc']['wall_s']:.2f} s, http {row['http']['wall_s']:.2f} s")
            rows.append(row)
    return rows


def cmd_gateway_bench(args) -> int:
    from cost_floor import PROMPTS, machine

    from coolfusion.clients.launcher import LocalCluster

    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    options = {"mode": "cool", "models": [m.split("=", 1)[0] for m in models], "max_new_tokens": args.max_new_tokens}
    prompts = PROMPTS[: args.prompts]
    cluster = LocalCluster(models, http_port=0)
    address = cluster.start()
    try:
        rows = asyncio.run(_runs(address, f"http://{cluster.http_address}", prompts, args.repeats, options, log))
    finally:
        cluster.stop()
    result = {
        "machine": machine(),
        "config": {**options, "prompts": prompts, "repeats": args.repeats},
        "summary": _summary(rows),
        "runs": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result if args.json else result["summary"], indent=2))
    return 0 if result["summary"]["same_text"] else 1
