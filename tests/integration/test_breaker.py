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
from tests.helpers import breaker_open, email_of, max_in_window
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import wait_until
from worker.ops.cli import main as cli
from worker.retries.breaker import Breaker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The product's retry defaults (the test environment shortens them for other suites).
PRODUCT_RETRIES = {"RETRY_BACKOFF_BASE": 2, "RETRY_BACKOFF_MAX": 600, "RETRY_MAX_ATTEMPTS": 0}
#: A minute of 503s: long enough for the breaker to open and its probes to space out (1, 2, 4, 8, 15 s).
OUTAGE = 60.0


def mine(sandbox_client, vendor: str, tag: str, status: int | None = None) -> list[dict]:
    return [r for r in sandbox_client.requests(vendor=vendor, status=status) if tag in str(r["body"])]


def rate(times: list[float]) -> float:
    """Deliveries per second over ``times`` (a figure to print; no assertion uses it)."""
    return (len(times) - 1) / (max(times) - min(times)) if len(times) > 1 else 0.0


#: ConvertLoop events queued before the outage: at its limit (10/s) they last past the outage's end
#: (12 s + OUTAGE at most 10 a second is 720), so ConvertLoop is busy the whole time Loops is down.
CL_BACKLOG = 800


@pytest.mark.timeout(1200)  # its own waits: 12 + 60 s of outage, then up to 60 + 240 + 300 s
def test_a_minute_long_outage_costs_no_dead_letter_few_requests_and_recovers_at_the_limit(
        start_worker, product_env, sandbox_client, unique_email):
    """Loops answers 503 for a minute under the product's breaker and retry defaults, while ConvertLoop
    works through a backlog at its limit. Loops: no dead letter, few requests while it is down (the breaker),
    every event delivered after it, never more than the limit in any second. ConvertLoop: every event
    delivered, none dead-lettered, and it kept delivering while the Loops breaker was open.

    No assertion is on a duration or a rate: how soon the backlog started and how fast each vendor went are
    printed (README's figures), not asserted."""
    tag = unique_email
    w = start_worker("outage", LOOPS_RATE_LIMIT=10, CONVERTLOOP_RATE_LIMIT=10, **PRODUCT_RETRIES)
    try:
        cl_events = [worker.track("bg", email=f"cl{i}-{tag}", vendors=["convertloop"]) for i in range(CL_BACKLOG)]
        time.sleep(12)
        outage_start = time.time()
        sandbox_client.configure("loops", fail_all=503)
        events = [worker.track("sale", email=f"before{i}-{tag}", vendors=["loops"]) for i in range(100)]
        stop = threading.Event()

        def trickle():  # one event a second to each vendor while Loops is down
            i = 0
            while not stop.wait(1.0):
                events.append(worker.track("sale", email=f"during{i}-{tag}", vendors=["loops"]))
                cl_events.append(worker.track("bg", email=f"cl-during{i}-{tag}", vendors=["convertloop"]))
                i += 1

        producer = threading.Thread(target=trickle, daemon=True)
        producer.start()
        time.sleep(OUTAGE)
        stop.set()
        producer.join()
        # Still during the outage: the Loops breaker is open, and ConvertLoop delivers after this moment.
        mark = time.time()
        opened_at_mark = breaker_open("loops")
        wait_until(lambda: [t for t in cl_delivered(sandbox_client, tag) if t > mark], timeout=60, interval=0.2,
                   message="a ConvertLoop delivery at the end of the Loops outage")
        sandbox_client.configure("loops", fail_all=None)
        outage_end = time.time()

        n = len(events)
        wait_until(lambda: len({email_of("loops", r["body"]) for r in mine(sandbox_client, "loops", tag, 200)}) >= n,
                   timeout=240, interval=0.5, message=f"{n} Loops deliveries after the outage")
        wait_until(lambda: len({email_of("convertloop", r["body"])
                                for r in mine(sandbox_client, "convertloop", tag, 200)}) >= len(cl_events),
                   timeout=300, interval=2, message=f"all {len(cl_events)} ConvertLoop deliveries")
        loops = mine(sandbox_client, "loops", tag)
        during = [r for r in loops if outage_start <= r["ts"] < outage_end]
        after = sorted(r["ts"] for r in loops if r["status"] == 200)
        cl = cl_delivered(sandbox_client, tag)
        cl_before = [t for t in cl if outage_start - 10 <= t < outage_start]
        cl_during = [t for t in cl if outage_start + 5 <= t < outage_end]
        cl_ids = set(cl_events)
        dead = [d for d in DeadLetterStore.default().list() if d.event_id in set(events)]
        cl_dead = [d for d in DeadLetterStore.default().list() if d.event_id in cl_ids]
        log = w.log()
        print(f"\n{n} Loops events ({100} queued at the start of a {OUTAGE:.0f}s outage, one a second during it): "
              f"{len(during)} requests to Loops during the outage (bound {n} + {OUTAGE:.0f}); first delivery "
              f"{after[0] - outage_end:.1f}s after it ended, then {rate(after):.1f}/s (limit 10), "
              f"max {max_in_window(after)} in any 1 s; ConvertLoop {rate(cl_before):.1f}/s before, "
              f"{rate(cl_during):.1f}/s during, all {len(cl_events)} delivered; dead letters {len(dead)}, "
              f"ConvertLoop {len(cl_dead)}")
        assert dead == []
        assert len(during) <= n + OUTAGE, "the breaker did not stop the hammering"
        assert all(r["status"] != 200 for r in during)
        # The breaker opened while Loops was down and closed when it answered again, in that order.
        assert opened_at_mark, "the Loops breaker was not open at the end of the outage"
        opened, closed = log.find("loops: circuit breaker open"), log.find("loops: circuit breaker closed")
        assert 0 <= opened < closed, "the worker log does not say the breaker opened, then closed"
        assert Breaker(redis.Redis.from_url(product_env["REDIS_URL"]), "vdw", 10).poll("loops").state == "closed"
        # The backlog drained under the limit (the sandbox's timestamps: one more tolerated, as test_rate_limits).
        assert max_in_window(after) <= 10 + 1, "the backlog went faster than the limit"
        # The outage did not hold up ConvertLoop: it delivered while the Loops breaker was open (up to the end
        # of the outage), lost nothing and dead-lettered nothing.
        assert [t for t in cl if outage_start <= t < outage_end], "no ConvertLoop delivery during the outage"
        assert [t for t in cl if mark < t < outage_end], "ConvertLoop stalled before the end of the outage"
        assert cl_dead == []
    finally:
        w.stop()
        redis.Redis.from_url(product_env["REDIS_URL"]).delete("convertloop")


