# Two entry points: `make demo` (the whole job end to end on embedded defaults) and `make test`.
# Both create .venv with pinned versions (constraints.txt: runtime, constraints-dev.txt: tests) when it is
# missing or out of date.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline, no telemetry, no auth token files: the same settings for tests, demo and CI.
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
# Keep the single-machine Ray of tests and the demo on 127.0.0.1 (Ray otherwise binds the host's IP).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv tools test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt constraints-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in the same command as everything else so pip takes the CPU build on disk.
	$(BIN)/python -m pip install --quiet -c constraints.txt -c constraints-dev.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

# promtool, prometheus and nginx for tests/test_infra.py, from Debian's packages (CI runs as root with
# apt). In containers the packages' services do not start; elsewhere they are stopped: the tests start
# their own servers on free ports. nginx lives in /usr/sbin.
tools:
	command -v promtool >/dev/null && command -v prometheus >/dev/null && PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus nginx-light >/dev/null \
	  && { systemctl disable --now prometheus nginx >/dev/null 2>&1 || true; }; } \
	  || { echo "make tools: installing Debian's prometheus and nginx-light packages needs root and apt" >&2; exit 1; }

test: $(STAMP) tools
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python infra/demo.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
