# Two commands: `make demo` (everything, on this machine) and `make test`.
# `make bench` measures the product against its baselines (tests/benchmarks/); `make bench-smoke` is CI's small run.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install compose-check clean bench bench-smoke

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m worker.demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow'

# Full sizes, about 15 minutes: table on stdout, JSON in bench-results.json. BENCH_ARGS e.g. --only enqueue, --profile var/profile
bench: $(STAMP)
	$(PY) -m tests.benchmarks --json bench-results.json $(BENCH_ARGS)

# Small sizes, under 2 minutes: fails only if something breaks (not on a missed target).
bench-smoke: $(STAMP)
	$(PY) -m tests.benchmarks --smoke --json bench-smoke.json $(BENCH_ARGS)

compose-check:
	FLOWER_BASIC_AUTH=user:password docker-compose -f docker/compose.yaml config -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache bench-*.json
