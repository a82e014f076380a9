VENV ?= .venv
PROMPT ?= Question: A baker makes 12 rolls per tray and bakes 3 trays. How many rolls?\nAnswer:
# Reinstall only when what the install reads changed (make test stays fast on a second run).
STAMP := $(VENV)/.coolfusion-installed
INSTALL_INPUTS := pyproject.toml setup.py scripts/install.sh $(wildcard protos/*.proto)

.PHONY: install demo test protos bench-tokenizer

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	VENV=$(VENV) bash scripts/install.sh
	@touch $@

# Install, then fuse the two bundled models on one prompt.
demo: install
	$(VENV)/bin/coolfusion generate "$$(printf '$(PROMPT)')" --max-new-tokens 48 --stop "Question:"

test: install
	$(VENV)/bin/python -m pytest -q

protos:
	$(VENV)/bin/python -m coolfusion.protos.build

bench-tokenizer:
	$(VENV)/bin/python -m coolfusion.services.tokenizer.bench
