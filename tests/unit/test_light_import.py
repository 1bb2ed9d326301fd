"""A web process imports only what a producer needs; the worker's Celery app and its configuration are the
package's own.

Each check runs in a fresh interpreter: ``sys.modules`` of this test process holds everything already.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import run_python

#: What a producer call must never load (the worker's side, the operator's side).
HEAVY = ("celery", "kombu", "billiard", "httpx", "sentry_sdk", "prometheus_client", "flower", "click")


@pytest.fixture
def env(redis_server, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPS_", "CONVERTLOOP_", "CONVEYOUR_"))}
    e.update(REDIS_URL=redis_server.url, LOOPS_API_KEY="k", SPOOL_DIR=str(tmp_path / "spool"),
             KEY_PREFIX="lightimport")
    return e


def test_import_worker_and_a_track_call_load_no_worker_side_library(env):
    got = run_python("""
        import json, sys
        import worker
        before = sorted({m.split(".")[0] for m in sys.modules})
        event_id = worker.track("signed_up", email="jill@acme.co", properties={"plan": "pro"})
        after = sorted({m.split(".")[0] for m in sys.modules})
        print(json.dumps({"id": event_id, "before": before, "after": after}))
    """, env)
    assert got["id"], got
    for phase in ("before", "after"):
        loaded = [m for m in HEAVY if m in got[phase]]
        assert not loaded, f"{phase} the call: {loaded}"


def test_the_call_queued_a_message_a_worker_can_read(env, redis_server):
    """The light path still queues the delivery (the message format is pinned against Celery's elsewhere)."""
    import redis

    got = run_python("""
        import json, worker
        print(json.dumps({"id": worker.track("signed_up", email="jill@acme.co")}))
    """, env)
    raw = redis.Redis.from_url(redis_server.url).lrange("loops", 0, -1)
    assert any(got["id"].encode() in m for m in raw), raw


def test_worker_app_is_the_celery_app_celery_finds(env):
    got = run_python("""
        import json, sys
        from celery.app.utils import find_app
        import worker
        app = find_app("worker")
        app.loader.import_default_modules()
        print(json.dumps({"same": app is worker.app, "main": app.main, "task": "worker.deliver" in app.tasks,
                          "acks_late": app.conf.task_acks_late}))
    """, env)
    assert got == {"same": True, "main": "worker", "task": True, "acks_late": True}, got


def test_an_apps_own_celeryconfig_does_not_replace_the_workers(env, tmp_path):
    """An application's ``celeryconfig.py`` on sys.path (here: the working directory) is not read."""
    (tmp_path / "celeryconfig.py").write_text("task_acks_late = False\nbroker_transport = 'redis'\n")
    got = run_python("""
        import json, worker
        print(json.dumps({"acks_late": worker.app.conf.task_acks_late,
                          "transport": worker.app.conf.broker_transport}))
    """, {**env, "PYTHONPATH": str(tmp_path)}, cwd=str(tmp_path))
    assert got["acks_late"] is True and got["transport"] != "redis", got


def test_celery_config_module_overrides_on_top(env, tmp_path):
    (tmp_path / "deploy_overrides.py").write_text("worker_prefetch_multiplier = 4\nimport os\n_private = 1\n")
    got = run_python("""
        import json, worker
        c = worker.app.conf
        print(json.dumps({"prefetch": c.worker_prefetch_multiplier, "acks_late": c.task_acks_late}))
    """, {**env, "PYTHONPATH": str(tmp_path), "CELERY_CONFIG_MODULE": "deploy_overrides"})
    assert got == {"prefetch": 4, "acks_late": True}, got


def test_one_result_backend_for_every_thread_unless_a_deployment_chooses_its_own(env, tmp_path):
    """Celery builds a result backend per thread unless it is thread-safe; on the gevent pool every task is a
    new greenlet ("thread"). Ours (none) is shared; a deployment's own backend gets Celery's default back."""
    script = """
        import json, threading, worker
        seen = []
        t = threading.Thread(target=lambda: seen.append(worker.app.backend))
        t.start(); t.join()
        print(json.dumps({"shared": seen[0] is worker.app.backend, "backend": type(seen[0]).__name__}))
    """
    assert run_python(script, env) == {"shared": True, "backend": "DisabledBackend"}
    (tmp_path / "results_overrides.py").write_text("result_backend = 'cache+memory://'\n")
    got = run_python(script, {**env, "PYTHONPATH": str(tmp_path), "CELERY_CONFIG_MODULE": "results_overrides"})
    assert got == {"shared": False, "backend": "CacheBackend"}, got
    (tmp_path / "safe_overrides.py").write_text("result_backend = 'cache+memory://'\n"
                                                "result_backend_thread_safe = True\n")
    got = run_python(script, {**env, "PYTHONPATH": str(tmp_path), "CELERY_CONFIG_MODULE": "safe_overrides"})
    assert got == {"shared": True, "backend": "CacheBackend"}, got


def test_unknown_attribute_is_an_attribute_error():
    import worker

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        worker.nope  # noqa: B018
