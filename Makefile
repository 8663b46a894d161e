# Both targets set up what they need: a virtual environment with a CPU build of torch.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	@test -n "$(PY)" || { echo "need python3.11 on PATH (or set PY=...)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmmkit demo

test: $(STAMP)
	$(BIN)/ruff check src tests
	# Two workers with one torch thread each (on a busy 2-core machine two threads per process run far slower);
	# worksteal: a worker that runs out takes queued tests from the one busy with the long demo test.
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs
