VENV ?= .venv
PROMPT ?= Question: A baker makes 12 rolls per tray and bakes 3 trays. How many rolls?\nAnswer:

.PHONY: install demo test protos bench-tokenizer

install:
	VENV=$(VENV) bash scripts/install.sh

# Install, then fuse the two bundled models on one prompt.
demo: install
	$(VENV)/bin/coolfusion generate "$$(printf '$(PROMPT)')" --max-new-tokens 48 --stop "Question:"

test: install
	$(VENV)/bin/python -m pytest -q

protos:
	$(VENV)/bin/python -m coolfusion.protos.build

bench-tokenizer:
	$(VENV)/bin/python -m coolfusion.services.tokenizer.bench
