# Two commands do all the set-up on a fresh machine:
#   make demo      create .venv, install, run the demo integration round (about 10-15 minutes)
#   make test      create .venv, install, run the fast tests: every test not marked slow
#                  (about a minute on 2 CPU cores)
# and more, with the same set-up:
#   make test-all  every test, the slow end-to-end ones included (10-15 minutes; what CI
#                  runs: .ci/run)
#   make bench     the CPU benchmark suite (about 8 minutes), one table
#   make lint      ruff check and ruff format --check
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Without CUDA, take the pinned CPU build: an unpinned torch pulls a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install torch; \
	else $(BIN)/pip install torch==2.13.0; fi
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/stacklab demo

test: setup
	$(BIN)/pytest -q -m "not slow"

test-all: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/stacklab bench

lint: setup
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
