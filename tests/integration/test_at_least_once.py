"""A worker killed mid-delivery loses nothing: late acks + visibility timeout hand its messages on."""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest
import redis

import worker
from worker.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sigkill_mid_delivery_loses_nothing(worker_factory, product_env, sandbox_client, unique_email):
    n = 40
    # The doomed worker holds many messages it has not sent yet (waiting for Loops tokens at 2/s)
    # and some whose requests are on the wire (ConvertLoop answering after 300 ms).
    sandbox_client.configure("convertloop", latency_ms=300)
    first = worker_factory("doomed", BROKER_VISIBILITY_TIMEOUT=4, LOOPS_RATE_LIMIT=2)
    ids = [worker.track("sale", email=f"{i}-{unique_email}", vendors=["loops", "convertloop"]) for i in range(n)]

    def mine(vendor, status=None):
        return [r for r in sandbox_client.requests(vendor=vendor, status=status) if unique_email in str(r["body"])]

    def emails(vendor):
        key = (lambda b: b["email"]) if vendor == "loops" else (lambda b: b["person"]["email"])
        return {key(r["body"]) for r in mine(vendor) if r["status"] in (200, 409)}

    wait_until(lambda: len(mine("loops")) >= 3, timeout=20, message="deliveries under way")
    unacked = redis.Redis.from_url(product_env["REDIS_URL"]).hlen("unacked")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    at_kill = {v: len(emails(v)) for v in ("loops", "convertloop")}
    assert unacked > 0 and at_kill["loops"] < n, "nothing was held by the worker; the test proves nothing"

    worker_factory("rescuer", BROKER_VISIBILITY_TIMEOUT=4, LOOPS_RATE_LIMIT=0)
    sandbox_client.configure("convertloop", latency_ms=0)
    everyone = {f"{i}-{unique_email}" for i in range(n)}
    for vendor in ("loops", "convertloop"):
        wait_until(lambda v=vendor: emails(v) == everyone, timeout=60, message=f"every event at {vendor}")
    loops_keys = Counter(r["idempotency_key"] for r in mine("loops", 200))
    extra = {v: len(mine(v)) - n for v in ("loops", "convertloop")}
    print(f"\nkilled holding {unacked} unacked messages, delivered then: {at_kill}; "
          f"requests beyond one per event: {extra}; Loops 409s: {len(mine('loops', 409))}")
    assert set(loops_keys) == set(ids)
    assert max(loops_keys.values()) == 1, "Loops accepted an event twice"
