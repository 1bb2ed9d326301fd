"""python -m worker status and retries release, as an operator runs them (subprocesses). No worker runs in
this module: one would probe the open breaker set up here, close it and release the retries itself."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .test_cli import entry

pytestmark = pytest.mark.integration


def test_status_shows_waiting_retries_breaker_and_dead_letters_and_release_makes_them_due(store, product_env,
                                                                                          unique_email):
    import redis

    from worker.app import app
    from worker.publisher import TaskMessages
    from worker.retries.attempts import RetryState
    from worker.retries.breaker import Breaker
    from worker.retries.schedule import RetrySchedule

    r = redis.Redis.from_url(product_env["REDIS_URL"])
    r.delete("loops", "vdw:retries:loops", "vdw:breaker:loops")
    schedule, messages = RetrySchedule(r, "vdw"), TaskMessages(app)
    scheduled = time.time()  # the retries are due 120, 300 and 900 s after a moment after this one
    for i, delay in enumerate((120, 300, 900)):
        event = {"id": f"st{i}", "operation": "identify", "created_at": "2026-01-01T00:00:00Z",
                 "identity": {"email": f"{i}-{unique_email}"}, "traits": {}}
        schedule.add("loops", messages.retry("loops", event, f"st{i}.loops", 1, RetryState(1, 1.0).header()), delay)
    breaker = Breaker(r, "vdw", threshold=2)
    breaker.record("loops", ok=False)
    breaker.record("loops", ok=False)
    store.add(entry("loops", unique_email))
    try:
        out = subprocess.run([sys.executable, "-m", "worker", "status", "--json"], env=product_env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        asked = time.time()  # the CLI looked at a moment before this one
        loops = json.loads(out.stdout)["vendors"]["loops"]
        # The earliest retry, due 120 s after it was scheduled, as seen at some moment of the CLI's run (shown
        # to 0.1 s): no bound on how long the CLI took, only what the two clock readings around it allow.
        assert loops["retries_waiting"] == 3
        assert 120 - (asked - scheduled) - 0.05 <= loops["next_retry_in"] <= 120 + 0.05, \
            (loops["next_retry_in"], asked - scheduled)
        assert loops["breaker"] == "open" and loops["breaker_since"] and loops["failures_in_a_row"] == 2
        assert loops["dead_letters"] == {"rejected": 1} and loops["queued"] == 0
        table = subprocess.run([sys.executable, "-m", "worker", "status"], env=product_env,
                               capture_output=True, text=True, timeout=60).stdout
        assert "loops" in table and "open since" in table and "rejected 1" in table

        out = subprocess.run([sys.executable, "-m", "worker", "retries", "release", "--vendor", "loops"],
                             env=product_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "loops: 3 waiting retries released" in out.stdout
        assert r.llen("loops") == 3 and schedule.waiting("loops").count == 0
        assert {json.loads(m)["headers"]["id"] for m in r.lrange("loops", 0, -1)} == {"st0.loops", "st1.loops",
                                                                                      "st2.loops"}
    finally:
        r.delete("loops", "vdw:retries:loops", "vdw:breaker:loops")
