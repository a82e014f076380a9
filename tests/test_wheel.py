"""The package as a user installs it: the wheel built from this checkout, installed into a fresh
venv, and ``coolfusion eval arc-easy`` run from a folder with no ``../shared`` beside it, so the
questions can only come from the data the wheel ships.

The fresh venv borrows this venv's dependencies through a ``.pth`` line (nothing is downloaded);
the editable ``coolfusion`` of this venv stays out of it, because Python reads ``.pth`` files only
in site directories, not in folders another ``.pth`` added.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 5
# What is not the package's source: environments, build output, VCS, runs, the folders beside it.
LOCAL_ONLY = (
    ".venv",
    ".git",
    "build",
    "dist",
    "runs",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "bench",
    "tests",
    "deploy",
)


def _run(cmd: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COOLFUSION_DATA_DIR")}
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}: {result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_installed_wheel_evaluates_arc_easy_from_its_own_data(tmp_path):
    # Built from a copy of the checkout: a build folder left in the checkout cannot leak into it.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LOCAL_ONLY))
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, source]
    _run(pip_wheel, tmp_path)
    (wheel,) = wheels.glob("coolfusion-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    )
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], tmp_path)

    here = tmp_path / "user" / "here"  # no ../shared: only the packaged data can answer
    here.mkdir(parents=True)
    where = _run([python, "-c", "import coolfusion.data as d; print(d.data_dir())"], here).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy runs, not the checkout

    out = here / "run"
    cmd = [env_dir / "bin" / "coolfusion", "eval", "arc-easy", "--limit", LIMIT, "--models", "smollm2"]
    _run([*cmd, "--modes", "single:smollm2", "--out", out], here, timeout=900)

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    packaged = Path(where) / "arc" / "ARC-Easy-validation.jsonl"
    first = [json.loads(line)["id"] for line in packaged.read_text().splitlines()[:LIMIT]]
    assert sorted(r["id"] for r in rows) == sorted(first)  # the packaged questions, in the packaged order's first five
    assert all(len(r["scores"]["smollm2"]) == len(r["chars"]) for r in rows)  # every choice scored
    assert json.loads((out / "summary.json").read_text())["n"] == LIMIT
