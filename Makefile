# Two entry points for a fresh clone: `make demo` (the whole pipeline, offline, toy scale) and
# `make test` (lint + the offline test suite). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first and pinned: an open range would pull a multi-GB CUDA build onto CPU-only machines.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-cluster lint demo docs bench clean speech-tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks scripts

# espeak-ng synthesises the corpus (scripts/make_corpus.py) for its regeneration tests and bench_train.
# Installed with apt-get where we may (root, Debian/Ubuntu); otherwise those tests skip, said loudly here.
speech-tools:
	@if command -v espeak-ng >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing espeak-ng (apt-get) for the corpus generator's tests"; \
		(apt-get install -y -q espeak-ng >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng >/dev/null 2>&1)) || \
		echo "WARNING: apt-get could not install espeak-ng"; \
	fi
	@command -v espeak-ng >/dev/null 2>&1 || echo "WARNING: espeak-ng is not installed: the corpus regeneration \
	tests (tests/test_corpus.py) and the training-benchmark smoke test will SKIP. Install it: apt-get install espeak-ng"

# One torch thread per xdist worker: two workers x two threads oversubscribe 2 cores badly.
test: $(STAMP) lint docs speech-tools
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
