# Two entry points for a fresh machine: `make demo` (install + run the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST := $(PYTHON) -m pytest

.PHONY: install install-dev demo browser test test-kernels lint

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

# Debian's Chromium for tests/test_browser.py, when it is missing (root or password-less sudo; else says how).
browser:
	./tools/ensure-chromium

test: install-dev browser
	$(PYTHON) -m ruff check src tests benchmarks recipes tools
	$(PYTEST)

# The float-comparing tests again with the CPU kernels limited: AVX2, then torch's default (no vector ISA
# extensions) with oneDNN and MKL limited alike. A tolerance tuned to one CPU fails here, not on a user's
# machine (docs/exactness.md). CI runs it after `make test`.
test-kernels: install-dev
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(PYTEST) -m parity --kernel-pass
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(PYTEST) -m parity --kernel-pass

lint:
	$(PYTHON) -m ruff check src tests benchmarks recipes tools
