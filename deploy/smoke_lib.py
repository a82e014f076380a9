"""Plain helpers of deploy/smoke.py (no docker here, unit-tested in tests/test_deploy_smoke.py):
`docker compose ps` parsing, a wait loop, provenance and Prometheus parsing, the result table."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field


def parse_compose_ps(text: str) -> dict[str, tuple[str, str]]:
    """``docker compose ps --all --format json`` -> {service: (state, health)}. Compose prints one
    JSON object per line (v2.21+) or one JSON array (older); health is "" without a healthcheck."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {r["Service"]: (r.get("State", ""), r.get("Health", "")) for r in rows}


def unhealthy(states: dict[str, tuple[str, str]], services: Iterable[str]) -> list[str]:
    """The services not yet running and healthy (a service without a healthcheck: running)."""
    waiting = []
    for name in services:
        state, health = states.get(name, ("missing", ""))
        if state != "running" or health not in ("", "healthy"):
            waiting.append(f"{name}={state}/{health or '-'}")
    return waiting


@dataclass
class Waited:
    ok: bool
    seconds: float
    last: object = None  # the probe's last answer (what was still wrong on a timeout)


def wait_until(
    probe: Callable[[], object],
    done: Callable[[object], bool],
    timeout: float,
    interval: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Waited:
    """Calls ``probe`` until ``done(answer)`` or ``timeout`` seconds; a probe that raises counts
    as not done (its exception is the last answer)."""
    start = clock()
    last: object = None
    while True:
        try:
            last = probe()
            if done(last):
                return Waited(True, clock() - start, last)
        except Exception as exc:  # a service mid-restart refuses connections: keep waiting
            last = exc
        if clock() - start >= timeout:
            return Waited(False, clock() - start, last)
        sleep(interval)


def segment_models(result: dict) -> dict[str, int]:
    """How many segments each model won in a ``coolfusion generate --json`` result."""
    counts: dict[str, int] = {}
    for segment in result.get("segments", []):
        counts[segment["model"]] = counts.get(segment["model"], 0) + 1
    return counts


def models_that_worked(usage: dict[str, dict]) -> set[str]:
    """Models that generated or scored tokens (every model of a fusion proposes and scores), from
    a result's ``usage``: {model: {"generated_tokens", "scored_tokens", ...}}."""
    return {m for m, u in usage.items() if u.get("generated_tokens", 0) > 0 or u.get("scored_tokens", 0) > 0}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Prometheus text -> {label set: value} of the samples named ``name`` (labels as printed)."""
    samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            samples[m.group(2) or ""] = float(m.group(3))
    return samples


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    seconds: float | None = None


@dataclass
class Report:
    images: list[dict] = field(default_factory=list)  # {image, build_s, size_bytes, cached}
    checks: list[Check] = field(default_factory=list)
    # What the run started: {service: {"image", "env": [names]}} (tests/test_deploy.py holds the
    # Kubernetes manifests to these).
    services: dict[str, dict] = field(default_factory=dict)

    def image(self, image: str, build_s: float, size_bytes: int) -> None:
        self.images.append({"image": image, "build_s": round(build_s, 1), "size_bytes": size_bytes})

    def check(self, name: str, ok: bool, detail: str = "", seconds: float | None = None) -> bool:
        self.checks.append(Check(name, bool(ok), detail, None if seconds is None else round(seconds, 1)))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def rows(self) -> list[tuple[str, str, str]]:
        rows = [(f"build {i['image']}", f"{i['build_s']:.0f} s", human_size(i["size_bytes"])) for i in self.images]
        for c in self.checks:
            took = "" if c.seconds is None else f"{c.seconds:.1f} s"
            rows.append((c.name, ("PASS " if c.ok else "FAIL ") + took, c.detail))
        return rows

    def table(self) -> str:
        return format_table(("step", "result", "detail"), self.rows())

    def to_json(self) -> str:
        checks = [asdict(c) for c in self.checks]
        return json.dumps({"ok": self.ok, "images": self.images, "checks": checks, "services": self.services}, indent=2)


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table whose columns line up in a terminal too."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def service_record(config: dict) -> dict[str, dict]:
    """``docker compose config --format json`` -> {service: {"image", "env": sorted names}}."""
    out = {}
    for name, service in config["services"].items():
        env = service.get("environment") or {}
        names = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        out[name] = {"image": service["image"], "env": sorted(names)}
    return out
