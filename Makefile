# Two entry points for a fresh clone: `make demo` (the whole pipeline, offline, toy scale) and
# `make test` (lint + the offline test suite). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first and pinned: an open range would pull a multi-GB CUDA build onto CPU-only machines.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-cluster lint demo docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks scripts

# One torch thread per xdist worker: two workers x two threads oversubscribe 2 cores badly.
test: $(STAMP) lint docs
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q tests

# Optional: the cluster tests with Ray (the `ray` extra, ~240 MB installed, a local Ray instance per run);
# `make test` runs the local and Slurm executor tests and skips the Ray one.
test-cluster: $(STAMP)
	$(PIP) install -q -e ".[ray]"
	GEMMA_RVQ_TEST_RAY=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_cluster.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d site

demo: $(STAMP)
	$(VENV)/bin/gemma-rvq demo --output-dir demo_output

bench: $(STAMP)
	$(PY) benchmarks/bench_encode.py
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) site demo_output .pytest_cache .ruff_cache
