# vitscale: `make demo` (install + end-to-end demo) and `make test` (install + test suite).
# Both create ./.venv on first use; set VENV=... to use another environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitscale-installed
PYTEST_ARGS ?=

.PHONY: install test demo clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
