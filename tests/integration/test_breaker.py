"""A vendor outage meets the circuit breaker; 429s never open it; the retry window ends in a dead letter.

Real workers, the private Redis, the sandbox over HTTP. Breaker and retry settings are the product's
defaults unless a test says otherwise (BREAKER_THRESHOLD 10, probes up to 15 s apart, RETRY_BACKOFF_BASE 2,
RETRY_BACKOFF_MAX 600, no attempt cap).
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

import worker
from tests.helpers import email_of
from worker.cli import main as cli
from worker.deadletters import DeadLetterStore
from worker.localstack import wait_until
from worker.retries.breaker import Breaker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The product's retry defaults (the test environment shortens them for other suites).
PRODUCT_RETRIES = {"RETRY_BACKOFF_BASE": 2, "RETRY_BACKOFF_MAX": 600, "RETRY_MAX_ATTEMPTS": 0}
OUTAGE = 120.0


def mine(sandbox_client, vendor: str, tag: str, status: int | None = None) -> list[dict]:
    return [r for r in sandbox_client.requests(vendor=vendor)
            if tag in str(r["body"]) and (status is None or r["status"] == status)]


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (max(times) - min(times)) if len(times) > 1 else 0.0


def test_two_minute_outage_costs_no_dead_letter_few_requests_and_recovers_at_the_limit(
        worker_factory, product_env, sandbox_client, unique_email):
    tag = unique_email
    w = worker_factory("outage", LOOPS_RATE_LIMIT=10, CONVERTLOOP_RATE_LIMIT=10, **PRODUCT_RETRIES)
    try:
        # ConvertLoop: a backlog that keeps its limiter busy for the whole test, to see its rate with and without
        # the Loops outage.
        for i in range(1800):
            worker.track("bg", email=f"cl{i}-{tag}", vendors=["convertloop"])
        time.sleep(12)
        outage_start = time.time()
        sandbox_client.configure("loops", fail_all=503)
        events = [worker.track("sale", email=f"before{i}-{tag}", vendors=["loops"]) for i in range(100)]
        stop = threading.Event()

        def trickle():  # one event a second while the vendor is down
            i = 0
            while not stop.wait(1.0):
                events.append(worker.track("sale", email=f"during{i}-{tag}", vendors=["loops"]))
                i += 1

        producer = threading.Thread(target=trickle, daemon=True)
        producer.start()
        time.sleep(OUTAGE)
        stop.set()
        producer.join()
        sandbox_client.configure("loops", fail_all=None)
        outage_end = time.time()

        n = len(events)
        wait_until(lambda: len({email_of("loops", r["body"]) for r in mine(sandbox_client, "loops", tag, 200)}) >= n,
                   timeout=OUTAGE, interval=0.5, message=f"{n} Loops deliveries after the outage")
        loops = mine(sandbox_client, "loops", tag)
        during = [r for r in loops if outage_start <= r["ts"] < outage_end]
        after = sorted(r["ts"] for r in loops if r["status"] == 200)
        cl = sorted(r["ts"] for r in mine(sandbox_client, "convertloop", tag, 200))
        cl_before = [t for t in cl if outage_start - 10 <= t < outage_start]
        cl_during = [t for t in cl if outage_start + 5 <= t < outage_end]
        dead = [d for d in DeadLetterStore.default().list() if d.event_id in set(events)]
        print(f"\n{n} Loops events ({100} queued at the start of a {OUTAGE:.0f}s outage, one a second during it): "
              f"{len(during)} requests to Loops during the outage (bound {n} + {OUTAGE:.0f}); first delivery "
              f"{after[0] - outage_end:.1f}s after it ended, then {rate(after):.1f}/s (limit 10); "
              f"ConvertLoop {rate(cl_before):.1f}/s before, {rate(cl_during):.1f}/s during; dead letters {len(dead)}")
        assert dead == []
        assert len(during) <= n + OUTAGE, "the breaker did not stop the hammering"
        assert all(r["status"] != 200 for r in during)
        assert after[0] - outage_end < 2 * 15 + 10, "the backlog did not start within the probe spacing"
        assert 7 <= rate(after) <= 10 * 1.1, "the backlog did not drain at the rate limit"
        assert rate(cl_during) >= 0.9 * rate(cl_before), "the outage slowed another vendor"
        assert Breaker(redis.Redis.from_url(product_env["REDIS_URL"]), "vdw", 10).poll("loops").state == "closed"
    finally:
        w.stop()
        redis.Redis.from_url(product_env["REDIS_URL"]).delete("convertloop")


def test_429s_never_open_the_breaker_nor_use_up_attempts(worker_factory, product_env, sandbox_client,
                                                          unique_email):
    """The vendor allows 2/s while our limiter is off: most first tries are 429s. With an attempt cap of 2 and
    a breaker that opens after 3 failures, every event is still delivered and the breaker never opened."""
    tag = unique_email
    w = worker_factory("w429", LOOPS_RATE_LIMIT=0, BREAKER_THRESHOLD=3, RETRY_MAX_ATTEMPTS=2,
                       RETRY_BACKOFF_BASE=0.2, RETRY_BACKOFF_MAX=1)
    try:
        sandbox_client.configure("loops", rate_limit=2, retry_after=1)
        events = [worker.track("sale", email=f"{i}-{tag}", vendors=["loops"]) for i in range(20)]
        wait_until(lambda: len(mine(sandbox_client, "loops", tag, 200)) >= 20, timeout=90, interval=0.2,
                   message="20 deliveries through the 429s")
        too_many = mine(sandbox_client, "loops", tag, 429)
        print(f"\n20 events: {len(too_many)} answers 429, all delivered; breaker log lines: "
              f"{w.log().count('circuit breaker open')}")
        assert len(too_many) >= 10, "the vendor never limited us: the test proves nothing"
        assert "circuit breaker open" not in w.log()
        assert [d for d in DeadLetterStore.default().list() if d.event_id in set(events)] == []
        state = Breaker(redis.Redis.from_url(product_env["REDIS_URL"]), "vdw", 3).poll("loops")
        assert state.state == "closed" and state.failures == 0
    finally:
        w.stop()


def test_short_retry_window_dead_letters_with_attempts_and_times_then_replay_delivers(
        worker_factory, product_env, sandbox_client, unique_email, capsys):
    window = 4.0
    w = worker_factory("window", RETRY_WINDOW=window, BREAKER_THRESHOLD=0, RETRY_MAX_ATTEMPTS=0,
                       RETRY_BACKOFF_BASE=0.5, RETRY_BACKOFF_MAX=1)
    try:
        sandbox_client.configure("convertloop", fail_all=500)
        event_id = worker.track("doomed", email=unique_email, vendors=["convertloop"])
        (entry,) = wait_until(lambda: [d for d in DeadLetterStore.default().list() if d.event_id == event_id],
                              timeout=60, message="the dead letter")
        sent = sorted(r["ts"] for r in mine(sandbox_client, "convertloop", unique_email))
        from datetime import datetime

        first, last = (datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
                       for t in (entry.first_failed_at, entry.failed_at))
        print(f"\nRETRY_WINDOW {window}s: {entry.attempts} attempts over {last - first:.2f}s, "
              f"requests at the vendor {len(sent)}, spanning {sent[-1] - sent[0]:.2f}s")
        assert (entry.reason, entry.status) == ("retries_exhausted", 500)
        assert entry.attempts == len(sent) >= 3
        assert abs(first - sent[0]) < 1 and abs(last - sent[-1]) < 1
        assert window <= last - first < window + 5, "retried past the window, or stopped long before it"
        assert "RETRY_WINDOW" in entry.error

        sandbox_client.configure("convertloop", fail_all=None)
        assert cli(["deadletters", "replay", entry.id]) == 0
        assert "1 replayed" in capsys.readouterr().out
        wait_until(lambda: mine(sandbox_client, "convertloop", unique_email, 200), timeout=30, message="the replay")
    finally:
        w.stop()


def test_probes_close_their_connections(worker_factory, product_env, sandbox_client, unique_email):
    """Each probe of an open breaker runs in a thread of its own; its HTTP connections close with it, so a long
    outage (thousands of probes) leaves no socket behind. Counted in the worker's /proc/<pid>/fd."""
    import os

    sandbox_client.configure("loops", fail_all=503)
    w = worker_factory("probe-fds", ("-Q", "loops"), BREAKER_THRESHOLD=1, BREAKER_PROBE_MAX=0.05,
                       RETRY_MAX_ATTEMPTS=0)
    worker.track("outage", email=unique_email, vendors=["loops"])

    def requests() -> int:
        return len(sandbox_client.requests(vendor="loops", status=503))

    def sockets() -> int:
        fds = f"/proc/{w.proc.pid}/fd"
        return sum(1 for fd in os.listdir(fds) if os.readlink(f"{fds}/{fd}").startswith("socket:"))

    wait_until(lambda: requests() >= 20, timeout=60, interval=0.1, message="20 probes")
    before, probes_before = sockets(), requests()
    wait_until(lambda: requests() >= probes_before + 40, timeout=90, interval=0.1, message="40 more probes")
    after = sockets()
    sandbox_client.configure("loops", fail_all=None)
    wait_until(lambda: len(sandbox_client.requests(vendor="loops", status=200)) >= 1, timeout=60,
               message="the event delivered after the outage")
    w.stop()
    print(f"\nworker sockets after {probes_before} probes: {before}; after {requests()}: {after}")
    assert after < before + 10, f"sockets grew from {before} to {after} over 40 probes"
