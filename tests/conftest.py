"""Shared fixtures: a private Redis, the vendor sandbox, the environment, workers.

Nothing here touches the machine's shared Redis: every test run starts its own
``redis-server`` on a free port and removes it afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid

import pytest
import redis

from worker.dev.localstack import VENDOR_ENV_PREFIXES, RedisServer, WorkerProcess, sandbox_env
from worker.sandbox import SANDBOX_CREDENTIALS, Sandbox, SandboxClient

from .helpers import stop_workers
from .leaks import LeakWatch

#: Mailing lists the tests map segments to.
MAILING_LISTS = {"vip": "list_vip", "trial": "list_trial", "newsletter": "list_news"}

#: This session's vendor credentials (the sandbox checks them, the workers send them): distinctive
#: strings, so that finding one anywhere by plain substring search means it leaked.
TEST_CREDENTIALS = {key: f"zz{key.lower().replace('_', '')}-{secrets.token_hex(8)}" for key in SANDBOX_CREDENTIALS}


@pytest.fixture(scope="session")
def leak_watch() -> LeakWatch:
    """Where the session's Redis contents, worker logs, Flower output and Sentry envelopes are collected;
    ``tests/integration/test_zz_no_secrets.py`` scans them for credentials."""
    return LeakWatch([*TEST_CREDENTIALS.values(), *SANDBOX_CREDENTIALS.values()])


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _celery_app_on_the_test_redis(redis_server):
    """In-process Celery calls (apply_async, connections) use the private Redis, whatever test runs first.

    Celery reads its configuration once, on first use; without this a test that touched the app
    before ``product_env`` set REDIS_URL would point it at the machine's shared Redis for the session.
    """
    from worker.broker.app import app

    app.conf.broker_url = redis_server.url
    yield


@pytest.fixture(scope="session")
def sandbox():
    with Sandbox(port=0, credentials=TEST_CREDENTIALS) as box:
        yield box


@pytest.fixture(scope="session")
def base_env(redis_server, sandbox, tmp_path_factory) -> dict[str, str]:
    """The environment the product runs with in tests (workers get a copy)."""
    return sandbox_env(
        redis_server.url,
        sandbox.base_urls,
        **TEST_CREDENTIALS,
        LOOPS_MAILING_LISTS=json.dumps(MAILING_LISTS),
        CONVERTLOOP_RATE_LIMIT="0",
        LOOPS_RATE_LIMIT="0",
        CONVEYOUR_RATE_LIMIT="0",
        RETRY_BACKOFF_BASE="0.2",
        RETRY_BACKOFF_MAX="2",
        RETRY_MAX_ATTEMPTS="4",
        HTTP_TIMEOUT="5",
        WORKER_CONCURRENCY="16",
        SPOOL_DIR=str(tmp_path_factory.mktemp("spool")),
    )


@pytest.fixture
def product_env(base_env, monkeypatch, redis_server):
    """Point this process (producer, CLI, pipeline) at the test Redis and sandbox."""
    from worker import clients
    from worker.delivery.pipeline import Pipeline
    from worker.producer.publisher import Publisher
    from worker.settings import get_settings

    for key in list(os.environ):
        if key.startswith(VENDOR_ENV_PREFIXES):
            monkeypatch.delenv(key)
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)

    def refresh():
        get_settings.cache_clear()
        clients.reset()
        Pipeline.reset_default()
        Publisher.reset_default()

    refresh()
    yield base_env
    monkeypatch.undo()
    refresh()


@pytest.fixture
def store(product_env):
    """The dead-letter store the product uses, empty before and after the test."""
    from worker.delivery.deadletters import DeadLetterStore

    s = DeadLetterStore.default()
    s.purge()
    yield s
    s.purge()


@pytest.fixture
def sandbox_client(sandbox):
    client = SandboxClient(sandbox.url)
    client.reset()
    yield client
    client.reset()


@pytest.fixture
def unique_email() -> str:
    return f"u{uuid.uuid4().hex[:12]}@example.com"


class Workers:
    """Starts Celery worker subprocesses (``WorkerProcess``) with the session's environment, and keeps them.

    Called as ``start(name=None, args=(), **env_overrides)``; returns the started worker (raises if it did
    not start). ``started`` lists every worker it ever started, in order.
    """

    def __init__(self, base_env: dict[str, str], log_dir: str) -> None:
        self.base_env = base_env
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def __call__(self, name: str | None = None, args: tuple[str, ...] = (), **env_overrides: object) -> WorkerProcess:
        env = {**self.base_env, **{k: str(v) for k, v in env_overrides.items()}}
        proc = WorkerProcess(env, name or f"w{len(self.started)}-{uuid.uuid4().hex[:6]}", args, self.log_dir)
        self.started.append(proc)
        return proc.start()


@pytest.fixture(scope="module")
def worker_factory(base_env, tmp_path_factory, redis_server, leak_watch, request):
    """Start Celery worker subprocesses; all are stopped when the module ends.

    For workers of one test, use ``start_worker``: they are stopped when that test ends. A module-scoped
    fixture that starts a worker every test of the module shares uses this one.

    When the module starts and ends the private Redis is emptied, so that messages a module left queued
    (a throttled backlog, pending retries) do not reach the next module's workers.
    What the module left in Redis, and the workers' logs, go to ``leak_watch`` first.
    """
    # The module starts on an empty Redis too: what tests without workers left (the unit tests' calls, queued or
    # pending in a person's order under the product's prefix) must not reach this module's workers or checks.
    leak_watch.add_redis(redis_server.url, f"redis before {request.module.__name__}")
    redis.Redis.from_url(redis_server.url).flushdb()
    workers = Workers(base_env, str(tmp_path_factory.mktemp("worker-logs")))
    yield workers
    stop_workers(workers.started)
    for proc in workers.started:
        leak_watch.add_log(proc.log_path)
    leak_watch.add_redis(redis_server.url, f"redis after {request.module.__name__}")
    redis.Redis.from_url(redis_server.url).flushdb()


@pytest.fixture
def start_worker(worker_factory):
    """``worker_factory`` for one test: every worker started through it (or through ``worker_factory``) while
    the test runs is stopped when the test ends, so the next test of the module does not share its Redis with
    them. Module-scoped fixtures are set up before it, so their workers live on for the module.

    A fixture that needs a stack of its own (a Redis, Sentinels) to outlive these workers asks for that
    stack before ``start_worker``: fixtures are torn down in the reverse order of their setup.
    """
    first = len(worker_factory.started)
    yield worker_factory
    stop_workers(worker_factory.started[first:])
