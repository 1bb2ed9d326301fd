"""The limiter as the vendor sees it: Retry-After pauses every process, throttled deliveries
are requeued and delivered, and an announced lower limit is followed without a 429 storm.

Each test's workers are stopped at its end (``start_worker``; so the next test's deliveries are all its own
workers'); a test that reads their logs stops them first (a worker's log is complete at exit).
"""

from __future__ import annotations

import pytest

import worker
from tests.helpers import max_in_window, stop_workers
from worker.dev.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mine(sandbox_client, vendor, tag, status=None):
    return [r for r in sandbox_client.requests(vendor=vendor)
            if tag in str(r["body"]) and (status is None or r["status"] == status)]


def test_retry_after_pauses_the_vendor_for_every_worker_process(start_worker, product_env, sandbox_client,
                                                                unique_email):
    rate, n, pause = 4, 16, 3
    a = start_worker("ra-a", ("-Q", "loops"), LOOPS_RATE_LIMIT=rate)
    b = start_worker("ra-b", ("-Q", "loops"), LOOPS_RATE_LIMIT=rate)
    sandbox_client.configure("loops", fail_next=[{"status": 429, "retry_after": str(pause)}])
    for i in range(n):
        worker.identify(email=f"{i}-{unique_email}", vendors=["loops"])
    wait_until(lambda: len(mine(sandbox_client, "loops", unique_email, 200)) == n, timeout=35,
               message=f"{n} deliveries")
    got = sorted(mine(sandbox_client, "loops", unique_email), key=lambda r: r["ts"])
    (refused,) = [r for r in got if r["status"] == 429]
    after = [r["ts"] - refused["ts"] for r in got if r["ts"] > refused["ts"]]
    print(f"\n429 with Retry-After {pause}; the next request {min(after):.2f}s later, then "
          f"max {max_in_window([refused['ts'] + t for t in after])} in any 1 s")
    # The pause began when a worker read the 429, after it arrived: nothing from either process sooner.
    assert min(after) >= pause
    assert max_in_window([r["ts"] for r in got if r["status"] == 200]) <= rate, "waiters left together"
    stop_workers([a, b])
    # Every delivery is in one of the two processes' logs (which process took how many is the scheduler's);
    # none came before the pause ended (above), whichever process made it.
    per_process = [w.log().count("'loops: 200, attempt") for w in (a, b)]
    print(f"deliveries per process: {per_process}")
    assert sum(per_process) == n


def test_throttled_delivery_goes_back_on_its_queue_and_is_delivered(start_worker, product_env, sandbox_client,
                                                                     unique_email):
    """A backlog there before the worker: its first takes bring 24 deliveries at once (the limit does not bind yet),
    so beyond the 8 token waiters some are thrown back; each is delivered once all the same."""
    n = 24
    for i in range(n):
        worker.identify(email=f"{i}-{unique_email}", vendors=["loops"])
    w = start_worker("rq", ("-Q", "loops", "--loglevel=DEBUG"), LOOPS_RATE_LIMIT=4, WORKER_CONCURRENCY=n)
    wait_until(lambda: len(mine(sandbox_client, "loops", unique_email, 200)) == n, timeout=35,
               message=f"{n} deliveries")
    got = mine(sandbox_client, "loops", unique_email)
    emails = sorted(r["body"]["email"] for r in got)
    assert emails == sorted(f"{i}-{unique_email}" for i in range(n)), "each delivered exactly once"
    w.stop()
    assert "requeued: loops: rate limited" in w.log(), "24 at once, at most 8 waiters: some must have been requeued"


def test_announced_lower_limit_is_followed_without_a_429_storm(start_worker, product_env, sandbox_client,
                                                               unique_email, redis_server):
    import redis

    n = 48
    r = redis.Redis.from_url(redis_server.url)
    r.delete(*r.keys("*:ratelimit:loops*") or ["-"])  # the effective rate the other tests left
    a = start_worker("an-a", ("-Q", "loops"), LOOPS_RATE_LIMIT=10)
    b = start_worker("an-b", ("-Q", "loops"), LOOPS_RATE_LIMIT=10)
    sandbox_client.configure("loops", rate_limit=4)  # sliding; answers x-ratelimit-limit: 4
    for i in range(n):
        worker.identify(email=f"{i}-{unique_email}", vendors=["loops"])
    wait_until(lambda: len(mine(sandbox_client, "loops", unique_email, 200)) == n, timeout=35,
               message=f"{n} deliveries")
    got = mine(sandbox_client, "loops", unique_email)
    refused = [r for r in got if r["status"] == 429]
    print(f"\n{len(refused)} x 429 of {len(got)} requests")
    assert len(refused) < 0.05 * len(got)
    line = "loops: effective rate 10.0 -> 4.0/s after the vendor announced its limit"
    stop_workers([a, b])
    assert (a.log() + b.log()).count(line) == 1, "one process changed the shared rate, and said so once"
