"""The compose stack built, started, used and broken for real (deploy/smoke.sh runs this).

Builds every image of docker-compose.yml + docker-compose.cpu.yml, brings the stack up under its
own project name and ports, sends a fused gRPC request, a streamed chat over HTTP with the
official openai client and a Score request, then kills a worker mid-generation, stops the
orchestrator behind the gateway and takes everything down. Prints one table and writes it to
--out (JSON) and --markdown. Exit 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx2 as httpx
import openai

from coolfusion.clients.client import FusionClient
from coolfusion.protos import fusion_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
from smoke_lib import (  # noqa: E402
    Report,
    metric_samples,
    models_that_worked,
    parse_compose_ps,
    service_record,
    unhealthy,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]
PROMPT = "Question: A baker makes 12 rolls per tray and bakes 3 trays. How many rolls?\nAnswer:"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # the models keep counting: a generation long enough to break mid-way
HEALTHY_TIMEOUT_S = 300
CALL_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, project: str, env: dict[str, str]):
        self.project, self.env = project, env

    def compose(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", "-p", self.project, *FILES, *args]
        done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return done

    def states(self) -> dict[str, tuple[str, str]]:
        return parse_compose_ps(self.compose("ps", "--all", "--format", "json").stdout)

    def wait_healthy(self, services: list[str], timeout: float = HEALTHY_TIMEOUT_S):
        return wait_until(self.states, lambda s: not unhealthy(s, services), timeout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()


def build(stack: Stack, report: Report, base_image: str) -> list[str]:
    config = json.loads(stack.compose("config", "--format", "json").stdout)
    report.services = service_record(config)
    by_image: dict[str, str] = {}
    for name, service in config["services"].items():
        by_image.setdefault(service["image"], name)
    for image, service in by_image.items():
        started = time.perf_counter()
        stack.compose("build", "--build-arg", f"BASE_IMAGE={base_image}", service, timeout=3600)
        took = time.perf_counter() - started
        size = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True, text=True)
        report.image(image, took, int(size.stdout.strip() or 0))
    return list(config["services"])


def generate_over_grpc(report: Report, port: int) -> None:
    done = subprocess.run(
        ["coolfusion", "generate", PROMPT, "--connect", f"127.0.0.1:{port}", "--json", "--max-new-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
    )
    if not report.check(
        "fused generate over gRPC (coolfusion generate --connect)", done.returncode == 0, done.stderr[-200:]
    ):
        return
    result = json.loads(done.stdout)
    worked = models_that_worked(result["usage"])
    report.check(
        "provenance: segments + both models took part",
        len(result["segments"]) > 0 and len(worked) == 2,
        f"{len(result['segments'])} segments, models {sorted(worked)}, text {result['text'][:40]!r}",
    )


def chat_over_http(report: Report, http_port: int) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", timeout=CALL_TIMEOUT_S)
    started = time.perf_counter()
    chunks, text, models = 0, "", set()
    stream = client.chat.completions.create(
        model="cool", messages=[{"role": "user", "content": "Name a color."}], max_tokens=16, stream=True
    )
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        extension = (chunk.model_extra or {}).get("coolfusion") or {}
        if extension.get("segment"):
            models.add(extension["segment"]["model"])
    report.check(
        "streamed chat over HTTP (openai client)",
        chunks > 1 and text.strip() != "",
        f"{chunks} chunks, winners {sorted(models)}, {text[:30]!r}",
        time.perf_counter() - started,
    )


async def score(report: Report, port: int) -> None:
    async with FusionClient(f"127.0.0.1:{port}", timeout=CALL_TIMEOUT_S) as client:
        reply = await client.score("Question: 2 + 2 =", [" 4", " 5"])
    models = {p.scorer for t in reply.scores for p in t.ppl}
    chosen = [t.chosen for t in reply.scores]
    report.check(
        "Score request (both models score both texts)",
        len(reply.scores) == 2 and len(models) == 2,
        f"scorers {sorted(models)}, chosen {chosen}, rule {reply.score_rule}",
    )


def metrics(report: Report, http_port: int) -> None:
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=30).text
    chat = metric_samples(text, "coolfusion_gateway_requests_total")
    served = sum(v for k, v in chat.items() if '"/v1/chat/completions"' in k and '"200"' in k)
    report.check("gateway /metrics counts the chat request", served >= 1, f"chat 200s: {served:.0f}")


async def _stream_until_end(client: FusionClient, allow_degraded: bool, first: asyncio.Event) -> dict:
    """A long fused stream; ``first`` is set at its first segment. Returns how it ended."""
    request = pb.GenerateRequest(prompt=COUNTING, mode="cool", max_new_tokens=300, allow_degraded=allow_degraded)
    started = time.perf_counter()
    try:
        async for item in client.stub.GenerateStream(request, timeout=CALL_TIMEOUT_S, metadata=client.metadata):
            first.set()
            if item.HasField("final"):
                return {
                    "end": "final",
                    "degraded": list(item.final.degraded_models),
                    "s": time.perf_counter() - started,
                }
    except grpc.aio.AioRpcError as exc:
        first.set()
        return {"end": exc.code().name, "message": exc.details(), "s": time.perf_counter() - started}
    return {"end": "no final", "s": time.perf_counter() - started}


async def kill_a_worker(stack: Stack, report: Report, port: int) -> None:
    """worker-b's process gets SIGKILL while two streams run: the one with allow_degraded ends with gemma3
    dropped, the other fails UNAVAILABLE; neither hangs."""
    async with FusionClient(f"127.0.0.1:{port}") as client:
        firsts = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.ensure_future(_stream_until_end(client, flag, ev)) for flag, ev in zip((True, False), firsts)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), CALL_TIMEOUT_S)
        killed_at = time.perf_counter()
        # A crash, not a manual stop: the worker process dies by SIGKILL (as the OOM killer does),
        # its init exits, and the restart policy applies (`docker kill` would count as a stop).
        crash = ["docker", "exec", stack.container("worker-b"), "sh", "-c", "kill -KILL -1"]
        subprocess.run(crash, check=False, capture_output=True)
        degraded, strict = await asyncio.wait_for(asyncio.gather(*tasks), CALL_TIMEOUT_S)
        after = time.perf_counter() - killed_at
    report.check(
        "kill worker-b mid-stream, allow_degraded: fused text without gemma3",
        degraded["end"] == "final" and degraded.get("degraded") == ["gemma3"],
        str(degraded),
        after,
    )
    report.check(
        "kill worker-b mid-stream, strict: UNAVAILABLE, no hang",
        strict["end"] == "UNAVAILABLE",
        f"{strict['end']}: {strict.get('message', '')[:80]}",
        after,
    )


def worker_comes_back(stack: Stack, report: Report, port: int) -> None:
    started = time.perf_counter()
    restarted = wait_until(stack.states, lambda s: s.get("worker-b", ("",))[0] == "running", 30)
    how = "restart policy"
    if not restarted.ok:  # not restarted by the engine: compose brings it back
        stack.compose("up", "-d", "--no-deps", "worker-b")
        how = "docker compose up -d worker-b"
    waited = stack.wait_healthy(["worker-b"])
    report.check("worker-b back and healthy", waited.ok, f"via {how}", time.perf_counter() - started)
    logs = stack.compose("logs", "--no-color", "worker-b").stdout
    conversions = logs.count("converting tokenizer")
    report.check(
        "second start reuses the GGUF conversion in the cache volume",
        conversions <= 1,
        f"'converting tokenizer' logged {conversions}x over both starts",
    )
    generate_over_grpc(report, port)


def stop_the_orchestrator(stack: Stack, report: Report, http_port: int) -> None:
    """`docker stop` while a completion runs: the orchestrator drains it (SIGTERM, --grace 30)
    within compose's stop_grace_period; then the gateway answers 503 and recovers on start."""
    url = f"http://127.0.0.1:{http_port}"
    long_body = {"model": "cool", "prompt": COUNTING, "max_tokens": 48}
    in_flight: dict = {}

    def complete() -> None:
        reply = httpx.post(f"{url}/v1/completions", json=long_body, timeout=CALL_TIMEOUT_S)
        in_flight.update(status=reply.status_code, text=reply.json().get("choices", [{}])[0].get("text", ""))

    worker = threading.Thread(target=complete)
    worker.start()
    time.sleep(3)  # the completion is generating
    started = time.perf_counter()
    stack.compose("stop", "orchestrator")
    stopped_s = time.perf_counter() - started
    worker.join(CALL_TIMEOUT_S)
    report.check(
        "docker stop orchestrator mid-request: drained, the request completes",
        stopped_s < 35 and in_flight.get("status") == 200,
        f"stop_grace_period 35 s; in-flight request {in_flight.get('status')} {in_flight.get('text', '')[:20]!r}",
        stopped_s,
    )
    body = {"model": "cool", "prompt": "1, 2, 3,", "max_tokens": 4}
    health = httpx.get(f"{url}/health", timeout=30)
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    report.check(
        "gateway with the orchestrator stopped: 503",
        health.status_code == 503 and reply.status_code == 503,
        f"/health {health.status_code}, completion {reply.status_code}",
    )
    stack.compose("start", "orchestrator")
    waited = wait_until(
        lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code,
        lambda status: status == 200,
        HEALTHY_TIMEOUT_S,
    )
    report.check(
        "gateway recovers when the orchestrator is back: 200", waited.ok, f"last {waited.last}", waited.seconds
    )


