# Two entry points: `make demo` (the whole job end to end on embedded defaults) and `make test`.
# Both create .venv with pinned versions (constraints.txt) when it is missing or out of date.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline, no telemetry, no auth token files: the same settings for tests, demo and CI.
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in the same command as everything else so pip takes the CPU build on disk.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python infra/demo.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
