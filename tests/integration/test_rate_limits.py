"""Rate limits hold globally across worker processes; one vendor never holds up another.

Each test's workers are stopped when it ends (``start_worker``), so no test shares a vendor queue with the
workers of another. Nothing here asserts on a duration or an average rate: the limiter's property is that no
1-second window holds more requests than the limit, and "not held up" is an ordering of deliveries.
"""

from __future__ import annotations

import time

import pytest

import worker
from tests.helpers import breaker_open, max_in_window
from worker.dev.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mine(sandbox_client, vendor, tag, status=None):
    return [r for r in sandbox_client.requests(vendor=vendor)
            if tag in str(r["body"]) and (status is None or r["status"] == status)]


def test_two_worker_processes_share_one_limit(start_worker, product_env, sandbox_client, unique_email):
    rate, n = 5, 30
    a = start_worker("rl-a", ("-Q", "loops"), LOOPS_RATE_LIMIT=rate)
    b = start_worker("rl-b", ("-Q", "loops"), LOOPS_RATE_LIMIT=rate)
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
    assert max_in_window(times) <= rate + 1
    assert "'loops: 200, attempt" in a.log() and "'loops: 200, attempt" in b.log(), \
        "both workers should have delivered"


def test_throttled_vendor_does_not_hold_up_the_others(start_worker, product_env, sandbox_client, unique_email):
    """40 Loops events at 2/s (at least 19.5 s of work, whatever the machine) queued ahead of 40 ConvertLoop
    events: every ConvertLoop event is delivered while Loops still has events left."""
    start_worker("iso-throttle", LOOPS_RATE_LIMIT=2)
    tag = unique_email
    for i in range(40):
        worker.track("page", email=f"{i}-{tag}", vendors=["loops"])
    t0 = time.time()
    for i in range(40):
        worker.track("page", email=f"{i}-{tag}", vendors=["convertloop"])
    wait_until(lambda: len(mine(sandbox_client, "convertloop", tag, 200)) == 40, timeout=60,
               message="40 ConvertLoop deliveries")
    loops_done = len(mine(sandbox_client, "loops", tag, 200))  # read after the 40th ConvertLoop delivery
    took = max(r["ts"] for r in mine(sandbox_client, "convertloop", tag)) - t0
    print(f"\n40 ConvertLoop deliveries took {took:.2f}s while Loops (2/s) had delivered {loops_done}/40")
    # An ordering: the last ConvertLoop delivery came before the last Loops one (Loops had not finished).
    assert loops_done < 40, "ConvertLoop waited for the throttled Loops backlog"


def test_down_vendor_does_not_delay_another(start_worker, product_env, sandbox_client, unique_email):
    """ConvertLoop delivers a batch of events going to ConvertLoop and ConveYour while ConveYour is down (its
    breaker open): all of them, before ConveYour answers again."""
    start_worker("iso-down", CONVEYOUR_RATE_LIMIT=0, RETRY_MAX_ATTEMPTS=50, RETRY_BACKOFF_MAX=1)

    def batch(label: str) -> float:
        t0 = time.time()
        for i in range(30):
            worker.track("page", email=f"{label}{i}-{unique_email}", vendors=["convertloop", "conveyour"])
        wait_until(lambda: len(mine(sandbox_client, "convertloop", f"{label}", 200)) >= 30, timeout=60,
                   message=f"30 {label} ConvertLoop deliveries")
        return max(r["ts"] for r in mine(sandbox_client, "convertloop", f"{label}")) - t0

    healthy = batch("healthy")
    sandbox_client.configure("conveyour", fail_all=503)
    during = batch("outage")
    # Every ConvertLoop delivery of the outage batch is in: ConveYour is still down, its breaker open.
    opened = breaker_open("conveyour")
    failing = len([r for r in sandbox_client.requests(vendor="conveyour") if r["status"] == 503])
    print(f"\n30 ConvertLoop deliveries: {healthy:.2f}s healthy, {during:.2f}s while ConveYour answered 503 "
          f"({failing} failed attempts)")
    # Really down: enough failures in a row to open its circuit breaker (then it is probed, not hammered).
    assert failing >= 10 and opened
    sandbox_client.configure("conveyour", fail_all=None)
    wait_until(lambda: len([r for r in mine(sandbox_client, "conveyour", "outage", 200)]) >= 30, timeout=60,
               message="ConveYour catching up after the outage")
    # An ordering: ConvertLoop had every event of the outage batch before ConveYour accepted any of them.
    cl_last = max(r["ts"] for r in mine(sandbox_client, "convertloop", "outage", 200))
    cy_first = min(r["ts"] for r in mine(sandbox_client, "conveyour", "outage", 200))
    assert cl_last < cy_first, "ConvertLoop's deliveries waited for ConveYour"
