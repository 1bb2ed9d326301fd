# Two commands: `make demo` (everything, on this machine) and `make test`.
# `make bench` measures the product against its baselines (tests/benchmarks/); `make bench-smoke` is CI's small run.
# `make docs` builds the docs site (docs/, mkdocs.yml) into var/site; `make doctest` runs the docstring examples.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Every package the product, its tests and examples use, pinned: make, CI and the Docker image install from it.
LOCK   := requirements.lock

.PHONY: demo test test-fast lint docs doctest install compose-check clean bench bench-smoke lock example-flask example-fastapi example-django

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# After changing a dependency in pyproject.toml: re-pin everything (newest versions allowed by pyproject.toml).
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip-tools
	$(PY) -m piptools compile --quiet --upgrade --extra dev --strip-extras --no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml
	# The dev extra names the project's own [examples] extra, so pip-compile pins the project itself at this
	# checkout's path (file:///...): a clone anywhere else could not install. Drop that pin and its comment.
	sed -i '/^vendor-delivery-worker @ /{N;d}' $(LOCK)

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

# ruff (lint only, never `ruff format`) and mypy, as configured in pyproject.toml; CI runs it before the tests.
lint: $(STAMP)
	$(PY) -m ruff check worker tests examples celeryconfig.py docs
	$(PY) -m mypy

# The docs site: mkdocs.yml, docs/*.md, the Configuration page's table generated from worker/settings.py by
# docs/hooks.py. --strict: a broken link or anchor, or a page missing from the nav, fails it. Output in var/site
# (git-ignored); `$(VENV)/bin/mkdocs serve` shows it while you edit. CI runs it after `make lint`.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir var/site

# The docstring examples: the package's (most are marked +SKIP: they need Redis, a worker or a vendor), the
# benchmark helpers', docs/hooks.py's, and any `>>>` example in docs/*.md. A few seconds; CI runs it.
doctest: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider --doctest-modules --doctest-glob='*.md' worker tests/benchmarks docs

# Full sizes, noisy figures 3 runs each, about 36-43 minutes on 2 cores (36 and 43 measured on 2026-12-07/08): table on stdout, JSON in bench-results.json,
# and docs/performance.md's Performance table rewritten from that JSON (not with --only or --no-table).
# BENCH_ARGS e.g. --only enqueue, --profile var/profile. Again from a JSON: python -m tests.benchmarks.readme FILE
bench: $(STAMP)
	$(PY) -m tests.benchmarks --json bench-results.json $(BENCH_ARGS)

# Small sizes, each figure once, about 3-4 minutes on 2 cores (245-257 s in the CI runs of 2026-12-07, 213 s on 2026-12-08
# before the rate-limit rows were cut to 50/s in the smoke): fails only if something breaks (not on a missed target);
# never touches docs/performance.md.
bench-smoke: $(STAMP)
	$(PY) -m tests.benchmarks --smoke --json bench-smoke.json $(BENCH_ARGS)

# Validates docker/compose.yaml with Docker Compose v2 (`docker compose`), or v1 (`docker-compose`) where v2 is missing.
compose-check:
	@if docker compose version >/dev/null 2>&1; then compose="docker compose"; \
	elif command -v docker-compose >/dev/null 2>&1; then compose="docker-compose"; \
	else echo "compose-check needs Docker Compose: the docker compose plugin (v2) or docker-compose (v1)" >&2; exit 1; fi; \
	echo "$$compose -f docker/compose.yaml config -q"; \
	FLOWER_BASIC_AUTH=user:password $$compose -f docker/compose.yaml config -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache bench-*.json var/site
