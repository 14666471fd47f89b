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

.PHONY: demo test lint install clean

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

test: install lint
	$(BIN)/python -m pytest -q

demo: install
	mkdir -p $(RESULTS)
	$(BIN)/topocoll bench --launcher local -n 5 --layout 2,3 --transport gloo \
	    --collective all_reduce --algorithm all,native --sizes 1K:4M:8 --check \
	    --json $(RESULTS)/demo_all_reduce.jsonl
	$(BIN)/topocoll bench --launcher local -n 5 --layout 2,3 --transport gloo \
	    --collective all_to_all_v --algorithm all,native --sizes 1K:1M:8 --check \
	    --json $(RESULTS)/demo_all_to_all_v.jsonl
	@echo "results: $(RESULTS)/demo_all_reduce.jsonl $(RESULTS)/demo_all_to_all_v.jsonl"

clean:
	rm -rf $(VENV) $(RESULTS) .pytest_cache .ruff_cache
