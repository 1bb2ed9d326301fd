"""The delivery suite's core cases on Celery's gevent pool: ``celery -A worker worker -P gevent -c N``.

Real worker processes on the gevent pool (every task a new greenlet, the standard library monkey-patched),
the private Redis and the sandbox over HTTP, as the rest of the integration suite. One worker of every queue
serves the first tests (the bulkhead and the queue gate at work); the SIGKILL test starts its own. Nothing
here asserts a duration or a rate: each waits for deliveries (or a log line) to happen, and the rate-limit
test checks the vendor's own count of any 1-second window, as ``test_rate_limits.py`` does.
"""

from __future__ import annotations

import os
import signal

import pytest
import redis

import worker
from tests.helpers import UNACKED, breaker_open, email_of, max_in_window, wait_idle
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Greenlets per worker: more than the 16 threads the other suites' workers run.
GREENLETS = 64
GEVENT = ("-P", "gevent", "-c", str(GREENLETS))
#: ConvertLoop's limit in the module's worker (and the sandbox's, strict): the rate-limit test.
RATE = 5
#: The module's worker: breaker opens after 3 failures, probes at most 0.5 s apart, no attempt cap.
WORKER_ENV = {"BREAKER_THRESHOLD": 3, "BREAKER_PROBE_MAX": 0.5, "RETRY_MAX_ATTEMPTS": 0,
              "CONVERTLOOP_RATE_LIMIT": RATE}


@pytest.fixture(scope="module")
def green_worker(worker_factory):
    """One gevent-pool worker consuming every vendor queue."""
    return worker_factory("green", GEVENT, **WORKER_ENV)


@pytest.fixture
def env(product_env, green_worker, sandbox_client):
    return product_env


def mine(sandbox_client, vendor: str, tag: str, status: int | None = None) -> list[dict]:
    return [r for r in sandbox_client.requests(vendor=vendor, status=status) if tag in str(r["body"])]


def test_every_vendor_delivered_on_gevent_and_connections_reused(env, green_worker, sandbox, sandbox_client,
                                                                 unique_email):
    """identify (ConveYour's batched) and track reach all three vendors; the worker runs the gevent pool with its
    bulkhead; and 200 more deliveries reuse the worker's keep-alive connections (each task is a new greenlet: an
    HTTP transport per greenlet would open a connection per delivery)."""
    tag = unique_email
    worker.identify(email=tag, traits={"first_name": "Jill"})
    worker.track("signed_up", email=tag, properties={"plan": "pro"})
    for vendor in ("convertloop", "loops", "conveyour"):
        wait_until(lambda v=vendor: len(mine(sandbox_client, v, tag, 200)) >= 2, timeout=30,
                   message=f"identify and track at {vendor}")
    log = green_worker.log()
    assert f"concurrency: {GREENLETS} (gevent)" in log
    assert f"hold at most {GREENLETS // 2} of the {GREENLETS} threads" in log, "no bulkhead on the gevent pool"
    assert "no event loop (gevent pool)" in log

    before = sandbox.connections_accepted
    for i in range(200):
        worker.track("page", email=f"many{i}-{tag}", vendors=["loops"])
    wait_until(lambda: len(mine(sandbox_client, "loops", f"-{tag}", 200)) >= 200, timeout=60,
               message="200 Loops deliveries")
    opened = sandbox.connections_accepted - before
    print(f"\n200 deliveries opened {opened} connections to the sandbox")
    assert opened < GREENLETS // 2 + 10, f"{opened} connections for 200 deliveries: not reused"


def test_a_failed_attempt_waits_in_redis_and_is_delivered(env, green_worker, sandbox_client, unique_email):
    """A 503 puts the delivery on the retry schedule; the worker's ticker (a greenlet here) moves it back."""
    sandbox_client.configure("conveyour", fail_next=[503, 503])
    worker.track("sale", email=unique_email, vendors=["conveyour"])
    wait_until(lambda: mine(sandbox_client, "conveyour", unique_email, 200), timeout=30, message="the retry")
    assert [r["status"] for r in mine(sandbox_client, "conveyour", unique_email)] == [503, 503, 200]
    assert "conveyour: 1 retries due, back on the queue" in green_worker.log()


def test_breaker_opens_holds_the_queue_and_closes(env, green_worker, sandbox_client, unique_email):
    """Loops answers 503: the breaker opens, the worker stops taking Loops' queue; once Loops answers again a
    probe closes it and every event is delivered, none dead-lettered."""
    tag = unique_email
    sandbox_client.configure("loops", fail_all=503)
    events = [worker.track("sale", email=f"b{i}-{tag}", vendors=["loops"]) for i in range(8)]
    wait_until(lambda: breaker_open("loops"), timeout=30, message="the Loops breaker to open")
    wait_until(lambda: "stopped taking messages from loops" in green_worker.log(), timeout=30,
               message="the worker to stop taking Loops' queue")
    sandbox_client.configure("loops", fail_all=None)
    wait_until(lambda: len({email_of("loops", r["body"]) for r in mine(sandbox_client, "loops", tag, 200)}) == 8,
               timeout=60, message="8 Loops deliveries after the outage")
    log = green_worker.log()
    assert 0 <= log.find("loops: circuit breaker open") < log.find("loops: circuit breaker closed")
    assert "taking messages from loops again" in log
    assert not breaker_open("loops")
    assert [d for d in DeadLetterStore.default().list() if d.event_id in set(events)] == []


