# Two commands: `make demo` (everything, on this machine) and `make test`.
# `make bench` measures the product against its baselines (tests/benchmarks/); `make bench-smoke` is CI's small run.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install compose-check clean bench bench-smoke example-flask example-fastapi example-django

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m worker.demo

# The web examples (examples/), each under its real server on 127.0.0.1:8000, against a private Redis,
# the sandbox and a worker (python -m worker.devstack); Ctrl-C stops everything.
example-flask: $(STAMP)
	$(PY) -m worker.devstack -- $(abspath $(VENV))/bin/gunicorn --chdir examples/flask_app -b 127.0.0.1:8000 app:app

example-fastapi: $(STAMP)
	$(PY) -m worker.devstack -- $(abspath $(VENV))/bin/uvicorn --app-dir examples/fastapi_app --port 8000 main:app

example-django: $(STAMP)
	cd examples/django_project && $(abspath $(PY)) manage.py migrate --verbosity 0 && \
	  $(abspath $(PY)) -m worker.devstack -- $(abspath $(PY)) manage.py runserver --noreload 127.0.0.1:8000

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow'

# Full sizes, noisy figures 3 runs each, about 31-36 minutes on 2 cores (28 measured before the 5-minute retries group and the 1-minute web group): table on stdout, JSON in bench-results.json,
# and README.md's Performance table rewritten from that JSON (not with --only or --no-readme).
# BENCH_ARGS e.g. --only enqueue, --profile var/profile. Again from a JSON: python -m tests.benchmarks.readme FILE
bench: $(STAMP)
	$(PY) -m tests.benchmarks --json bench-results.json $(BENCH_ARGS)

# Small sizes, each figure once, about 3¾ minutes on 2 cores (213 s measured before the 11-second web group): fails only if something breaks (not on a missed target);
# never touches README.md.
bench-smoke: $(STAMP)
	$(PY) -m tests.benchmarks --smoke --json bench-smoke.json $(BENCH_ARGS)

compose-check:
	FLOWER_BASIC_AUTH=user:password docker-compose -f docker/compose.yaml config -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache bench-*.json