def down(stack: Stack, report: Report) -> None:
    stack.compose("down", "-v", "--remove-orphans", timeout=300)
    label = f"label=com.docker.compose.project={stack.project}"
    left = []
    for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
        out = subprocess.run(["docker", *kind, "-q", "--filter", label], capture_output=True, text=True).stdout.split()
        left += [f"{kind[0]}:{x[:12]}" for x in out]
    report.check(
        "docker compose down -v leaves nothing", not left, ", ".join(left) or "no container, volume or network"
    )


def run(args) -> Report:
    report = Report()
    port, http_port = free_port(), free_port()
    env = dict(
        os.environ,
        COOLFUSION_INTERNAL_TOKEN=secrets.token_hex(32),
        COOLFUSION_PUBLIC_PORT=str(port),
        COOLFUSION_HTTP_PORT=str(http_port),
        COOLFUSION_AUTH_TOKENS="",
    )
    stack = Stack(args.project, env)
    services = build(stack, report, args.base_image)
    if args.build_only:
        return report
    try:
        started = time.perf_counter()
        # `up -d` itself waits for each depends_on condition (service_healthy) before starting
        # the next service: the first start converts the GGUF tokenizers on the way.
        stack.compose("up", "-d", timeout=3 * HEALTHY_TIMEOUT_S)
        waited = stack.wait_healthy(services)
        report.check(
            "docker compose up: every service healthy",
            waited.ok,
            str(waited.last if not waited.ok else ""),
            time.perf_counter() - started,
        )
        if waited.ok:
            generate_over_grpc(report, port)
            chat_over_http(report, http_port)
            asyncio.run(score(report, port))
            metrics(report, http_port)
            asyncio.run(kill_a_worker(stack, report, port))
            worker_comes_back(stack, report, port)
            stop_the_orchestrator(stack, report, http_port)
    except Exception as exc:  # the table still shows how far it got
        report.check("smoke run", False, f"{type(exc).__name__}: {str(exc)[-300:]}")
    finally:
        if not report.ok:
            (ROOT / "runs").mkdir(exist_ok=True)
            logs = stack.compose("logs", "--no-color", "--timestamps", check=False).stdout
            (ROOT / "runs" / "deploy-smoke-logs.txt").write_text(logs)
        down(stack, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-image", default="python:3.11-slim")
    parser.add_argument("--project", default="coolfusion-smoke")
    parser.add_argument("--out", type=Path, help="the results as JSON")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = run(args)
    report.check("whole run", report.ok, f"base image {args.base_image}", time.perf_counter() - started)
    print(report.table())
    if args.out:
        args.out.write_text(report.to_json() + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
