# Everything the project needs is installed from here: `make demo` and `make test` work on a
# fresh machine. torch is pinned to the exact CPU wheel on disk before the package is
# installed, so the package's looser `torch>=2.6` is already satisfied and pulls no CUDA.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP) lint
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check galvatron_fx tests examples bench
	$(VENV)/bin/ruff format --check galvatron_fx tests examples bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/suite.py

# Random plans at length (tests/test_fuzz_plans.py): GFX_FUZZ_EXAMPLES batches of valid plans
# per model against one process, 10x as many invalid plans of each kind; about 5 minutes at 12.
# Then random architectures (tests/test_fuzz_arch.py): GFX_FUZZ_ARCH_EXAMPLES variants, up to
# 3 plans each, against one process; 70 give about 200 variant x plan runs.
GFX_FUZZ_EXAMPLES ?= 12
GFX_FUZZ_ARCH_EXAMPLES ?= 70
fuzz: $(STAMP)
	GFX_FUZZ_EXAMPLES=$(GFX_FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz_plans.py --timeout=3600
	GFX_FUZZ_EXAMPLES=$(GFX_FUZZ_ARCH_EXAMPLES) $(PY) -m pytest tests/test_fuzz_arch.py -k random \
		--timeout=7200 -s

clean:
	rm -rf $(VENV) build *.egg-info
