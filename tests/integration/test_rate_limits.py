"""Rate limits hold globally across worker processes; one vendor never holds up another."""

from __future__ import annotations

import time

import pytest

import worker
from tests.helpers import breaker_open, max_in_window
from worker.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mine(sandbox_client, vendor, tag, status=None):
    return [r for r in sandbox_client.requests(vendor=vendor)
            if tag in str(r["body"]) and (status is None or r["status"] == status)]


def test_two_worker_processes_share_one_limit(worker_factory, product_env, sandbox_client, unique_email):
    rate, n = 5, 30
    a = worker_factory("rl-a", ("-Q", "loops"), LOOPS_RATE_LIMIT=rate)
    b = worker_factory("rl-b", ("-Q", "loops"), LOOPS_RATE_LIMIT=rate)
    sandbox_client.configure("loops", rate_limit=rate)
    tag = unique_email
    for i in range(n):
        worker.identify(email=f"{i}-{tag}", vendors=["loops"])
    wait_until(lambda: len(mine(sandbox_client, "loops", tag, 200)) == n, timeout=30, message=f"{n} deliveries")
    got = mine(sandbox_client, "loops", tag)
    times = [r["ts"] for r in got]
    span = max(times) - min(times)
    print(f"\n{n} requests over {span:.2f}s = {(n - 1) / span:.2f}/s (limit {rate}/s), "
          f"max {max_in_window(times)} in any 1s window")
    assert [r["status"] for r in got].count(429) == 0, "the sandbox saw the limit exceeded"
    assert len(got) == n
    assert (n - 1) / span <= rate * 1.05
    assert max_in_window(times) <= rate + 1
    assert "'vendor': 'loops', 'status': 200" in a.log() and "'vendor': 'loops', 'status': 200" in b.log(), \
        "both workers should have delivered"


def test_throttled_vendor_does_not_hold_up_the_others(worker_factory, product_env, sandbox_client, unique_email):
    worker_factory("iso-throttle", LOOPS_RATE_LIMIT=2)
    tag = unique_email
    for i in range(40):
        worker.track("page", email=f"{i}-{tag}", vendors=["loops"])
    t0 = time.time()
    for i in range(40):
        worker.track("page", email=f"{i}-{tag}", vendors=["convertloop"])
    wait_until(lambda: len(mine(sandbox_client, "convertloop", tag, 200)) == 40, timeout=20)
    took = max(r["ts"] for r in mine(sandbox_client, "convertloop", tag)) - t0
    loops_done = len(mine(sandbox_client, "loops", tag, 200))
    print(f"\n40 ConvertLoop deliveries took {took:.2f}s while Loops (2/s) had delivered {loops_done}/40")
    assert took < 5.0
    assert loops_done < 20


def test_down_vendor_does_not_delay_another(worker_factory, product_env, sandbox_client, unique_email):
    worker_factory("iso-down", CONVEYOUR_RATE_LIMIT=0, RETRY_MAX_ATTEMPTS=50, RETRY_BACKOFF_MAX=1)

    def batch(label: str) -> float:
        t0 = time.time()
        for i in range(30):
            worker.track("page", email=f"{label}{i}-{unique_email}", vendors=["convertloop", "conveyour"])
        wait_until(lambda: len(mine(sandbox_client, "convertloop", f"{label}", 200)) >= 30, timeout=30)
        return max(r["ts"] for r in mine(sandbox_client, "convertloop", f"{label}")) - t0

    healthy = batch("healthy")
    sandbox_client.configure("conveyour", fail_all=503)
    during = batch("outage")
    failing = len([r for r in sandbox_client.requests(vendor="conveyour") if r["status"] == 503])
    print(f"\n30 ConvertLoop deliveries: {healthy:.2f}s healthy, {during:.2f}s while ConveYour answered 503 "
          f"({failing} failed attempts)")
    # Really down: enough failures in a row to open its circuit breaker (then it is probed, not hammered).
    assert failing >= 10 and breaker_open("conveyour")
    assert during <= 2 * healthy + 1.0
    sandbox_client.configure("conveyour", fail_all=None)
    wait_until(lambda: len([r for r in mine(sandbox_client, "conveyour", "outage", 200)]) >= 30, timeout=30,
               message="ConveYour catching up after the outage")