def cl_delivered(sandbox_client, tag: str) -> list[float]:
    """Times of the ConvertLoop deliveries of this test, in order."""
    return sorted(r["ts"] for r in mine(sandbox_client, "convertloop", tag, 200))


def test_429s_never_open_the_breaker_nor_use_up_attempts(start_worker, product_env, sandbox_client,
                                                          unique_email):
    """The vendor allows 2/s while our limiter is off: most first tries are 429s. With an attempt cap of 2 and
    a breaker that opens after 3 failures, every event is still delivered and the breaker never opened."""
    tag = unique_email
    w = start_worker("w429", LOOPS_RATE_LIMIT=0, BREAKER_THRESHOLD=3, RETRY_MAX_ATTEMPTS=2,
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
        start_worker, product_env, sandbox_client, unique_email, capsys):
    window = 4.0
    w = start_worker("window", RETRY_WINDOW=window, BREAKER_THRESHOLD=0, RETRY_MAX_ATTEMPTS=0,
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
        # The first failure is the first attempt's answer; the dead letter comes with the last attempt's answer.
        assert sent[0] <= first < sent[1] and sent[-1] <= last
        # Retried until the window was used up, and not past it: every attempt but the last was made (and
        # answered) inside the window, and the dead letter came once it had passed.
        assert sent[-2] < first + window <= last, "retried past the window, or stopped before it"
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
