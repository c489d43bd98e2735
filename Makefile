# Two entry points for a fresh machine: `make demo` (install + run the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-dev demo test lint

# torch first, pinned: the CPU wheel of this version is what we build and test against; an unpinned torch
# would pull a multi-GB CUDA build.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'

demo: install
	$(PYTHON) -m token2wav demo

test: install-dev
	$(PYTHON) -m ruff check src tests benchmarks recipes
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests benchmarks recipes
