"""The exporter's gauges, from a state set up directly in Redis and the spool (``python -m worker metrics`` as a
subprocess, scraped over HTTP). No worker runs in this module: one would take the queued messages, probe the
open breaker and move the waiting retries, changing the state this checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from tests.helpers import metric, metric_values
from worker.delivery.deadletters import DeadLetter
from worker.dev.localstack import MetricsExporterProcess
from worker.errors import REASONS
from worker.limits.ratelimit import limiter_for
from worker.producer.spool import Spool
from worker.retries.breaker import Breaker
from worker.retries.schedule import UNACKED, RetrySchedule
from worker.vendors import VENDORS

pytestmark = pytest.mark.integration

#: Keys this test writes, removed afterwards.
KEYS = ("convertloop", UNACKED, "vdw:retries:conveyour", "vdw:breaker:loops", "vdw:breaker:conveyour",
        "vdw:ratelimit:loops:state",
        "vdw:ratelimit:loops:log")


def test_gauges_show_queues_held_messages_retries_breakers_rates_dead_letters_and_the_spool(product_env, store,
                                                                                           tmp_path):
    r = redis.Redis.from_url(product_env["REDIS_URL"])
    r.delete(*KEYS)
    spool_dir = tmp_path / "spool"
    env = {**product_env, "LOOPS_RATE_LIMIT": "20", "CONVEYOUR_RATE_LIMIT": "12", "CONVERTLOOP_RATE_LIMIT": "0",
           "SPOOL_DIR": str(spool_dir)}
    exporter = None
    try:
        r.rpush("convertloop", "m1", "m2", "m3")                              # 3 queued
        for tag, vendor in (("t1", "loops"), ("t2", "loops"), ("t3", "conveyour")):  # held by a worker
            r.hset(UNACKED, tag, json.dumps([{"body": ""}, "", vendor]))
        schedule = RetrySchedule(r, "vdw")
        for i in range(2):                                                    # 2 waiting retries
            schedule.add("conveyour", f"retry-{i}", 300)
        Breaker(r, "vdw", threshold=1).record("loops", ok=False)             # open
        Breaker(r, "vdw", threshold=1, auth_threshold=1).record_auth_failure("conveyour")  # paused: key refused
        limiter_for(r, "vdw:ratelimit:loops", 20).observe(200, {"x-ratelimit-limit": "4"})  # Loops announces 4/s
        for vendor, reason in (("convertloop", "retries_exhausted"), ("convertloop", "retries_exhausted"),
                               ("loops", "property_cap")):
            store.add(DeadLetter(vendor=vendor, operation="track", reason=reason, attempts=1, event_id="e"))
        spool = Spool(spool_dir, 10**6)
        for i in range(2):
            spool.put(f"ev{i}", [{"queue": "loops", "body": "x" * 100}])
        spooled = sum(p.stat().st_size for p in Path(spool_dir).iterdir())

        exporter = MetricsExporterProcess(env, tmp_path / "exporter.log").start()
        values = metric_values(exporter.scrape())
    finally:
        if exporter is not None:
            exporter.stop()
        r.delete(*KEYS)

    def each(name: str) -> dict[str, float | None]:
        return {v: metric(values, name, vendor=v) for v in VENDORS}

    assert each("vdw_queue_depth") == {"convertloop": 3, "loops": 0, "conveyour": 0}
    assert each("vdw_in_flight") == {"convertloop": 0, "loops": 2, "conveyour": 1}
    assert each("vdw_retries_waiting") == {"convertloop": 0, "loops": 0, "conveyour": 2}
    assert each("vdw_breaker_open") == {"convertloop": 0, "loops": 1, "conveyour": 0}
    assert each("vdw_vendor_auth_failed") == {"convertloop": 0, "loops": 0, "conveyour": 1}
    assert each("vdw_configured_rate") == {"convertloop": None, "loops": 20, "conveyour": 12}
    assert each("vdw_effective_rate") == {"convertloop": None, "loops": 4, "conveyour": 12}
    stored = {(v, reason): metric(values, "vdw_dead_letters_stored", vendor=v, reason=reason)
              for v in VENDORS for reason in REASONS}
    expected = {key: 0 for key in stored} | {("convertloop", "retries_exhausted"): 2, ("loops", "property_cap"): 1}
    assert stored == expected
    assert metric(values, "vdw_spool_events") == 2
    assert metric(values, "vdw_spool_bytes") == spooled > 0
    assert metric(values, "vdw_redis_up") == 1
