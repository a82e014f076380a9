"""deploy/smoke_lib.py, the plain helpers of the compose smoke run (no docker here): compose ps
parsing, the wait loop, provenance and Prometheus parsing, the table; and smoke.sh's contract."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("smoke_lib", ROOT / "deploy" / "smoke_lib.py")
smoke_lib = sys.modules.setdefault("smoke_lib", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(smoke_lib)


def _row(service: str, state: str, health: str) -> dict:
    return {"Service": service, "State": state, "Health": health, "Name": f"p-{service}-1"}


@pytest.mark.parametrize("as_array", [False, True])
def test_compose_ps_lines_or_array(as_array):
    rows = [_row("tokenizer", "running", "healthy"), _row("worker-a", "running", "starting")]
    text = json.dumps(rows) if as_array else "\n".join(json.dumps(r) for r in rows) + "\n"
    assert smoke_lib.parse_compose_ps(text) == {
        "tokenizer": ("running", "healthy"),
        "worker-a": ("running", "starting"),
    }
    assert smoke_lib.parse_compose_ps("  \n") == {}


def test_unhealthy_names_what_is_missing_starting_or_exited():
    states = {
        "tokenizer": ("running", "healthy"),
        "gateway": ("running", ""),  # no healthcheck: running is enough
        "worker-a": ("running", "starting"),
        "worker-b": ("exited", ""),
    }
    assert smoke_lib.unhealthy(states, ["tokenizer", "gateway"]) == []
    waiting = smoke_lib.unhealthy(states, ["worker-a", "worker-b", "orchestrator"])
    assert waiting == ["worker-a=running/starting", "worker-b=exited/-", "orchestrator=missing/-"]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_wait_until_done_counts_the_time_and_survives_a_raising_probe():
    clock = FakeClock()
    answers = iter([ConnectionError("refused"), 503, 503, 200])
    waited = smoke_lib.wait_until(lambda: _next(answers), lambda s: s == 200, 60, 2.0, clock, clock.sleep)
    assert waited.ok and waited.last == 200 and waited.seconds == pytest.approx(6.0)


def test_wait_until_gives_up_at_the_timeout_with_the_last_answer():
    clock = FakeClock()
    calls = []
    waited = smoke_lib.wait_until(lambda: calls.append(1) or "starting", lambda s: False, 10, 3.0, clock, clock.sleep)
    assert not waited.ok and waited.last == "starting" and waited.seconds == pytest.approx(12.0)
    assert len(calls) == 5  # t = 0, 3, 6, 9, 12


def _next(it):
    value = next(it)
    if isinstance(value, Exception):
        raise value
    return value


def test_models_that_worked_and_segment_winners():
    result = {
        "segments": [{"model": "smollm2"}, {"model": "gemma3"}, {"model": "smollm2"}],
        "usage": {
            "smollm2": {"generated_tokens": 12, "scored_tokens": 0},
            "gemma3": {"generated_tokens": 0, "scored_tokens": 7},
            "idle": {"generated_tokens": 0, "scored_tokens": 0},
        },
    }
    assert smoke_lib.segment_models(result) == {"smollm2": 2, "gemma3": 1}
    assert smoke_lib.models_that_worked(result["usage"]) == {"smollm2", "gemma3"}


def test_metric_samples_reads_labels_and_values():
    text = (
        "# HELP coolfusion_gateway_requests_total HTTP requests\n"
        "# TYPE coolfusion_gateway_requests_total counter\n"
        'coolfusion_gateway_requests_total{route="/v1/chat/completions",status="200"} 2.0\n'
        'coolfusion_gateway_requests_total{route="/health",status="503"} 1.0\n'
        'coolfusion_gateway_requests_created{route="/health",status="503"} 1.7e9\n'
        "process_open_fds 12.0\n"
    )
    samples = smoke_lib.metric_samples(text, "coolfusion_gateway_requests_total")
    assert samples == {'{route="/v1/chat/completions",status="200"}': 2.0, '{route="/health",status="503"}': 1.0}
    assert smoke_lib.metric_samples(text, "process_open_fds") == {"": 12.0}


@pytest.mark.parametrize("n,text", [(512, "512 B"), (2_500, "2 kB"), (734_000_000, "734.00 MB"), (1.52e9, "1.52 GB")])
def test_human_size(n, text):
    assert smoke_lib.human_size(n) == text


def test_report_table_and_json():
    report = smoke_lib.Report()
    report.image("coolfusion/gateway:0.1.0", 41.26, 251_000_000)
    assert report.check("up: every service healthy", True, "", 63.04)
    assert not report.check("kill worker-b", False, "hung")
    lines = report.table().splitlines()
    assert lines[0].startswith("| step") and set(lines[1]) <= {"|", "-", " "}
    assert len({len(line) for line in lines}) == 1, "columns line up"
    assert "| build coolfusion/gateway:0.1.0 | 41 s" in lines[2] and "251.00 MB" in lines[2]
    assert "PASS 63.0 s" in lines[3] and "FAIL" in lines[4] and "hung" in lines[4]
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["images"][0]["size_bytes"] == 251_000_000
    assert [c["ok"] for c in data["checks"]] == [True, False]
    assert not smoke_lib.Report().ok, "a report without checks is not a pass"


def test_smoke_script_contract():
    """smoke.sh sets a fresh internal token per run (via smoke.py), builds the offline base only when
    the official image cannot be pulled, and make deploy-smoke runs it; CI never calls docker."""
    sh = (ROOT / "deploy" / "smoke.sh").read_text()
    pull = re.search(r"^\s+if .*docker pull -q python:3.11-slim.*; then$", sh, re.M)
    assert pull and pull.end() < sh.index('BASE_IMAGE="$(deploy/offline-base.sh)"'), "offline base only as a fallback"
    driver = (ROOT / "deploy" / "smoke.py").read_text()
    assert "COOLFUSION_INTERNAL_TOKEN=secrets.token_hex(32)" in driver
    assert '"down", "-v"' in driver
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^deploy-smoke:.*\n\tbash deploy/smoke.sh", makefile, re.M)
    for workflow in (ROOT / ".github").rglob("*.y*ml") if (ROOT / ".github").exists() else []:
        assert "deploy-smoke" not in workflow.read_text() and "docker compose" not in workflow.read_text()


def test_service_record_names_images_and_env():
    config = {
        "services": {
            "gateway": {"image": "coolfusion/gateway:0.1.0", "environment": {"COOLFUSION_PORT": "8000", "A": None}},
            "tokenizer": {"image": "coolfusion/tokenizer:0.1.0", "environment": ["X=1", "B=2"]},
            "bare": {"image": "busybox"},
        }
    }
    assert smoke_lib.service_record(config) == {
        "gateway": {"image": "coolfusion/gateway:0.1.0", "env": ["A", "COOLFUSION_PORT"]},
        "tokenizer": {"image": "coolfusion/tokenizer:0.1.0", "env": ["B", "X"]},
        "bare": {"image": "busybox", "env": []},
    }
