# The two commands of the README:
#   make demo   - the main job: a full federated run on the embedded default (creates .venv on first use)
#   make test   - the test suite (creates .venv on first use)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup proto interop clean

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

# the wire contract's own checks: stubs fresh, buf lint (npm @bufbuild/buf), SecAgg vectors, the Node.js client
# (tests/interop: installs its node_modules with npm; skipped without node/npm or the npm registry)
interop: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests/test_proto_stubs.py tests/test_protocol_lint.py \
		tests/test_protocol_vectors.py tests/interop $(ARGS)