def test_rate_limit_holds_at_the_vendor(env, green_worker, sandbox_client, unique_email):
    """30 events to ConvertLoop under a limit of 5/s (the sandbox's strict sliding window too): 64 greenlets, at
    most 8 of them waiting for a token, the rest put back and the queue paused by the gate. The vendor never
    answers 429 and never sees more than the limit in a second (one more tolerated, as test_rate_limits)."""
    n, tag = 30, unique_email
    sandbox_client.configure("convertloop", rate_limit=RATE)
    for i in range(n):
        worker.track("page", email=f"r{i}-{tag}", vendors=["convertloop"])
    wait_until(lambda: len(mine(sandbox_client, "convertloop", tag, 200)) == n, timeout=60,
               message=f"{n} ConvertLoop deliveries")
    got = mine(sandbox_client, "convertloop", tag)
    times = [r["ts"] for r in got]
    print(f"\n{n} requests, max {max_in_window(times)} in any 1 s window (limit {RATE})")
    arrivals = [(round(r["ts"] - times[0], 3), r["status"]) for r in got]  # on failure: what the vendor saw, when
    assert [r["status"] for r in got].count(429) == 0, f"the sandbox saw the limit exceeded: {arrivals}"
    assert len(got) == n, arrivals
    assert max_in_window(times) <= RATE + 1, arrivals
    log = green_worker.log()  # put back by dozens of greenlets at once: each through a broker connection
    for bad in ("Traceback", "Too many connections"):
        at = log.find(bad)
        assert at < 0, f"{bad!r} in the worker's log: {log[max(0, at - 1500):at + 2500]}"


def test_sigkill_of_a_gevent_worker_loses_nothing(start_worker, product_env, sandbox_client, unique_email):
    """A gevent worker SIGKILLed while it holds deliveries (Loops answering after 3 s): another gevent worker
    restores what it held after the visibility timeout (its restore runs on a timer: no event loop), delivers
    every event and ends holding nothing; none is dead-lettered. (Requests the dead worker had sent may have
    reached the sandbox: the proof of the restore is kombu's record of held messages, emptied.)

    Half the events are queued after the kill: the sandbox records a request when it arrives, and the doomed
    worker sends all it holds at once, so with every event queued first all of them had arrived by the kill
    now and then (a CI run), and the check that the rescuer had deliveries left to make failed by chance."""
    for w in start_worker.started:  # the module's worker, if it runs, would take these messages too
        w.stop()
    tag, r = unique_email, redis.Redis.from_url(product_env["REDIS_URL"])
    short = {"BROKER_VISIBILITY_TIMEOUT": 4, "RETRY_MAX_ATTEMPTS": 0}
    doomed = start_worker("green-doomed", ("-Q", "loops", *GEVENT), **short)
    sandbox_client.configure("loops", latency_ms=3000)  # held 3 s after its request arrived: killed holding it
    n, before = 40, 20
    events = [worker.track("sale", email=f"k{i}-{tag}", vendors=["loops"]) for i in range(before)]

    def delivered() -> set[str]:
        return {email_of("loops", x["body"]) for x in mine(sandbox_client, "loops", tag) if x["status"] in (200, 409)}

    # In flight: requests arrived at the sandbox (answered only 3 s later) while the worker holds their messages.
    # Not "answered": all 20 are answered at once and acknowledged within milliseconds, so a poll for answered
    # requests and held messages at the same moment missed it in 2 of 3 runs on a fast machine.
    wait_until(lambda: len(mine(sandbox_client, "loops", tag)) >= 10 and r.hlen(UNACKED) >= 10, timeout=30,
               interval=0.02, message="deliveries in flight")
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(10)
    events += [worker.track("sale", email=f"k{i}-{tag}", vendors=["loops"]) for i in range(before, n)]
    assert r.hlen(UNACKED) > 0 and len(delivered()) < n, "the worker held nothing: the test proves nothing"
    sandbox_client.configure("loops", latency_ms=0)
    rescuer = start_worker("green-rescuer", ("-Q", "loops", *GEVENT), **short)
    wait_until(lambda: delivered() == {f"k{i}-{tag}" for i in range(n)}, timeout=60, interval=0.2,
               message=f"all {n} delivered")
    wait_idle(product_env["REDIS_URL"], timeout=60, queues=("loops",))  # every held message restored and acked
    assert "no event loop (gevent pool): unacknowledged messages restored every 1s" in rescuer.log()
    assert [d for d in DeadLetterStore.default().list() if d.event_id in set(events)] == []
