"""``coolfusion/envs.py`` is the one reader of COOLFUSION_* variables, and every service config
names only declared ones; no model loaded."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from coolfusion import envs
from coolfusion.orchestrator.config import OrchestratorConfig
from coolfusion.services.common.config import add_arguments
from coolfusion.services.gateway.config import GatewayConfig
from coolfusion.services.tokenizer.config import TokenizerConfig
from coolfusion.services.worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("clients", "data", "distill", "orchestrator", "protos", "services")
CONFIGS = (WorkerConfig, TokenizerConfig, OrchestratorConfig, GatewayConfig)


def test_no_module_but_envs_reads_a_coolfusion_variable():
    direct = re.compile(r"(os\.environ\.get|os\.getenv|os\.environ\[)\(?\s*[\"']COOLFUSION_")
    readers = [
        str(path.relative_to(ROOT))
        for folder in PACKAGE_DIRS
        for path in (ROOT / folder).rglob("*.py")
        if direct.search(path.read_text())
    ]
    assert readers == []


def test_every_name_read_or_configured_is_declared():
    read = re.compile(r"envs\.read\(\s*\"(COOLFUSION_\w+)\"")
    names = {m for folder in PACKAGE_DIRS for p in (ROOT / folder).rglob("*.py") for m in read.findall(p.read_text())}
    names |= {f.metadata["env"] for c in CONFIGS for f in dataclasses.fields(c) if f.metadata["env"]}
    assert names and names <= set(envs.VARIABLES), names - set(envs.VARIABLES)


def test_read_takes_empty_as_unset_and_refuses_undeclared_names(monkeypatch):
    monkeypatch.setenv("COOLFUSION_CACHE", "")
    assert envs.read("COOLFUSION_CACHE", "fallback") == "fallback"
    monkeypatch.setenv("COOLFUSION_CACHE", "/x")
    assert envs.read("COOLFUSION_CACHE", "fallback") == "/x"
    with pytest.raises(KeyError, match="COOLFUSION_NOPE"):
        envs.read("COOLFUSION_NOPE")


def test_config_flags_take_the_environment_then_the_field_default(monkeypatch):
    def parsed(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_arguments(parser, WorkerConfig)
        return parser.parse_args(argv)

    monkeypatch.delenv("COOLFUSION_MAX_BATCH", raising=False)
    assert parsed().max_batch == WorkerConfig.max_batch
    monkeypatch.setenv("COOLFUSION_MAX_BATCH", "3")
    assert parsed().max_batch == 3 and parsed("--max-batch", "5").max_batch == 5
    monkeypatch.setenv("COOLFUSION_MAX_BATCH", "three")
    with pytest.raises(SystemExit, match="COOLFUSION_MAX_BATCH"):
        parsed()
