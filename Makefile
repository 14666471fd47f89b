# Two commands that work on a fresh machine (Python 3.11, no GPU):
#   make demo   - create .venv if missing, install, run the main job
#   make test   - create .venv if missing, install with test extras, run the whole suite
# torch is pinned to the local CPU wheel first, so nothing pulls a CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,mpi,ucx,report
BIN := $(VENV)/bin
STAMP := $(VENV)/.topocoll-installed
RESULTS ?= results

.PHONY: demo test lint install browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

# Headless Chromium for the report's browser test (tests/test_report.py): Debian's package,
# installed when missing and we are root; otherwise that test is skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	  echo "chromium could not be installed: the report's browser test will be skipped"

test: install browser lint
	$(BIN)/python -m pytest -q

# The main job: as root, an emulated 2-node x 4-rank cluster with 1 Gbit/s uplinks (then 2
# rails, then uneven 3+5 nodes), every sweep verified, ratios against Gloo and Open MPI
# measured in the same run; elsewhere the same sweeps on localhost. Under 10 minutes here.
demo: install
	$(BIN)/python -m topocoll.benchmarks.suite --out $(RESULTS)

clean:
	rm -rf $(VENV) $(RESULTS) .pytest_cache .ruff_cache
