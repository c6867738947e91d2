# The two commands of the README:
#   make demo   - the main job: a full federated run on the embedded default (creates .venv on first use)
#   make test   - the test suite (creates .venv on first use)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mor demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

proto: $(STAMP)
	$(VENV)/bin/python scripts/gen_proto.py
