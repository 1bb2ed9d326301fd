"""A bulkhead per vendor: in a worker consuming every vendor queue, a slow vendor never holds more than its
share of the threads while another vendor has work waiting (worker/broker/bulkhead.py)."""

from __future__ import annotations

import time

import pytest

import worker
from tests.helpers import max_in_window, wait_idle
from worker.dev.localstack import wait_until
from worker.settings import DEFAULT_BULKHEAD_SHARE, DEFAULT_WORKER_CONCURRENCY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Loops answers 200, after this long.
LATENCY = 8.0
#: Events per vendor: more than the default threads, so that without the bulkhead Loops would hold every one.
N = 200


def mine(sandbox_client, vendor, tag):
    return [r for r in sandbox_client.requests(vendor=vendor) if tag in str(r["body"])]


def test_a_slow_vendor_holds_only_its_share_of_the_threads(worker_factory, redis_server, product_env,
                                                           sandbox_client, unique_email):
    from worker.broker.bulkhead import thread_share

    threads = DEFAULT_WORKER_CONCURRENCY
    queues = ("convertloop", "loops", "conveyour")
    share = thread_share(threads, len(queues), DEFAULT_BULKHEAD_SHARE)
    assert N > threads, f"the test needs more Loops events ({N}) than threads ({threads})"
    # Every vendor queue, the product's default threads; HTTP_TIMEOUT above the latency: Loops is slow, not failing.
    worker_factory("bulkhead", WORKER_CONCURRENCY=threads, HTTP_TIMEOUT=LATENCY + 10)
    sandbox_client.configure("loops", latency_ms=LATENCY * 1000)
    tag = unique_email
    t0 = time.time()
    for i in range(N):
        worker.track("page", email=f"l{i}-{tag}", vendors=["loops"])
    for i in range(N):
        worker.track("page", email=f"c{i}-{tag}", vendors=["convertloop"])

    def convertloop_done():
        got = [r for r in mine(sandbox_client, "convertloop", tag) if r["status"] == 200]
        return got if len(got) >= N else None

    convertloop = wait_until(convertloop_done, timeout=N / share * LATENCY * 3, interval=0.2,
                             message=f"{N} ConvertLoop deliveries")
    last = max(convertloop, key=lambda r: r["seq"])
    # Every Loops request that reached the sandbox before ConvertLoop's last one: while Loops held its threads.
    loops_before = [r for r in mine(sandbox_client, "loops", tag) if r["seq"] < last["seq"]]
    wait_until(lambda: len([r for r in mine(sandbox_client, "loops", tag) if r["status"] == 200]) >= N,
               timeout=N / share * LATENCY * 3, interval=0.5, message=f"{N} Loops deliveries")
    wait_idle(redis_server.url, timeout=60)
    loops = mine(sandbox_client, "loops", tag)
    convertloop = mine(sandbox_client, "convertloop", tag)
    loops_arrivals = sorted(r["ts"] for r in loops)
    # Each Loops request is answered LATENCY after it arrived, and a thread sends its next one only after its answer:
    # the most Loops arrivals within any LATENCY seconds is the most Loops requests the worker had out at once.
    in_flight = max_in_window(loops_arrivals, LATENCY)
    print(f"\n{threads} threads, every vendor queue, bulkhead share {share}: {N} ConvertLoop deliveries took "
          f"{last['ts'] - t0:.2f}s, while Loops ({LATENCY:g}s a request) had sent {len(loops_before)} requests; "
          f"the {N}th Loops request arrived at {loops_arrivals[N - 1] - t0:.2f}s, the last Loops answer came "
          f"~{loops_arrivals[-1] + LATENCY - t0:.2f}s after the first event; at most {in_flight} Loops requests "
          f"out at once")
    # Ordering, not time: ConvertLoop never waited for a Loops thread to come free, and Loops never held more than
    # its share: no more Loops requests than that went out before ConvertLoop's last one.
    assert len(loops_before) <= share, (f"{len(loops_before)} Loops requests went out before ConvertLoop's last: "
                                        f"Loops held more than {share} threads")
    assert last["ts"] < loops_arrivals[N - 1]
    assert in_flight <= share
    # None lost, none twice.
    assert sorted(r["body"]["email"] for r in loops if r["status"] == 200) == sorted(f"l{i}-{tag}" for i in range(N))
    assert sorted(r["body"]["person"]["email"] for r in convertloop if r["status"] == 200) == \
        sorted(f"c{i}-{tag}" for i in range(N))
