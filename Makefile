# Two entry points for a fresh machine: `make demo` (install + run the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST := $(PYTHON) -m pytest
# two pytest-xdist workers of one torch thread each, whole files per worker (a module's models load once)
ON_WORKERS := OMP_NUM_THREADS=1 $(PYTEST) -n 2 --dist loadfile
# a kernel pass: the parity tests (none of them `wallclock`) on the workers
KERNEL_PASS := $(ON_WORKERS) -m parity --kernel-pass

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

# Two workers with one torch thread each for most tests (small models leave a second core idle otherwise), then
# the `wallclock` tests (tests/conftest.py), which time streams or servers, alone. Both run even if the first fails.
test: install-dev browser
	$(PYTHON) -m ruff check src tests benchmarks recipes tools
	rc=0; \
	$(ON_WORKERS) -m "not wallclock" || rc=1; \
	$(PYTEST) -m wallclock || rc=1; \
	exit $$rc

# The float-comparing tests again with the CPU kernels limited: AVX2, then torch's default (no vector ISA
# extensions) with oneDNN and MKL limited alike. A tolerance tuned to one CPU fails here, not on a user's
# machine (docs/exactness.md). CI runs it after `make test`. On a CPU whose best is AVX2 the AVX2 pass would
# run the kernels `make test` just ran, so it is left out there (tools/cpu-beyond-avx2), and says so.
test-kernels: install-dev
	if ./tools/cpu-beyond-avx2; then \
	  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(KERNEL_PASS); \
	else \
	  echo "test-kernels: this CPU has nothing beyond AVX2, so its own kernels (make test) are the AVX2 pass; running the default-kernel pass only"; \
	fi
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(KERNEL_PASS)

lint:
	$(PYTHON) -m ruff check src tests benchmarks recipes tools
